import click

from pipeline.teacher.capture import run_capture
from pipeline.config import CacheConfig
from stages.options import build_config, config_options


@click.command()
@click.option("--teacher", "teacher_dir", required=True, type=click.Path(), help="Teacher directory from `teacher`.")
@click.option("--tokens", required=True, type=click.Path(), help="Token store from `prepare`.")
@click.option("--out", required=True, type=click.Path(), help="Targets store (Zarr) to write or resume.")
@config_options(CacheConfig)
def cache(teacher_dir, tokens, out, **options):
    """Run the teacher once over the tokens and write top-k log-probs, tail mass and hidden states."""
    store = run_capture(build_config(CacheConfig, options), teacher_dir, tokens, out)
    click.echo(f"wrote {out}: {store.rows} rows, top-{store.top_k}, layers {store.layers}")
