"""The MindSpore test modules' common start: MindSpore imported, or the whole module skipped with the reason printed
(CI's log shows why a file did not run)."""

from __future__ import annotations

from types import ModuleType

import pytest


def require_mindspore(what: str) -> ModuleType:
    """``import mindspore``, or skip the calling test module; ``what`` names its tests in the printed line."""
    try:
        import mindspore
    except ImportError as exc:
        print(f"{what} skipped: mindspore is not importable ({exc}); pip install 'streamchat[mindspore]'")
        pytest.skip(f"mindspore is not importable ({exc})", allow_module_level=True)
    return mindspore
