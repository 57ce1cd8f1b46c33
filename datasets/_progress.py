"""A progress bar for the converters (rich, on stderr), or nothing when disabled."""

from __future__ import annotations

from typing import Callable


class Progress:
    """``task(description, total)`` returns an ``advance(k)`` callable; ``close()`` stops the display."""

    def __init__(self, enabled: bool):
        self._p = None
        if enabled:
            from rich.console import Console
            from rich.progress import BarColumn, TextColumn, TimeRemainingColumn
            from rich.progress import Progress as RichProgress

            self._p = RichProgress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[amount]}"),
                                   TimeRemainingColumn(), console=Console(stderr=True))
            self._p.start()

    def task(self, description: str, total: float, *, unit: str = "") -> Callable[[float], None]:
        if self._p is None:
            return lambda k=1: None
        p = self._p
        tid = p.add_task(description, total=total, amount="")
        done = [0.0]

        def advance(k: float = 1) -> None:
            done[0] += k
            amount = (f"{done[0] / 2**20:,.0f}/{total / 2**20:,.0f} MiB" if unit == "bytes"
                      else f"{int(done[0])}/{int(total)}")
            p.update(tid, completed=done[0], amount=amount)

        return advance

    def close(self) -> None:
        if self._p is not None:
            self._p.stop()
            self._p = None
