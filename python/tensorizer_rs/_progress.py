"""Progress bars for long work started from a terminal (CLI commands, serializing a model)."""

from __future__ import annotations

import sys


class _NoBar:
    """What `terminal_bar` returns where no bar is shown: accepts the same calls."""

    n = 0

    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


def terminal_bar(total: int | None, desc: str, show: bool = True):
    """A tqdm bar in bytes on stderr when `show` and stderr is a terminal (and tqdm is
    installed); otherwise a stand-in that does nothing. Scripts and logs get no bar."""
    if show and sys.stderr.isatty():
        try:
            from tqdm import tqdm
        except ImportError:
            pass
        else:
            return tqdm(total=total, desc=desc, unit="B", unit_scale=True, leave=False)
    return _NoBar()


def bytes_callback(bar):
    """A `progress(bytes done so far)` callback that moves `bar`."""

    def progress(done: int, *_) -> None:
        bar.update(done - bar.n)

    return progress
