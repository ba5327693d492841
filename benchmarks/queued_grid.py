"""What a queued grid of students costs after a committed run: two students, not two captures.

In a fresh copy of the project (a temporary git repository: code, dvc.yaml, DVC config, --params as
params.yaml), side by side in one run:

  repro      `dvc repro` from nothing (what `make run` runs after its set-up)
  one        `dvc exp run -S student.alpha=0.2`: one student experiment
  grid       `dvc exp run --queue -S student.alpha=0.3,0.4` + `dvc exp run --run-all`: two of them

and which stages each ran. The grid should cost about twice `one`, and a small part of `repro`.

  python benchmarks/queued_grid.py                              # the embedded default (minutes)
  python benchmarks/queued_grid.py --params params.smoke.yaml   # the smoke profile
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def timed(cmd: list[str], cwd: Path, env: dict) -> tuple[float, str]:
    start = time.perf_counter()
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return time.perf_counter() - start, result.stdout + result.stderr


def stages_run(log: str) -> str:
    names = re.findall(r"Running stage '([^']+)'", log)
    return ", ".join(f"{n} x{names.count(n)}" if names.count(n) > 1 else n for n in dict.fromkeys(names))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--work", help="project directory to create (default: a temporary one)")
    args = parser.parse_args()
    repo = Path(args.work or tempfile.mkdtemp(prefix="kdcache-grid-")) / "project"
    repo.mkdir(parents=True)
    for name in ("pipeline", "stages"):
        shutil.copytree(ROOT / name, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "dvc.yaml", repo)
    shutil.copy(ROOT / args.params, repo / "params.yaml")
    shutil.copytree(ROOT / ".dvc", repo / ".dvc", ignore=shutil.ignore_patterns("tmp", "cache"))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "GIT_AUTHOR_NAME": "b", "GIT_AUTHOR_EMAIL": "b@b", "GIT_COMMITTER_NAME": "b",
           "GIT_COMMITTER_EMAIL": "b@b", "DVC_NO_ANALYTICS": "1"}
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "project"]):
        timed(cmd, repo, env)

    rows = []
    seconds, log = timed(["dvc", "repro"], repo, env)
    rows.append(("repro", seconds, stages_run(log)))
    for cmd in (["git", "add", "-A"], ["git", "commit", "-qm", "baseline run"]):  # as README says
        timed(cmd, repo, env)
    seconds, log = timed(["dvc", "exp", "run", "-S", "student.alpha=0.2"], repo, env)
    rows.append(("one", seconds, stages_run(log)))
    queue_s, _ = timed(["dvc", "exp", "run", "--queue", "-S", "student.alpha=0.3,0.4"], repo, env)
    seconds, log = timed(["dvc", "exp", "run", "--run-all"], repo, env)
    rows.append(("grid of 2", queue_s + seconds, stages_run(log)))

    print(f"project {repo} ({args.params})")
    print(f"{'run':>10} {'wall s':>8}  stages run")
    for name, seconds, stages in rows:
        print(f"{name:>10} {seconds:8.1f}  {stages}")
    repro, one, grid = (row[1] for row in rows)
    print(f"\ngrid / one = {grid / one:.2f} (2 would be two students exactly); grid / repro = {grid / repro:.2f}")


if __name__ == "__main__":
    main()
