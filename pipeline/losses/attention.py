"""Attention losses: TinyBERT's per-head attention MSE, MiniLM's attention and value-relation KL.

Shapes: B rows, H heads, T tokens (a causal T × T matrix per head: row q is a distribution over keys
0..q), D value width, R relation heads, K kept keys per row. Teacher matrices come from the store
decoded (rows sum to 1), either dense or as SparseRows (the topk encoding: K entries and one fill value
per row); the student's are its own softmax outputs, zero above the diagonal. Every loss averages over
B, heads and the T query rows. On SparseRows a loss expands its sum over keys into the K kept entries
plus a closed form for the fill, so no teacher T × T matrix is built; it equals the dense definition
(the `dense()` rows) up to float rounding.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

# A student probability that underflowed to 0 under a teacher with mass there: log of this, not −inf.
TINY = 1e-12
LOG_TINY = float(torch.tensor(TINY).log())  # its float32 log: max(log s, LOG_TINY) = log max(s, TINY)


class SparseRows(NamedTuple):
    """Causal teacher rows (codecs.sparse_attention): row q holds values[q, j] at keys[q, j] where
    values[q, j] > 0 (distinct keys ≤ q), and fill[q] at every other key 0..q."""

    keys: torch.Tensor    # (B, H, T, K) int64
    values: torch.Tensor  # (B, H, T, K) float32, 0 where nothing is kept
    fill: torch.Tensor    # (B, H, T) float32

    def dense(self) -> torch.Tensor:
        """(B, H, T, T) float32: the same rows written out."""
        rows = torch.where(causal_mask(self.fill.shape[-1], self.fill.device), self.fill.unsqueeze(-1), 0.0)
        # Unkept entries write back what is there, so only the kept keys change.
        return rows.scatter(-1, self.keys, torch.where(self.values > 0, self.values, rows.gather(-1, self.keys)))

    def above_fill(self) -> torch.Tensor:
        """(B, H, T, K): each kept value minus the fill (0 where nothing is kept)."""
        return torch.where(self.values > 0, self.values - self.fill.unsqueeze(-1), 0.0)


def heads(attention) -> int:
    """H of a dense (B, H, T, T) stack or of SparseRows."""
    return attention.fill.shape[1] if isinstance(attention, SparseRows) else attention.shape[1]


def xlogx(x: torch.Tensor) -> torch.Tensor:
    """x · log x with attention_kl's guards: 0 where x = 0, log clamped at TINY."""
    return torch.where(x > 0, x * torch.log(x.clamp(min=TINY)), 0.0)


def causal_mask(T: int, device, dtype=torch.bool) -> torch.Tensor:
    """(T, T): 1 on and below the diagonal (the keys 0..q of query q), else 0."""
    return torch.ones(T, T, dtype=dtype, device=device).tril()


def causal_keys(T: int, device, dtype=torch.int64) -> torch.Tensor:
    """(T,): how many keys each query row has, q + 1 for query q."""
    return torch.arange(1, T + 1, device=device, dtype=dtype)


# The two losses on SparseRows as autograd Functions with hand-written backward: autograd through the
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
    """Σ_k t (log t − log ŝ) per row over the keys with t > 0, mean over rows, with attention_kl's
    guard log ŝ = log max(s, TINY) = max(log s, LOG_TINY). The student comes as probabilities s
    (from_weights) or as log-probabilities log s. own = Σ_k t log t per row (B, H, T)."""

    @staticmethod
    def forward(ctx, student, keys, above, fill, own, from_weights: bool):
        # The guard's floor on keys 0..q; above the diagonal (s = 0, log s = −∞) a bound whose log ŝ is 0,
        # so the one clamp also masks and a row's sum is its sum over keys 0..q.
        floor, above_diagonal = (TINY, 1.0) if from_weights else (LOG_TINY, 0.0)
        T = student.shape[-1]
        bound = torch.full((T, T), above_diagonal, dtype=student.dtype, device=student.device)
        bound.masked_fill_(causal_mask(T, student.device), floor)
        log_student = student.clamp(min=bound)
        if from_weights:
            log_student.log_()
        # Σ t log ŝ: the fill's part is 0 when the fill is (those keys have t = 0 and are left out).
        cross = fill * log_student.sum(-1) + (above * log_student.gather(-1, keys)).sum(-1)
        ctx.save_for_backward(student, keys, above, fill)
        ctx.from_weights = from_weights
        return (own - cross).mean()

    @staticmethod
    def backward(ctx, grad):
        student, keys, above, fill = ctx.saved_tensors
        scale = -grad / fill.numel()
        # d log ŝ / d(input), 0 where the clamp holds: 1/s (1/∞ below TINY), or 1 above LOG_TINY. Above
        # the diagonal the clamp always holds (s = 0, log s = −∞), so no causal mask is needed.
        if ctx.from_weights:
            slope = torch.where(student >= TINY, student, math.inf).reciprocal_()
        else:
            slope = (student >= LOG_TINY).to(student.dtype)
        at_keys = scale * above * slope.gather(-1, keys)
        return slope.mul_((scale * fill).unsqueeze(-1)).scatter_add_(-1, keys, at_keys), None, None, None, None, None


