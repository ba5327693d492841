"""Page faults and time per training step under three allocator settings, each run in a fresh
process, the settings interleaved round by round: glibc's defaults; blocks up to the size
`runtime.keep_freed_memory` picks taken from the heap with its free top trimmed past twice that size
(what it did before); and the same with the top never trimmed (what it does now).

  python benchmarks/allocator_faults.py --rounds 6 --vocab 5120

The step is a forward + backward of a 2 × 64 GPT-2 over 16 × 128 positions (the default student's
shape; a 5 120-token vocabulary makes 40 MiB logits, 2 048 the default student's 16 MiB). Prints per
setting the median over rounds of each run's median faults and ms per step from the third step on,
and the share of runs whose median step faulted more than a logits' worth / 16.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

STEPS = """
import ctypes, json, resource, sys, time, torch
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.utils import logging
from pipeline import runtime
logging.set_verbosity_error()
setting, vocab, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
if setting != "defaults":
    size = runtime.keep_freed_memory()
    if setting == "trim_at_twice":
        ctypes.CDLL("libc.so.6").mallopt(-1, 2 * size)  # M_TRIM_THRESHOLD, as before
torch.manual_seed(0)
model = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=128, n_embd=64, n_layer=2, n_head=4))
ids = torch.randint(0, vocab, (16, 128))
faults, ms = [], []
for _ in range(steps):
    before, start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
    model(input_ids=ids, labels=ids).loss.backward()
    ms.append(1000 * (time.perf_counter() - start))
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"faults": faults, "ms": ms}))
"""
SETTINGS = ("defaults", "trim_at_twice", "never_trim")


def one_run(setting: str, vocab: int, steps: int) -> dict:
    out = subprocess.run([sys.executable, "-c", STEPS, setting, str(vocab), str(steps)],
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=6, help="fresh processes per setting, interleaved")
    parser.add_argument("--vocab", type=int, default=5120, help="the student's vocabulary (sets the logits' size)")
    parser.add_argument("--steps", type=int, default=10, help="steps per process (the first two are not counted)")
    args = parser.parse_args()
    logits_pages = 16 * 128 * args.vocab * 4 // 4096
    runs = {setting: [] for setting in SETTINGS}
    for round_ in range(args.rounds):
        for setting in SETTINGS:
            run = one_run(setting, args.vocab, args.steps)
            runs[setting].append((statistics.median(run["faults"][2:]), statistics.median(run["ms"][2:])))
            print(f"round {round_} {setting:>13}: faults {run['faults']}", flush=True)
    base_ms = statistics.median(ms for _, ms in runs["defaults"])
    print(f"\nlogits {logits_pages} pages; medians of each run's median step (steps 3-{args.steps})")
    for setting, results in runs.items():
        faults = statistics.median(f for f, _ in results)
        ms = statistics.median(m for _, m in results)
        faulting = sum(f >= logits_pages // 16 for f, _ in results)
        print(f"{setting:>13}: {faults:8.0f} faults/step  {ms:6.1f} ms/step  speed vs defaults {base_ms / ms:.2f}×  "
              f"runs faulting {faulting}/{len(results)}")


if __name__ == "__main__":
    main()
