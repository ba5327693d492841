"""Training checkpoints: all a run needs to continue to the same batches and, on CPU, the same losses.

With checkpoint_every N, the training loop writes one every N steps and at the end, replacing the
previous one, in --checkpoint-dir (default OUT/checkpoint). A checkpoint is a directory: `state.pt`
(model, extra modules, optimizer, RNG states, loss histories; torch.save) and `run.json` (step,
epoch, batches consumed in that epoch, and what defines the run: settings, world size, data
fingerprints; readable by people). It is written to a temporary sibling and renamed into place, so a
kill mid-write leaves the previous one.

`--resume` loads it before any training and refuses one written by another run, naming what differs.
It may raise max_steps/epochs: the run goes on, the learning-rate schedule stretched over the new
total from the resume step on (so an extended run is not the run that had the larger total from the
start). Logs (--log, --val-log) are rewritten whole, so they stay continuous across resumes.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from pipeline.errors import KdcacheError

STATE, RUN = "state.pt", "run.json"
# Settings a resume may change: they do not alter the batches or the updates already made. The step
# budget may grow (extending a run re-plans the learning-rate schedule over the new total from the
# resume step on), other schedule-free settings are free.
MAY_CHANGE = ("max_steps", "epochs", "checkpoint_every", "eval_every", "eval_batches", "device",
              "gradient_accumulation_steps",  # the same update, in fewer or more pieces
              "reader")  # the same batches, read elsewhere (and absent from checkpoints before it existed)


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(directory: str | Path, state: dict, run: dict) -> None:
    """Replace the checkpoint in `directory` by this one, atomically (temp dir + rename)."""
    directory = Path(directory)
    partial, old = directory.with_name(directory.name + ".partial"), directory.with_name(directory.name + ".old")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    torch.save(state, partial / STATE)
    (partial / RUN).write_text(json.dumps(run, indent=2, default=str))
    if directory.exists():
        shutil.rmtree(old, ignore_errors=True)
        directory.rename(old)
    partial.rename(directory)
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(directory: str | Path) -> tuple[dict, dict]:
    """(state, run) of the checkpoint in `directory` (or of the one a kill left in DIR.old)."""
    directory = Path(directory)
    old = directory.with_name(directory.name + ".old")
    if not (directory / RUN).exists() and (old / RUN).exists():
        directory = old  # killed between the two renames of save_checkpoint
    if not (directory / RUN).exists():
        raise KdcacheError(f"--resume: no checkpoint in {directory}; run without --resume (with "
                           f"--checkpoint-every N to write one) or point --checkpoint-dir at one.")
    run = json.loads((directory / RUN).read_text())
    # Our own file, holding RNG states (Python tuples, NumPy arrays) beside the tensors.
    state = torch.load(directory / STATE, map_location="cpu", weights_only=False)
    return state, run


def check_same_run(saved: dict, current: dict, total_steps: int, directory) -> None:
    """Refuse to resume a checkpoint of another run; say which settings differ."""
    differ = [f"{key}: checkpoint {saved['settings'].get(key)!r}, now {value!r}"
              for key, value in current["settings"].items()
              if key not in MAY_CHANGE and saved["settings"].get(key) != value]
    differ += [f"{key}: checkpoint {saved[key]!r}, now {current[key]!r}"
               for key in ("world_size", "data") if saved[key] != current[key]]
    if differ:
        raise KdcacheError(f"the checkpoint in {directory} was written by a different run ("
                           + "; ".join(differ) + "). Resume with the checkpoint's settings, or start "
                           "afresh without --resume (another --checkpoint-dir keeps this one).")
    if total_steps < saved["step"]:
        raise KdcacheError(f"the checkpoint in {directory} is at step {saved['step']}, beyond this run's "
                           f"{total_steps} steps; raise max_steps/epochs to extend it.")
