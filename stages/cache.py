import click

from pipeline import runtime
from pipeline.teacher.capture import run_capture
from pipeline.config import CacheConfig
from stages.options import build_config, config_options


@click.command()
@click.option("--teacher", "teacher_dir", required=True, type=click.Path(), help="Teacher directory from `teacher`.")
@click.option("--tokens", required=True, type=click.Path(), help="Token store from `prepare`.")
@click.option("--out", required=True, type=click.Path(),
              help="Targets store (Zarr) to write or resume: a directory or an fsspec URL (s3://, gs://, ...).")
@click.option("--overwrite", is_flag=True,
              help="Delete a store at --out that holds a capture with other settings or inputs (refused without).")
@click.option("--force", is_flag=True,
              help="Take over the store's writer lock even if its holder may still run (e.g. on another host).")
@config_options(CacheConfig)
def cache(teacher_dir, tokens, out, overwrite, force, **options):
    """Run the teacher once over the tokens and write top-k log-probs, tail mass and hidden states.

    Under torchrun (WORLD_SIZE > 1) rank r of N captures shards r, r + N, ... of the one store.
    """
    config = build_config(CacheConfig, options)
    runtime.start(config.device)
    store = run_capture(config, teacher_dir, tokens, out, overwrite=overwrite, force=force)
    if runtime.is_main():
        click.echo(f"wrote {out}: {store.rows} rows, top-{store.top_k}, layers {store.layers}")
