"""Set up and run one student distillation: checks first, then the shared training loop."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch

from pipeline.config import StudentConfig
from pipeline.errors import KdcacheError
from pipeline.loader import BlockStream
from pipeline.objective import Objective
from pipeline.student import build_gpt2, check_model_fits, hidden_size, load_causal_lm, num_layers
from pipeline.targets import format as fmt
from pipeline.targets.reader import TargetsStore
from pipeline.tokens import TokenStore
from pipeline.train import resolve_device, save_model, train_loop


def uniform_layer_map(captured: list[int], teacher_layers: int, student_layers: int) -> list[tuple[int, int]]:
    """Map each captured teacher layer t to student layer round(t · L_s / L_t) (0 stays 0)."""
    return [(round(t * student_layers / teacher_layers), t) for t in captured]


def build_student(config: StudentConfig, vocab_size: int, block_size: int):
    if config.init:
        model = load_causal_lm(config.init, "student --init model")
    else:
        model = build_gpt2(config, vocab_size, block_size, config.seed)
    return model


def check_same_tokenizer(model_dir: str, tokens: TokenStore) -> None:
    """A student brought with --init must share the teacher's vocabulary, id for id."""
    from transformers import AutoTokenizer

    try:
        theirs = AutoTokenizer.from_pretrained(model_dir).get_vocab()
    except Exception:  # no tokenizer saved beside the model: the size check is all we can do
        return
    if theirs != tokens.load_tokenizer().get_vocab():
        raise KdcacheError(f"the student's vocabulary ({model_dir}, {len(theirs)} ids) differs from the "
                           f"teacher's ({tokens.vocab_size} ids); the student must use the teacher's tokenizer.")


def resolve_kd_targets(requested: str, store: TargetsStore) -> str:
    """"topk" or "sampled": what the KD term reads, refusing a kind the store does not hold."""
    has = {"topk": store.top_k > 0, "sampled": store.samples > 0}
    kind = requested if requested != "auto" else ("topk" if has["topk"] else "sampled")
    if not has[kind]:
        raise KdcacheError(f"{store.path} holds no {kind} targets (top_k={store.top_k}, samples="
                           f"{store.samples}); use --kd-targets {'sampled' if kind == 'topk' else 'topk'} "
                           f"or re-run cache with them.")
    return kind


def run_student(config: StudentConfig, tokens_dir: str, out: str, targets: str | None = None,
                log_path: str | None = None, add_targets=None) -> dict:
    """Train one student from a token store (+ a targets store) and save it with save_pretrained.

    Everything that can be refused (fingerprints, vocabulary, layers) is checked before training.
    """
    tokens = TokenStore(tokens_dir)
    distill = config.alpha < 1.0 and (targets is not None or add_targets is not None)
    model = build_student(config, tokens.vocab_size, tokens.block_size)
    check_model_fits(model, tokens.vocab_size, tokens.block_size, "student")
    if config.init:
        check_same_tokenizer(config.init, tokens)
    layer_pairs, store, kind = [], None, "topk"
    capture_temperature = 1.0  # the online baseline computes its targets at τ = 1
    if targets is not None:
        store = TargetsStore(targets)
        pairs = [tuple(int(x) for x in p.split(":")) for p in config.layer_map]
        if config.beta and not pairs:
            pairs = uniform_layer_map(store.layers, int(store.attrs["teacher_num_layers"]), num_layers(model))
        store.check_compatible(tokens, "train", tokens.vocab_size, [t for _, t in pairs])
        bad_student = [s for s, _ in pairs if s > num_layers(model)]
        if bad_student:
            raise KdcacheError(f"student layers {bad_student} in layer_map do not exist (student has "
                               f"{num_layers(model)}).")
        layer_pairs = pairs if config.beta else []
        capture_temperature = store.temperature
        kind = resolve_kd_targets(config.kd_targets, store)
    # To the stored width: the teacher's D, or the rank P of a low-rank store (its coefficients).
    projections = torch.nn.ModuleDict({
        str(s): torch.nn.Linear(hidden_size(model), store.hidden_width, bias=False)
        for s, _ in layer_pairs})
    hidden_scale = store.hidden_width / int(store.attrs["hidden_size"]) if layer_pairs else 1.0
    objective = Objective(vocab_size=tokens.vocab_size, alpha=config.alpha if distill else 1.0,
                          temperature=config.temperature, capture_temperature=capture_temperature,
                          loss=config.loss, kd_targets=kind, beta=config.beta, layer_pairs=layer_pairs,
                          projections=projections, hidden_scale=hidden_scale)
    names = None
    if store is not None:
        kd_names = store.sampled_names() if kind == "sampled" else store.topk_names()
        names = (kd_names if distill else []) + \
                [fmt.hidden_array(t) for _, t in layer_pairs]
        if config.verify and names:
            store.check_shards(names)  # a corrupt shard would train silently on garbage
    stream = BlockStream(tokens_dir, "train", targets if names else None, names,
                         shuffle_buffer=config.shuffle_buffer, seed=config.seed)
    device = resolve_device(config.device)
    projections.to(device)
    history = train_loop(model, stream, config, objective, device, f"student {Path(out).name}",
                         log_path, [projections], add_targets)
    save_model(model, tokens, out, {"config": asdict(config), "targets": targets,
                                    "tokens_fingerprint": tokens.fingerprint,
                                    "final_loss": history[-1]["loss"], "steps": len(history)})
    return history[-1]


