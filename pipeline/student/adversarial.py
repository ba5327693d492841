"""The adversarial student: offline KD plus a discriminator that tells teacher from student outputs.

Per position the discriminator sees a distribution over the teacher's cached support: the K+1
buckets (its top-k ids, most probable first, then the tail), as log-probs. "Real" are the teacher's
cached buckets, "fake" the student's on the same ids. Each training step alternates: the
discriminator takes one step of its own AdamW on the batch (student outputs detached), then the
student's loss gains weight · −log D(student buckets) (the non-saturating generator loss) against the
updated discriminator, once per step on the whole batch (so gradient accumulation is refused). It
runs in float32 whatever --dtype. Discriminator weights and optimizer are saved in checkpoints, so
--resume continues exactly; its loss and accuracy (before its update) are logged per step (disc_loss,
disc_acc).

Shapes: N positions, K top-k, V vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline import losses, runtime
from pipeline.config import StudentConfig
from pipeline.errors import KdcacheError
from pipeline.student.offline import parse_targets, run_offline
from pipeline.targets import format as fmt
from pipeline.targets.reader import TargetsStore


class Discriminator(torch.nn.Module):
    """An MLP on the K+1 bucket log-probs of one position → a logit (real = teacher)."""

    def __init__(self, buckets: int, hidden: int):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(buckets, hidden), torch.nn.GELU(),
                                       torch.nn.Linear(hidden, hidden), torch.nn.GELU(),
                                       torch.nn.Linear(hidden, 1))

    def forward(self, bucket_logprobs: torch.Tensor) -> torch.Tensor:  # (N, K+1) → (N,)
        # log-probs clipped to a finite floor: trimmed (−inf) entries become a value the net can read
        return self.net(bucket_logprobs.clamp(min=-30.0)).squeeze(-1)


class AdversarialTerm:
    """A logit term of the Objective (see Objective.logit_terms) that also trains the discriminator."""

    def __init__(self, top_k: int, config: StudentConfig, device):
        generator_state = torch.get_rng_state()
        torch.manual_seed(config.seed + 1)  # its own initialisation, leaving the student's RNG as it was
        self.discriminator = Discriminator(top_k + 1, config.discriminator_hidden).to(device)
        torch.set_rng_state(generator_state)
        self.optimizer = torch.optim.AdamW(self.discriminator.parameters(), lr=config.discriminator_lr,
                                           betas=(0.5, 0.999), weight_decay=0.0)
        self.weight = config.adversarial_weight

    def __call__(self, logits: torch.Tensor, targets: dict) -> dict[str, torch.Tensor]:
        """logits (N, V); targets: the batch's top-k arrays flattened to N. Returns the weighted term
        ("weighted", added to the loss) and logged parts."""
        # float32 under --dtype bfloat16/float16 too: the discriminator's own backward has no gradient scaler.
        with torch.autocast(logits.device.type, enabled=False):
            return self.step(logits.float(), targets)

    def step(self, logits: torch.Tensor, targets: dict) -> dict[str, torch.Tensor]:
        ids, teacher_logprobs, tail = (targets[name] for name in (fmt.TOPK_IDS, fmt.TOPK_LOGPROBS, fmt.TAIL_LOGMASS))
        real = losses.teacher_buckets(teacher_logprobs, tail)  # (N, K+1)
        fake = losses.student_buckets(logits, ids)  # (N, K+1), differentiable in the student
        if torch.is_grad_enabled():  # training: one discriminator step first
            self.discriminator.train()
            scores = self.discriminator(torch.cat([real, fake.detach()]))  # (2N,)
            labels = torch.cat([torch.ones(len(real)), torch.zeros(len(fake))]).to(scores.device)
            disc_loss = F.binary_cross_entropy_with_logits(scores, labels)
            disc_acc = ((scores > 0).float() == labels).float().mean()
            self.optimizer.zero_grad(set_to_none=True)
            disc_loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        else:
            disc_loss = disc_acc = torch.zeros((), device=logits.device)
        adversarial = -F.logsigmoid(self.discriminator(fake)).mean()  # the student wants "teacher"
        return {"weighted": self.weight * adversarial, "adversarial": adversarial.detach(),
                "disc_loss": disc_loss.detach(), "disc_acc": disc_acc.detach()}

    def state_dict(self) -> dict:
        return {"discriminator": self.discriminator.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.discriminator.load_state_dict(state["discriminator"])
        self.optimizer.load_state_dict(state["optimizer"])


def run_adversarial(config: StudentConfig, tokens_dir: str, out: str, targets, files=None, add_targets=None,
                    teacher_dir: str | None = None) -> dict:
    """Offline KD from one top-k store plus the adversarial term; refused before training when the
    store, the loss settings or the launch cannot carry it. teacher_dir: as run_offline's."""
    specs = parse_targets(targets)
    if len(specs) != 1:
        raise KdcacheError("--adversarial trains against one teacher: pass exactly one --targets store.")
    store = TargetsStore(specs[0][0])
    if store.top_k < 1:
        raise KdcacheError(f"--adversarial reads the teacher's top-k + tail, but {store.path} holds sampled "
                           f"targets only; re-capture with --top-k K.")
    if config.loss_chunk or runtime.launched_world_size() > 1:
        raise KdcacheError("--adversarial runs on one process without loss_chunk; set loss_chunk 0 and "
                           "launch without torchrun.")
    term = AdversarialTerm(store.top_k, config, runtime.resolve_device(config.device))
    return run_offline(config, tokens_dir, out, targets, files, add_targets, teacher_dir, logit_terms=[term],
                       stateful=[term])
