import click

from pipeline.config import EvaluateConfig
from pipeline.errors import KdcacheError
from pipeline.evaluate import run_evaluate
from stages.options import build_config, config_options


def _parse_models(pairs) -> dict[str, str]:
    models = {}
    for pair in pairs:
        name, sep, path = pair.partition("=")
        if not sep or not name or not path:
            raise KdcacheError(f"--model {pair!r} is not NAME=DIR, e.g. --model teacher=models/teacher.")
        models[name] = path
    return models


@click.command()
@click.option("--tokens", required=True, type=click.Path(), help="Token store; its validation split is used.")
@click.option("--model", "models", multiple=True, required=True, help="NAME=DIR of a model to evaluate (repeat).")
@click.option("--out", required=True, type=click.Path(), help="metrics JSON to write (DVC metrics).")
@click.option("--plot", type=click.Path(), help="CSV of validation loss by position per model (a DVC plot).")
@click.option("--table", type=click.Path(), help="Markdown table of the metrics, one row per model.")
@config_options(EvaluateConfig)
def evaluate(tokens, models, out, plot, table, **options):
    """Validation loss, perplexity, top-1 agreement, calibration (ECE), size and CPU latency of each model."""
    result = run_evaluate(build_config(EvaluateConfig, options), tokens, _parse_models(models), out, plot, table)
    for name, m in result["models"].items():
        click.echo(f"{name:>12}: val_loss {m['val_loss']:.4f}  ppl {m['perplexity']:.2f}  ECE {m['ece']:.4f}  "
                   f"params {m['params']:,}  {m['latency_ms_per_token']:.3f} ms/token")
