"""Distillation losses: pure functions on tensors (DESIGN §4). Losses never import models.

buckets.py     supports: teacher and student log-probs on the same buckets; the tempered tail
divergences.py KL, reverse KL, JSD, TV; `kd_loss(SUPPORT_DIVERGENCE, ...)` composes the two
fused.py       CE + tail KL, sampled KD or top-k + sampled tail from one softmax (single-teacher paths)
sampled.py     random-sampling KD, and the top-k completed by sampled tail ids;  mixture.py  several teachers;  hidden.py  hidden-state losses
attention.py   TinyBERT attention MSE, MiniLM attention + value-relation KL (dense or SparseRows teachers)
uld.py         Universal Logit Distillation: sorted probabilities, no shared vocabulary (cross-tokenizer)
"""

from pipeline.losses.attention import (ATTENTION_LOSSES, SparseRows, attention_kl, attention_mse, minilm_loss,
                                       relation_kl, value_relation)
from pipeline.losses.buckets import (LOG_ZERO, SUPPORTS, TAIL_MODELS, cross_entropy, masked_mean,
                                     student_buckets, teacher_buckets, tempered_tail)
from pipeline.losses.divergences import (DIVERGENCES, KD_LOSS_FUNCTIONS, KD_LOSSES, jsd_from_logprobs,
                                         kd_loss, kl_from_logprobs, reverse_kl_from_logprobs, tail_kl,
                                         tv_from_logprobs)
from pipeline.losses.fused import ce_and_sampled_kd, ce_and_tail_kl, ce_and_topk_sampled_kd
from pipeline.losses.hidden import HIDDEN_LOSSES, hidden_cosine, hidden_mse, hidden_relative_mse
from pipeline.losses.mixture import mixture_buckets, mixture_kd
from pipeline.losses.sampled import sampled_kd, topk_sampled_kd
from pipeline.losses.uld import uld_loss

__all__ = ["ATTENTION_LOSSES", "SparseRows", "attention_kl", "attention_mse", "minilm_loss", "relation_kl", "value_relation", "LOG_ZERO", "SUPPORTS", "TAIL_MODELS", "DIVERGENCES", "KD_LOSSES", "KD_LOSS_FUNCTIONS", "ce_and_sampled_kd", "ce_and_tail_kl",
           "ce_and_topk_sampled_kd",
           "cross_entropy", "HIDDEN_LOSSES", "hidden_cosine", "hidden_mse", "hidden_relative_mse",
           "jsd_from_logprobs", "kd_loss", "kl_from_logprobs",
           "masked_mean", "mixture_buckets", "mixture_kd", "reverse_kl_from_logprobs", "sampled_kd",
           "student_buckets", "tail_kl", "topk_sampled_kd", "teacher_buckets", "tempered_tail", "tv_from_logprobs",
           "uld_loss"]
