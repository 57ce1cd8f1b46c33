"""Progress reporting: a rich progress bar on a terminal, plain lines with an ETA otherwise, nothing when quiet."""

from __future__ import annotations

import sys

from .pace import Pace, duration


class Reporter:
    """What a command prints while it works (stderr): lines, and one progress bar at a time."""

    def __init__(self, quiet: bool = False):
        self.quiet = quiet
        self.tty = sys.stderr.isatty() and not quiet
        self._progress = None
        self._task = None

    def line(self, msg: str) -> None:
        if not self.quiet:
            print(msg, file=sys.stderr, flush=True)

    def start(self, label: str, total: int, done: int = 0) -> None:
        self._label, self._total, self._last = label, total, -1
        self._pace = Pace()
        self._pace.start(done)
        if self.tty:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                      TextColumn("{task.fields[info]}"), TimeRemainingColumn(), transient=False)
            self._progress.start()
            self._task = self._progress.add_task(label, total=total, completed=done, info="")

    def update(self, done: int, info: str = "", every: int = 1) -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=done, info=info)
        elif not self.quiet and (done == self._total or done % max(1, every) == 0) and done != self._last:
            self._last = done
            eta = self._pace.eta(done, self._total) if done < self._total else None
            tail = f" eta {duration(eta)}" if eta is not None else ""
            print(f"{self._label} {done}/{self._total} {info}".rstrip() + tail, file=sys.stderr, flush=True)

    def stop(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
