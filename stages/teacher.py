from pathlib import Path

import click

from pipeline import distributed
from pipeline.config import TeacherConfig
from pipeline.errors import KdcacheError
from pipeline.teacher import materialise_teacher
from pipeline.train import TrainFiles
from stages.options import build_config, config_options


@click.command()
@click.option("--tokens", required=True, type=click.Path(), help="Token store written by `prepare`.")
@click.option("--out", required=True, type=click.Path(), help="Directory to write the teacher to.")
@click.option("--log", type=click.Path(), help="CSV of the default teacher's training loss (a DVC plot).")
@click.option("--val-log", type=click.Path(), help="CSV of the default teacher's validation loss (a DVC plot).")
@click.option("--checkpoint-dir", type=click.Path(), help="Checkpoint directory (default: OUT/checkpoint).")
@click.option("--resume/--no-resume", default=False, help="Continue training the default teacher from the "
              "checkpoint (settings must match; max_steps/epochs may grow).")
@config_options(TeacherConfig)
def teacher(tokens, out, log, val_log, checkpoint_dir, resume, **options):
    """Materialise the teacher: load --model, or train the small default teacher on the tokens.

    Under torchrun (WORLD_SIZE > 1) the default teacher trains data-parallel: see docs/DDP.md.
    """
    files = TrainFiles(log, val_log, checkpoint_dir or str(Path(out) / "checkpoint"), resume)
    config = build_config(TeacherConfig, options)
    distributed.start()
    if config.model and distributed.world_size() > 1:
        raise KdcacheError("--model only loads a teacher: run it as one process, not under torchrun.")
    info = materialise_teacher(config, tokens, out, files)
    if distributed.is_main():
        click.echo(f"teacher {info['source']} -> {out} (fingerprint {info['fingerprint']})")
