"""Schedule specs: endpoints, midpoints, monotonicity, and the errors a bad spec raises."""

import math

import pytest

from pipeline.errors import KdcacheError
from pipeline.schedules import make_schedule

TOTAL = 100


@pytest.mark.parametrize("spec, start, middle, end", [
    ("constant:0.7", 0.7, 0.7, 0.7),
    ("linear:1.0:0.5", 1.0, 0.75, 0.5),
    ("cosine:2:4", 2.0, 3.0, 4.0),
    ("linear:-1:1", -1.0, 0.0, 1.0),
])
def test_endpoints_and_midpoint(spec, start, middle, end):
    value = make_schedule(spec)
    assert value(0, TOTAL) == pytest.approx(start)
    assert value(TOTAL // 2, TOTAL) == pytest.approx(middle)
    assert value(TOTAL, TOTAL) == pytest.approx(end)


def test_linear_and_cosine_differ_off_the_midpoint():
    linear, cosine = make_schedule("linear:0:1"), make_schedule("cosine:0:1")
    assert linear(25, TOTAL) == pytest.approx(0.25)
    assert cosine(25, TOTAL) == pytest.approx(0.5 * (1 - math.cos(math.pi / 4)))  # ≈ 0.146: slow start


@pytest.mark.parametrize("spec", ["linear:0:1", "cosine:0:1", "linear:3:-2", "cosine:1:0.25"])
def test_monotone_from_start_to_end(spec):
    value = make_schedule(spec)
    values = [value(step, TOTAL) for step in range(TOTAL + 1)]
    increasing = values[-1] > values[0]
    pairs = list(zip(values, values[1:]))
    assert all(b >= a if increasing else b <= a for a, b in pairs)


def test_progress_is_clamped_outside_training():
    value = make_schedule("linear:1:0")
    assert value(-5, TOTAL) == 1.0
    assert value(TOTAL + 50, TOTAL) == 0.0
    assert value(0, 0) == 0.0  # no steps: already at the end


@pytest.mark.parametrize("spec", [
    "exponential:1:0",  # unknown shape
    "constant",  # too few numbers
    "constant:1:2",  # too many
    "linear:1",
    "cosine:0:1:2",
    "linear:one:0",  # not a number
    "cosine:0:nan",  # not finite
    "",
])
def test_bad_specs_name_the_spec_and_the_valid_shapes(spec):
    with pytest.raises(KdcacheError) as error:
        make_schedule(spec)
    message = str(error.value)
    assert repr(spec) in message
    for shape in ("constant:V", "linear:START:END", "cosine:START:END"):
        assert shape in message
