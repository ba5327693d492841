"""Attention losses: TinyBERT's per-head attention MSE, MiniLM's attention and value-relation KL.

Shapes: B rows, H heads, T tokens (a causal T × T matrix per head: row q is a distribution over keys
0..q), D value width, R relation heads, K kept keys per row. Teacher matrices come from the store
decoded (rows sum to 1), either dense or as SparseRows (the topk encoding: K entries and one fill value
per row); the student's are its own softmax outputs, zero above the diagonal (its value relations
come as its values, compared in log space: relation_kl). Every loss averages over
B, heads and the T query rows. On SparseRows a loss expands its sum over keys into the K kept entries
plus a closed form for the fill, so no teacher T × T matrix is built; it equals the dense definition
(the `dense()` rows) up to float rounding. DistilledAttention takes the student's queries, keys and
values instead of its weights: a block's attention and its loss in one pass (the student's attention
kernel, models.distilling_attention, calls it). It and RelationKL make the student's T × T rows a
span of queries at a time (query_spans).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch

# A student probability that underflowed to 0 under a teacher with mass there: log of this, not −inf.
TINY = 1e-12


class SparseRows(NamedTuple):
    """Causal teacher rows (codecs.sparse_attention, whose roles these are): row q holds fill[q] at
    every key 0..q, plus above[q, j] at keys[q, j] (distinct keys; 0 where nothing is kept)."""

    keys: torch.Tensor     # (B, H, T, K) int64
    above: torch.Tensor    # (B, H, T, K) float32: a kept probability minus the fill, else 0
    fill: torch.Tensor     # (B, H, T) float32
    entropy: torch.Tensor  # (B, H, T) float32: −Σ_k t log t of each row

    @classmethod
    def of(cls, keys, above, fill, entropy) -> "SparseRows":
        """From codecs.sparse_attention's arrays (batched or not): keys widened to the int64 that
        gather and scatter take."""
        return cls(keys.long(), above, fill, entropy)

    def dense(self) -> torch.Tensor:
        """(B, H, T, T) float32: the same rows written out."""
        rows = torch.where(causal_mask(self.fill.shape[-1], self.fill.device), self.fill.unsqueeze(-1), 0.0)
        return rows.scatter_add_(-1, self.keys, self.above)  # unkept entries add 0

    def mass(self) -> torch.Tensor:
        """(B, H, T): Σ_k t of each row (1 up to rounding)."""
        return causal_keys(self.fill.shape[-1], self.fill.device, self.fill.dtype) * self.fill + self.above.sum(-1)


def heads(attention) -> int:
    """H of a dense (B, H, T, T) stack or of SparseRows."""
    return attention.fill.shape[1] if isinstance(attention, SparseRows) else attention.shape[1]


def causal_mask(T: int, device, dtype=torch.bool) -> torch.Tensor:
    """(T, T): 1 on and below the diagonal (the keys 0..q of query q), else 0."""
    return torch.ones(T, T, dtype=dtype, device=device).tril()


def causal_keys(T: int, device, dtype=torch.int64) -> torch.Tensor:
    """(T,): how many keys each query row has, q + 1 for query q."""
    return torch.arange(1, T + 1, device=device, dtype=dtype)


# The losses on SparseRows as autograd Functions with hand-written backward: autograd through the
# same formulas makes about three times as many passes over the student's B × H × T × T weights, which
# are most of their cost (masks go in as clamp bounds, or are not needed: broadcast `where`s are several
# times slower). Row q's teacher is t = fill on keys 0..q, plus `above` at the kept keys.
#
# The student's rows are a causal softmax: zero above the diagonal, whatever its parameters. So sums
# over keys 0..q are sums over the whole row, and the gradient above the diagonal is never used (the
# softmax's backward multiplies it by those zeros): SparseMSE leaves it unmasked, saving passes over
# T × T. Its values, and its gradient on keys 0..q, are the dense definition's.

class SparseMSE(torch.autograd.Function):
    """Σ_k (s − t)² per row, mean over rows, for rows s zero above the diagonal:
    Σ s² − 2·fill·Σ s + (q + 1)·fill² over keys 0..q, corrected at the kept keys by (d − above)² − d²
    with d = s − fill there. Only reads of the T × T rows forward, one write backward."""

    @staticmethod
    def forward(ctx, student, keys, above, fill):
        keys_per_row = causal_keys(student.shape[-1], student.device, student.dtype)
        at_keys = student.gather(-1, keys) - fill.unsqueeze(-1)  # (B, H, T, K)
        rows = (torch.linalg.vecdot(student, student) - 2 * fill * student.sum(-1) + keys_per_row * fill.square()
                + ((at_keys - above).square() - at_keys.square()).sum(-1))
        ctx.save_for_backward(student, keys, above, fill)
        return rows.mean()

    @staticmethod
    def backward(ctx, grad):
        student, keys, above, fill = ctx.saved_tensors
        scale = 2 * grad / fill.numel()  # of the mean over rows of Σ (s − t)²: 2 (s − t) / rows
        # scale · (s − fill) in one pass (unmasked above the diagonal: see above), then the kept keys.
        out = torch.addcmul((fill * -scale).unsqueeze(-1), student, scale)
        return out.scatter_add_(-1, keys, above * -scale), None, None, None


class SparseKL(torch.autograd.Function):
    """Σ_k t (log t − log ŝ) per row over the keys with t > 0, mean over rows, for student
    probabilities s, with attention_kl's guard log ŝ = log max(s, TINY)."""

    @staticmethod
    def forward(ctx, student, keys, above, fill, entropy):
        # The guard's floor on keys 0..q; above the diagonal (s = 0) a bound of 1, whose log is 0, so the
        # one clamp also masks and a row's sum is its sum over keys 0..q.
        T = student.shape[-1]
        bound = torch.ones(T, T, dtype=student.dtype, device=student.device).masked_fill_(
            causal_mask(T, student.device), TINY)
        at_keys = student.gather(-1, keys)  # (B, H, T, K); unkept keys (above = 0) may be above the diagonal
        # Σ t log ŝ: the fill's part is 0 when the fill is (those keys have t = 0 and are left out).
        cross = fill * student.clamp(min=bound).log_().sum(-1) + (above * at_keys.clamp(min=TINY).log()).sum(-1)
        ctx.save_for_backward(student, keys, above, fill, at_keys)
        return (-entropy - cross).mean()

    @staticmethod
    def backward(ctx, grad):
        student, keys, above, fill, at_keys = ctx.saved_tensors
        scale = -grad / fill.numel()
        # d log ŝ / ds = 1/s, 0 where the clamp holds (s ≤ TINY → ∞ → 1/∞). Above the diagonal the clamp
        # always holds (s = 0), so no causal mask is needed.
        slope = torch.nn.functional.threshold(student, TINY, math.inf).reciprocal_()
        at_keys = torch.nn.functional.threshold(at_keys, TINY, math.inf).reciprocal_().mul_(above * scale)
        return slope.mul_((scale * fill).unsqueeze(-1)).scatter_add_(-1, keys, at_keys), None, None, None, None


