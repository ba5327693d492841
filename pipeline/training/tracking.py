"""Experiment trackers the training loop reports to, besides its CSV logs: DVCLive and TensorBoard.

DVCLive (DVC's own logger) writes DIR/metrics.json (the last values: `dvc exp show` columns when a
stage declares it as metrics) and DIR/plots/metrics/NAME.tsv (one row per step: DVC plots). TensorBoard
event files are optional (`pip install tensorboard`). Rank 0 alone reports.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.errors import KdcacheError


class Trackers:
    """Report each optimizer step's logged values (and validation values) to the trackers asked for."""

    def __init__(self, live_dir: str | None = None, tensorboard_dir: str | None = None, resume: bool = False):
        self.live = self.board = None
        if live_dir:
            from dvclive import Live

            # Inside a DVC stage: no edits to dvc.yaml, no experiment commits: the stage declares the files.
            self.live = Live(str(live_dir), resume=resume, save_dvc_exp=False, dvcyaml=None)
        if tensorboard_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise KdcacheError("--tensorboard needs the tensorboard package: `pip install tensorboard` "
                                   "(or leave --tensorboard out).") from e
            Path(tensorboard_dir).mkdir(parents=True, exist_ok=True)
            self.board = SummaryWriter(str(tensorboard_dir))

    def log_step(self, row: dict, validation: dict | None = None) -> None:
        """row: step, epoch, lr and the loss parts of one step; validation: its val_loss, when evaluated."""
        values = {key: value for key, value in {**row, **(validation or {})}.items()
                  if key not in ("step", "epoch", "val_blocks")}
        if self.live is not None:
            self.live.step = row["step"]
            for name, value in values.items():
                self.live.log_metric(name, float(value))
            self.live.next_step()
        if self.board is not None:
            for name, value in values.items():
                self.board.add_scalar(name, float(value), row["step"])

    def close(self) -> None:
        if self.live is not None:
            self.live.end()
        if self.board is not None:
            self.board.close()
