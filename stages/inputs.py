import json
from pathlib import Path

import click

from pipeline.data.corpus import corpus_fingerprint
from pipeline.models import model_fingerprint


@click.command()
@click.option("--corpus", required=True, help="The corpus source, as `prepare --corpus` takes it.")
@click.option("--model", default="", show_default=True,
              help="The teacher, as `teacher --model` takes it (a directory, a file, a hub id; empty: the default).")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Directory for corpus.json and teacher_model.json.")
def inputs(corpus, model, out):
    """Summarise what the pipeline reads from outside the repository, for DVC.

    A path in params.yaml is a string to DVC, not a dependency. This stage (always run; seconds) hashes the
    corpus files and a local teacher directory into small JSON files that `prepare` and `teacher`
    depend on, so adding a corpus file or new teacher weights re-runs them, and nothing else does.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name, record in (("corpus.json", corpus_fingerprint(corpus)), ("teacher_model.json", model_fingerprint(model))):
        (out / name).write_text(json.dumps(record, indent=2) + "\n")
        click.echo(f"{out / name}: {record}")
