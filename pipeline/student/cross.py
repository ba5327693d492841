"""The cross-tokenizer student: its own token store and vocabulary, a teacher's store over the same documents.

`--tokens` is the student's token store, `--teacher-tokens` the teacher's, which `--targets` was captured
from; both were prepared over the same documents. Every student position reads the teacher position whose
prediction covers the same next characters (data/alignment.py). The KD term is ULD (losses/uld.py), which
needs no shared vocabulary, on the aligned positions only; CE covers every position.
"""

from __future__ import annotations

from pathlib import Path

from pipeline import runtime
from pipeline.config import StudentConfig
from pipeline.data.alignment import align_token_stores, aligned_share
from pipeline.data.tokens import TokenStore
from pipeline.errors import KdcacheError
from pipeline.student.setup import build_student, distills, make_objective, save_student
from pipeline.targets.reader import TargetsStore
from pipeline.training.loader import BlockStream
from pipeline.training.loop import TrainFiles, train_loop


def check_cross_settings(config: StudentConfig, targets: list[str]) -> None:
    """Refuse what cannot cross tokenizers: hidden states, attention and ids belong to the teacher's positions
    and vocabulary, so only the sorted distribution (ULD) from one store is distilled."""
    if config.mode != "offline" or config.adversarial:
        raise KdcacheError("--teacher-tokens trains an offline student from a cached store: use mode offline "
                           "without --adversarial.")
    if len(targets) != 1:
        raise KdcacheError(f"--teacher-tokens distils one teacher: pass exactly one --targets (got {len(targets)}), "
                           f"the store captured from the teacher's token store.")
    if config.loss != "uld":
        raise KdcacheError(f"loss {config.loss} compares the teacher's and the student's probabilities id by id, "
                           f"which needs one vocabulary; a student of another tokenizer (--teacher-tokens) "
                           f"trains with --loss uld.")
    uses = [name for name in ("beta", "gamma") if config.schedule(name).bounds()[1] > 0]
    if uses or config.cosine or config.init_from_teacher:
        raise KdcacheError("hidden-state, attention and cosine losses and --init-from-teacher pair the student "
                           "with the teacher position by position and layer by layer, which another tokenizer "
                           "breaks: set beta, gamma and cosine 0 and leave --init-from-teacher out.")


def run_cross_tokenizer(config: StudentConfig, tokens_dir: str, out: str, targets: list[str], teacher_tokens_dir: str,
                        files: TrainFiles | str | None = None) -> dict:
    """Train a student on its own token store with ULD from `targets` (captured over `teacher_tokens_dir`,
    the same documents in the teacher's tokenizer) and save it. Everything refusable is checked first."""
    check_cross_settings(config, targets)
    tokens, teacher_tokens, store = TokenStore(tokens_dir), TokenStore(teacher_tokens_dir), TargetsStore(targets[0])
    store.check_compatible(teacher_tokens, "train", teacher_tokens.num_outputs)
    if store.top_k == 0:
        raise KdcacheError(f"{store.path} holds no top-k targets, which ULD reads; re-run cache with --top-k K.")
    alignment = align_token_stores(tokens, teacher_tokens, "train")  # (N_s, T_s); refuses other documents
    share = aligned_share(alignment.reshape(-1))
    if share == 0:
        raise KdcacheError(f"no position of {tokens.name} aligns with one of {teacher_tokens.name}: nothing to "
                           f"distil. Check that both were prepared over the same text.")
    print(f"[student] cross-tokenizer: {share:.1%} of the student's positions predict the same next characters "
          f"as a teacher position and get ULD; the rest get CE only")
    model = build_student(config, tokens)
    distill = distills(config)
    objective = make_objective(config, tokens, distill, store.capture_temperature, kd_signal="topk")
    names = store.topk_names() if distill else []
    if names and config.verify:
        store.check_shards(names)  # a corrupt shard would train silently on garbage
    stream = BlockStream(tokens_dir, "train", [targets[0]] if names else None, [names] if names else None,
                         shuffle_buffer=config.shuffle_buffer, seed=config.seed,
                         alignment=alignment if names else None)
    history = train_loop(model, stream, config, objective, runtime.resolve_device(config.device),
                         f"student {Path(out).name}", files)
    save_student(model, tokens, out, config, history, targets=list(targets), teacher_tokens=teacher_tokens.name,
                 teacher_tokens_fingerprint=teacher_tokens.fingerprint, aligned_share=share)
    return history[-1]
