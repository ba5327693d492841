"""Progress bars that stay readable in logs: redraw at most every few seconds when not on a terminal,
one line per redraw (a log file or DVC's output would otherwise hold one endless `\\r`-joined line).

The training loop's bar shows steps with tqdm's elapsed time and ETA, and as postfix the loss and
the tokens per second of this run (a resumed run counts from its resume step).
"""

import sys

from tqdm.auto import tqdm


class _Lines:
    """A stream for tqdm that turns each carriage-return redraw into a line of its own."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> None:
        text = text.replace("\r", "").rstrip("\n")
        if text.strip():
            self.stream.write(text + "\n")

    def flush(self) -> None:
        self.stream.flush()


def progress(**kwargs) -> tqdm:
    interactive = sys.stderr.isatty()
    if not interactive:
        kwargs.setdefault("file", _Lines(sys.stderr))
    kwargs.setdefault("mininterval", 0.2 if interactive else 5.0)
    return tqdm(dynamic_ncols=interactive, **kwargs)
