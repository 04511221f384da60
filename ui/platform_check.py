"""Whether Qt can open a window here, said in one line before ``QApplication`` is created.

Qt ends the process with an abort (exit 134) when its platform plugin cannot start: no display at all, a display that
does not answer, or a system library of the xcb plugin that is missing (Qt 6.5+ needs ``libxcb-cursor0``, and Debian's
desktop installs often lack ``libxcb-icccm4`` and ``libxcb-keysyms1``). A desktop user would see nothing, a terminal
user a wall of plugin text, a kiosk unit a crash loop. ``checked_display`` (and ``why_no_window``, the same answer) finds
these cases first, the way Qt would meet them, so the launcher can print what to do and exit with status 2.

An X server whose last client disconnects resets, and refuses connections while it does (Xvfb, or an X server
started with the app as its only client): a check that connected and left would make Qt's own connection fail. The
launcher therefore creates its ``QApplication`` inside ``checked_display``, which keeps the check's connection open
until then.
"""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from pathlib import Path

# The libraries Qt's xcb platform plugin (libqxcb.so, libQt6XcbQpa.so.6) loads, and the Debian package of each: the
# .deb's Depends, docs/install.md, the README and .ci/run list the same packages.
XCB_LIBRARIES = {
    "libxcb.so.1": "libxcb1",
    "libX11.so.6": "libx11-6",
    "libX11-xcb.so.1": "libx11-xcb1",
    "libxcb-cursor.so.0": "libxcb-cursor0",
    "libxcb-icccm.so.4": "libxcb-icccm4",
    "libxcb-image.so.0": "libxcb-image0",
    "libxcb-keysyms.so.1": "libxcb-keysyms1",
    "libxcb-randr.so.0": "libxcb-randr0",
    "libxcb-render.so.0": "libxcb-render0",
    "libxcb-render-util.so.0": "libxcb-render-util0",
    "libxcb-shape.so.0": "libxcb-shape0",
    "libxcb-shm.so.0": "libxcb-shm0",
    "libxcb-sync.so.1": "libxcb-sync1",
    "libxcb-util.so.1": "libxcb-util1",
    "libxcb-xfixes.so.0": "libxcb-xfixes0",
    "libxcb-xkb.so.1": "libxcb-xkb1",
    "libxkbcommon.so.0": "libxkbcommon0",
    "libxkbcommon-x11.so.0": "libxkbcommon-x11-0",
}
# Platforms that draw without a display server (or on one Qt does not need to find): nothing to check.
NO_SERVER = ("offscreen", "minimal", "minimalegl", "linuxfb", "eglfs", "vnc", "vkkhrdisplay")
NO_DISPLAY = ("no display to open the window on (neither DISPLAY nor WAYLAND_DISPLAY is set): start StreamChat from a "
              "desktop session, or chat in a terminal with `streamchat chat --demo`")


def why_no_window(environ: Mapping[str, str] | None = None) -> str | None:
    """None when Qt can open a window with the platform it will choose; else one line saying why not and what to do."""
    with checked_display(environ) as problem:
        return problem


@contextmanager
def checked_display(environ: Mapping[str, str] | None = None) -> Iterator[str | None]:
    """``why_no_window``'s answer, with the X connection the check made (if any) held open until the block ends.

    Only Linux is checked (elsewhere Qt's platform is the system's own). ``QT_QPA_PLATFORM`` is followed as Qt reads
    it: a ``;``-separated list tried in order, each name possibly followed by ``:options``; unset, a Wayland
    compositor's socket is taken to be used and xcb otherwise.
    """
    env = os.environ if environ is None else environ
    with ExitStack() as held:
        yield _problem(env, held) if sys.platform.startswith("linux") else None


def _problem(env: Mapping[str, str], held: ExitStack) -> str | None:
    names = [entry.split(":")[0] for entry in env.get("QT_QPA_PLATFORM", "").split(";") if entry.strip()]
    if not names:
        names = ["wayland", "xcb"]
    problems = []
    for name in names:
        if name in NO_SERVER:
            return None
        if name.startswith("wayland"):
            if _wayland_socket(env):
                return None
            problems.append(NO_DISPLAY)
        elif name == "xcb":
            problem = _xcb_problem(env, held)
            if problem is None:
                return None
            problems.append(problem)
        else:
            return None  # a platform this check does not know: Qt says for itself whether it starts
    return problems[-1] if problems else None


def _wayland_socket(env: Mapping[str, str]) -> bool:
    """Whether the compositor socket libwayland would connect to exists (``WAYLAND_DISPLAY``, default wayland-0,
    relative to ``XDG_RUNTIME_DIR``)."""
    name = Path(env.get("WAYLAND_DISPLAY") or "wayland-0")
    if not name.is_absolute():
        if not env.get("XDG_RUNTIME_DIR"):
            return False
        name = Path(env["XDG_RUNTIME_DIR"]) / name
    return name.exists()


def _xcb_problem(env: Mapping[str, str], held: ExitStack) -> str | None:
    display = env.get("DISPLAY", "")
    if not display:
        return NO_DISPLAY
    problem = _xcb_plugin_problem()
    if problem is not None:
        return f"the window cannot open on the X display {display}: {problem}"
    if not _x_server_answers(display, held):
        return (f"the X display {display} does not answer (is the X server running, and may this user use it? "
                "see DISPLAY and XAUTHORITY)")
    return None


def _xcb_plugin_problem() -> str | None:
    """Load Qt's xcb plugin as Qt would (its own file, so its own library search path); when that fails, name the
    missing libraries of ``XCB_LIBRARIES`` and their packages, or else the loader's message."""
    from PySide6.QtCore import QLibraryInfo

    plugin = Path(QLibraryInfo.path(QLibraryInfo.LibraryPath.PluginsPath)) / "platforms" / "libqxcb.so"
    if not plugin.is_file():
        return None  # a Qt without the plugin: Qt says so itself
    try:
        ctypes.CDLL(str(plugin))
        return None
    except OSError as exc:
        missing = missing_libraries(XCB_LIBRARIES)
        if not missing:
            return f"Qt's xcb plugin does not load ({exc})"
        return (f"these system libraries are missing: {', '.join(missing)} "
                f"(Debian/Ubuntu: sudo apt install {' '.join(sorted(set(missing.values())))})")


def missing_libraries(packages: Mapping[str, str]) -> dict[str, str]:
    """The entries of ``packages`` (soname -> Debian package) whose library the dynamic loader cannot load."""
    missing = {}
    for soname, package in packages.items():
        try:
            ctypes.CDLL(soname)
        except OSError:
            missing[soname] = package
    return missing


def _x_server_answers(display: str, held: ExitStack) -> bool:
    """Connect to ``display`` with libxcb, as Qt's xcb plugin does (same DISPLAY and XAUTHORITY rules); the
    connection (or the error object of one that failed) is closed when ``held`` is."""
    try:
        xcb = ctypes.CDLL("libxcb.so.1")
    except OSError:  # only where Qt has no xcb plugin to check (the plugin needs libxcb): Qt says what is missing
        return True
    xcb.xcb_connect.restype = ctypes.c_void_p
    xcb.xcb_connect.argtypes = [ctypes.c_char_p, ctypes.POINTER(ctypes.c_int)]
    xcb.xcb_connection_has_error.argtypes = [ctypes.c_void_p]
    xcb.xcb_disconnect.argtypes = [ctypes.c_void_p]
    connection = xcb.xcb_connect(display.encode(), None)  # never NULL: a failed connection is an error object
    held.callback(xcb.xcb_disconnect, connection)
    return xcb.xcb_connection_has_error(connection) == 0
