"""Progress bars with an ETA for long commands (eval, pairs, cache), on the main process only.

tqdm draws the bar on a terminal; in a log file (no TTY) it writes a line at most every 30 s, so batch jobs
show progress without flooding their logs.
"""

from __future__ import annotations

import sys
from typing import Any


def bar(total: int, desc: str, unit: str = "img") -> Any:
    """A tqdm bar on stderr: ``bar.update(n)`` after each chunk, ``bar.close()`` at the end."""
    from tqdm.auto import tqdm

    from fewstep.reliability import is_main_process

    tty = sys.stderr.isatty()
    return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=tty, mininterval=0.5 if tty else 30.0,
                disable=not is_main_process(), file=sys.stderr)


class Progress:
    """A ``progress(done, total)`` callback (fewstep.pairs.generate_pairs, fewstep.cache) drawing a :func:`bar`."""

    def __init__(self, desc: str, unit: str = "img") -> None:
        self.desc, self.unit, self.bar = desc, unit, None

    def __call__(self, done: int, total: int) -> None:
        if self.bar is None:
            self.bar = bar(total, self.desc, self.unit)
        self.bar.update(done - self.bar.n)
        if done >= total:
            self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
