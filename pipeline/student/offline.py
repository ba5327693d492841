"""The offline student: targets stream from one or more cached stores; the teacher never runs."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from pipeline import runtime
from pipeline.config import StudentConfig
from pipeline.data.tokens import TokenStore
from pipeline.errors import KdcacheError
from pipeline.models import check_room, hidden_size, num_layers, use_distilling_attention, value_width
from pipeline.student.setup import build_student, distills, make_objective, save_student
from pipeline.targets import format as fmt
from pipeline.targets.reader import TargetsStore
from pipeline.training.loader import BlockStream
from pipeline.training.loop import TrainFiles, train_loop


def uniform_layer_map(captured: list[int], teacher_layers: int, student_layers: int) -> list[tuple[int, int]]:
    """Map each captured teacher layer t to student layer round(t · L_s / L_t) (0 stays 0)."""
    return [(round(t * student_layers / teacher_layers), t) for t in captured]


def resolve_kd_signal(requested: str, store: TargetsStore) -> str:
    """"topk" or "sampled": what the KD term reads, refusing a kind the store does not hold."""
    has = {"topk": store.top_k > 0, "sampled": store.samples > 0}
    has["topk_sampled"] = has["topk"] and has["sampled"]
    kind = requested if requested != "auto" else ("topk" if has["topk"] else "sampled")
    if not has[kind]:
        other = "sampled" if kind == "topk" else "topk"
        raise KdcacheError(f"{store.path} holds no {kind} targets (top_k={store.top_k}, samples="
                           f"{store.samples}); use --kd-signal {other} or re-run cache with them "
                           f"(--top-k K --samples S for topk_sampled).")
    return kind


def signal_names(store: TargetsStore, kind: str) -> list[str]:
    """The arrays of `store` that the KD signal `kind` reads."""
    return {"topk": store.topk_names, "sampled": store.sampled_names,
            "topk_sampled": lambda: store.topk_names() + store.sampled_names()}[kind]()


def check_signal_settings(config, kind: str, capture_temperature: float) -> None:
    """topk_sampled is the forward KL at the capture temperature: its draws cannot be re-tempered."""
    if kind == "topk_sampled" and config.loss != "tail_kl":
        raise KdcacheError(f"kd_signal topk_sampled computes the forward KL (loss tail_kl), not {config.loss}; "
                           f"set loss tail_kl or use kd_signal topk.")
    if kind == "topk_sampled" and (config.temperature not in (0.0, capture_temperature)
                                   or config.temperature_schedule):
        raise KdcacheError(f"kd_signal topk_sampled trains at the capture temperature ({capture_temperature:g}): "
                           f"its sampled ids were drawn there. Set temperature 0 (or {capture_temperature:g}) "
                           f"and no temperature_schedule, or use kd_signal topk with a tail_model.")


def check_cosine(config: StudentConfig, stores: list[TargetsStore], model) -> tuple[int, int] | None:
    """(student's last layer, teacher's last layer) for --cosine, or None without it; refuses a run
    whose first store lacks the teacher's last layer at full width."""
    if not config.cosine:
        return None
    if not stores:
        raise KdcacheError("--cosine compares the student's last hidden state with the teacher's: give --targets "
                           "a store captured with the teacher's last layer, or set cosine 0.")
    store, last = stores[0], int(stores[0].attrs["teacher_num_layers"])
    if last not in store.layers or store.hidden_rank:
        raise KdcacheError(f"--cosine needs the teacher's last layer ({last}) at full width, but {store.path} holds "
                           f"layers {store.layers} (hidden_rank {store.hidden_rank}); re-run cache with --layer "
                           f"{last} and hidden_rank 0, or set cosine 0.")
    return num_layers(model), last


