"""The targets store's schema: every array's name, per-row shape, dtype, encoder and decoder.

The writer (through `array_specs` and `encode_targets`), the reader (`array_names`, `decode_rows`),
`inspect` and the loader all go through this file; codecs.py and ids.py do the bytes. A new kind of
target is one more `Signal` here, its codec, and its loss. docs/FORMAT.md is the human-readable
version of this file; keep the two in step.

Arrays are indexed [row, position, ...]: R rows, P positions per row (`positions`, the task's; T for
causal LM), K top-k entries, N samples, D hidden width (or the rank of a low-rank store).
"""

from __future__ import annotations

import numpy as np
import torch
from zarr.codecs import BloscCodec

from pipeline.errors import KdcacheError
from pipeline.targets import codecs
from pipeline.targets.codecs import ENCODINGS, check_encoding
from pipeline.targets.ids import count_dtype, decode_ids, encode_ids, ids_spec
from pipeline.tasks import get_task

FORMAT_NAME = "kdcache-targets"
# 2 added bit-packed ids, the sqd encoding, top-p trimming, low-rank hidden states; 3 renamed the
# attribute `temperature` to `capture_temperature`; 4 moved the per-shard completion records out of
# the group attributes into objects of their own (RECORDS).
FORMAT_VERSION = 4
READABLE_VERSIONS = (1, 2, 3, 4)  # older stores are newer ones with those features off
RECORDS_SINCE = 4  # versions before keep their records in the attributes `shards` and `shard_stats`

RECORDS = "records"  # a zarr group beside the arrays: one child group per finished shard


def record_name(index: int) -> str:
    """The child of RECORDS whose attributes record shard `index`: {shard, rows, checksums, stats}."""
    return f"shard_{index:06d}"

TOPK_IDS = "topk_ids"            # (R, P, K) uint16, or bit-packed uint8 bytes above 65 536 ids (ids.py)
TOPK_LOGPROBS = "topk_logprobs"  # (R, P, K) log p at the capture temperature, in the store's encoding
TAIL_LOGMASS = "tail_logmass"    # (R, P) float32, log(1 - sum of the top-k probabilities); -inf if none
TOPK_COUNT = "topk_count"        # (R, P) uint8 | uint16, kept entries per position (top-p); absent: all K
SAMPLED_IDS = "sampled_ids"      # (R, P, N) ids drawn from the teacher, distinct ids first, then id 0 padding
SAMPLED_COUNTS = "sampled_counts"  # (R, P, N) uint8 draw counts of those ids (0 for padding); sum N
HIDDEN_PREFIX = "hidden_layer_"
TARGET_POSITIONS = "target_positions"  # (R, P) uint16: masked LM, the block positions the targets are at
ATTENTION_KINDS = ("attention", "value_relation")  # attention_layer_L, value_relation_layer_L
SPARSE_PIECE_BYTES = 4 << 20  # float32 bytes of topk attention rows decoded at a time (Attention.decode_sparse)


def hidden_array(layer: int) -> str:
    """Hidden states of one teacher layer: (R, T, D) float16; 0 = embeddings, i = after block i."""
    return f"{HIDDEN_PREFIX}{layer}"


def hidden_basis_arrays(layer: int) -> tuple[str, str]:
    """With hidden_rank P > 0: the layer's basis (D, P) float32 and mean (D,) float32, written once."""
    return f"hidden_basis_layer_{layer}", f"hidden_mean_layer_{layer}"


def attention_array(layer: int, kind: str = "attention") -> str:
    """Decoded attention of teacher block `layer` (1..L): (R, H, T, T) float32, rows summing to 1.

    kind "attention": softmax(QKᵀ/√d) of each head; "value_relation": softmax(VVᵀ/√d) causal, of each
    of the store's `value_relation_heads` relation heads (MiniLM). Stored as `{this}_{role}` arrays
    (codecs.attention_arrays: `_probs`, and `_keys` for the topk encoding).
    """
    return f"{kind}_layer_{layer}"


