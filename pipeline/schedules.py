"""Schedules for loss weights and temperatures over training (alpha, beta, temperature).

A spec string names the shape and its numbers, as written in params.yaml:
  "constant:V"           V at every step
  "linear:START:END"     straight line from START at step 0 to END at step total_steps
  "cosine:START:END"     half a cosine from START to END, flat at both ends

    alpha = make_schedule("linear:1.0:0.5")
    alpha(step, total_steps)

Progress is step / total_steps clamped to [0, 1], as in `pipeline.training.loop.lr_at`: with steps counted
0 … total_steps − 1 the last step sits one step short of END.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pipeline.errors import KdcacheError

# Shape → how many numbers follow it in the spec.
SHAPES = {"constant": 1, "linear": 2, "cosine": 2}
VALID_SPECS = "'constant:V', 'linear:START:END' or 'cosine:START:END'"


@dataclass(frozen=True)
class Schedule:
    """A value over training: call with (step, total_steps) → float. Build with `make_schedule`."""

    shape: str
    start: float
    end: float

    def __call__(self, step: int, total_steps: int) -> float:
        # No steps to spread over: the schedule is already at its end.
        return self.at(step / total_steps if total_steps > 0 else 1.0)

    def at(self, progress: float) -> float:
        """The value at a fraction of training done (clamped to [0, 1]), as `Objective` passes it."""
        progress = min(max(progress, 0.0), 1.0)
        if self.shape == "cosine":
            progress = 0.5 * (1.0 - math.cos(math.pi * progress))
        return self.start + (self.end - self.start) * progress

    def bounds(self) -> tuple[float, float]:
        """(lowest, highest) value over training: every shape is monotone between its endpoints."""
        return min(self.start, self.end), max(self.start, self.end)


def make_schedule(spec: str) -> Schedule:
    """Parse "constant:V", "linear:START:END" or "cosine:START:END"; raise KdcacheError otherwise."""
    shape, *numbers = str(spec).strip().split(":")
    if shape not in SHAPES or len(numbers) != SHAPES[shape]:
        raise KdcacheError(f"schedule {spec!r} is not understood; write {VALID_SPECS}.")
    try:
        values = [float(number) for number in numbers]
    except ValueError:
        raise KdcacheError(f"schedule {spec!r} holds a value that is not a number; write {VALID_SPECS}.") from None
    if not all(math.isfinite(value) for value in values):
        raise KdcacheError(f"schedule {spec!r} holds a non-finite value; write {VALID_SPECS} with finite numbers.")
    return Schedule(shape, values[0], values[-1])  # constant: start = end