def attention_plan(config: StudentConfig, stores: list[TargetsStore], model) -> dict:
    """Objective fields of the attention term (gamma that ever rises above 0), refused before training
    when no store holds the attention it needs or the student cannot compute it; {} without gamma."""
    if config.schedule("gamma").bounds()[1] <= 0:
        return {}
    if len(stores) != 1:
        raise KdcacheError("gamma > 0 distils attention from one targets store; pass exactly one --targets "
                           "captured with --attention-layer, or set gamma 0 (and no gamma_schedule).")
    store, student_blocks = stores[0], num_layers(model)
    captured = list(fmt.attribute(store.attrs, "attention_layers"))
    if not captured:
        raise KdcacheError(f"gamma > 0 asks for the attention loss, but {store.path} holds no attention; re-run "
                           f"cache with --attention-layer L, or set gamma 0 (and no gamma_schedule).")
    teacher_blocks = int(store.attrs["teacher_num_layers"])
    if config.attention_loss == "minilm":
        pairs = [(student_blocks, max(captured))]  # last block to the deepest captured one
    else:
        pairs = config.attention_pairs() or [(max(1, round(t * student_blocks / teacher_blocks)), t)
                                             for t in captured]
    missing = sorted({t for _, t in pairs} - set(captured))
    bad_student = sorted({s for s, _ in pairs if not 1 <= s <= student_blocks})
    if missing or bad_student:
        raise KdcacheError(f"attention_layer_map pairs student blocks 1..{student_blocks} with captured teacher "
                           f"blocks {captured}; {missing or bad_student} are not among them.")
    relation_heads = int(fmt.attribute(store.attrs, "value_relation_heads"))
    if config.attention_loss == "minilm" and relation_heads:
        width = value_width(model, student_blocks)
        if width % relation_heads:
            raise KdcacheError(f"the store's value relations have {relation_heads} relation heads, which do not "
                               f"divide the student's value width {width}; pick n_embd a multiple of "
                               f"{relation_heads}, or re-capture with --relation-heads dividing {width}.")
    use_distilling_attention(model, "student")
    return {"gamma": config.gamma, "attention_loss": config.attention_loss, "attention_pairs": pairs,
            "relation_heads": relation_heads if config.attention_loss == "minilm" else 0}


def attention_names(store: TargetsStore, fields: dict) -> list[str]:
    """Stored arrays the attention term reads (each matrix's `_keys` / `_probs`)."""
    matrices = {fmt.attention_array(t) for _, t in fields.get("attention_pairs", [])}
    if fields.get("relation_heads"):
        matrices |= {fmt.attention_array(t, "value_relation") for _, t in fields["attention_pairs"][-1:]}
    return [name for name in store.array_names() if name.rpartition("_")[0] in matrices]


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
        for key, option in (("rows_per_shard", "--rows-per-shard"), ("capture_temperature", "--capture-temperature")):
            mine, theirs = fmt.attribute(store.attrs, key), fmt.attribute(first.attrs, key)
            if mine != theirs:
                raise KdcacheError(f"{store.path} was captured with {key} {mine} but {first.path} with {theirs}; "
                                   f"re-run `kdcache cache --out {store.path}` with {option} {theirs}.")