def params_array(encoding: str) -> str:
    """The per-position parameter array of an encoding that has one (q8: `topk_logprobs_q8`)."""
    return f"{TOPK_LOGPROBS}_{encoding}"


def teacher_key(name: str, teacher: int) -> str:
    """Batch key of array `name` from the teacher-th targets store (the first keeps the bare name)."""
    return name if teacher == 0 else f"{name}@{teacher}"


# --- Identity: the attributes that say what a store holds -------------------------------------------
# A store whose identity differs from the capture being asked for is stale (different teacher, tokens
# or settings): never resumed.
IDENTITY_KEYS = ("format", "format_version", "tokens_fingerprint", "teacher_fingerprint", "split",
                 "rows", "block_size", "vocab_size", "capture_temperature", "top_k", "top_p", "min_k",
                 "encoding", "ids_dtype", "layers", "hidden_size", "hidden_dtype", "hidden_rank",
                 "hidden_fit_rows", "rows_per_chunk", "rows_per_shard", "teacher_num_layers", "samples", "seed",
                 "task", "mask_count", "attention_layers", "attention_encoding", "attention_top_k",
                 "attention_heads", "value_relation_heads")

# Identity keys added after format version 1, with the value that means "off": an older store (or an
# identity) without them holds that value.
IDENTITY_DEFAULTS = {"top_p": 1.0, "min_k": 1, "hidden_rank": 0, "hidden_fit_rows": 0, "task": "causal",
                     "mask_count": 0, "attention_layers": [], "attention_encoding": "", "attention_top_k": 0,
                     "attention_heads": 0, "value_relation_heads": 0}
# Attributes renamed since: new name -> the name older stores use.
RENAMED = {"capture_temperature": "temperature"}


def attribute(attrs: dict, key: str, default=None):
    """A store attribute by its current name, falling back to the name an older store used."""
    if key in attrs:
        return attrs[key]
    return attrs.get(RENAMED.get(key, key), IDENTITY_DEFAULTS.get(key, default))


def identity_of(attrs: dict) -> dict:
    """The IDENTITY_KEYS of a store's attributes (or of a capture's settings), old spellings read."""
    return {key: attribute(attrs, key) for key in IDENTITY_KEYS}


def positions(identity: dict) -> int:
    """P, target positions per row: the task's (every position of the block for causal LM)."""
    return get_task(identity.get("task", "causal")).positions(identity)


def compressor_for(dtype) -> BloscCodec:
    """Bit-shuffle floats (sign/exponent bits line up across values); byte-shuffle integer ids."""
    shuffle = "bitshuffle" if str(dtype).startswith(("float", "bfloat")) else "shuffle"
    return BloscCodec(cname="zstd", clevel=5, shuffle=shuffle)


def shard_ranges(rows: int, rows_per_shard: int) -> list[tuple[int, int]]:
    """[start, stop) row ranges of every shard; the last one may be short."""
    return [(start, min(start + rows_per_shard, rows)) for start in range(0, rows, rows_per_shard)]


def check_version(attrs: dict, path) -> None:
    if attrs.get("format") != FORMAT_NAME:
        raise KdcacheError(f"{path} is not a kdcache targets store (format={attrs.get('format')!r}).")
    version = attrs.get("format_version")
    if version not in READABLE_VERSIONS:
        raise KdcacheError(f"{path} was written with targets format version {version}; this kdcache reads "
                           f"versions {', '.join(map(str, READABLE_VERSIONS))}. Re-run `kdcache cache` to "
                           f"rewrite it, or use the kdcache release that wrote it.")


# --- Signals: what a teacher contributes per position, and how each is stored -----------------------
# Each signal maps the teacher's tensors (teacher/signals.py's names) to stored arrays and back.
# `identity` is a store's attributes (or a capture's identity); `stored` holds encoded arrays by name.


