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


# --- Schedules in StudentConfig and in training ------------------------------------------------------

import csv  # noqa: E402

from pipeline.config import StudentConfig  # noqa: E402


@pytest.mark.parametrize("field, spec, words", [
    ("alpha_schedule", "exponential:1:0", ["alpha_schedule", "not understood", "linear:START:END"]),
    ("alpha_schedule", "linear:1.0:1.5", ["alpha_schedule", "in [0, 1]"]),
    ("temperature_schedule", "cosine:4:0", ["temperature_schedule", "> 0"]),
    ("beta_schedule", "linear:0:-1", ["beta_schedule", ">= 0"]),
    ("beta_schedule", "linear:0", ["beta_schedule", "not understood"]),
])
def test_student_config_refuses_bad_schedules(field, spec, words):
    with pytest.raises(KdcacheError) as error:
        StudentConfig(**{field: spec})
    for word in words:
        assert word in str(error.value)


def test_student_config_schedules_default_to_the_plain_fields():
    config = StudentConfig(alpha=0.3, temperature=2.0, alpha_schedule="linear:1:0.2")
    assert set(config.schedules()) == {"alpha"}
    assert config.schedule("alpha").at(0.5) == pytest.approx(0.6)
    assert config.schedule("temperature").at(0.7) == 2.0  # unscheduled: the plain field throughout
    assert config.schedule("beta").bounds() == (0.0, 0.0)


def test_values_follow_their_schedules_over_a_short_run(kdcache, small_tokens, small_targets, tmp_path):
    log = tmp_path / "loss.csv"
    steps = 5
    result = kdcache("student", "--tokens", small_tokens, "--targets", small_targets, "--out", tmp_path / "student",
                     "--log", log, "--max-steps", steps, "--n-layer", 1, "--n-embd", 16, "--n-head", 2,
                     "--batch-size", 4, "--alpha", 0.5, "--alpha-schedule", "linear:0.9:0.1",
                     "--temperature-schedule", "cosine:1:3")
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(log.open()))
    assert len(rows) == steps
    alpha, temperature = make_schedule("linear:0.9:0.1"), make_schedule("cosine:1:3")
    for row in rows:
        step = int(row["step"]) - 1  # the CSV counts steps from 1; the loss at step s saw progress s / total
        assert float(row["alpha"]) == pytest.approx(alpha(step, steps), rel=1e-6)
        assert float(row["temperature"]) == pytest.approx(temperature(step, steps), rel=1e-6)
        expected = float(row["alpha"]) * float(row["ce"]) + \
            (1 - float(row["alpha"])) * float(row["temperature"]) ** 2 * float(row["kd"])
        assert float(row["loss"]) == pytest.approx(expected, rel=1e-5)  # the logged values are the ones used
    assert "beta" not in rows[0]  # only scheduled values are logged
    assert float(rows[0]["alpha"]) > float(rows[-1]["alpha"])


def test_objective_reads_its_schedules_at_the_progress_it_is_given():
    import torch

    from pipeline.config import ModelShape
    from pipeline.training.objective import Objective
    from pipeline.models import build_gpt2
    from pipeline.targets import format as fmt

    B, T, V, D = 2, 6, 30, 8
    g = torch.Generator().manual_seed(0)
    logprobs, ids = torch.log_softmax(torch.randn(B, T, V, generator=g), -1).topk(4, -1)
    batch = {"input_ids": torch.randint(0, V, (B, T), generator=g), fmt.TOPK_IDS: ids, fmt.TOPK_LOGPROBS: logprobs,
             fmt.TAIL_LOGMASS: torch.log(-torch.expm1(torch.logsumexp(logprobs, -1))),
             fmt.hidden_array(1): torch.randn(B, T, D, generator=g)}
    model = build_gpt2(ModelShape(n_layer=1, n_embd=16, n_head=2), V, T)
    objective = Objective(vocab_size=V, alpha=0.5, beta=0.0, layer_pairs=[(1, 1)],
                          projections=torch.nn.ModuleDict({"1": torch.nn.Linear(16, D)}),
                          schedules={"beta": make_schedule("linear:0:2"), "temperature": make_schedule("cosine:1:3")})
    for progress in (0.0, 0.25, 1.0):
        parts = objective(model, batch, progress)
        beta, tau = 2 * progress, 1 + 2 * 0.5 * (1 - math.cos(math.pi * progress))
        assert parts["beta"].item() == pytest.approx(beta) and parts["temperature"].item() == pytest.approx(tau)
        assert "alpha" not in parts  # not scheduled: the plain 0.5
        expected = 0.5 * parts["ce"] + 0.5 * tau**2 * parts["kd"] + beta * parts["hidden"]  # hidden even at beta 0
        assert parts["loss"].item() == pytest.approx(expected.item(), rel=1e-6)
