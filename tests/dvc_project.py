"""A copy of the project in a temporary git repository, for the tests that run real DVC (the e2e ones)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def run(cmd, cwd, env) -> str:
    """Run `cmd` in `cwd`; fail the test with the end of its output unless it succeeds. Returns the output."""
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout + result.stderr


def make_project(repo: Path, params: str | dict, files: dict[str, str] | None = None) -> dict:
    """Copy the code, dvc.yaml, the DVC config and `params` (a params file of the project, or the params
    themselves) as params.yaml into a new git repository `repo`, plus `files` (destination -> source,
    relative to the repository and the project), and commit. Returns the environment for `run`."""
    repo.mkdir()
    for name in ("pipeline", "stages"):
        shutil.copytree(ROOT / name, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "dvc.yaml", repo)
    if isinstance(params, dict):
        (repo / "params.yaml").write_text(yaml.safe_dump(params))
    else:
        shutil.copy(ROOT / params, repo / "params.yaml")
    for destination, source in {".dvc/config": ".dvc/config", **(files or {})}.items():
        (repo / destination).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / source, repo / destination)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t", "DVC_NO_ANALYTICS": "1"}
    run(["git", "init", "-q"], repo, env)
    run(["git", "add", "-A"], repo, env)
    run(["git", "commit", "-qm", "smoke"], repo, env)
    return env