class TopK:
    """Top-k ids sorted by probability, their log-probs in the store's encoding, and the tail mass."""

    def present(self, identity: dict) -> bool:
        return bool(int(identity.get("top_k") or 0))

    def names(self, identity: dict) -> list[str]:
        """Arrays read together for top-k targets: ids, values (+ parameters), counts if trimmed, tail."""
        return list(self.arrays(identity))

    def arrays(self, identity: dict) -> dict[str, tuple[tuple, str]]:
        P, K, encoding = positions(identity), int(identity["top_k"]), identity["encoding"]
        check_encoding(encoding)
        id_shape, id_dtype = ids_spec(identity["ids_dtype"], K)
        roles = topk_role_names(encoding)
        specs = {TOPK_IDS: ((P, *id_shape), id_dtype),
                 **{roles[role]: spec for role, spec in ENCODINGS[encoding].arrays(P, K).items()}}
        if float(attribute(identity, "top_p")) < 1.0:
            specs[TOPK_COUNT] = ((P,), count_dtype(K))
        specs[TAIL_LOGMASS] = ((P,), "float32")
        return specs

    def encode(self, targets: dict[str, torch.Tensor], identity: dict) -> dict[str, np.ndarray]:
        stored = encode_topk(targets[TOPK_IDS], targets[TOPK_LOGPROBS], identity["encoding"],
                             identity["ids_dtype"], targets.get(TOPK_COUNT))
        return {**stored, TAIL_LOGMASS: targets[TAIL_LOGMASS].float().cpu().numpy()}

    def decode(self, stored: dict[str, np.ndarray], attrs: dict) -> dict[str, torch.Tensor]:
        out = {}
        if TOPK_LOGPROBS in stored:
            out.update(decode_topk(stored, attrs.get("ids_dtype"), attrs.get("encoding")))
        elif TOPK_IDS in stored:
            encoding = ENCODINGS.get(attrs.get("encoding"))
            if encoding is not None and encoding.owns_ids:  # ids alone are differences
                raise KdcacheError(f"encoding {attrs['encoding']} stores ids and values together: read "
                                   f"{TOPK_IDS} with {TOPK_LOGPROBS}.")
            out[TOPK_IDS] = decode_ids(stored[TOPK_IDS], attrs.get("ids_dtype"),
                                       int(attrs.get("top_k", stored[TOPK_IDS].shape[-1])))
        if TAIL_LOGMASS in stored:
            out[TAIL_LOGMASS] = torch.from_numpy(np.asarray(stored[TAIL_LOGMASS], dtype=np.float32))
        return out

    def owns(self, name: str) -> bool:
        return name in (TOPK_IDS, TOPK_LOGPROBS, TOPK_COUNT, TAIL_LOGMASS) or name.startswith(TOPK_LOGPROBS + "_")


class Sampled:
    """Ids drawn from the teacher (random-sampling KD), as distinct ids + counts."""

    def present(self, identity: dict) -> bool:
        return bool(int(identity.get("samples") or 0))

    def names(self, identity: dict) -> list[str]:
        return [SAMPLED_IDS, SAMPLED_COUNTS]

    def arrays(self, identity: dict) -> dict[str, tuple[tuple, str]]:
        P, N = positions(identity), int(identity["samples"])
        id_shape, id_dtype = ids_spec(identity["ids_dtype"], N)
        return {SAMPLED_IDS: ((P, *id_shape), id_dtype), SAMPLED_COUNTS: ((P, N), "uint8")}

    def encode(self, targets, identity):
        return {SAMPLED_IDS: encode_ids(targets[SAMPLED_IDS], identity["ids_dtype"]),
                SAMPLED_COUNTS: targets[SAMPLED_COUNTS].cpu().numpy().astype(np.uint8)}

    def decode(self, stored, attrs):
        out = {}
        if SAMPLED_IDS in stored:
            width = int(attrs.get("samples", stored[SAMPLED_IDS].shape[-1]))
            out[SAMPLED_IDS] = decode_ids(stored[SAMPLED_IDS], attrs.get("ids_dtype"), width)
        if SAMPLED_COUNTS in stored:
            out[SAMPLED_COUNTS] = torch.from_numpy(stored[SAMPLED_COUNTS].astype(np.int64))
        return out

    def owns(self, name: str) -> bool:
        return name in (SAMPLED_IDS, SAMPLED_COUNTS)


