"""The window on a real X display (Xvfb, Qt's xcb platform, not offscreen), the one line it prints where no window can
open (instead of Qt's abort), and the screenshot tool, which must exit once its images are written."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("PySide6")

from ui.platform_check import NO_DISPLAY, XCB_LIBRARIES, checked_display, missing_libraries, why_no_window  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DISPLAY_VARIABLES = ("DISPLAY", "WAYLAND_DISPLAY", "QT_QPA_PLATFORM", "XDG_RUNTIME_DIR")


def _env(tmp_path: Path, **extra: str) -> dict:
    """The environment without any display, with throwaway folders, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in DISPLAY_VARIABLES}
    for name in ("CONFIG", "DATA", "CACHE"):
        env[f"STREAMCHAT_{name}_DIR"] = str(tmp_path / name.lower())
    return {**env, **extra}


def _run(args: list[str], env: dict, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the display checks are for Linux")
def test_without_a_display_the_window_says_so_in_one_line_and_exits_2(tmp_path):
    run = _run(["-m", "streamchat", "gui", "--demo"], _env(tmp_path), timeout=60)
    assert (run.returncode, run.stderr) == (2, f"error: {NO_DISPLAY}\n")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the display checks are for Linux")
def test_a_display_that_does_not_answer_is_one_line_and_exit_2(tmp_path):
    display = next(f":{n}" for n in range(97, 200) if not Path(f"/tmp/.X11-unix/X{n}").exists())
    run = _run(["-m", "streamchat", "gui", "--demo"], _env(tmp_path, DISPLAY=display, QT_QPA_PLATFORM="xcb"),
               timeout=60)
    assert run.returncode == 2 and run.stderr.count("\n") == 1, run.stderr
    assert run.stderr.startswith(f"error: the X display {display} does not answer") or \
        run.stderr.startswith(f"error: the window cannot open on the X display {display}: these system libraries")


def test_platform_check_follows_qt_qpa_platform(tmp_path):
    assert why_no_window({"QT_QPA_PLATFORM": "offscreen"}) is None
    assert why_no_window({"QT_QPA_PLATFORM": "minimal:enable_fonts"}) is None
    if sys.platform.startswith("linux"):
        assert why_no_window({}) == NO_DISPLAY
        assert why_no_window({"QT_QPA_PLATFORM": "wayland", "XDG_RUNTIME_DIR": str(tmp_path)}) == NO_DISPLAY
        (tmp_path / "wayland-1").touch()  # a compositor's socket
        assert why_no_window({"WAYLAND_DISPLAY": "wayland-1", "XDG_RUNTIME_DIR": str(tmp_path)}) is None
        assert why_no_window({"QT_QPA_PLATFORM": "wayland;offscreen"}) is None  # the fallback Qt would take
        assert missing_libraries({"libc.so.6": "libc6", "libstreamchat-absent.so.0": "streamchat-absent"}) == \
            {"libstreamchat-absent.so.0": "streamchat-absent"}


def test_the_install_lists_name_every_library_the_xcb_plugin_loads():
    """The .deb depends on the packages the start-up check names; the README, docs/install.md and CI install them."""
    packages = set(XCB_LIBRARIES.values())
    for listing in ("README.md", "docs/install.md", ".ci/run"):
        words = set(re.findall(r"[a-z0-9][a-z0-9.+-]+", (REPO / listing).read_text(encoding="utf-8")))  # package names
        assert packages - words == set(), listing
    assert "from ui.platform_check import XCB_LIBRARIES" in (REPO / "installers" / "build_deb.sh").read_text()
    assert "xvfb" in re.findall(r"[a-z0-9-]+", (REPO / ".ci" / "run").read_text())


def _assert_screenshots(run: subprocess.CompletedProcess, out: Path, platform: str) -> None:
    from PySide6.QtGui import QImage

    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.splitlines()[0] == f"platform {platform}"
    for name in ("screenshot-chat.png", "screenshot-kiosk.png"):
        image = QImage(str(out / name))
        assert image.width() >= 640 and image.height() >= 480, name
        colours = {image.pixel(x, y) for x in range(0, image.width(), 7) for y in range(0, image.height(), 7)}
        assert len(colours) > 20, f"{name} is nearly blank"  # text was drawn: antialiasing makes many shades


def test_the_screenshot_tool_writes_both_images_and_exits(tmp_path):
    """Its kiosk window refuses to close, so Qt 6's quit() (which closes the windows first) never ended the tool."""
    out = tmp_path / "shots"
    out.mkdir()
    run = _run(["tools/screenshots.py", "--out", str(out)], _env(tmp_path, QT_QPA_PLATFORM="offscreen"), timeout=150)
    _assert_screenshots(run, out, "offscreen")


def test_ready_exit_leaves_a_kiosk_window_and_fails_with_a_failed_load(tmp_path):
    """The installer's cold-start check (--ready-exit) ends also in kiosk mode, whose window refuses to close, and a
    model that does not load is its error line and status 1."""
    env = _env(tmp_path, QT_QPA_PLATFORM="offscreen")
    kiosk = _run(["-m", "streamchat", "gui", "--demo", "--kiosk", "--ready-exit"], env, timeout=120)
    assert kiosk.returncode == 0 and kiosk.stdout.startswith("window ready with DEMO"), kiosk.stderr
    missing = tmp_path / "missing"
    failed = _run(["-m", "streamchat", "gui", "--bundle", str(missing), "--ready-exit"], env, timeout=120)
    assert (failed.returncode, failed.stdout) == (1, "")
    assert failed.stderr.splitlines()[-1].startswith(f"error: bundle not found: {missing} (no such folder): give the ")


def _start_xvfb(*options: str) -> tuple[subprocess.Popen, str]:
    """An Xvfb of its own: it picks a free display number and writes it to a pipe (-displayfd) once it answers."""
    if not shutil.which("Xvfb"):
        pytest.skip("Xvfb is not installed (Debian: apt-get install xvfb)")
    read, write = os.pipe()
    server = subprocess.Popen(["Xvfb", "-displayfd", str(write), "-screen", "0", "1280x800x24", "-nolisten", "tcp",
                               *options], pass_fds=(write,), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.close(write)
    with os.fdopen(read) as pipe:
        number = pipe.readline().strip()
    assert number, "Xvfb did not start"
    return server, f":{number}"


@pytest.fixture
def xvfb():
    """A display like a desktop session's: another client (the display check's connection, held as a window
    manager's would be) stays connected, so the server does not reset between the test's programs."""
    server, display = _start_xvfb()
    with checked_display({"DISPLAY": display, "QT_QPA_PLATFORM": "xcb"}) as problem:
        assert problem is None, problem
        yield display
    server.terminate()
    server.wait(10)


def test_the_window_on_a_real_x_display(xvfb, tmp_path):
    """The desktop path a user takes on X11, under Xvfb with the xcb platform: the window opens (on a missing library
    the check names it, and this test fails with that line), answers, is pictured, and quits."""
    env = _env(tmp_path, DISPLAY=xvfb, QT_QPA_PLATFORM="xcb")
    started = _run(["-m", "streamchat", "gui", "--demo", "--ready-exit"], env)
    assert started.returncode == 0, started.stderr
    assert started.stdout.startswith("window ready with DEMO")
    out = tmp_path / "shots"
    out.mkdir()
    _assert_screenshots(_run(["tools/screenshots.py", "--out", str(out)], env, timeout=150), out, "xcb")


def test_the_window_opens_on_an_x_server_it_is_the_only_client_of(tmp_path):
    """Xvfb, or an X server started with the app as its only client: the server resets when its last client leaves,
    and refuses connections while it does. The display check's connection must stay open until Qt has its own, or Qt
    aborts with "could not connect to display". Xvfb -terminate makes that reset an exit, so a check that let go first
    fails here every time."""
    server, display = _start_xvfb("-terminate")
    try:
        started = _run(["-m", "streamchat", "gui", "--demo", "--ready-exit"],
                       _env(tmp_path, DISPLAY=display, QT_QPA_PLATFORM="xcb"))
        assert started.returncode == 0, started.stderr
        assert started.stdout.startswith("window ready with DEMO")
        assert server.wait(10) == 0  # the window was its last client: -terminate ended it when the app left
    finally:
        server.kill()
        server.wait(10)
