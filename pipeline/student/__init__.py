"""Students: one module per way the teacher's targets reach a batch.

offline.py  read from cached stores (the product)
online.py   the teacher runs in the loop (baseline)
mutual.py   two students teach each other, no teacher (baseline)
adversarial.py  offline, plus a discriminator between teacher and student outputs (--adversarial)
cross.py    offline from a teacher of another tokenizer, positions aligned by text (--teacher-tokens)
setup.py    what the three share
"""

from __future__ import annotations

from pipeline import runtime
from pipeline.config import StudentConfig
from pipeline.errors import KdcacheError
from pipeline.student.adversarial import run_adversarial
from pipeline.student.cross import run_cross_tokenizer
from pipeline.location import Location
from pipeline.student.mutual import mutual_peer_dir, run_mutual
from pipeline.student.offline import run_offline
from pipeline.student.online import run_online
from pipeline.training.loop import TrainFiles


def run_student(config: StudentConfig, tokens_dir: str, out: str, targets=None,
                files: TrainFiles | str | None = None, teacher_dir: str | None = None, add_targets=None,
                teacher_tokens: str | None = None) -> dict:
    """Train a student in `config.mode`; returns the last step's logged values.

    offline: `targets` are targets stores (none: plain CE); online: `teacher_dir` runs in the loop;
    mutual: neither (the second student is saved to `mutual_peer_dir(out)`). An input the mode does
    not use is named in the log, not read (dvc.yaml passes both, so params.yaml alone picks the mode).
    add_targets: offline only, a hook on every batch before its step (see train_loop).
    teacher_tokens: the teacher's token store `targets` was captured from, when `tokens_dir` is the
    student's own (another tokenizer over the same documents; cross.py).
    """
    Location(out).check_writable()  # a read-only --out fails now, not after training
    runtime.decode_in_one_thread()  # the loader's reading leaves the step its cores
    targets = [targets] if isinstance(targets, str) else list(targets or [])
    unused = {"offline": ("--teacher", None if config.init_from_teacher else teacher_dir), "online": ("--targets", targets),
              "mutual": ("--targets/--teacher", targets or teacher_dir)}[config.mode]
    if unused[1]:
        print(f"[student] mode {config.mode} does not read {unused[0]}")
    if config.mode != "offline" and config.schedule("gamma").bounds()[1] > 0:
        raise KdcacheError(f"gamma > 0 distils cached attention, which mode {config.mode} does not read; "
                           f"use mode offline with --targets captured with --attention-layer, or set gamma 0.")
    if teacher_tokens:
        return run_cross_tokenizer(config, tokens_dir, out, targets, teacher_tokens, files)
    if config.adversarial:
        if config.mode != "offline" or not targets:
            raise KdcacheError("--adversarial trains an offline student: use mode offline and pass --targets.")
        return run_adversarial(config, tokens_dir, out, targets, files, add_targets, teacher_dir)
    if config.mode == "offline":
        return run_offline(config, tokens_dir, out, targets or None, files, add_targets, teacher_dir)
    if config.mode == "online":
        if not teacher_dir:
            raise KdcacheError("mode online needs --teacher DIR (the teacher that runs in the loop).")
        return run_online(config, tokens_dir, out, teacher_dir, files)
    return run_mutual(config, tokens_dir, out, files)


__all__ = ["run_student", "mutual_peer_dir"]
