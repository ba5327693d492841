import click

from pipeline import runtime
from pipeline.config import TeacherConfig
from pipeline.errors import KdcacheError
from pipeline.training.teacher import materialise_teacher
from stages.options import build_config, config_options
from stages.train_options import train_file_options


@click.command()
@click.option("--tokens", required=True, type=click.Path(), help="Token store written by `prepare`.")
@click.option("--out", required=True, type=click.Path(), help="Directory to write the teacher to.")
@train_file_options("default teacher")
@config_options(TeacherConfig)
def teacher(tokens, out, files, **options):
    """Materialise the teacher: load --model, or train the small default teacher on the tokens.

    Under torchrun (WORLD_SIZE > 1) the default teacher trains data-parallel: see docs/DDP.md.
    """
    config = build_config(TeacherConfig, options)
    runtime.start(config.device)
    if config.model and runtime.world_size() > 1:
        raise KdcacheError("--model only loads a teacher: run it as one process, not under torchrun.")
    info = materialise_teacher(config, tokens, out, files)
    if runtime.is_main():
        click.echo(f"teacher {info['source']} -> {out} (fingerprint {info['fingerprint']})")
