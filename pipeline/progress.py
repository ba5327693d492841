"""Progress bars that stay readable in logs: redraw at most every few seconds when not on a terminal."""

import sys

from tqdm.auto import tqdm


def progress(**kwargs) -> tqdm:
    interactive = sys.stderr.isatty()
    return tqdm(mininterval=0.2 if interactive else 5.0, dynamic_ncols=interactive, **kwargs)
