"""Attention targets: capture round-trips to the model's own attention; TinyBERT / MiniLM losses
against their dense definitions; refusals before any work; a student trained with gamma."""

import math

import numpy as np
import pytest
import torch

from pipeline import losses
from pipeline.config import CacheConfig, ModelShape, StudentConfig, TeacherConfig
from pipeline.data.tokens import TokenStore
from pipeline.errors import KdcacheError
from pipeline.models import DistilledBlocks, build_gpt2, use_eager_attention
from pipeline.student import run_student
from pipeline.targets import codecs
from pipeline.targets import format as fmt
from pipeline.teacher.capture import run_capture
from pipeline.teacher.load import load_teacher
from pipeline.training.teacher import materialise_teacher


@pytest.fixture(scope="module")
def tiny_tokens(small_tokens):
    return TokenStore(small_tokens)  # about 100 rows of 32 tokens: captures take seconds


@pytest.fixture(scope="module")
def teacher_dir(tiny_tokens, tmp_path_factory):
    """A default teacher of 2 blocks, 2 heads, width 32 (a few steps)."""
    out = tmp_path_factory.mktemp("attention") / "teacher"
    config = TeacherConfig(n_layer=2, n_embd=32, n_head=2, max_steps=2, batch_size=4, device="cpu")
    materialise_teacher(config, str(tiny_tokens.path), str(out))
    return out


def capture(teacher_dir, tokens, out, **settings):
    config = CacheConfig(**{"top_k": 4, "batch_size": 32, "rows_per_chunk": 8, "rows_per_shard": 32,
                            "attention_layers": (1, 2), "attention_budget": 0, **settings})
    return run_capture(config, str(teacher_dir), str(tokens.path), str(out))


def own_attention(teacher_dir, tokens, rows):
    """The teacher's own eager attentions and (by hand) its value relations for `rows`."""
    model, _ = load_teacher(teacher_dir)
    model.set_attn_implementation("eager")
    ids = torch.from_numpy(tokens.blocks("train")[rows].astype(np.int64))
    with torch.no_grad():
        out = model(input_ids=ids, output_attentions=True, output_hidden_states=True)
        relations, D = [], model.config.n_embd
        for layer, block in enumerate(model.transformer.h):  # GPT-2: values are the last third of c_attn(ln_1(h))
            values = block.attn.c_attn(block.ln_1(out.hidden_states[layer]))[..., 2 * D:]  # (B, T, D)
            heads = values.reshape(*values.shape[:2], 2, D // 2).transpose(1, 2)  # (B, 2, T, D/2)
            scores = heads @ heads.transpose(-1, -2) / math.sqrt(D // 2)
            T = scores.shape[-1]
            scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
            relations.append(torch.softmax(scores, -1))
    return out.attentions, relations


@pytest.mark.parametrize("encoding, tolerance", [("fp16", 2e-3), ("topk", 2e-3), ("q8", 2e-2)])
def test_capture_round_trips_to_the_models_own_attention(teacher_dir, tiny_tokens, tmp_path, encoding, tolerance):
    block = tiny_tokens.block_size
    store = capture(teacher_dir, tiny_tokens, tmp_path / "t.zarr", attention_encoding=encoding,
                    attention_top_k=block)  # topk keeping every key: lossless up to float16
    assert fmt.attribute(store.attrs, "attention_layers") == [1, 2]
    assert fmt.attribute(store.attrs, "value_relation_heads") == 2
    rows = slice(17, 20)
    decoded = store.decode(store.read_rows(rows.start, rows.stop))
    attentions, relations = own_attention(teacher_dir, tiny_tokens, rows)
    for layer in (1, 2):
        got = decoded[fmt.attention_array(layer)]
        assert got.shape == (3, 2, block, block)
        torch.testing.assert_close(got.sum(-1), torch.ones(3, 2, block))
        torch.testing.assert_close(got, attentions[layer - 1], atol=tolerance, rtol=0)
        torch.testing.assert_close(decoded[fmt.attention_array(layer, "value_relation")], relations[layer - 1],
                                   atol=tolerance, rtol=0)


def test_topk_rows_keep_the_missing_mass_on_the_other_causal_keys():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])  # one query row q = 3 of a 4-token block
    dense = torch.zeros(1, 1, 4, 4)
    dense[0, 0] = torch.tril(torch.ones(4, 4)) / torch.arange(1, 5).unsqueeze(1)
    dense[0, 0, 3] = probs
    decoded = codecs.decode_attention(codecs.encode_attention(dense, "topk", top_k=2), "topk")
    torch.testing.assert_close(decoded[0, 0, 3], torch.tensor([0.5, 0.3, 0.1, 0.1]), atol=1e-3, rtol=0)
    torch.testing.assert_close(decoded[0, 0, 0], torch.tensor([1.0, 0, 0, 0]))  # the first row is exact


