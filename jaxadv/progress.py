"""A sweep's progress bar: images done, images per second, the time left and the success share so far."""
from __future__ import annotations

import sys

from tqdm import tqdm


class SweepProgress:
    """tqdm's bar on stderr (images done, rate, ETA) with the success share so far as its postfix.

    Chunks found finished (resumed) count as done but not in the rate: the bar starts at them
    (tqdm's `initial`) and `smoothing=0` makes the rate this run's images over this run's time.
    A chunk takes seconds to minutes, so every chunk is shown (`mininterval=0`, `miniters=1`).
    """

    def __init__(self, total: int, description: str, enabled: bool):
        self.total, self.description, self.enabled = total, description, enabled
        self.done = self.successes = self.success_rows = 0
        self.bar = None

    def resumed(self, rows, successes):
        self._count(rows, successes)
        if self.bar is not None:        # saved by another process meanwhile: done, but not this run's rate
            self.bar.initial += rows
            self._advance(rows)

    def start(self, chunks, total_chunks):
        """Say what was found finished, then start the bar there."""
        if not self.enabled:
            return
        if chunks:
            sys.stderr.write(f"{self.description + ' ' if self.description else ''}resuming: {chunks}/{total_chunks} chunks "
                             f"({self.done}/{self.total} images{self._success(', success ')}) already done\n")
            sys.stderr.flush()
        self.bar = tqdm(total=self.total, initial=self.done, desc=self.description or None, unit="img", file=sys.stderr,
                        smoothing=0, mininterval=0, miniters=1, dynamic_ncols=True)
        self.bar.set_postfix_str(self._success("success "), refresh=False)

    def computed(self, rows, successes):
        self._count(rows, successes)
        if self.bar is not None:
            self._advance(rows)

    def _advance(self, rows):
        self.bar.set_postfix_str(self._success("success "), refresh=False)
        self.bar.update(rows)

    def note(self, text):
        """A line on stderr that leaves the bar whole."""
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def _count(self, rows, successes):
        self.done += rows
        if successes is not None:
            self.successes += successes
            self.success_rows += rows

    def _success(self, prefix):
        return f"{prefix}{self.successes / self.success_rows:.1%}" if self.success_rows else ""

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None
