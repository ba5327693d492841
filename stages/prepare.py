import click

from pipeline.config import PrepareConfig
from pipeline.data.mix import mix_token_stores
from pipeline.data.tokens import prepare_tokens
from stages.options import build_config, config_options


@click.command()
@click.option("--out", required=True, type=click.Path(), help="Token store directory to write.")
@config_options(PrepareConfig)
def prepare(out, **options):
    """Tokenize a corpus into packed blocks and write the Arrow token store (train/validation).

    With --mix, write the mixture of existing token stores instead (e.g. the corpus and `generate`'s output).
    """
    config = build_config(PrepareConfig, options)
    store = (mix_token_stores if config.mix else prepare_tokens)(config, out)
    click.echo(f"wrote {out}: {store.meta['rows']} blocks of {store.block_size} tokens, "
               f"vocabulary {store.vocab_size}, fingerprint {store.fingerprint}")
