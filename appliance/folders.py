"""Where StreamChat keeps its files: config, data and cache folders (standard library only).

Locations, most specific first:
- ``STREAMCHAT_PORTABLE=DIR`` or a ``portable.txt`` beside the frozen app: all three live in that folder (USB-stick
  field deployments);
- ``STREAMCHAT_CONFIG_DIR`` / ``STREAMCHAT_DATA_DIR`` / ``STREAMCHAT_CACHE_DIR`` override one folder each;
- the ``data_dir`` setting moves the data folder;
- otherwise appdirs' user config, data and cache folders.

This module imports nothing heavy, so the crash log can find its folder even when numpy could not be loaded.
"""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path
from typing import Any

APP = "streamchat"


def portable_root() -> Path | None:
    env = os.environ.get("STREAMCHAT_PORTABLE")
    if env:
        return Path(env)
    if getattr(sys, "frozen", False):
        beside = Path(sys.executable).resolve().parent
        if (beside / "portable.txt").exists():
            return beside
    return None


def _folder(env: str, portable: str, appdirs_function: str) -> Path:
    if os.environ.get(env):
        return Path(os.environ[env])
    root = portable_root()
    if root is not None:
        return root / portable
    import appdirs

    return Path(getattr(appdirs, appdirs_function)(APP, appauthor=False))


def config_dir() -> Path:
    return _folder("STREAMCHAT_CONFIG_DIR", "config", "user_config_dir")


def data_dir(settings: Any = None) -> Path:
    """``settings``: an ``appliance.settings.Settings`` whose ``data_dir`` moves the folder when set."""
    if not os.environ.get("STREAMCHAT_DATA_DIR") and settings is not None and settings.data_dir:
        return Path(settings.data_dir).expanduser()
    return _folder("STREAMCHAT_DATA_DIR", "data", "user_data_dir")


def why_not_writable(path: Path) -> str | None:
    """Why a new file may not be put at ``path`` (a missing folder; something there that is not a regular file, judged
    without following a symlink: replacing a FIFO, a device or a link is never what an ``--out`` meant), or None."""
    if not path.parent.is_dir():
        return f"cannot write {path}: the folder {path.parent} does not exist"
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return None
    except OSError as exc:
        return f"cannot write {path}: {exc.strerror or exc}"
    if not stat.S_ISREG(mode):
        return f"{path} is not a regular file (a folder, symlink, pipe or device); choose another name"
    return None


class Refused(Exception):
    """``read_small_file`` did not read a file: ``reason`` says why ("not a regular file", or its size over the cap)."""

    def __init__(self, reason: str, size: int | None = None) -> None:
        super().__init__(reason)
        self.reason, self.size = reason, size


def read_small_file(path: Path, limit: int) -> bytes:
    """The bytes of a file that must be small (a manifest, a config, an import), read only if it is a regular file of
    at most ``limit`` bytes, checked on the open file: a device such as /dev/zero would be read until memory runs out,
    opening a FIFO would wait for a writer forever. Raises Refused, or OSError when the file cannot be read."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO opens at once instead of waiting for a writer
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise Refused("not a regular file")
        if info.st_size > limit:
            raise Refused("too big", info.st_size)
        with open(fd, "rb", closefd=False) as fh:
            data = fh.read(limit + 1)  # one byte over the cap shows a file that grew since fstat
        if len(data) > limit:
            raise Refused("too big", os.fstat(fd).st_size)
        return data
    finally:
        os.close(fd)


def read_small_text(path: Path, limit: int, what: str) -> str:
    """``read_small_file`` as UTF-8 text, its refusals as one line naming ``what`` the file is ("token file")."""
    from appliance.errors import StreamChatError

    try:
        return read_small_file(path, limit).decode("utf-8")
    except Refused as exc:
        problem = exc.reason if exc.size is None else f"{exc.size} bytes, more than the {limit} allowed"
        raise StreamChatError(f"cannot read {what} {path}: {problem}") from exc
    except OSError as exc:
        raise StreamChatError(f"cannot read {what} {path}: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise StreamChatError(f"{what} {path} is not UTF-8 text") from exc


def cache_dir() -> Path:
    """Verification results, converted models and crash logs: anything that can be rebuilt or thrown away."""
    return _folder("STREAMCHAT_CACHE_DIR", "cache", "user_cache_dir")
