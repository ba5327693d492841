"""Set up and run one student distillation: checks first, then the shared training loop."""

from __future__ import annotations

import math
import os
from dataclasses import asdict
from pathlib import Path

import torch

from pipeline.config import StudentConfig
from pipeline.errors import KdcacheError
from pipeline.loader import BlockStream
from pipeline.objective import Objective, check_chunkable
from pipeline.student import build_gpt2, check_model_fits, hidden_size, load_causal_lm, num_layers
from pipeline.targets import format as fmt
from pipeline.targets.reader import TargetsStore
from pipeline.tokens import TokenStore
from pipeline.train import TrainFiles, resolve_device, save_model, train_loop


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


def parse_targets(specs) -> list[tuple[str, float]]:
    """--targets values PATH or PATH:WEIGHT → [(path, weight)], weights normalised to sum 1.

    The part after the last ':' is a weight only when it reads as a number, so a path holding ':'
    works as long as it carries no weight. No weight given anywhere: equal weights.
    """
    if specs is None:
        return []
    parsed = []
    for spec in [specs] if isinstance(specs, (str, Path)) else specs:
        path, colon, last = str(spec).rpartition(":")
        try:
            parsed.append((path, float(last)) if colon else (str(spec), None))
        except ValueError:
            parsed.append((str(spec), None))
    given = [weight for _, weight in parsed if weight is not None]
    if given and len(given) < len(parsed):
        raise KdcacheError(f"--targets {' '.join(map(str, specs))}: give every store a :WEIGHT, or none "
                           f"(equal weights).")
    bad = [weight for weight in given if not (math.isfinite(weight) and weight > 0)]
    if bad:
        raise KdcacheError(f"--targets weights must be positive numbers, got {bad}.")
    weights = given or [1.0] * len(parsed)
    return [(path, weight / sum(weights)) for (path, _), weight in zip(parsed, weights)]


def check_same_layout(stores: list[TargetsStore]) -> None:
    """Several teachers' stores are read row-aligned, shard by shard, at one capture temperature."""
    first = stores[0]
    for store in stores[1:]:
        for key, option in (("rows_per_shard", "--rows-per-shard"), ("temperature", "--temperature")):
            if store.attrs[key] != first.attrs[key]:
                raise KdcacheError(f"{store.path} was captured with {key} {store.attrs[key]} but {first.path} "
                                   f"with {first.attrs[key]}; re-run `kdcache cache --out {store.path}` "
                                   f"with {option} {first.attrs[key]}.")


def run_student(config: StudentConfig, tokens_dir: str, out: str, targets: str | list[str] | None = None,
                files: TrainFiles | str | None = None, add_targets=None) -> dict:
    """Train one student from a token store (+ targets stores) and save it with save_pretrained.

    targets: a store path, or several "PATH[:WEIGHT]" (one per teacher; see `parse_targets`).
    Everything that can be refused (fingerprints, vocabulary, layers) is checked before training.
    """
    tokens = TokenStore(tokens_dir)
    specs = parse_targets(targets)
    paths, weights = [path for path, _ in specs], tuple(weight for _, weight in specs) or (1.0,)
    # A schedule counts by its range: alpha that ever drops below 1 distils, beta that ever rises above 0
    # needs hidden states.
    distill = config.schedule("alpha").bounds()[0] < 1.0 and (specs or add_targets is not None)
    uses_hidden = config.schedule("beta").bounds()[1] > 0
    model = build_student(config, tokens.vocab_size, tokens.block_size)
    check_model_fits(model, tokens.vocab_size, tokens.block_size, "student")
    if config.init:
        check_same_tokenizer(config.init, tokens)
    if config.loss_chunk:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise KdcacheError("loss_chunk does not run under torchrun/DDP yet; set loss_chunk 0.")
        check_chunkable(model)
    layer_pairs, stores, kind = [], [TargetsStore(path) for path in paths], "topk"
    capture_temperature = 1.0  # the online baseline computes its targets at τ = 1
    if stores:
        store = stores[0]
        if uses_hidden and len(stores) > 1:
            raise KdcacheError("the hidden-state loss reads one teacher's layers; with several --targets set "
                               "beta 0 (and no beta_schedule), or train on hidden states from one store.")
        pairs = [tuple(int(x) for x in p.split(":")) for p in config.layer_map]
        if uses_hidden and not pairs:
            pairs = uniform_layer_map(store.layers, int(store.attrs["teacher_num_layers"]), num_layers(model))
        for each in stores:
            each.check_compatible(tokens, "train", tokens.vocab_size, [t for _, t in pairs] if each is store else [])
        check_same_layout(stores)
        bad_student = [s for s, _ in pairs if s > num_layers(model)]
        if bad_student:
            raise KdcacheError(f"student layers {bad_student} in layer_map do not exist (student has "
                               f"{num_layers(model)}).")
        layer_pairs = pairs if uses_hidden else []
        capture_temperature = store.temperature
        kind = resolve_kd_targets(config.kd_targets, store)
        for other in stores[1:]:
            resolve_kd_targets(kind, other)  # every teacher must hold the kind the first one gives
    # To the stored width: the teacher's D, or the rank P of a low-rank store (its coefficients).
    projections = torch.nn.ModuleDict({
        str(s): torch.nn.Linear(hidden_size(model), store.hidden_width, bias=False)
        for s, _ in layer_pairs})
    # Without KD, alpha and temperature stay out of the loss (and the log).
    schedules = {name: s for name, s in config.schedules().items() if distill or name == "beta"}
    hidden_scale = store.hidden_width / int(store.attrs["hidden_size"]) if layer_pairs else 1.0
    objective = Objective(vocab_size=tokens.vocab_size, alpha=config.alpha if distill else 1.0,
                          temperature=config.temperature, capture_temperature=capture_temperature,
                          loss=config.loss, kd_targets=kind, beta=config.beta, layer_pairs=layer_pairs,
                          projections=projections, hidden_scale=hidden_scale, schedules=schedules,
                          loss_chunk=config.loss_chunk, teacher_weights=weights,
                          multi_teacher=config.multi_teacher)
    names = [(s.sampled_names() if kind == "sampled" else s.topk_names()) if distill else [] for s in stores]
    if layer_pairs:
        names[0] = names[0] + [fmt.hidden_array(t) for _, t in layer_pairs]
    if config.verify:
        for each, its_names in zip(stores, names):
            if its_names:
                each.check_shards(its_names)  # a corrupt shard would train silently on garbage
    reading = any(names)  # a store that contributes nothing is not read
    stream = BlockStream(tokens_dir, "train", paths if reading else None, names if reading else None,
                         shuffle_buffer=config.shuffle_buffer, seed=config.seed)
    device = resolve_device(config.device)
    projections.to(device)
    history = train_loop(model, stream, config, objective, device, f"student {Path(out).name}",
                         files, [projections], add_targets)
    save_model(model, tokens, out, {"config": asdict(config), "targets": paths, "target_weights": list(weights),
                                    "tokens_fingerprint": tokens.fingerprint,
                                    "final_loss": history[-1]["loss"], "steps": len(history)})
    return history[-1]
