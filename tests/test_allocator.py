"""runtime.keep_freed_memory: a training step's large CPU tensors reuse freed blocks instead of being
mapped, and page-faulted in, afresh every step."""

import statistics
import subprocess
import sys

import pytest

# In a fresh process, so that glibc's thresholds start from its defaults: ten forward + backward
# steps of a 2 × 64 GPT-2 over 16 × 128 positions whose vocabulary makes its logits 5/8 of the block
# size kept (40 MiB at 64 MiB, 20 MiB where glibc caps it at 32 MiB); prints that size, then the
# page faults of each step. "default" leaves glibc as it is, at the same vocabulary.
STEPS = """
import resource, sys, torch
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.utils import logging
from pipeline import runtime
logging.set_verbosity_error()
kept = runtime.keep_freed_memory() if sys.argv[1] == "kept" else int(sys.argv[2])
vocab = kept * 5 // 8 // (16 * 128 * 4)
torch.manual_seed(0)
model = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=128, n_embd=64, n_layer=2, n_head=4))
ids = torch.randint(0, vocab, (16, 128))
faults = []
for _ in range(10):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    model(input_ids=ids, labels=ids).loss.backward()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(kept, " ".join(map(str, faults)))
"""
GLIBC_OWN_CEILING = 32 << 20  # the most glibc's default threshold rises to


def run_steps(*args: str) -> tuple[int, list[int]]:
    out = subprocess.run([sys.executable, "-c", STEPS, *args], capture_output=True, text=True, check=True).stdout
    size, *faults = (int(n) for n in out.split())
    return size, faults


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_steps_reuse_freed_blocks_instead_of_faulting_them_in_again():
    size, kept = run_steps("kept")
    if size == 0:
        pytest.skip("not glibc")
    logits_pages = size * 5 // 8 // 4096
    # The typical step from the third on (the median: a kept heap still grows by a logits' worth in a
    # step now and then): next to no faults. A heap that trimmed its free top at twice the block
    # size faulted 4 logits' worth per step in half the runs.
    assert statistics.median(kept[2:]) < logits_pages // 16
    if size > GLIBC_OWN_CEILING:
        # Blocks glibc's defaults never keep: they fault in at least about a logits' worth each step.
        _, default = run_steps("default", str(size))
        assert statistics.median(default[2:]) > logits_pages // 2
