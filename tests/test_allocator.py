"""runtime.keep_freed_memory: a training step's large CPU tensors reuse freed blocks instead of being
mapped, and page-faulted in, afresh every step."""

import statistics
import subprocess
import sys

import pytest

# In a fresh process, so that glibc's thresholds start from its defaults: ten forward + backward
# steps of a 2 × 64 GPT-2 with a 5 120-token vocabulary (16 × 128 positions: its logits alone are
# 40 MiB, 10 240 pages, above the 32 MiB that glibc's own threshold can rise to, so its defaults map
# them afresh every step; a 2 048-token vocabulary's 16 MiB blocks it sometimes keeps by itself);
# prints the page faults of each step.
STEPS = """
import resource, sys, torch
from transformers import GPT2Config, GPT2LMHeadModel
from pipeline import runtime
if sys.argv[1] == "kept" and not runtime.keep_freed_memory():
    print("unsupported"); sys.exit()
torch.manual_seed(0)
model = GPT2LMHeadModel(GPT2Config(vocab_size=5120, n_positions=128, n_embd=64, n_layer=2, n_head=4))
ids = torch.randint(0, 5120, (16, 128))
faults = []
for _ in range(10):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    model(input_ids=ids, labels=ids).loss.backward()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(" ".join(map(str, faults)))
"""
LOGITS_PAGES = 16 * 128 * 5120 * 4 // 4096


def page_faults(mode: str) -> list[int] | None:
    out = subprocess.run([sys.executable, "-c", STEPS, mode], capture_output=True, text=True, check=True).stdout
    return None if out.strip() == "unsupported" else [int(n) for n in out.split()]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_steps_reuse_freed_blocks_instead_of_faulting_them_in_again():
    kept = page_faults("kept")
    if kept is None:
        pytest.skip("not glibc")
    default = page_faults("default")
    # The typical step from the third on (the median: a kept heap still grows by a few thousand pages
    # in a step now and then): glibc's defaults fault in about a logits' worth of pages or more; kept,
    # next to none.
    assert statistics.median(default[2:]) > LOGITS_PAGES // 2
    assert statistics.median(kept[2:]) < LOGITS_PAGES // 16
