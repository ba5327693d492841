"""Peak memory of a student run does not grow with the corpus: 10x the rows vs 1x, same steps.

Builds two token stores from --tokens (its first --rows train rows, and those rows repeated 10 times),
captures each with a tiny default teacher, then trains the same student for the same steps on each,
every run in a fresh child process, and prints each child's peak resident memory (ru_maxrss) and the
ratio 10x / 1x (the bar: <= 1.1). Runs alternate 1x, 10x, 1x, 10x, ... so machine noise hits both.

  PYTHONPATH=$PWD python benchmarks/memory.py --tokens data/tokens --rows 1024 --steps 60 --rounds 2
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np

from pipeline.teacher.capture import run_capture
from pipeline.config import CacheConfig, TeacherConfig
from pipeline.training.teacher import materialise_teacher
from pipeline.data.tokens import TokenStore, _write_split

CHILD = """
import json, resource, sys, torch
torch.set_num_threads(1)
from pipeline.config import StudentConfig
from pipeline.student import run_student
config = StudentConfig(**json.loads(sys.argv[1]))
run_student(config, sys.argv[2], sys.argv[3], sys.argv[4])
print("MAXRSS_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def repeated_store(source: TokenStore, rows: int, times: int, out: Path) -> Path:
    """A token store whose train split is the first `rows` rows of `source`, repeated `times` times."""
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(source.path, out)
    blocks = np.tile(source.blocks("train")[:rows], (times, 1))
    _write_split(out / "train.arrow", blocks, source.vocab_size)
    meta = json.loads((out / "meta.json").read_text())
    meta["rows"]["train"] = len(blocks)
    meta["fingerprint"] = hashlib.sha256(f"{meta['fingerprint']}-{rows}x{times}".encode()).hexdigest()[:16]
    (out / "meta.json").write_text(json.dumps(meta, indent=2))
    return out


def build(source: TokenStore, rows: int, times: int, work: Path) -> tuple[str, str]:
    tokens = repeated_store(source, rows, times, work / f"tokens_x{times}")
    teacher = work / f"teacher_x{times}"
    materialise_teacher(TeacherConfig(n_layer=1, n_embd=32, n_head=2, max_steps=2, batch_size=4),
                        str(tokens), str(teacher))
    targets = work / f"targets_x{times}.zarr"
    shutil.rmtree(targets, ignore_errors=True)
    run_capture(CacheConfig(top_k=32, batch_size=64, device="cpu"), str(teacher), str(tokens), str(targets))
    return str(tokens), str(targets)


def peak_rss_mb(config: dict, tokens: str, targets: str, out: Path) -> float:
    result = subprocess.run([sys.executable, "-c", CHILD, json.dumps(config), tokens, str(out), targets],
                            capture_output=True, text=True, check=True)
    line = [l for l in result.stdout.splitlines() if l.startswith("MAXRSS_KB")][-1]
    return int(line.split()[1]) / 1024


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", required=True, help="A token store to take rows from.")
    parser.add_argument("--rows", type=int, default=1024, help="Train rows of the 1x store.")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--work", default="/tmp/kdcache-memory-bench")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    source = TokenStore(args.tokens)
    stores = {times: build(source, args.rows, times, work) for times in (1, 10)}
    config = {"n_layer": 2, "n_embd": 64, "n_head": 4, "max_steps": args.steps, "batch_size": 16,
              "alpha": 0.5, "device": "cpu"}
    peaks = {1: [], 10: []}
    for _ in range(args.rounds):
        for times, (tokens, targets) in stores.items():
            peaks[times].append(peak_rss_mb(config, tokens, targets, work / f"student_x{times}"))
    for times, (tokens, targets) in stores.items():
        rows = TokenStore(tokens).num_rows("train")
        size = sum(f.stat().st_size for f in Path(targets).rglob("*") if f.is_file()) / 2**20
        print(f"{times:>2}x: {rows:>6} rows, targets {size:7.1f} MiB, peak RSS per run (MiB): "
              + ", ".join(f"{p:.0f}" for p in peaks[times]))
    ratio = statistics.median(peaks[10]) / statistics.median(peaks[1])
    print(f"peak RSS 10x / 1x (medians): {ratio:.3f}  (bar: <= 1.1)")


if __name__ == "__main__":
    main()