def test_capture_refusals_come_before_the_teacher_runs(teacher_dir, tiny_tokens, tmp_path):
    out = tmp_path / "t.zarr"
    with pytest.raises(KdcacheError, match=r"blocks 1..2; --attention-layer \[3\] does not exist"):
        capture(teacher_dir, tiny_tokens, out, attention_layers=(3,))
    with pytest.raises(KdcacheError, match="needs 128 bytes/token/layer, over --attention-budget 100.*"
                                           "--attention-top-k 6 or less"):
        capture(teacher_dir, tiny_tokens, out, attention_encoding="q8", attention_budget=100)
    with pytest.raises(KdcacheError, match="cannot hold one key"):
        capture(teacher_dir, tiny_tokens, out, attention_budget=8)
    assert not out.exists()  # nothing half-written
    store = capture(teacher_dir, tiny_tokens, out, attention_budget=100)  # topk: as many keys as fit
    assert fmt.attribute(store.attrs, "attention_top_k") == 6


class NoAttentionGPT2(__import__("transformers").GPT2LMHeadModel):
    """A real GPT-2 whose outputs drop the attention weights, as models without an eager path do."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.attentions = None
        return out


def test_a_model_that_returns_no_attention_is_refused():
    model = build_gpt2(ModelShape(n_layer=1, n_embd=16, n_head=2), 50, 8)
    use_eager_attention(model, "teacher")  # a GPT-2 can
    silent = NoAttentionGPT2(model.config)
    with pytest.raises(KdcacheError, match="returns no attention weights"):
        use_eager_attention(silent, "teacher")


def dense_kl(t, s):
    return sum(t[i] * (math.log(t[i]) - math.log(s[i])) for i in range(len(t)) if t[i] > 0)


def test_minilm_with_equal_heads_is_its_dense_definition():
    torch.manual_seed(0)
    B, H, T, D = 2, 2, 5, 8
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    rows = lambda x: torch.softmax(x.masked_fill(~causal, float("-inf")), -1)  # noqa: E731
    teacher_attention, student_attention = rows(torch.randn(B, H, T, T)), rows(torch.randn(B, H, T, T))
    teacher_values, student_values = torch.randn(B, T, D), torch.randn(B, T, D)
    teacher_relation = losses.value_relation(teacher_values, H)
    loss = losses.minilm_loss(student_attention, teacher_attention, student_values, teacher_relation)

    expected = 0.0
    for b in range(B):
        for h in range(H):
            vt = teacher_values[b, :, h * 4:(h + 1) * 4].double()
            vs = student_values[b, :, h * 4:(h + 1) * 4].double()
            for q in range(T):
                # softmax over keys 0..q of v_q · v_k / sqrt(d), per relation head
                rel_t = torch.softmax(vt[:q + 1] @ vt[q] / 2.0, 0).tolist()
                rel_s = torch.softmax(vs[:q + 1] @ vs[q] / 2.0, 0).tolist()
                expected += dense_kl(teacher_attention[b, h, q, :q + 1].tolist(),
                                     student_attention[b, h, q, :q + 1].tolist())
                expected += dense_kl(rel_t, rel_s)
    assert float(loss) == pytest.approx(expected / (B * H * T), rel=1e-5)
    assert float(losses.minilm_loss(teacher_attention, teacher_attention, teacher_values, teacher_relation)) \
        == pytest.approx(0.0, abs=1e-6)


def test_minilm_and_tinybert_take_other_head_counts_and_widths():
    torch.manual_seed(1)
    T = 6
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    rows = lambda x: torch.softmax(x.masked_fill(~causal, float("-inf")), -1)  # noqa: E731
    teacher = rows(torch.randn(1, 4, T, T))
    student = teacher.reshape(1, 2, 2, T, T).mean(2)  # 2 heads, each the mean of 2 teacher heads
    assert float(losses.attention_kl(student, teacher)) == pytest.approx(0.0, abs=1e-6)
    assert float(losses.attention_mse(student, teacher)) == pytest.approx(0.0, abs=1e-12)
    other = rows(torch.randn(1, 3, T, T))  # 3 heads against 4: both sides collapse to their mean
    mse = losses.attention_mse(other, teacher)
    assert float(mse) == pytest.approx(float((other.mean(1) - teacher.mean(1)).pow(2).sum(-1).mean()))
    relation = losses.value_relation(torch.randn(1, T, 16), 4)  # teacher width 16, student width 8
    value_loss = losses.minilm_loss(student, teacher, torch.randn(1, T, 8, requires_grad=True), relation)
    assert torch.isfinite(value_loss) and value_loss > 0


def test_student_distils_attention_and_refuses_stores_without_it(teacher_dir, tiny_tokens, tmp_path):
    store = capture(teacher_dir, tiny_tokens, tmp_path / "t.zarr", attention_budget=256)
    common = dict(n_layer=1, n_embd=16, n_head=4, batch_size=4, max_steps=2, device="cpu", alpha=0.5)
    for loss_name in ("minilm", "tinybert"):
        last = run_student(StudentConfig(**common, gamma=1.0, gamma_schedule="linear:1:0",
                                         attention_loss=loss_name), str(tiny_tokens.path),
                           str(tmp_path / loss_name), str(store.path))
        assert last["attention"] > 0 and "gamma" in last
    plain = capture(teacher_dir, tiny_tokens, tmp_path / "plain.zarr", attention_layers=())
    with pytest.raises(KdcacheError, match="holds no attention; re-run cache with --attention-layer"):
        run_student(StudentConfig(**common, gamma=0.5), str(tiny_tokens.path), str(tmp_path / "x"), str(plain.path))
    with pytest.raises(KdcacheError, match="relation heads, which do not divide the student's value width 9"):
        run_student(StudentConfig(**{**common, "n_embd": 9, "n_head": 3}, gamma=0.5), str(tiny_tokens.path),
                    str(tmp_path / "y"), str(store.path))


@pytest.mark.parametrize("encoding", ["topk", "q8", "fp16"])
def test_format_md_numpy_reader_agrees_with_decode(encoding, tmp_path):
    import re
    from pathlib import Path

    import zarr

    text = (Path(__file__).resolve().parents[1] / "docs" / "FORMAT.md").read_text()
    scope = {"np": np}
    exec(re.search(r"```python\n(def read_attention.*?)```", text, re.S).group(1), scope)
    torch.manual_seed(2)
    T = 6
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    attention = torch.softmax(torch.randn(2, 3, T, T).masked_fill(~causal, float("-inf")), -1)
    identity = {"block_size": T, "attention_layers": [1], "attention_encoding": encoding,
                "attention_top_k": 3 if encoding == "topk" else 0, "attention_heads": 3, "value_relation_heads": 0}
    stored = fmt.encode_targets({fmt.attention_array(1): attention}, identity)
    assert set(stored) == set(fmt.array_specs(identity))
    group = zarr.open_group(tmp_path / "a.zarr", mode="w", attributes=identity)
    for name, array in stored.items():
        assert array.shape[1:] == fmt.array_specs(identity)[name][0]
        group.create_array(name, data=array)
    expected = fmt.decode_rows(stored, identity)[fmt.attention_array(1)]
    got = scope["read_attention"](group, "attention_layer_1", slice(None))
    np.testing.assert_allclose(got, expected.numpy(), rtol=1e-5, atol=1e-6)


# --- The training path: topk rows as SparseRows, losses without a dense teacher, batches as stored ---

def causal_rows(scores):
    T = scores.shape[-1]
    return torch.softmax(scores.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf")), -1)


def stored_topk(teacher, top_k):
    """Stored topk arrays of `teacher`, with some kept probabilities zeroed (they get the fill, like
    float16 underflow) and row 0 of head 0 made a row whose kept mass is over 1 (no fill)."""
    stored = codecs.encode_attention(teacher, "topk", top_k)
    stored[codecs.PROBS][:, :, 5, -1] = 0
    stored[codecs.PROBS][0, 0, -1, 0] = 1.5
    return stored


def sparse_rows(stored):
    return losses.SparseRows.of(*codecs.sparse_attention(stored[codecs.KEYS], stored[codecs.PROBS]))


@pytest.mark.parametrize("top_k", [1, 3, 9, 12])
def test_sparse_rows_are_the_decoded_rows(top_k):
    torch.manual_seed(3)
    stored = stored_topk(causal_rows(3 * torch.randn(2, 3, 9, 9)), top_k)
    rows = sparse_rows(stored)
    expected = codecs.decode_attention(stored, "topk")
    torch.testing.assert_close(rows.dense(), expected, atol=1e-7, rtol=1e-6)  # float rounding only
    entropy = -torch.where(expected > 0, expected * expected.clamp(min=1e-30).log(), 0).sum(-1)
    torch.testing.assert_close(rows.entropy, entropy, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(rows.mass(), torch.ones_like(rows.fill))
    assert float(rows.fill[0, 0, -1]) == 0.0  # kept mass over 1: renormalised, nothing filled


@pytest.mark.parametrize("loss", [losses.attention_mse, losses.attention_kl])
@pytest.mark.parametrize("top_k", [2, 9])
def test_losses_on_sparse_rows_equal_their_dense_definition_and_gradients(loss, top_k):
    torch.manual_seed(4)
    rows = sparse_rows(stored_topk(causal_rows(3 * torch.randn(2, 3, 9, 9)), top_k))
    scores = (4 * torch.randn(2, 3, 9, 9)).requires_grad_()
    with torch.no_grad():
        scores[0, 1, 6, 2] = -80.0  # a student probability below TINY: clamped in the log, no gradient
    values, gradients = [], []
    for teacher in (rows, rows.dense()):
        student = causal_rows(scores)
        student.retain_grad()
        value = loss(student, teacher)
        value.backward()
        values.append(value.detach())
        gradients += [student.grad, scores.grad.clone()]
        scores.grad = None
    torch.testing.assert_close(values[0], values[1], rtol=1e-6, atol=1e-7)
    # wrt the weights on keys 0..q (above the diagonal a causal softmax's backward never reads them)
    causal = losses.attention.causal_mask(9, "cpu")
    torch.testing.assert_close(gradients[0][..., causal], gradients[2][..., causal], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(gradients[1], gradients[3], rtol=1e-5, atol=1e-7)  # wrt the scores
    # And in float64, by its definition over the decoded rows (no clamps bite but the one above).
    student, dense = causal_rows(scores.detach().double()), rows.dense().double()
    if loss is losses.attention_mse:
        expected = (student - dense).pow(2).sum(-1).mean()
    else:
        ratio = dense.clamp(min=losses.attention.TINY).log() - student.clamp(min=losses.attention.TINY).log()
        expected = torch.where(dense > 0, dense * ratio, 0).sum(-1).mean()
    assert float(values[0]) == pytest.approx(float(expected), rel=1e-5)


@pytest.mark.parametrize("span", [64, 4])  # one span of queries; three (4, 4 and 1 rows)
def test_minilm_value_relations_on_sparse_rows_equal_the_dense_loss_and_gradients(span, monkeypatch):
    monkeypatch.setattr(losses.attention, "QUERY_SPAN", span)
    torch.manual_seed(7)
    attention = sparse_rows(stored_topk(causal_rows(3 * torch.randn(2, 3, 9, 9)), 3))
    relation = sparse_rows(stored_topk(losses.value_relation(torch.randn(2, 9, 12), 3), 3))
    student = causal_rows(torch.randn(2, 3, 9, 9))
    values = torch.randn(2, 9, 6)
    values[0, 4] *= 40  # relation probabilities far below TINY: exact in log space, not clamped
    results = []
    for teachers in ((attention, relation), (attention.dense(), relation.dense())):
        leaf = values.clone().requires_grad_()
        loss = losses.minilm_loss(student, teachers[0], leaf, teachers[1])
        loss.backward()
        results.append((loss.detach(), leaf.grad))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-4, atol=1e-6)
    # The relation term by its definition, in float64: Σ t (log t − log_softmax(scores)) on keys 0..q.
    teacher = relation.dense().double()
    scores = torch.einsum("brqd,brkd->brqk", *[losses.attention.split_values(values.double(), 3)] * 2) / 2 ** 0.5
    log_student = torch.log_softmax(scores.masked_fill(~losses.attention.causal_mask(9, "cpu"), float("-inf")), -1)
    expected = torch.where(teacher > 0, teacher * (teacher.clamp(min=1e-300).log() - log_student), 0).sum(-1).mean()
    assert float(log_student[0, :, 4].min()) < -100  # far below log TINY (−27.6)
    relation_only = float(results[0][0]) - float(losses.attention_kl(student, attention))
    assert relation_only == pytest.approx(float(expected), rel=1e-5)
    assert results[0][1][0, 4].abs().sum() > 0  # that row still gets a gradient


def test_sparse_rows_against_another_head_count_are_written_out():
    torch.manual_seed(5)
    rows = sparse_rows(stored_topk(causal_rows(torch.randn(1, 4, 7, 7)), 3))
    student = causal_rows(torch.randn(1, 2, 7, 7))
    for loss in (losses.attention_mse, losses.attention_kl):
        assert float(loss(student, rows)) == float(loss(student, rows.dense()))


@pytest.mark.parametrize("encoding", ["topk", "q8", "fp16"])
def test_objective_reads_attention_as_stored_and_as_decoded_alike(teacher_dir, tiny_tokens, tmp_path, encoding):
    from pipeline.training.objective import Objective

    store = capture(teacher_dir, tiny_tokens, tmp_path / "t.zarr", attention_encoding=encoding, attention_top_k=3)
    raw = store.read_rows(0, 4, [n for n in store.array_names() if "_layer_" in n and "hidden" not in n])
    stored, decoded = store.decode(raw, sparse_attention=True), store.decode(raw)
    if encoding == "topk":  # K entries and a fill value per row, no decoded matrix
        assert set(stored) == {f"{m}_{role}" for m in decoded for role in codecs.SPARSE_ROLES}
        assert all(stored[f"{m}_above"].shape[-1] == 3 for m in decoded)
    else:
        assert stored.keys() == decoded.keys()
    torch.manual_seed(6)
    T = tiny_tokens.block_size
    blocks = DistilledBlocks({})  # the student's weights, as a block in eager attention returns them
    blocks.weights = {b: causal_rows(torch.randn(4, 2, T, T)) for b in (1, 2)}
    values = {2: torch.randn(4, T, 32)}
    for kind in ("tinybert", "minilm"):
        objective = Objective(vocab_size=10, attention_loss=kind, attention_pairs=[(1, 1), (2, 2)],
                              relation_heads=2 if kind == "minilm" else 0)
        got = objective.attention_term(blocks, values, stored)
        expected = objective.attention_term(blocks, values, decoded)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)


# --- The student's kernel: a distilled block's attention and loss in one pass ---------------------

@pytest.mark.parametrize("span", [64, 4])  # one span of queries; three (4, 4 and 1 rows)
@pytest.mark.parametrize("kind", ["tinybert", "minilm"])
def test_distilled_attention_is_attention_and_its_loss_by_definition(kind, span, monkeypatch):
    monkeypatch.setattr(losses.attention, "QUERY_SPAN", span)
    torch.manual_seed(8)
    B, H, T, d = 2, 3, 9, 4
    rows = sparse_rows(stored_topk(causal_rows(3 * torch.randn(B, H, T, T)), 3))
    inputs = [torch.randn(B, H, T, d, dtype=torch.float64) for _ in range(3)]
    inputs[0][0, 1, 6] *= 30  # a row whose student probabilities underflow far below TINY
    upstream = torch.randn(B, H, T, d, dtype=torch.float64)
    results = []
    for fused in (True, False):
        q, k, v = (x.clone().requires_grad_() for x in inputs)
        if fused:
            output, loss = losses.attention.DistilledAttention.apply(q.float(), k.float(), v.float(), d ** -0.5, kind,
                                                                     *rows, rows.mass())
        else:  # in float64, from the definitions over the decoded rows (log space for the KL)
            scores = (q @ k.transpose(-1, -2) * d ** -0.5).masked_fill(~losses.attention.causal_mask(T, "cpu"),
                                                                        float("-inf"))
            output, teacher = torch.softmax(scores, -1) @ v, rows.dense().double()
            if kind == "tinybert":
                loss = (torch.softmax(scores, -1) - teacher).pow(2).sum(-1).mean()
            else:
                log_ratio = teacher.clamp(min=1e-300).log() - torch.log_softmax(scores, -1)
                loss = torch.where(teacher > 0, teacher * log_ratio, 0).sum(-1).mean()
        ((output.double() * upstream).sum() + 3 * loss.double()).backward()
        results.append((output.detach().double(), loss.detach().double(), [x.grad for x in (q, k, v)]))
    (out, loss, grads), (out_ref, loss_ref, grads_ref) = results
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-6)
    assert float(loss) == pytest.approx(float(loss_ref), rel=1e-5)
    for got, expected in zip(grads, grads_ref):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    if kind == "minilm":  # the underflowing row keeps its gradient (no TINY clamp in log space)
        assert float(torch.log_softmax(inputs[0][0, 1, 6] @ inputs[1][0, 1].T * d ** -0.5, -1)[:7].min()) < -30
        assert grads[0][0, 1, 6].abs().sum() > 0


@pytest.mark.parametrize("kind", ["tinybert", "minilm"])
def test_a_student_in_distilling_attention_trains_as_in_eager_attention(kind, monkeypatch):
    """The same GPT-2 student, batch and sparse teacher rows through the Objective: distilling attention
    (SDPA in block 1, the kernel's loss in block 2, or the weights where a block is paired twice) and
    eager attention give the same loss and the same gradients."""
    from pipeline.models import use_distilling_attention
    from pipeline.training.objective import Objective

    monkeypatch.setattr(losses.attention, "QUERY_SPAN", 5)  # spans of 5, 5 and 2 queries
    torch.manual_seed(9)
    B, T, V = 2, 12, 40
    student = build_gpt2(ModelShape(n_layer=2, n_embd=24, n_head=3), V, T, seed=0)
    twin = build_gpt2(ModelShape(n_layer=2, n_embd=24, n_head=3), V, T, seed=0)
    assert use_distilling_attention(student, "student")
    use_eager_attention(twin, "student")
    batch = {"input_ids": torch.randint(0, V, (B, T))}
    for layer in (1, 2):
        stored = stored_topk(causal_rows(3 * torch.randn(B, 3, T, T)), 4)
        for role, tensor in zip(codecs.SPARSE_ROLES, sparse_rows(stored)):
            batch[f"{fmt.attention_array(layer)}_{role}"] = tensor
    for pairs in ([(2, 2)], [(1, 1), (2, 1), (2, 2)]) if kind == "tinybert" else ([(2, 2)],):
        objective = Objective(vocab_size=V, alpha=1.0, gamma=0.5, attention_loss=kind, attention_pairs=pairs)
        with torch.no_grad(), DistilledBlocks(objective.distilled_blocks(batch)) as blocks:
            student(**batch)
        assert (set(blocks.losses), set(blocks.weights)) == (({2}, set()) if len(pairs) == 1 else ({1}, {2}))
        results = []
        for model in (student, twin):
            model.zero_grad()
            parts = objective(model, batch)
            parts["loss"].backward()
            results.append((parts["attention"].detach(), [p.grad.clone() for p in model.parameters()]))
        assert float(results[0][0]) == pytest.approx(float(results[1][0]), rel=1e-5)
        for got, expected in zip(results[0][1], results[1][1]):
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)


def test_topk_rows_decode_alike_in_pieces_with_narrow_keys(teacher_dir, tiny_tokens, tmp_path, monkeypatch):
    """The loader decodes topk rows a few MiB at a time (format.SPARSE_PIECE_BYTES); one row at a time
    gives the same tensors, and keys travel as int16."""
    store = capture(teacher_dir, tiny_tokens, tmp_path / "t.zarr", attention_encoding="topk", attention_top_k=3)
    raw = store.read_rows(0, 10, [n for n in store.array_names() if "_layer_" in n and "hidden" not in n])
    whole = store.decode(raw, sparse_attention=True)
    monkeypatch.setattr(fmt, "SPARSE_PIECE_BYTES", 1)
    pieces = store.decode(raw, sparse_attention=True)
    assert whole.keys() == pieces.keys() and all(torch.equal(whole[n], pieces[n]) for n in whole)
    assert {whole[n].dtype for n in whole if n.endswith("_keys")} == {torch.int16}
    assert whole[f"{fmt.attention_array(1)}_keys"].shape[0] == 10


def test_the_fused_attention_losses_train_under_bfloat16_autocast():
    """`--dtype bfloat16` runs the forward under autocast: the kernel and the value-relation KL keep
    float32 inside (their backward runs outside autocast) and return gradients in the inputs' dtype."""
    torch.manual_seed(10)
    B, H, T, d = 2, 3, 9, 4
    rows = sparse_rows(stored_topk(causal_rows(3 * torch.randn(B, H, T, T)), 3))
    for kind in ("tinybert", "minilm"):
        q, k, v = (torch.randn(B, H, T, d, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            output, loss = losses.attention.DistilledAttention.apply(q, k, v, d ** -0.5, kind, *rows, rows.mass())
        (output.float().sum() + loss).backward()
        assert output.dtype == q.grad.dtype == torch.bfloat16 and torch.isfinite(q.grad.float()).all()
    values = torch.randn(B, T, 6, dtype=torch.bfloat16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = losses.relation_kl(values, rows)
    loss.backward()
    assert values.grad.dtype == torch.bfloat16 and torch.isfinite(values.grad.float()).all()
