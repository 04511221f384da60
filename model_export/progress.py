"""Progress bars for long export stages (tqdm on stderr), silent when asked."""

from __future__ import annotations

import sys
from contextlib import contextmanager


class Progress:
    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled

    @contextmanager
    def stage(self, description: str, total: int, unit: str = "it"):
        """Yield a function that advances the bar by n."""
        if not self.enabled:
            yield lambda n=1: None
            return
        from tqdm import tqdm

        bar = tqdm(total=total, desc=description, unit=unit, unit_scale=unit == "B", file=sys.stderr,
                   dynamic_ncols=True, leave=True)
        try:
            yield bar.update
        finally:
            bar.close()

    def note(self, message: str) -> None:
        if self.enabled:
            print(message, file=sys.stderr, flush=True)
