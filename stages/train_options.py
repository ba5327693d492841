"""Options of the stages that train (teacher, student): logs, checkpoints, resume."""

from __future__ import annotations

import functools
from pathlib import Path

import click

from pipeline.training.loop import TrainFiles


def train_file_options(what: str):
    """--log, --val-log, --checkpoint-dir, --resume, --live and --tensorboard of a stage that trains `what`.

    The command receives them as one `files` argument (pipeline.training.loop.TrainFiles); it must take --out.
    """
    def decorate(command):
        @functools.wraps(command)
        def with_files(log, val_log, checkpoint_dir, resume, live, tensorboard, **kwargs):
            checkpoints = checkpoint_dir or str(Path(kwargs["out"]) / "checkpoint")
            return command(files=TrainFiles(log, val_log, checkpoints, resume, live, tensorboard), **kwargs)

        for option in reversed([
            click.option("--log", type=click.Path(), help=f"CSV of the {what}'s training loss per step (a DVC plot)."),
            click.option("--val-log", type=click.Path(),
                         help=f"CSV of the {what}'s validation loss every eval_every steps (a DVC plot)."),
            click.option("--checkpoint-dir", type=click.Path(), help="Checkpoint directory (default: OUT/checkpoint)."),
            click.option("--resume/--no-resume", default=False,
                         help=f"Continue training the {what} from the checkpoint, to the batches and losses of an "
                              f"uninterrupted run (settings must match; max_steps/epochs may grow)."),
            click.option("--live", type=click.Path(file_okay=False),
                         help=f"DVCLive directory: the {what}'s logged values per step (plots/metrics/*.tsv) and "
                              f"their last values (metrics.json, `dvc exp show` columns)."),
            click.option("--tensorboard", type=click.Path(file_okay=False),
                         help="TensorBoard log directory (needs `pip install tensorboard`)."),
        ]):
            with_files = option(with_files)
        return with_files

    return decorate