class RelationKL(torch.autograd.Function):
    """MiniLM's value-relation KL against SparseRows, from the student's split values (B, R, T, d):
    scores z = α V_r V_rᵀ on keys 0..q and log ŝ = z − lse (exact, finite: no guard needed).

    Σ_k t log ŝ = fill·Σ_{k≤q} z_k + Σ_j above_j·z[keys_j] − mass·lse, and Σ_{k≤q} z_k = α v_q·(v_0 + … + v_q)
    is a prefix sum: no pass over T × T. The gradient wrt z is (mass·ŝ − t) / rows; t's fill part
    (fill_q on keys k ≤ q) goes back to the values through prefix sums too, so the T × T work is the
    product, one softmax, the scaled ŝ and the two products of the backward."""

    @staticmethod
    def forward(ctx, split, keys, above, fill, entropy, mass, alpha: float):
        with torch.autocast(split.device.type, enabled=False):  # float32 throughout, as the backward runs
            return RelationKL.compute(ctx, split, keys, above, fill, entropy, mass, alpha)

    @staticmethod
    def compute(ctx, split, keys, above, fill, entropy, mass, alpha):
        B, R, T, _ = split.shape
        flat = split.flatten(0, 1)  # (B·R, T, d)
        prefix = split.cumsum(-2)  # (B, R, T, d): v_0 + … + v_q
        cross = fill * alpha * torch.linalg.vecdot(split, prefix)
        saved = []
        for start, end in query_spans(T):  # as in DistilledAttention
            rows_of = slice(start, end)
            scores = causal_scores(flat[:, rows_of], flat[:, :end], alpha, start)
            student = torch.softmax(scores, dim=-1)
            lse = log_partition(scores, student).unflatten(0, (B, R))
            kept, span_above = span_keys(keys, start, end), above[:, :, rows_of]
            at_keys = span_above * finite_at(scores.unflatten(0, (B, R)), kept)
            cross[:, :, rows_of] += at_keys.sum(-1) - mass[:, :, rows_of] * lse
            saved += [student, kept]
        ctx.save_for_backward(split, above, fill, mass, prefix, *saved)
        ctx.alpha = alpha
        return (-entropy - cross).mean()

    @staticmethod
    def backward(ctx, grad):
        split, above, fill, mass, prefix, *saved = ctx.saved_tensors
        B, R, T = fill.shape
        scale = grad / fill.numel()
        flat = split.flatten(0, 1)
        out = torch.zeros_like(flat)
        for (start, end), student, kept in zip(query_spans(T), saved[0::2], saved[1::2]):
            rows_of = slice(start, end)
            # dz = scale · (mass·ŝ − above at the kept keys − fill on keys 0..q); the fill part is added below.
            dz = (student * (scale * mass[:, :, rows_of]).flatten(0, 1).unsqueeze(-1)).unflatten(0, (B, R))
            dz = dz.scatter_add_(-1, kept, above[:, :, rows_of] * -scale).flatten(0, 1)
            add_product(out[:, rows_of], dz, flat[:, :end])
            add_product(out[:, :end], dz.transpose(-1, -2), flat[:, rows_of])
        out = out.unflatten(0, (B, R))
        # −scale·fill_q on keys k ≤ q: row q gets fill_q·Σ_{k≤q} v_k, key k gets Σ_{q≥k} fill_q·v_q.
        weighted = (fill * -scale).unsqueeze(-1)
        later = (weighted * split).flip(-2).cumsum(-2).flip(-2)
        return (out + weighted * prefix + later) * ctx.alpha, None, None, None, None, None, None


