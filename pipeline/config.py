"""Typed settings for each stage, validated once.

One dataclass per DVC stage (`prepare` = PrepareConfig = params.yaml `prepare:`). Field defaults are
the only defaults in the project; the click options in `stages/` are generated from these fields and
their `help` metadata, so `--help`, params.yaml and the library cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline import runtime
from pipeline.errors import KdcacheError
from pipeline.losses import ATTENTION_LOSSES, HIDDEN_LOSSES, KD_LOSSES, TAIL_MODELS
from pipeline.schedules import Schedule, make_schedule
from pipeline.targets.codecs import ATTENTION_ENCODINGS, ENCODINGS, HIDDEN_DTYPES


def setting(default, help: str, **extra):
    """A dataclass field carrying its --help text (tuples become repeatable options)."""
    if isinstance(default, tuple):
        return field(default_factory=lambda: default, metadata={"help": help, **extra})
    return field(default=default, metadata={"help": help, **extra})


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise KdcacheError(message)


@dataclass(frozen=True)
class PrepareConfig:
    corpus: str = setting("stdlib", "Corpus: 'stdlib' (this Python's standard library source), a path or "
                          "glob of .txt/.jsonl/.parquet files, or hf:NAME[:CONFIG][:SPLIT].")
    tokenizer: str = setting("", "Tokenizer path or hub id (use the teacher's). Empty: train a byte-level "
                             "BPE on the train split.")
    vocab_size: int = setting(4096, "Vocabulary size of the trained BPE (ignored with --tokenizer).")
    block_size: int = setting(128, "Tokens per packed block (one row of the token store).")
    val_fraction: float = setting(0.05, "Fraction of documents held out for validation.")
    max_documents: int = setting(0, "Use at most this many documents (0: all).")
    task: str = setting("causal", "What the models learn: causal (next token, packed blocks), masked (masked "
                        "LM: packed blocks with masks fixed here, BERT's 80/10/10) or classification (one "
                        "example per row, padded to block_size, with its label).")
    mask_rate: float = setting(0.15, "With --task masked: the share of each block's positions masked "
                               "(exactly round(rate x block_size) per block).")
    mask_views: int = setting(1, "With --task masked: differently masked copies of every train block (an "
                              "offline stand-in for dynamic masking); validation has one.")
    mask_seed: int = setting(0, "With --task masked: seed of the masks (the same seed writes the same masks).")
    text_field: str = setting("text", "The field (column) holding each document's (or, with --task "
                              "classification, each record's) text in .jsonl and .parquet files and hf: datasets.")
    label_field: str = setting("label", "With --task classification: the field or column holding each "
                               "record's label (a name or an integer).")
    skip_bad_lines: bool = setting(False, "Skip (and count) lines of .txt/.jsonl files that are not UTF-8 or "
                                   "not JSON, instead of stopping at the first one.")
    mix: tuple = setting((), "Instead of reading a corpus, mix token stores: DIR or DIR:WEIGHT (repeat). The "
                         "train split takes WEIGHT x each store's train rows (0.5: a seeded half, 2: every row "
                         "twice), shuffled; validation is the first store's. Stores must share tokenizer and "
                         "block size; the corpus settings are ignored. Causal LM stores only.")

    def __post_init__(self):
        _check(self.task in ("causal", "masked", "classification"),
               f"task must be causal, masked or classification, got {self.task!r}.")
        _check(0.0 < self.mask_rate < 1.0, f"mask_rate must be in (0, 1), got {self.mask_rate}.")
        _check(self.mask_views >= 1, f"mask_views must be >= 1, got {self.mask_views}.")
        _check(self.block_size >= 2, f"block_size must be >= 2, got {self.block_size}.")
        _check(0.0 < self.val_fraction < 1.0,
               f"val_fraction must be in (0, 1), got {self.val_fraction}.")
        _check(self.vocab_size >= 260, f"vocab_size must be >= 260 (256 bytes + specials), got {self.vocab_size}.")
        _check(self.max_documents >= 0, "max_documents must be >= 0 (0 means all).")
        _check(bool(self.text_field), "text_field must name a field, e.g. text.")
        _check(not (self.mix and self.task != "causal"),
               f"--mix mixes causal LM token stores; a {self.task} store is prepared from its corpus.")


DTYPES = ("float32", "bfloat16", "float16")
READERS = ("process", "thread")


@dataclass(frozen=True)
class TrainSettings:
    """Optimisation settings shared by the default teacher and the students."""

    max_steps: int = setting(200, "Stop after this many optimizer steps (0: no step limit).")
    epochs: int = setting(0, "Stop after this many passes over the data (0: no epoch limit).")
    batch_size: int = setting(16, "Blocks per optimizer step.")
    lr: float = setting(1e-3, "Peak learning rate (AdamW).")
    warmup_steps: int = setting(20, "Linear warm-up steps before cosine decay.")
    weight_decay: float = setting(0.01, "AdamW weight decay, on weight matrices only (not on biases, norms "
                                  "or position embeddings).")
    min_lr_ratio: float = setting(0.1, "The cosine schedule ends at this fraction of --lr.")
    seed: int = setting(0, "Seed for initialisation and data order.")
    num_workers: int = setting(0, "DataLoader worker processes decoding shards.")
    reader: str = setting("process", "With num_workers 0, where shards are read and decoded: process (a forked "
                          "reader process hands each batch over in shared memory allocated once; the training "
                          "process reads only one row, to size it) or thread (a thread of the training process).")
    shuffle_buffer: int = setting(256, "Rows held in the shuffle buffer.")
    checkpoint_every: int = setting(0, "Write a checkpoint (model, optimizer, data position, RNG states) "
                                    "every this many steps and at the end, for --resume (0: never).")
    eval_every: int = setting(0, "Compute the validation loss every this many steps and at the end "
                              "(0: never); written to --val-log.")
    eval_batches: int = setting(8, "Validation batches (of batch_size blocks, the same ones every time) "
                                "per evaluation.")
    gradient_accumulation_steps: int = setting(1, "Split each step's batch_size blocks into this many "
                                               "micro-batches run one after another, their gradients summed "
                                               "before the optimizer step: the same update with 1/N of the "
                                               "activation memory (batch_size / world size must divide by N).")
    max_grad_norm: float = setting(1.0, "Clip the global gradient norm to this before each optimizer step "
                                   "(0: no clipping). The norm before clipping is logged as grad_norm.")
    dtype: str = setting("float32", "Training precision: float32, bfloat16 (autocast on CPU or GPU; weights "
                         "and optimizer stay float32) or float16 (autocast with a gradient scaler, CUDA only).")

    def __post_init__(self):
        _check(self.max_steps > 0 or self.epochs > 0,
               "set max_steps or epochs (> 0): otherwise training never stops.")
        _check(self.max_steps >= 0 and self.epochs >= 0, "max_steps and epochs must be >= 0.")
        _check(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}.")
        _check(self.lr > 0, f"lr must be > 0, got {self.lr}.")
        _check(0.0 <= self.min_lr_ratio <= 1.0, f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}.")
        _check(self.num_workers >= 0, "num_workers must be >= 0.")
        _check(self.reader in READERS, f"reader must be one of {', '.join(READERS)}, got {self.reader!r}.")
        _check(min(self.checkpoint_every, self.eval_every) >= 0 and self.eval_batches >= 1,
               "checkpoint_every and eval_every must be >= 0 (0: off) and eval_batches >= 1.")
        self.check_precision()

    def check_precision(self):
        """The options that do not depend on max_steps (also checked for a loaded teacher --model)."""
        _check(self.gradient_accumulation_steps >= 1,
               f"gradient_accumulation_steps must be >= 1, got {self.gradient_accumulation_steps}.")
        _check(self.max_grad_norm >= 0, f"max_grad_norm must be >= 0 (0: no clipping), got {self.max_grad_norm}.")
        _check(self.dtype in DTYPES, f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}.")


@dataclass(frozen=True)
class ModelShape:
    n_layer: int = setting(2, "Transformer layers.")
    n_embd: int = setting(128, "Hidden width.")
    n_head: int = setting(4, "Attention heads (must divide n_embd).")

    def __post_init__(self):
        _check(self.n_layer >= 1 and self.n_embd >= 1, "n_layer and n_embd must be >= 1.")
        _check(self.n_embd % self.n_head == 0,
               f"n_head ({self.n_head}) must divide n_embd ({self.n_embd}).")


@dataclass(frozen=True)
class TeacherConfig(ModelShape, TrainSettings):
    model: str = setting("", "Path or hub id of the teacher: an AutoModelForCausalLM, AutoModelForMaskedLM or "
                         "AutoModelForSequenceClassification, as the token store's task. Empty: train the small "
                         "default teacher on the token store.")
    n_layer: int = setting(4, "Layers of the default teacher.")
    n_embd: int = setting(256, "Width of the default teacher.")
    vocab_multiple: int = setting(64, "Pad the default teacher's vocabulary to a multiple of this "
                                  "(as real models do); targets cover only the tokenizer's ids.")
    device: str = setting("auto", "Torch device for training the default teacher: auto, cpu, cuda, ...")
    dtype: str = setting("float32", "Precision: the default teacher trains in it (as student --dtype: "
                         "float32, bfloat16, or float16 on CUDA); a --model teacher is loaded and saved in it "
                         "(bfloat16 halves its size).")
    finetune: bool = setting(False, "Train the --model teacher on the token store for max_steps before saving: "
                             "for classification, a pretrained encoder with a new head for the store's labels "
                             "(the usual first step of task distillation).")
    mlm_steps: int = setting(0, "Classification, default teacher: masked-LM pre-training steps on the text of the "
                             "train split (15% masks, BERT's 80/10/10) before training on the labels; 0: none.")

    def __post_init__(self):
        runtime.check_device(self.device)
        ModelShape.__post_init__(self)
        _check(not (self.finetune and not self.model),
               "--finetune trains a loaded --model; the default teacher (no --model) is trained anyway.")
        _check(self.mlm_steps >= 0, f"mlm_steps must be >= 0, got {self.mlm_steps}.")
        _check(not (self.mlm_steps and self.model),
               "--mlm-steps pre-trains the default teacher; a --model encoder is pretrained already "
               "(give --finetune to train it on the labels, with --mlm-steps 0).")
        if not self.model or self.finetune:
            TrainSettings.__post_init__(self)
        self.check_precision()
        _check(self.vocab_multiple >= 1, "vocab_multiple must be >= 1.")


@dataclass(frozen=True)
class CacheConfig:
    top_k: int = setting(32, "Teacher log-probs kept per position (sorted by probability); 0 with "
                         "--samples stores sampled targets only.")
    top_p: float = setting(1.0, "Top-p trimming: keep per position the fewest most probable entries "
                           "(of at most --top-k) whose mass reaches P, at least --min-k. 1.0: keep all K.")
    min_k: int = setting(1, "With --top-p: keep at least this many entries per position (1..top_k).")
    samples: int = setting(0, "Also draw this many ids per position from the teacher (random-sampling "
                           "KD), stored as distinct ids + counts; 0: none.")
    seed: int = setting(0, "Seed of the sampled draws (a resumed capture draws the same ids).")
    layers: tuple = setting((), "Teacher hidden-state layer to capture (0 = embeddings, L = last "
                            "block); repeat for several.", type=int, aliases=("--layer",))
    batch_size: int = setting(16, "Blocks per teacher forward pass.")
    capture_temperature: float = setting(1.0, "Capture temperature: targets are log_softmax(logits / T). "
                                         "Students may train at another temperature (see student --tail-model).",
                                         aliases=("--temperature",))
    encoding: str = setting("fp16", "Top-k log-prob encoding (`kdcache encodings` lists them): "
                            + ", ".join(ENCODINGS) + " (sqd: ids and values together, the fewest bytes).")
    split: str = setting("train", "Token-store split to capture.")
    rows_per_chunk: int = setting(32, "Rows per compressed chunk (fewer, larger chunks read faster).")
    rows_per_shard: int = setting(256, "Rows per shard file (the unit of resume, checksums and streaming).")
    device: str = setting("auto", "Torch device for the teacher: auto, cpu, cuda, cuda:1, ...")
    hidden_dtype: str = setting("float16", "Dtype of the stored hidden states (or their --hidden-rank "
                                "coefficients): float16, or bfloat16 (float32's range, for activations "
                                "beyond float16's 65 504).")
    hidden_rank: int = setting(0, "Store each captured layer's hidden states as coefficients on its top-R "
                               "principal directions (fitted at the start of the capture, stored in the "
                               "store); 0: full width.")
    hidden_fit_rows: int = setting(256, "Rows (from the first) the hidden-state basis is fitted on, with "
                                   "--hidden-rank.")
    attention_layers: tuple = setting((), "Teacher block (1..L) whose attention, all heads, is captured "
                                      "(TinyBERT / MiniLM); repeat for several. The teacher then runs with "
                                      "eager attention.", type=int, aliases=("--attention-layer",))
    attention_encoding: str = setting("topk", "Attention encoding: " + ", ".join(ATTENTION_ENCODINGS)
                                      + " (see docs/FORMAT.md and BENCHMARKS.md for bytes and fidelity).")
    attention_top_k: int = setting(0, "With the topk attention encoding: keys kept per query row; 0: as "
                                   "many as --attention-budget holds.")
    attention_budget: int = setting(1024, "Most bytes per token per captured attention layer (attention and "
                                    "value relations together, before compression); a capture that needs "
                                    "more is refused. 0: no limit.")
    value_relations: bool = setting(True, "With --attention-layer: also store each layer's value relations "
                                    "softmax(V Vᵀ/√d) (MiniLM's second term).")
    relation_heads: int = setting(0, "Relation heads of the stored value relations; 0: the teacher's "
                                  "attention heads.")
    background_writer: bool = setting(True, "Reduce, encode, compress and write each batch on a background "
                                      "thread while the teacher runs the next one (at most two batches "
                                      "wait); off: all on one thread. The store is the same either way.")

    def __post_init__(self):
        runtime.check_device(self.device)
        _check(self.hidden_rank >= 0, f"hidden_rank must be >= 0 (0: full width), got {self.hidden_rank}.")
        _check(self.hidden_dtype in HIDDEN_DTYPES,
               f"hidden_dtype must be one of {', '.join(HIDDEN_DTYPES)}, got {self.hidden_dtype!r}.")
        _check(self.encoding in ENCODINGS, f"unknown encoding {self.encoding!r}; choose one of "
               f"{', '.join(ENCODINGS)} (`kdcache encodings` lists them).")
        _check(self.hidden_fit_rows >= 1, f"hidden_fit_rows must be >= 1, got {self.hidden_fit_rows}.")
        _check(self.hidden_rank == 0 or bool(self.layers),
               "hidden_rank needs captured hidden states: add --layer L (or set hidden_rank to 0).")
        _check(self.top_k >= 0 and 0 <= self.samples <= 255,
               f"top_k must be >= 0 and samples in [0, 255], got top_k={self.top_k}, samples={self.samples}.")
        _check(self.top_k > 0 or self.samples > 0, "nothing to capture: set top_k or samples above 0.")
        _check(self.capture_temperature > 0, f"capture_temperature must be > 0, got {self.capture_temperature}.")
        _check(0.0 < self.top_p <= 1.0, f"top_p must be in (0, 1] (1.0: no trimming), got {self.top_p}.")
        _check(self.top_p == 1.0 or self.top_k > 0,
               "top_p trims the top-k targets: set top_k above 0 (the maximum kept per position).")
        _check(self.top_k == 0 or 1 <= self.min_k <= self.top_k,
               f"min_k must be in [1, top_k={self.top_k}], got {self.min_k}.")
        _check(self.batch_size >= 1, "batch_size must be >= 1.")
        _check(self.rows_per_chunk >= 1 and self.rows_per_shard % self.rows_per_chunk == 0,
               f"rows_per_shard ({self.rows_per_shard}) must be a positive multiple of "
               f"rows_per_chunk ({self.rows_per_chunk}).")
        _check(all(layer >= 0 for layer in self.layers), f"layers must be >= 0, got {self.layers}.")
        _check(all(layer >= 1 for layer in self.attention_layers),
               f"attention layers are blocks 1..L, got {self.attention_layers}.")
        _check(self.attention_encoding in ATTENTION_ENCODINGS, f"unknown attention_encoding "
               f"{self.attention_encoding!r}; choose one of {', '.join(ATTENTION_ENCODINGS)}.")
        _check(min(self.attention_top_k, self.attention_budget, self.relation_heads) >= 0,
               "attention_top_k, attention_budget and relation_heads must be >= 0 (0: automatic / no limit).")


@dataclass(frozen=True)
class GenerateConfig:
    prompts: int = setting(256, "Prompts drawn (seeded) from the train split: each is --prompt-tokens "
                           "consecutive tokens of a random row at a random offset.")
    prompt_tokens: int = setting(16, "Tokens per prompt (at most the token store's block size).")
    max_new_tokens: int = setting(112, "Tokens the teacher writes after each prompt; prompt + new tokens "
                                  "must fit the teacher's positions.")
    temperature: float = setting(1.0, "Sampling temperature; 0: greedy (argmax) decoding.")
    top_p: float = setting(1.0, "Nucleus sampling: draw from the fewest most probable ids whose mass "
                           "reaches P (1.0: the whole distribution).")
    batch_size: int = setting(16, "Prompts decoded together (one resumable unit of the output).")
    seed: int = setting(0, "Seed of the prompt draw and of each prompt's sampling (a resumed run writes "
                        "the same rows).")
    kv_cache: bool = setting(True, "Reuse past keys and values (one position per step); --no-kv-cache "
                             "recomputes the whole sequence every step (same tokens, for comparison).")
    device: str = setting("auto", "Torch device for the teacher: auto, cpu, cuda, ...")

    def __post_init__(self):
        runtime.check_device(self.device)
        _check(self.prompts >= 1, f"prompts must be >= 1 (nothing to generate from {self.prompts} prompts).")
        _check(self.prompt_tokens >= 1, f"prompt_tokens must be >= 1, got {self.prompt_tokens}.")
        _check(self.max_new_tokens >= 1, f"max_new_tokens must be >= 1, got {self.max_new_tokens}.")
        _check(self.temperature >= 0, f"temperature must be >= 0 (0: greedy), got {self.temperature}.")
        _check(0.0 < self.top_p <= 1.0, f"top_p must be in (0, 1] (1.0: no nucleus), got {self.top_p}.")
        _check(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}.")


# Student values that can follow a schedule (field NAME_schedule), with the range each must stay in.
SCHEDULED = {"alpha": ("in [0, 1]", lambda v: 0.0 <= v <= 1.0), "temperature": ("> 0", lambda v: v > 0),
             "beta": (">= 0", lambda v: v >= 0), "gamma": (">= 0", lambda v: v >= 0)}
MULTI_TEACHER = ("mixture", "sum")
KD_SIGNALS = ("auto", "topk", "sampled", "topk_sampled")
STUDENT_LOSSES = (*KD_LOSSES, "uld")  # uld: sorted probabilities, for students of another tokenizer too
# How a student receives its teacher's targets: read from a cache, computed by the teacher in the
# loop (the online-KD baseline), or from a second student (deep mutual learning, no teacher).
MODES = ("offline", "online", "mutual")
ARCHS = ("transformer", "lstm")


@dataclass(frozen=True)
class StudentConfig(ModelShape, TrainSettings):
    alpha: float = setting(0.5, "Weight of cross-entropy on hard labels; 1 - alpha weighs KD. "
                           "alpha = 1 (or no --targets) is plain cross-entropy training.")
    temperature: float = setting(0.0, "KD temperature; the KD term is scaled by temperature^2. 0: the "
                                 "store's capture temperature (1 without a store), where cached targets are "
                                 "exact.")
    tail_model: str = setting("uniform", "At a temperature other than the capture's, how the teacher's tail "
                              "(the mass outside its cached top-k) is tempered: uniform (spread evenly over "
                              "the other ids; matches dense KD on a real teacher, BENCHMARKS.md), power (a "
                              "decay continuing the cached log-probs, fitted per position to the tail mass) "
                              "or atom (one bucket, as if a single id).")
    loss: str = setting("tail_kl", "KD loss on cached top-k: tail_kl, tail_rkl, tail_jsd, tail_tv (on the "
                        "k+1 buckets, exact at k = V), topk_kl, topk_rkl, topk_jsd, topk_tv (both sides "
                        "renormalised over the top-k ids), or uld (Universal Logit Distillation: the distance "
                        "between the sorted probability vectors, top-k + tail; needs no shared vocabulary, so "
                        "it is the loss of a cross-tokenizer student, --teacher-tokens).")
    kd_signal: str = setting("auto", "Which cached signal the KD term uses: topk, sampled, topk_sampled "
                             "(the top-k with the tail's shape from the sampled ids: needs both, trains at "
                             "the capture temperature), or auto (top-k when the store has them, else sampled).",
                             aliases=("--kd-targets", "--kd_targets"))
    beta: float = setting(0.0, "Weight of hidden-state MSE (needs layers captured by `cache`).")
    hidden_loss: str = setting("mse", "The hidden-state term (--beta): mse (mean squared error over the width, "
                               "TinyBERT's) or relative (that MSE over the teacher's variance at the layer on "
                               "the batch: 1 for predicting the mean state, whatever the teacher's activation "
                               "scale; for pretrained teachers, whose residual streams run large).")
    cosine: float = setting(0.0, "Weight of DistilBERT's cosine loss: 1 - cos(student's last hidden state, "
                            "teacher's last layer) per position (needs the teacher's last layer captured; "
                            "through a learned projection when the widths differ). 0: off.")
    layer_map: tuple = setting((), "Hidden-state pairs STUDENT:TEACHER (e.g. 2:4); empty with beta > 0 "
                               "maps captured layers uniformly onto the student.")
    init: str = setting("", "Start from this pretrained causal LM (path or hub id) instead of a "
                        "fresh model of n_layer/n_embd/n_head.")
    mode: str = setting("offline", "How the student gets its teacher's targets: offline (read --targets "
                        "stores), online (the baseline: --teacher DIR runs in the loop) or mutual (the "
                        "baseline without a teacher: two students teach each other; the second is saved "
                        "to OUT-peer). --online and --mutual are spellings of the last two.")
    online_top_k: int = setting(32, "With mode online: the teacher's top-k per position (0: the full "
                                "vocabulary, i.e. dense KD).")
    device: str = setting("auto", "Torch device: auto, cpu, cuda, ...")
    alpha_schedule: str = setting("", "Schedule alpha over training: constant:V, linear:START:END or "
                                  "cosine:START:END (START at the first step, END after the last). Empty: "
                                  "--alpha throughout. Scheduled values are logged per step in --log.")
    temperature_schedule: str = setting("", "Schedule the KD temperature, as --alpha-schedule. Empty: "
                                        "--temperature throughout.")
    beta_schedule: str = setting("", "Schedule beta, as --alpha-schedule. Empty: --beta throughout.")
    loss_chunk: int = setting(0, "Compute the LM head, CE and KD over chunks of this many positions "
                              "(batch x block flattened), recomputed in backward, so the full logits and "
                              "their gradient never sit in memory at once; the loss is the same. Assumes "
                              "logits = output embeddings applied to the base model's final hidden state "
                              "(GPT-2, Llama style; checked before training). 0: off.")
    multi_teacher: str = setting("mixture", "How several --targets combine. mixture: the KD loss against "
                                 "sum_i w_i p_i on the union of the teachers' top-k ids, an id outside teacher "
                                 "i's top-k getting 0 from it and the tail bucket sum_i w_i tail_i (exact at "
                                 "k = V; otherwise mass a teacher left in its tail on ids that another teacher "
                                 "lists stays in the tail, so union ids are under-weighted). sum: "
                                 "sum_i w_i KD(teacher i). With sampled targets the two are the same.")
    init_from_teacher: str = setting("", "Start from the --teacher's own weights (DistilBERT): a student of the "
                                     "teacher's family and width (n_embd/n_head ignored) with the teacher layers "
                                     "every_other, first:N or layers:A,B,... (0 = the first block), embeddings "
                                     "and heads included. Empty: a fresh student.")
    arch: str = setting("transformer", "Student architecture: transformer (GPT-2 for causal LM, BERT for "
                        "masked LM and classification, of n_layer/n_embd/n_head) or lstm (a BiLSTM classifier of "
                        "n_layer layers and width n_embd; classification only).")
    verify: bool = setting(True, "Before training, recompute the checksums of every targets shard the "
                           "student will read and refuse a store that fails (--no-verify skips this "
                           "full read, e.g. for huge stores).")
    gamma: float = setting(0.0, "Weight of the attention loss (needs --attention-layer captured by `cache`).")
    gamma_schedule: str = setting("", "Schedule gamma, as --alpha-schedule. Empty: --gamma throughout.")
    attention_loss: str = setting("minilm", "Attention loss: minilm (the student's last block against the "
                                  "last captured teacher block: attention KL + value-relation KL; any head "
                                  "count or width) or tinybert (per-head attention MSE over "
                                  "--attention-layer-map pairs).")
    adversarial: bool = setting(False, "Adversarial distillation: a discriminator learns to tell the teacher's "
                                "cached top-k + tail distribution from the student's (its own optimizer, "
                                "alternating steps, saved in checkpoints); the student also minimises "
                                "--adversarial-weight · −log D(student). Offline mode, one top-k store.")
    adversarial_weight: float = setting(0.1, "Weight of the adversarial (generator) term.")
    discriminator_lr: float = setting(2e-4, "Learning rate of the discriminator's AdamW.")
    discriminator_hidden: int = setting(64, "Hidden width of the discriminator MLP.")
    attention_layer_map: tuple = setting((), "tinybert pairs of blocks STUDENT:TEACHER (1-based, e.g. 2:4); "
                                         "empty: captured teacher blocks mapped uniformly onto the student.")

    def __post_init__(self):
        runtime.check_device(self.device)
        ModelShape.__post_init__(self)
        TrainSettings.__post_init__(self)
        _check(self.loss_chunk >= 0, f"loss_chunk must be >= 0 (0: off), got {self.loss_chunk}.")
        _check(self.multi_teacher in MULTI_TEACHER,
               f"multi_teacher must be mixture or sum, got {self.multi_teacher!r}.")
        _check(0.0 <= self.alpha <= 1.0, f"alpha must be in [0, 1], got {self.alpha}.")
        _check(self.temperature >= 0, f"temperature must be > 0 (or 0: the capture temperature), "
               f"got {self.temperature}.")
        _check(self.beta >= 0, f"beta must be >= 0, got {self.beta}.")
        _check(self.hidden_loss in HIDDEN_LOSSES,
               f"hidden_loss must be one of {', '.join(HIDDEN_LOSSES)}, got {self.hidden_loss!r}.")
        _check(self.cosine >= 0, f"cosine must be >= 0 (0: off), got {self.cosine}.")
        _check(self.kd_signal in KD_SIGNALS,
               f"kd_signal must be one of {', '.join(KD_SIGNALS)}, got {self.kd_signal!r}.")
        _check(self.tail_model in TAIL_MODELS,
               f"tail_model must be one of {', '.join(TAIL_MODELS)}, got {self.tail_model!r}.")
        _check(self.arch in ARCHS, f"arch must be one of {', '.join(ARCHS)}, got {self.arch!r}.")
        _check(self.mode in MODES, f"mode must be one of {', '.join(MODES)}, got {self.mode!r}.")
        _check(self.online_top_k >= 0, f"online_top_k must be >= 0 (0: full vocabulary), got {self.online_top_k}.")
        _check(self.loss in STUDENT_LOSSES, f"unknown loss {self.loss!r}; choose one of {', '.join(STUDENT_LOSSES)}.")
        _check(self.loss != "uld" or self.kd_signal in ("auto", "topk") and not self.adversarial,
               "loss uld compares the teacher's sorted top-k + tail with the student's: use kd_signal topk (or auto) "
               "and no --adversarial, or another loss.")
        self.layer_pairs()  # refuses a malformed layer_map
        self.attention_pairs()
        _check(self.adversarial_weight >= 0 and self.discriminator_lr > 0 and self.discriminator_hidden >= 1,
               "adversarial_weight must be >= 0, discriminator_lr > 0 and discriminator_hidden >= 1.")
        _check(not self.adversarial or (self.alpha < 1 or bool(self.alpha_schedule)) and self.kd_signal != "sampled",
               "--adversarial is distillation from cached top-k: set alpha below 1 and kd_signal topk or auto.")
        _check(not self.adversarial or self.gradient_accumulation_steps == 1,
               "--adversarial steps its discriminator once per batch it sees, so micro-batches would change the "
               "update: set gradient_accumulation_steps 1.")
        _check(self.gamma >= 0, f"gamma must be >= 0, got {self.gamma}.")
        _check(self.attention_loss in ATTENTION_LOSSES, f"attention_loss must be one of "
               f"{', '.join(ATTENTION_LOSSES)}, got {self.attention_loss!r}.")
        for name, schedule in self.schedules().items():  # make_schedule refuses a malformed spec
            allowed, ok = SCHEDULED[name]
            _check(all(ok(value) for value in schedule.bounds()),
                   f"{name}_schedule {getattr(self, name + '_schedule')!r} leaves the range of {name}, "
                   f"which must stay {allowed}; change its endpoints.")

    def attention_pairs(self) -> list[tuple[int, int]]:
        """attention_layer_map as (student block, teacher block) pairs."""
        return self.layer_pairs(self.attention_layer_map)

    def layer_pairs(self, layer_map=None) -> list[tuple[int, int]]:
        """layer_map as (student layer, teacher layer) pairs."""
        pairs = []
        for pair in self.layer_map if layer_map is None else layer_map:
            parts = str(pair).split(":")
            _check(len(parts) == 2 and all(p.isdigit() for p in parts),
                   f"layer_map entry {pair!r} is not STUDENT:TEACHER, e.g. 2:4.")
            pairs.append((int(parts[0]), int(parts[1])))
        return pairs

    def schedule(self, name: str) -> Schedule:
        """alpha, temperature, beta or gamma over training: its schedule, or constant at the plain field."""
        spec = getattr(self, f"{name}_schedule")
        if not spec:
            return Schedule("constant", getattr(self, name), getattr(self, name))
        try:
            return make_schedule(spec)
        except KdcacheError as e:
            raise KdcacheError(f"{name}_schedule: {e}") from None

    def schedules(self) -> dict[str, Schedule]:
        """The values given a schedule, by name (the others stay at their plain fields)."""
        return {name: self.schedule(name) for name in SCHEDULED if getattr(self, f"{name}_schedule")}


@dataclass(frozen=True)
class EvaluateConfig:
    batch_size: int = setting(16, "Blocks per forward pass.")
    max_batches: int = setting(0, "Evaluate at most this many validation batches (0: all).")
    reference: str = setting("teacher", "Name (from --model NAME=DIR) whose top-1 predictions the "
                             "others are compared with.")
    latency_rounds: int = setting(5, "Interleaved timing rounds for CPU latency per token.")
    device: str = setting("auto", "Torch device the validation blocks are scored on: auto, cpu, cuda, ... "
                          "(latency per token is always timed on CPU).")


    def __post_init__(self):
        runtime.check_device(self.device)
