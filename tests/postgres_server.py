"""A real PostgreSQL server for the tests: Debian's ``initdb`` and ``pg_ctl`` on a free loopback port in a temporary
folder, torn down afterwards.

PostgreSQL refuses to run as root, so under root (CI) the cluster belongs to an unprivileged system user (``postgres``
from Debian's package, else ``nobody``) and its commands run through ``runuser``. The cluster asks for passwords on TCP
(scram-sha-256), so a wrong password is refused as it would be in production; fsync is off because nothing here
survives the test run.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

from tests.ports import free_port

ADMIN, ADMIN_PASSWORD = "admin", "admin-secret-1"
USER, PASSWORD = "streamchat", "s3cret:pass@word/%"  # URL-special characters: the URL must escape them


def _bin_dir() -> Path | None:
    """The folder holding initdb, pg_ctl and postgres (Debian keeps them under /usr/lib/postgresql/N/bin)."""
    found = shutil.which("initdb")
    if found and Path(found).resolve().with_name("postgres").exists():
        return Path(found).resolve().parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"), key=lambda p: int(p.split("/")[4]))
    return Path(versions[-1]).parent if versions else None


def missing() -> str | None:
    """Why no cluster can be started here, or None."""
    if _bin_dir() is None:
        return "PostgreSQL's server binaries are not installed (apt-get install postgresql; .ci/run does)"
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg is not installed (pip install 'streamchat[postgres]')"
    return None


def _owner() -> str | None:
    """The unprivileged user that runs the cluster when we are root; None when we are not root."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    raise RuntimeError("no unprivileged user (postgres, nobody) to run PostgreSQL as")


class PostgresCluster:
    """One cluster: ``start()``, then ``create_database()`` per test (owned by the unprivileged role ``USER``), and
    ``stop()`` removes everything."""

    def __init__(self) -> None:
        self.bin = _bin_dir()
        self.owner = _owner()
        self.root = Path(tempfile.mkdtemp(prefix="streamchat-pg-"))
        self.port = free_port()
        self._databases = 0

    def _run(self, *argv: str) -> None:
        command = [str(self.bin / argv[0]), *argv[1:]]
        if self.owner:
            command = ["runuser", "-u", self.owner, "--", *command]
        run = subprocess.run(command, capture_output=True, text=True, timeout=120)
        if run.returncode != 0:
            log = self.root / "server.log"
            raise RuntimeError(f"{argv[0]} failed: {run.stderr.strip()} {log.read_text() if log.exists() else ''}")

    def start(self) -> PostgresCluster:
        pwfile = self.root / "pwfile"
        pwfile.write_text(ADMIN_PASSWORD + "\n")
        if self.owner:
            account = pwd.getpwnam(self.owner)
            os.chown(self.root, account.pw_uid, account.pw_gid)
            os.chown(pwfile, account.pw_uid, account.pw_gid)
        self._run("initdb", "-D", str(self.root / "data"), "-U", ADMIN, f"--pwfile={pwfile}", "-E", "UTF8",
                  "--locale=C.UTF-8", "--auth-local=trust", "--auth-host=scram-sha-256", "--no-sync")
        self._run("pg_ctl", "-D", str(self.root / "data"), "-l", str(self.root / "server.log"), "-w", "-t", "60", "-o",
                  f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off "
                  "-c synchronous_commit=off -c full_page_writes=off", "start")
        self.admin(f"CREATE ROLE {USER} LOGIN PASSWORD '{PASSWORD}'")
        return self

    def stop(self) -> None:
        try:
            if (self.root / "data" / "postmaster.pid").exists():
                self._run("pg_ctl", "-D", str(self.root / "data"), "-m", "fast", "-w", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def admin(self, statement: str, database: str = "postgres") -> list[tuple]:
        """Run one statement as the cluster's superuser (autocommit: CREATE DATABASE needs it)."""
        import psycopg

        with psycopg.connect(host="127.0.0.1", port=self.port, user=ADMIN, password=ADMIN_PASSWORD, dbname=database,
                             autocommit=True) as conn:
            cur = conn.execute(statement)
            return cur.fetchall() if cur.description else []

    def url(self, database: str, user: str = USER, password: str = PASSWORD) -> str:
        from urllib.parse import quote

        return f"postgresql://{quote(user, safe='')}:{quote(password, safe='')}@127.0.0.1:{self.port}/{database}"

    def create_database(self) -> str:
        """A new empty database owned by ``USER``; its URL."""
        self._databases += 1
        name = f"history_{self._databases}"
        self.admin(f"CREATE DATABASE {name} OWNER {USER}")
        return self.url(name)

    def drop_database(self, url: str) -> None:
        self.admin(f"DROP DATABASE IF EXISTS {url.rsplit('/', 1)[1]} WITH (FORCE)")
