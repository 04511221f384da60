"""``tools/bootstrap.sh`` (the README's setup step) installs once and then only when something it depends on changed,
without setuptools' deprecation boxes: its runs are checked with a stand-in ``.venv/bin/python`` that records what it
is asked to do, so the test needs neither the network nor minutes of pip."""

import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FAKE_PYTHON = """#!/bin/sh
echo "$@" >> "$(dirname "$0")/../calls"
case "$1" in -VV) echo "Python 3.11.0 (stand-in)";; esac
if [ "$3" = install ] && [ "$6" = -e ]; then touch "$(dirname "$0")/streamchat"; chmod +x "$(dirname "$0")/streamchat"; fi
"""


def _checkout(tmp_path: Path) -> Path:
    root = tmp_path / "checkout"
    for name in ("tools/bootstrap.sh", "pyproject.toml", "setup.py", "appliance/kernels/prompt_kernels.c"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, root / name)
    python = root / ".venv/bin/python"
    python.parent.mkdir(parents=True)
    python.write_text(FAKE_PYTHON)
    python.chmod(python.stat().st_mode | stat.S_IXUSR)
    return root


def _bootstrap(root: Path) -> tuple[str, list[str]]:
    env = {k: v for k, v in os.environ.items() if k not in ("BOOTSTRAP_FORCE", "STREAMCHAT_EXTRAS")}
    run = subprocess.run(["bash", "tools/bootstrap.sh"], cwd=root, env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    calls = (root / ".venv/calls").read_text().splitlines()
    (root / ".venv/calls").unlink()
    return run.stdout, [c for c in calls if " install " in f" {c} "]


def test_a_second_bootstrap_installs_nothing_and_a_change_installs_again(tmp_path):
    root = _checkout(tmp_path)
    out, installs = _bootstrap(root)
    assert "bootstrap: installing streamchat[dev]" in out and any("-e .[dev]" in c for c in installs)
    out, installs = _bootstrap(root)
    assert out == "bootstrap: ready, nothing changed since the last install (.venv/bin/streamchat; " \
                  "BOOTSTRAP_FORCE=1 reinstalls)\n" and installs == []
    with open(root / "setup.py", "a") as f:
        f.write("\n# changed\n")
    out, installs = _bootstrap(root)
    assert "bootstrap: installing" in out and installs


def test_the_license_is_an_spdx_string_not_the_deprecated_table():
    """setuptools >= 77 prints a deprecation box on every install for ``license = {text = ...}``."""
    text = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'^license = "[A-Za-z0-9.-]+"$', text, re.MULTILINE)
    assert int(re.search(r'^requires = \["setuptools>=(\d+)"\]', text, re.MULTILINE).group(1)) >= 77