class Hidden:
    """Hidden states of the captured layers at every token: full width, or low-rank coefficients."""

    def present(self, identity: dict) -> bool:
        return bool(identity.get("layers"))

    def names(self, identity: dict) -> list[str]:
        return [hidden_array(layer) for layer in identity.get("layers", [])]

    def arrays(self, identity: dict) -> dict[str, tuple[tuple, str]]:
        width = int(attribute(identity, "hidden_rank") or identity["hidden_size"])  # coefficients, or full
        dtype = codecs.hidden_storage_dtype(identity["hidden_dtype"])
        return {name: ((int(identity["block_size"]), width), dtype) for name in self.names(identity)}

    def encode(self, targets, identity):
        return {name: codecs.encode_hidden(targets[name], identity["hidden_dtype"]) for name in self.names(identity)}

    def decode(self, stored, attrs):
        return {name: codecs.decode_hidden(array, attrs.get("hidden_dtype", "float16"))
                for name, array in stored.items() if self.owns(name)}

    def owns(self, name: str) -> bool:
        return name.startswith(HIDDEN_PREFIX)


class Positions:
    """Masked LM: the block positions of a row's P = M targets (the token store's mask_positions), kept
    so that a reader can check that its tokens carry the masks the teacher saw."""

    def present(self, identity: dict) -> bool:
        return attribute(identity, "task") == "masked"

    def names(self, identity: dict) -> list[str]:
        return [TARGET_POSITIONS]

    def arrays(self, identity: dict) -> dict[str, tuple[tuple, str]]:
        return {TARGET_POSITIONS: ((positions(identity),), "uint16" if int(identity["block_size"]) <= 2**16
                                   else "int32")}

    def encode(self, targets, identity):
        dtype = self.arrays(identity)[TARGET_POSITIONS][1]
        return {TARGET_POSITIONS: targets[TARGET_POSITIONS].cpu().numpy().astype(dtype)}

    def decode(self, stored, attrs):
        return {name: torch.from_numpy(array.astype(np.int64)) for name, array in stored.items()}

    def owns(self, name: str) -> bool:
        return name == TARGET_POSITIONS