class DistilledAttention(torch.autograd.Function):
    """One block's causal attention and its loss against SparseRows of the same heads, together: the
    student's T × T weights are made once, serve the output and the loss, and never leave the function.

    query, key, value (B, H, T, d) → (output (B, H, T, d), loss). kind "tinybert": SparseMSE's row sum
    with Σ_k s = 1 (softmax rows). kind "minilm": the attention KL in log space, as RelationKL (exact:
    log s = scores − lse; a row far off the teacher's keeps its gradient), the fill part through prefix
    sums of the keys. Backward folds the loss's gradient into the attention's own passes: for the MSE,
    2c·s joins dO Vᵀ in one baddbmm (the fill's −2c·fill is constant along a row, and a softmax's
    backward cancels row constants); for the KL, c·(mass·s − t) joins the scores' gradient.
    The rows go in spans of QUERY_SPAN queries, each against only the keys it can see (query_spans).
    """

    @staticmethod
    def forward(ctx, query, key, value, scale: float, kind: str, keys, above, fill, entropy, mass):
        with torch.autocast(query.device.type, enabled=False):  # float32 throughout, as the backward runs
            return DistilledAttention.compute(ctx, query, key, value, scale, kind, keys, above, fill, entropy, mass)

    @staticmethod
    def compute(ctx, query, key, value, scale, kind, keys, above, fill, entropy, mass):
        B, H, T, _ = query.shape
        q, k, v = (x.float().flatten(0, 1) for x in (query, key, value))  # (B·H, T, d)
        prefix = fill_part = None
        if kind == "minilm":
            prefix = k.cumsum(-2)  # (B·H, T, d): k_0 + … + k_q
            fill_part = fill * scale * torch.linalg.vecdot(q, prefix).unflatten(0, (B, H))
        keys_per_row = causal_keys(T, q.device, fill.dtype)
        outputs, row_losses, saved = [], [], []
        for start, end in query_spans(T):
            rows_of, keys_of = slice(start, end), slice(0, end)
            scores = causal_scores(q[:, rows_of], k[:, keys_of], scale, start)
            weights = torch.softmax(scores, dim=-1)
            outputs.append(torch.bmm(weights, v[:, keys_of]))
            rows = weights.unflatten(0, (B, H))
            kept = span_keys(keys, start, end)
            span_fill, span_above = fill[:, :, rows_of], above[:, :, rows_of]
            if kind == "tinybert":
                at_keys = rows.gather(-1, kept) - span_fill.unsqueeze(-1)  # d = s − fill at the kept keys
                row_loss = (torch.linalg.vector_norm(rows, dim=-1).square() - 2 * span_fill
                            + keys_per_row[rows_of] * span_fill.square()
                            + ((at_keys - span_above).square() - at_keys.square()).sum(-1))
            else:
                lse = log_partition(scores, weights).unflatten(0, (B, H))
                at_keys = span_above * finite_at(scores.unflatten(0, (B, H)), kept)
                row_loss = -entropy[:, :, rows_of] - (fill_part[:, :, rows_of] + at_keys.sum(-1)
                                                      - mass[:, :, rows_of] * lse)
            row_losses.append(row_loss)
            saved += [weights, kept]
        output = torch.cat(outputs, dim=1).unflatten(0, (B, H)).to(value.dtype)
        ctx.save_for_backward(q, k, v, above, fill, mass, prefix, *saved)
        ctx.scale, ctx.kind, ctx.dtypes = scale, kind, (query.dtype, key.dtype, value.dtype)
        return output, torch.cat(row_losses, dim=-1).mean()

    @staticmethod
    def backward(ctx, grad_output, grad_loss):
        q, k, v, above, fill, mass, prefix, *saved = ctx.saved_tensors
        B, H, T = fill.shape
        c = grad_loss / fill.numel()  # the loss is a mean over rows
        d_out = grad_output.float().flatten(0, 1)
        d_query, d_key, d_value = torch.empty_like(q), torch.zeros_like(k), torch.zeros_like(v)
        for (start, end), weights, kept in zip(query_spans(T), saved[0::2], saved[1::2]):
            rows_of, keys_of = slice(start, end), slice(0, end)
            span_above = above[:, :, rows_of]
            if ctx.kind == "tinybert":  # dL/ds = 2c (s − t): 2c·s here, −2c·above at the kept keys below
                # Folded into the product, which takes a number (on a GPU reading it waits for the step so far).
                d_weights = torch.baddbmm(weights, d_out[:, rows_of], v[:, keys_of].transpose(-1, -2), beta=2 * float(c))
                d_weights.unflatten(0, (B, H)).scatter_add_(-1, kept, span_above * (-2 * c))
                d_scores = torch._softmax_backward_data(d_weights, weights, -1, weights.dtype)
            else:  # dL/dz = c (mass·s − t): the kept keys here, the fill (keys 0..q) through prefix sums below
                d_scores = torch._softmax_backward_data(torch.bmm(d_out[:, rows_of], v[:, keys_of].transpose(-1, -2)),
                                                        weights, -1, weights.dtype)
                d_scores.addcmul_(weights, (c * mass[:, :, rows_of]).flatten(0, 1).unsqueeze(-1))
                d_scores.unflatten(0, (B, H)).scatter_add_(-1, kept, span_above * -c)
            d_query[:, rows_of] = torch.bmm(d_scores, k[:, keys_of])
            add_product(d_key[:, keys_of], d_scores.transpose(-1, -2), q[:, rows_of])
            add_product(d_value[:, keys_of], weights.transpose(-1, -2), d_out[:, rows_of])
        d_query.mul_(ctx.scale)
        d_key.mul_(ctx.scale)
        if ctx.kind != "tinybert":  # −c·fill_q on keys k ≤ q: row q gets fill_q Σ_{k≤q} k_k, key k Σ_{q≥k} fill_q q_q
            weighted = (fill * (-c * ctx.scale)).flatten(0, 1).unsqueeze(-1)
            d_query.addcmul_(weighted, prefix)
            d_key.add_((weighted * q).flip(-2).cumsum(-2).flip(-2))
        grads = (g.unflatten(0, (B, H)).to(dtype) for g, dtype in zip((d_query, d_key, d_value), ctx.dtypes))
        return (*grads, None, None, None, None, None, None, None)