def sparse_kl(student: torch.Tensor, teacher: SparseRows, from_weights: bool = True) -> torch.Tensor:
    """attention_kl for SparseRows with the student's head count; student: probabilities, or
    log-probabilities with from_weights False."""
    kept = (teacher.values > 0).sum(-1)
    filled = causal_keys(teacher.fill.shape[-1], kept.device) - kept  # keys holding the fill, per row
    own = filled * xlogx(teacher.fill) + xlogx(teacher.values).sum(-1)
    return SparseKL.apply(student.float(), teacher.keys, teacher.above_fill(), teacher.fill, own, from_weights)


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
        return SparseMSE.apply(student.float(), teacher.keys, teacher.above_fill(), teacher.fill)
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


def relation_scores(values: torch.Tensor, heads: int) -> torch.Tensor:
    """MiniLM's value-relation scores, causal: (B, T, D) values → (B, R, T, T) = V_r V_rᵀ / √(D/R) on
    keys 0..q, −inf above. R = heads relation heads, each D / R wide (any width works)."""
    B, T, D = values.shape
    split = values.float().reshape(B, T, heads, D // heads).transpose(1, 2).flatten(0, 1)  # (B·R, T, D/R)
    future = torch.zeros(T, T, device=values.device).masked_fill_(causal_mask(T, values.device).logical_not(),
                                                                  float("-inf"))
    # One pass: the product, its scale and the (T, T) mask together (a broadcast masked_fill over
    # B × R × T × T is several times slower).
    scores = torch.baddbmm(future, split, split.transpose(-1, -2), alpha=1 / math.sqrt(D // heads))
    return scores.unflatten(0, (B, heads))


def value_relation(values: torch.Tensor, heads: int) -> torch.Tensor:
    """MiniLM's value relation: softmax of relation_scores, each query row over keys 0..q."""
    return torch.softmax(relation_scores(values, heads), dim=-1)


def minilm_loss(student_attention: torch.Tensor, teacher_attention: torch.Tensor,
                student_values: torch.Tensor | None = None,
                teacher_value_relation: torch.Tensor | None = None) -> torch.Tensor:
    """MiniLM on one (last) layer: attention KL + value-relation KL.

    student_values (B, T, D_s): the student's value projections of that layer, split into the
    teacher's relation heads R = teacher_value_relation.shape[1], so the student's width and head
    count may differ from the teacher's. Without value relations: the attention KL alone.
    """
    loss = attention_kl(student_attention, teacher_attention)
    if isinstance(teacher_value_relation, SparseRows):  # log_softmax: no softmax, clamp and log over T × T
        relation = torch.log_softmax(relation_scores(student_values, heads(teacher_value_relation)), dim=-1)
        loss = loss + sparse_kl(relation, teacher_value_relation, from_weights=False)
    elif teacher_value_relation is not None:
        relation = value_relation(student_values, heads(teacher_value_relation))
        loss = loss + attention_kl(relation, teacher_value_relation)
    return loss


ATTENTION_LOSSES = ("minilm", "tinybert")