class Attention:
    """Attention matrices of the captured teacher blocks (all heads), and their value relations."""

    def present(self, identity: dict) -> bool:
        return bool(attribute(identity, "attention_layers"))

    def matrices(self, identity: dict) -> dict[str, int]:
        """Decoded name (attention_array) -> its head count, for every stored matrix."""
        heads = {"attention": int(attribute(identity, "attention_heads")),
                 "value_relation": int(attribute(identity, "value_relation_heads"))}
        return {attention_array(layer, kind): heads[kind] for layer in attribute(identity, "attention_layers")
                for kind in ATTENTION_KINDS if heads[kind]}

    def names(self, identity: dict) -> list[str]:
        return list(self.arrays(identity))

    def arrays(self, identity: dict) -> dict[str, tuple[tuple, str]]:
        encoding, top_k = attribute(identity, "attention_encoding"), int(attribute(identity, "attention_top_k"))
        block = int(identity["block_size"])
        return {f"{matrix}_{role}": spec for matrix, heads in self.matrices(identity).items()
                for role, spec in codecs.attention_arrays(encoding, heads, block, top_k).items()}

    def encode(self, targets, identity):
        encoding, top_k = attribute(identity, "attention_encoding"), int(attribute(identity, "attention_top_k"))
        return {f"{matrix}_{role}": array for matrix in self.matrices(identity)
                for role, array in codecs.encode_attention(targets[matrix], encoding, top_k).items()}

    def decode(self, stored, attrs):
        encoding = attribute(attrs, "attention_encoding")
        return {matrix: codecs.decode_attention(roles, encoding) for matrix, roles in self.by_matrix(stored).items()}

    def decode_sparse(self, stored, attrs):
        """topk: each matrix decoded as `{matrix}_{role}` for role in codecs.SPARSE_ROLES (its rows as
        K entries and a fill value, codecs.sparse_attention); other encodings: decoded rows, as `decode`."""
        if attribute(attrs, "attention_encoding") != "topk":
            return self.decode(stored, attrs)
        decoded = {}
        for matrix, roles in self.by_matrix(stored).items():
            keys, probs = roles[codecs.KEYS], roles[codecs.PROBS]
            # A few MiB of rows at a time: the float32 temporaries are reused from one piece to the next
            # instead of being fresh (page-faulted) memory as large as the shard (BENCHMARKS §17).
            step = max(1, SPARSE_PIECE_BYTES // (4 * int(np.prod(probs.shape[1:]))))
            pieces = [codecs.sparse_attention(keys[i:i + step], probs[i:i + step]) for i in range(0, len(probs), step)]
            decoded.update({f"{matrix}_{role}": torch.cat(parts) if len(parts) > 1 else parts[0]
                            for role, parts in zip(codecs.SPARSE_ROLES, zip(*pieces))})
        return decoded

    @staticmethod
    def by_matrix(stored) -> dict[str, dict]:
        """{`{matrix}_{role}`: array} → {matrix: {role: array}}."""
        found: dict[str, dict] = {}
        for name, array in stored.items():
            matrix, _, role = name.rpartition("_")
            found.setdefault(matrix, {})[role] = array
        return found

    def owns(self, name: str) -> bool:
        return name.startswith(tuple(f"{kind}_layer_" for kind in ATTENTION_KINDS))


SIGNALS = {"topk": TopK(), "sampled": Sampled(), "hidden": Hidden(), "positions": Positions(),
           "attention": Attention()}


def array_specs(identity: dict) -> dict[str, tuple[tuple, str]]:
    """name -> (per-row shape, dtype) of every row-indexed array a capture with `identity` writes."""
    return {name: spec for signal in SIGNALS.values() if signal.present(identity)
            for name, spec in signal.arrays(identity).items()}


def array_names(attrs: dict) -> list[str]:
    """Names of every row-indexed array of a store, in schema order."""
    return list(array_specs(attrs))


def signal_names(attrs: dict, signal: str) -> list[str]:
    """Arrays that hold one signal ("topk", "sampled", "hidden", "positions", "attention") of a store; [] if
    not captured."""
    chosen = SIGNALS[signal]
    return chosen.names(attrs) if chosen.present(attrs) else []


def encode_targets(targets: dict[str, torch.Tensor], identity: dict) -> dict[str, np.ndarray]:
    """The teacher's tensors for a batch of rows → every stored array by name."""
    return {name: array for signal in SIGNALS.values() if signal.present(identity)
            for name, array in signal.encode(targets, identity).items()}


def decode_rows(stored: dict[str, np.ndarray], attrs: dict | None = None,
                sparse_attention: bool = False) -> dict[str, torch.Tensor]:
    """Encoded arrays → float32 / int64 tensors, same names.

    attrs: the store's attributes (`TargetsStore.attrs`); needed for bit-packed ids (V > 65 536) and
    for encodings that store ids and values together (sqd).
    Top-k arrays are decoded together: an encoding's parameter array (`topk_logprobs_{name}`) and
    `topk_count` must be passed along with `topk_logprobs` and are consumed, not returned.
    sparse_attention: topk attention decoded as K entries and a fill value per row
    (Attention.decode_sparse): the training losses read those without building T × T rows.
    """
    attrs = attrs or {}
    out = {}
    for signal in SIGNALS.values():
        mine = {name: array for name, array in stored.items() if signal.owns(name)}
        if mine:
            decode = signal.decode_sparse if sparse_attention and isinstance(signal, Attention) else signal.decode
            out.update(decode(mine, attrs))
    for name, array in stored.items():  # arrays of no signal (e.g. hidden bases): plain floats
        if not any(signal.owns(name) for signal in SIGNALS.values()):
            out[name] = torch.from_numpy(np.asarray(array, dtype=np.float32))
    return out


# --- Top-k arrays by name ⇄ codecs by role --------------------------------------------------------


def topk_role_names(encoding: str) -> dict[str, str]:
    """codec role -> array name, for the top-k arrays of `encoding`."""
    return {codecs.IDS: TOPK_IDS, codecs.VALUES: TOPK_LOGPROBS, codecs.PARAMS: params_array(encoding),
            codecs.COUNT: TOPK_COUNT}


def topk_value_names(encoding: str) -> list[str]:
    """Names of the arrays that hold top-k log-probs in `encoding` (read them together)."""
    check_encoding(encoding)
    return [TOPK_LOGPROBS] + ([params_array(encoding)] if ENCODINGS[encoding].has_params else [])


def find_encoding(stored: dict[str, np.ndarray], name: str | None = None) -> tuple[str, codecs.Encoding]:
    """(name, encoding) of stored top-k arrays: `name` (the store's `encoding` attribute) if given,
    else by their parameter array, else by the values' dtype."""
    if name is not None:
        check_encoding(name)
        return name, ENCODINGS[name]
    for each, encoding in ENCODINGS.items():
        if encoding.has_params and params_array(each) in stored:
            return each, encoding
    dtype = np.dtype(stored[TOPK_LOGPROBS].dtype).name
    for each, encoding in ENCODINGS.items():
        if not encoding.has_params and not encoding.owns_ids and encoding.dtype == dtype:
            return each, encoding
    needs = [params_array(each) for each, e in ENCODINGS.items() if e.has_params and e.dtype == dtype]
    raise KdcacheError(f"{TOPK_LOGPROBS} is stored as {dtype} and cannot be decoded without its "
                       f"parameter array ({' or '.join(needs) or 'none known'}); read every array of "
                       f"TargetsStore.array_names() that starts with {TOPK_LOGPROBS}, and pass the "
                       f"store's attributes (decode_rows(stored, store.attrs)) to name its encoding.")


def encode_topk(ids, logprobs, encoding: str, ids_dtype: str, count=None) -> dict[str, np.ndarray]:
    """(R, P, K) ids and log-probs sorted descending (tensors or arrays; and (R, P) kept counts if
    trimmed) → the stored top-k arrays by name (all but the tail)."""
    check_encoding(encoding)
    as_numpy = lambda x: x.cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)  # noqa: E731
    count = None if count is None else as_numpy(count)
    by_role = ENCODINGS[encoding].encode_topk(as_numpy(ids), as_numpy(logprobs).astype(np.float32),
                                             ids_dtype, count)
    roles = topk_role_names(encoding)
    return {roles[role]: array for role, array in by_role.items()}


def decode_topk(stored: dict[str, np.ndarray], ids_dtype: str | None = None,
                encoding: str | None = None) -> dict[str, torch.Tensor]:
    """Stored top-k arrays by name (ids, values and their parameters, counts) → topk_ids int64 (if
    stored) and topk_logprobs float32, (R, P, K) each, most probable first; padded entries are id 0,
    log-prob −inf. ids_dtype, encoding: the store's attributes (needed for packed ids and for sqd)."""
    name, codec = find_encoding(stored, encoding)
    roles = topk_role_names(name)
    by_role = {role: stored[array] for role, array in roles.items() if array in stored}
    decoded = codec.decode_topk(by_role, ids_dtype)
    return {roles[role]: tensor for role, tensor in decoded.items()}