def run_offline(config: StudentConfig, tokens_dir: str, out: str, targets: str | list[str] | None = None,
                files: TrainFiles | str | None = None, add_targets=None, teacher_dir: str | None = None,
                logit_terms=(), stateful=()) -> dict:
    """Train one student from a token store (+ targets stores) and save it with save_pretrained.

    targets: a store path, or several "PATH[:WEIGHT]" (one per teacher; see `parse_targets`); none:
    plain CE training. Everything that can be refused (fingerprints, vocabulary, layers) is checked
    before training. add_targets: called on every batch before its step (train_loop's hook; it may add the
    teacher's targets, as the online baseline does).
    logit_terms, stateful: extra loss terms on the logits and their state (see adversarial.py).
    """
    tokens = TokenStore(tokens_dir)
    specs = parse_targets(targets)
    paths, weights = [path for path, _ in specs], tuple(weight for _, weight in specs) or (1.0,)
    distill = distills(config) and (bool(specs) or add_targets is not None)  # the hook may supply targets
    uses_hidden = config.schedule("beta").bounds()[1] > 0  # beta that ever rises above 0
    model = build_student(config, tokens, teacher_dir=teacher_dir)  # the teacher only with --init-from-teacher
    check_room([model], out)
    layer_pairs, stores, kind, capture_temperature = [], [TargetsStore(path) for path in paths], "topk", 1.0
    if config.schedule("gamma").bounds()[1] > 0 and not stores:
        raise KdcacheError("gamma > 0 asks for the attention loss: pass --targets captured with "
                           "--attention-layer, or set gamma 0 (and no gamma_schedule).")
    attention = attention_plan(config, stores, model) if stores else {}
    if stores:
        store = stores[0]
        if uses_hidden and len(stores) > 1:
            raise KdcacheError("the hidden-state loss reads one teacher's layers; with several --targets set "
                               "beta 0 (and no beta_schedule), or train on hidden states from one store.")
        if uses_hidden and not store.layers and not config.layer_map:
            raise KdcacheError(f"beta > 0 asks for the hidden-state loss, but {store.path} holds no hidden "
                               f"states; re-run cache with --layer L, or set beta 0 (and no beta_schedule).")
        pairs = config.layer_pairs()
        if uses_hidden and not pairs:
            pairs = uniform_layer_map(store.layers, int(store.attrs["teacher_num_layers"]), num_layers(model))
        for each in stores:
            each.check_compatible(tokens, "train", tokens.num_outputs, [t for _, t in pairs] if each is store else [])
        check_same_layout(stores)
        if config.loss == "uld" and len(stores) > 1 and config.multi_teacher == "mixture":
            raise KdcacheError("loss uld compares each teacher's sorted probabilities on its own: with several "
                               "--targets set multi_teacher sum (the weighted sum of the per-teacher losses).")
        bad_student = [s for s, _ in pairs if s > num_layers(model)]
        if bad_student:
            raise KdcacheError(f"student layers {bad_student} in layer_map do not exist (student has "
                               f"{num_layers(model)}).")
        layer_pairs = pairs if uses_hidden else []
        capture_temperature = store.capture_temperature
        kind = resolve_kd_signal(config.kd_signal, store)
        check_signal_settings(config, kind, capture_temperature)
        for other in stores[1:]:
            resolve_kd_signal(kind, other)  # every teacher must hold the kind the first one gives
    cosine_pair = check_cosine(config, stores, model)
    # To the stored width: the teacher's D, or the rank P of a low-rank store (its coefficients).
    projections = torch.nn.ModuleDict({
        str(s): torch.nn.Linear(hidden_size(model), store.hidden_width, bias=False)
        for s, _ in layer_pairs})
    if cosine_pair and hidden_size(model) != store.hidden_width:
        projections["cosine"] = torch.nn.Linear(hidden_size(model), store.hidden_width, bias=False)
    hidden_scale = store.hidden_width / int(store.attrs["hidden_size"]) if layer_pairs else 1.0
    objective = make_objective(config, tokens, distill, capture_temperature, kd_signal=kind,
                               layer_pairs=layer_pairs, projections=projections, hidden_scale=hidden_scale,
                               teacher_weights=weights, cosine_pair=cosine_pair or (0, 0),
                               logit_terms=list(logit_terms), **attention)
    names = [signal_names(s, kind) if distill else [] for s in stores]
    hidden_layers = [t for _, t in layer_pairs] + ([cosine_pair[1]] if cosine_pair else [])
    if hidden_layers:
        names[0] = names[0] + [fmt.hidden_array(t) for t in dict.fromkeys(hidden_layers)]
    if attention:
        names[0] = names[0] + attention_names(stores[0], attention)
    if config.verify:
        for each, its_names in zip(stores, names):
            if its_names:
                each.check_shards(its_names)  # a corrupt shard would train silently on garbage
    reading = any(names)  # a store that contributes nothing is not read
    stream = BlockStream(tokens_dir, "train", paths if reading else None, names if reading else None,
                         shuffle_buffer=config.shuffle_buffer, seed=config.seed)
    device = runtime.resolve_device(config.device)
    projections.to(device)
    history = train_loop(model, stream, config, objective, device, f"student {Path(out).name}",
                         files, [projections], add_targets, stateful)
    save_student(model, tokens, out, config, history, targets=paths, target_weights=list(weights))
    return history[-1]
