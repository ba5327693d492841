import click

from pipeline.config import TeacherConfig
from pipeline.teacher import materialise_teacher
from stages.options import build_config, config_options


@click.command()
@click.option("--tokens", required=True, type=click.Path(), help="Token store written by `prepare`.")
@click.option("--out", required=True, type=click.Path(), help="Directory to write the teacher to.")
@click.option("--log", type=click.Path(), help="CSV of the default teacher's training loss (a DVC plot).")
@config_options(TeacherConfig)
def teacher(tokens, out, log, **options):
    """Materialise the teacher: load --model, or train the small default teacher on the tokens."""
    info = materialise_teacher(build_config(TeacherConfig, options), tokens, out, log)
    click.echo(f"teacher {info['source']} -> {out} (fingerprint {info['fingerprint']})")
