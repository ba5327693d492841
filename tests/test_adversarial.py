"""The adversarial student: discriminator and student alternate, and a killed run resumes exactly."""

import copy
import csv

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from pipeline.config import StudentConfig
from pipeline.errors import KdcacheError
from pipeline.student import run_student
from pipeline.student.adversarial import AdversarialTerm
from pipeline.targets import format as fmt
from pipeline.training.loop import TrainFiles
from tests.test_classification import cls_targets, cls_teacher, cls_tokens, labelled_corpus  # noqa: F401
from tests.test_masked import mlm_teacher, mlm_targets, mlm_tokens  # noqa: F401 (fixtures)
from tests.test_resume import Killed, kill_at

CONFIG = dict(n_layer=1, n_embd=16, n_head=2, batch_size=8, max_steps=5, warmup_steps=1, lr=3e-3, alpha=0.5,
              adversarial=True, adversarial_weight=0.5, discriminator_lr=1e-2, checkpoint_every=2, device="cpu")


def teacher_targets(N=6, V=20, K=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    logprobs = torch.log_softmax(torch.randn(N, V, generator=g) * 2, -1)
    top, ids = logprobs.topk(K, -1)
    tail = torch.log(-torch.expm1(torch.logsumexp(top, -1)))
    return {fmt.TOPK_IDS: ids, fmt.TOPK_LOGPROBS: top, fmt.TAIL_LOGMASS: tail}


def test_discriminator_steps_first_then_the_student_is_scored_by_it():
    targets = teacher_targets()
    term = AdversarialTerm(4, StudentConfig(**CONFIG), "cpu")
    before = copy.deepcopy(term.discriminator)
    logits = torch.randn(6, 20, requires_grad=True)
    parts = term(logits, targets)
    # The discriminator moved (its own optimizer) ...
    assert any(not torch.equal(a, b) for a, b in zip(before.parameters(), term.discriminator.parameters()))
    # ... and the student's term is −log D(student buckets) under the *updated* discriminator.
    from pipeline import losses
    fake = losses.student_buckets(logits, targets[fmt.TOPK_IDS])
    expected = -F.logsigmoid(term.discriminator(fake)).mean()
    torch.testing.assert_close(parts["adversarial"], expected.detach())
    assert not torch.allclose(expected, -F.logsigmoid(before(fake)).mean())
    # Accuracy and loss of the discriminator are those of `before` on teacher (1) vs student (0).
    real = losses.teacher_buckets(targets[fmt.TOPK_LOGPROBS], targets[fmt.TAIL_LOGMASS])
    scores = before(torch.cat([real, fake.detach()]))
    labels = torch.cat([torch.ones(6), torch.zeros(6)])
    torch.testing.assert_close(parts["disc_acc"], ((scores > 0).float() == labels).float().mean())
    torch.testing.assert_close(parts["disc_loss"], F.binary_cross_entropy_with_logits(scores, labels).detach())
    # The student's gradient flows through the weighted term only into the logits.
    parts["weighted"].backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    torch.testing.assert_close(parts["weighted"].detach(), 0.5 * expected.detach())


def test_discriminator_runs_in_float32_under_autocast():
    """--dtype bfloat16: the student's forward is autocast, the discriminator (no gradient scaler) is not."""
    targets = teacher_targets()
    plain, autocast = (AdversarialTerm(4, StudentConfig(**CONFIG), "cpu") for _ in range(2))
    logits = torch.randn(6, 20)
    expected = plain(logits, targets)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        parts = autocast(logits.bfloat16(), targets)
    assert parts["weighted"].dtype == torch.float32
    torch.testing.assert_close(parts["disc_loss"], expected["disc_loss"], atol=2e-2, rtol=0)


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_adversarial_student_logs_and_resumes_exactly(small_tokens, small_targets, tmp_path):
    config = StudentConfig(**CONFIG)
    files = lambda root, resume=False: TrainFiles(str(root / "loss.csv"), None, str(root / "ckpt"), resume)  # noqa: E731
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    run_student(config, str(small_tokens), str(straight / "model"), str(small_targets), files(straight))
    rows = read_csv(straight / "loss.csv")
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5]
    assert all(0.0 <= float(r["disc_acc"]) <= 1.0 and float(r["adversarial"]) > 0 for r in rows)
    with pytest.raises(Killed):  # dies fetching batch 4: the checkpoint is at step 2
        run_student(config, str(small_tokens), str(broken / "model"), str(small_targets), files(broken),
                    add_targets=kill_at(4))
    run_student(config, str(small_tokens), str(broken / "model"), str(small_targets), files(broken, True))
    assert read_csv(broken / "loss.csv") == rows  # disc_loss, disc_acc and every loss part, exactly
    a, b = load_file(straight / "model" / "model.safetensors"), load_file(broken / "model" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    saved = torch.load(straight / "ckpt" / "state.pt", weights_only=False)
    assert set(saved["stateful"][0]) == {"discriminator", "optimizer"}


def test_adversarial_refusals(small_tokens, small_targets, tmp_path):
    with pytest.raises(KdcacheError, match="set alpha below 1"):
        StudentConfig(**{**CONFIG, "alpha": 1.0})
    with pytest.raises(KdcacheError, match="gradient_accumulation_steps 1"):
        StudentConfig(**{**CONFIG, "gradient_accumulation_steps": 2})
    with pytest.raises(KdcacheError, match="pass --targets"):
        run_student(StudentConfig(**CONFIG), str(small_tokens), str(tmp_path / "m"), None)
    with pytest.raises(KdcacheError, match="without loss_chunk"):
        run_student(StudentConfig(**{**CONFIG, "loss_chunk": 64}), str(small_tokens), str(tmp_path / "m"),
                    str(small_targets))


@pytest.mark.parametrize("arch", ["transformer", "lstm"])
def test_adversarial_student_of_a_classification_store(cls_tokens, cls_targets, arch, tmp_path):
    """The discriminator reads a classification store's one position per row (every class, no tail)."""
    config = StudentConfig(**{**CONFIG, "checkpoint_every": 0, "max_steps": 3, "arch": arch})
    run_student(config, str(cls_tokens.path), str(tmp_path / "model"), [str(cls_targets.path)],
                TrainFiles(str(tmp_path / "loss.csv")))
    rows = read_csv(tmp_path / "loss.csv")
    assert len(rows) == 3 and all(0.0 <= float(r["disc_acc"]) <= 1.0 and float(r["adversarial"]) > 0 for r in rows)
    assert (tmp_path / "model" / "kdcache.json").exists()


def test_adversarial_student_of_a_masked_store(mlm_tokens, mlm_teacher, mlm_targets, tmp_path):
    """...and a masked-LM store's M masked positions per row."""
    config = StudentConfig(**{**CONFIG, "checkpoint_every": 0, "max_steps": 3})
    run_student(config, str(mlm_tokens.path), str(tmp_path / "model"), [str(mlm_targets.path)],
                TrainFiles(str(tmp_path / "loss.csv")), teacher_dir=str(mlm_teacher))
    rows = read_csv(tmp_path / "loss.csv")
    assert len(rows) == 3 and all(0.0 <= float(r["disc_acc"]) <= 1.0 and float(r["adversarial"]) > 0 for r in rows)
