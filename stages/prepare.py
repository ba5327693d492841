import click

from pipeline.config import PrepareConfig
from pipeline.data.tokens import prepare_tokens
from stages.options import build_config, config_options


@click.command()
@click.option("--out", required=True, type=click.Path(), help="Token store directory to write.")
@config_options(PrepareConfig)
def prepare(out, **options):
    """Tokenize a corpus into packed blocks and write the Arrow token store (train/validation)."""
    store = prepare_tokens(build_config(PrepareConfig, options), out)
    click.echo(f"wrote {out}: {store.meta['rows']} blocks of {store.block_size} tokens, "
               f"vocabulary {store.vocab_size}, fingerprint {store.fingerprint}")
