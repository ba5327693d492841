import click

from pipeline.config import GenerateConfig
from pipeline.teacher.generate import run_generate
from stages.options import build_config, config_options


@click.command()
@click.option("--teacher", "teacher_dir", required=True, type=click.Path(), help="Teacher directory (`kdcache teacher`, "
              "or a student's).")
@click.option("--tokens", required=True, type=click.Path(), help="Token store the prompts are drawn from (train "
              "split); the output keeps its tokenizer, block size and validation split.")
@click.option("--out", required=True, type=click.Path(), help="Token store to write (generated train rows).")
@config_options(GenerateConfig)
def generate(teacher_dir, tokens, out, **options):
    """The teacher writes data: continue seeded prompts from the train split, write a token store.

    Sequence-level KD: `cache` and `student` take the result like any token store (`prepare --mix`
    combines it with the original). An interrupted run resumes from its finished batches.
    """
    config = build_config(GenerateConfig, options)
    store = run_generate(config, teacher_dir, tokens, out)
    click.echo(f"wrote {out}: {store.meta['rows']['train']} generated blocks of {store.block_size} tokens "
               f"from {config.prompts} prompts, fingerprint {store.fingerprint}")