# Queries per span of the kernels (DistilledAttention, RelationKL): a span's rows see keys 0..its last
# row only, so T × T work shrinks to (T + QUERY_SPAN) / 2T of the square, and at the default student's
# shapes a span's B·H × 32 × T slabs fit a core's 1 MiB L2; narrower spans pay more calls
# (32 was fastest of 16, 32, 64 from T 128 to 1 024: BENCHMARKS §17, ninth pass).
QUERY_SPAN = 32


def query_spans(T: int) -> list[tuple[int, int]]:
    """(start, end) of each span of query rows, in order, covering 0..T."""
    return [(start, min(start + QUERY_SPAN, T)) for start in range(0, T, QUERY_SPAN)]


def span_keys(keys: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """The kept keys of query rows start..end−1, as indices into the span's end keys: a kept key is at
    or before its row; an unkept one (above = 0) may lie past the span's last key, and any key serves it."""
    rows = keys[:, :, start:end]
    return rows if end == keys.shape[2] else rows.clamp(max=end - 1)


def log_partition(scores: torch.Tensor, softmax: torch.Tensor) -> torch.Tensor:
    """Each row's log Σ exp(scores), from the row's softmax: at its largest score the softmax is
    exp(max − lse) ≥ 1 / (keys in the row), whose log never underflows (no second pass of exp)."""
    return scores.amax(-1) - softmax.amax(-1).log()


def finite_at(scores: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """scores at keys, −∞ (a key past its row: only ever an unkept one) raised to the lowest float, so
    that times its above of 0 it is 0 (in one pass, where a mask and a `where` take three)."""
    return scores.gather(-1, keys).clamp_(min=torch.finfo(scores.dtype).min)


def add_product(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """out += a @ b (batched), in place. A span's slice of a gradient is strided along its batch:
    there baddbmm_ falls back to a loop of per-matrix addmm_, so the product is made apart and added."""
    if out.is_contiguous():
        out.baddbmm_(a, b)
    else:
        out += torch.bmm(a, b)


def causal_scores(q: torch.Tensor, k: torch.Tensor, scale: float, start: int = 0) -> torch.Tensor:
    """(N, C, d) queries start..start+C−1 and (N, W, d) keys 0..W−1 → (N, C, W): scale · q kᵀ where the
    key is at or before the query, −inf past it. One pass: the product, its scale and the mask together
    (a broadcast masked_fill over N × C × W is several times slower)."""
    return torch.baddbmm(future_mask(q.shape[-2], k.shape[-2], start, q.device), q, k.transpose(-1, -2),
                         alpha=scale)


@functools.lru_cache(maxsize=256)
def future_mask(C: int, W: int, start: int, device) -> torch.Tensor:
    """(C, W) float32: 0 where key ≤ query (queries start..start+C−1), −inf past it. Cached: every step
    asks for the same few (read only)."""
    seen = torch.ones(C, W, dtype=torch.bool, device=device).tril(start)
    return torch.zeros(C, W, device=device).masked_fill_(seen.logical_not(), float("-inf"))


def sparse_kl(student: torch.Tensor, teacher: SparseRows) -> torch.Tensor:
    """attention_kl for SparseRows with the student's head count; student: probabilities."""
    return SparseKL.apply(student.float(), teacher.keys, teacher.above, teacher.fill, teacher.entropy)


def group_heads(attention: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, H, T, T) → (B, G, T, T): the mean of each run of H / G consecutive heads (rows still sum to 1)."""
    B, H, T, _ = attention.shape
    return attention.reshape(B, groups, H // groups, T, T).mean(2)


def match_heads(student: torch.Tensor, teacher: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bring two (B, H, T, T) stacks to one head count: the finer side's heads are averaged in groups
    when one count divides the other, else both sides collapse to their head mean."""
    hs, ht = student.shape[1], teacher.shape[1]
    if hs == ht:
        return student, teacher
    if ht % hs == 0:
        return student, group_heads(teacher, hs)
    if hs % ht == 0:
        return group_heads(student, ht), teacher
    return group_heads(student, 1), group_heads(teacher, 1)


def sparse_if_same_heads(teacher, student: torch.Tensor):
    """SparseRows stay sparse when the student has their head count (the closed forms need it); with
    another count they are written out, for match_heads to group. Dense teachers pass through."""
    if isinstance(teacher, SparseRows) and heads(teacher) != heads(student):
        return teacher.dense()
    return teacher


def attention_mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """TinyBERT: squared error of each head's attention row, summed over keys, mean over B, heads, rows.

    Matches attention probabilities (the store holds those), not TinyBERT's pre-softmax scores.
    teacher: dense (B, H', T, T) or SparseRows (the closed form below needs H' = H, else it is written out).
    """
    teacher = sparse_if_same_heads(teacher, student)
    if isinstance(teacher, SparseRows):
        return SparseMSE.apply(student.float(), teacher.keys, teacher.above, teacher.fill)
    student, teacher = match_heads(student.float(), teacher.float())
    return (student - teacher).pow(2).sum(-1).mean()


def attention_kl(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """KL(teacher row ‖ student row) per head and query, mean over B, heads and rows.
    teacher: dense (B, H', T, T) or SparseRows (as in attention_mse)."""
    teacher = sparse_if_same_heads(teacher, student)
    if isinstance(teacher, SparseRows):
        return sparse_kl(student, teacher)
    student, teacher = match_heads(student.float(), teacher.float())
    log_ratio = torch.log(teacher.clamp(min=TINY)) - torch.log(student.clamp(min=TINY))
    return torch.where(teacher > 0, teacher * log_ratio, torch.zeros_like(teacher)).sum(-1).mean()


def split_values(values: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, T, D) → (B, R, T, D / R): the relation heads' slices of the values, in float32."""
    B, T, D = values.shape
    return values.float().reshape(B, T, heads, D // heads).transpose(1, 2)


def causal_products(split: torch.Tensor, alpha: float) -> torch.Tensor:
    """(B, R, T, d) → (B, R, T, T): alpha · V_r V_rᵀ on keys 0..q, −inf above."""
    flat = split.flatten(0, 1)  # (B·R, T, d)
    return causal_scores(flat, flat, alpha).unflatten(0, split.shape[:2])


def relation_scores(values: torch.Tensor, heads: int) -> torch.Tensor:
    """MiniLM's value-relation scores, causal: (B, T, D) values → (B, R, T, T) = V_r V_rᵀ / √(D/R) on
    keys 0..q, −inf above. R = heads relation heads, each D / R wide (any width works)."""
    split = split_values(values, heads)
    return causal_products(split, 1 / math.sqrt(split.shape[-1]))


def value_relation(values: torch.Tensor, heads: int) -> torch.Tensor:
    """MiniLM's value relation: softmax of relation_scores, each query row over keys 0..q."""
    return torch.softmax(relation_scores(values, heads), dim=-1)


def relation_kl(values: torch.Tensor, teacher) -> torch.Tensor:
    """KL(teacher's value-relation row ‖ the student's) per relation head and query, mean over B, heads
    and rows. values (B, T, D): the student's, split into the teacher's R = heads(teacher) relation heads.
    The student's relation is taken in log space (log-softmax of its scores), where it is finite on
    every key 0..q: no TINY guard, a row far off the teacher's still gets its gradient."""
    R = heads(teacher)
    if isinstance(teacher, SparseRows):
        split = split_values(values, R)
        return RelationKL.apply(split, teacher.keys, teacher.above, teacher.fill, teacher.entropy, teacher.mass(),
                                1 / math.sqrt(split.shape[-1]))
    log_student, teacher = torch.log_softmax(relation_scores(values, R), dim=-1), teacher.float()
    # Above the diagonal t = 0 and log ŝ = −∞: left out by the `where` (its gradient there is 0).
    log_ratio = torch.log(teacher.clamp(min=TINY)) - log_student
    return torch.where(teacher > 0, teacher * log_ratio, 0.0).sum(-1).mean()


def minilm_loss(student_attention: torch.Tensor, teacher_attention: torch.Tensor,
                student_values: torch.Tensor | None = None,
                teacher_value_relation: torch.Tensor | None = None) -> torch.Tensor:
    """MiniLM on one (last) layer: attention KL + value-relation KL.

    student_values (B, T, D_s): the student's value projections of that layer, split into the
    teacher's relation heads R = heads(teacher_value_relation), so the student's width and head
    count may differ from the teacher's. Without value relations: the attention KL alone.
    """
    loss = attention_kl(student_attention, teacher_attention)
    if teacher_value_relation is not None:
        loss = loss + relation_kl(student_values, teacher_value_relation)
    return loss


ATTENTION_LOSSES = ("minilm", "tinybert")
