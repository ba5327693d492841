import click

from pipeline.config import EvaluateConfig
from pipeline.errors import KdcacheError
from pipeline.evaluate import run_evaluate
from stages.options import build_config, config_options


def _parse_models(pairs, option: str = "--model", example: str = "teacher=models/teacher") -> dict[str, str]:
    models = {}
    for pair in pairs:
        name, sep, path = pair.partition("=")
        if not sep or not name or not path:
            raise KdcacheError(f"{option} {pair!r} is not NAME=PATH, e.g. {option} {example}.")
        models[name] = path
    return models


@click.command()
@click.option("--tokens", required=True, type=click.Path(), help="Token store; its validation split is used.")
@click.option("--model", "models", multiple=True, required=True, help="NAME=DIR of a model to evaluate (repeat).")
@click.option("--out", required=True, type=click.Path(), help="metrics JSON to write (DVC metrics).")
@click.option("--plot", type=click.Path(), help="CSV of validation loss by position per model (a DVC plot).")
@click.option("--table", type=click.Path(), help="Markdown table of the metrics, one row per model.")
@click.option("--summary", type=click.Path(), help="CSV of the metrics, one row per model in --model order "
              "(index 0, 1, ...): a DVC plot of a metric by model or by generation.")
@click.option("--figures", type=click.Path(file_okay=False), help="Directory for SVG figures: loss by position, "
              "reliability diagram, and the --curve logs' training and validation losses.")
@click.option("--curve", "curves", multiple=True, help="NAME=CSV of a training log (--log or --val-log of teacher "
              "or student) to draw in --figures (repeat).")
@config_options(EvaluateConfig)
def evaluate(tokens, models, out, plot, table, summary, figures, curves, **options):
    """Validation loss, perplexity, top-1 agreement, calibration (ECE), size and CPU latency of each model."""
    curve_logs: dict[str, list[str]] = {}  # a model may have two logs (--log and --val-log)
    for pair in curves:
        (name, path), = _parse_models([pair], "--curve", "student=plots/student_loss.csv").items()
        curve_logs.setdefault(name, []).append(path)
    result = run_evaluate(build_config(EvaluateConfig, options), tokens, _parse_models(models), out, plot, table,
                          figures, curves=curve_logs, summary_path=summary)
    for name, m in result["models"].items():
        if result.get("task") == "classification":
            click.echo(f"{name:>12}: accuracy {m['accuracy']:.4f}  macro-F1 {m['macro_f1']:.4f}  ECE {m['ece']:.4f}  "
                       f"params {m['params']:,}  {m['latency_ms_per_example']:.3f} ms/example")
            continue
        accuracy = f"  accuracy {m['accuracy']:.4f}" if "accuracy" in m else ""  # masked LM: of the masked ids
        click.echo(f"{name:>12}: val_loss {m['val_loss']:.4f}  ppl {m['perplexity']:.2f}{accuracy}  "
                   f"ECE {m['ece']:.4f}  params {m['params']:,}  {m['latency_ms_per_token']:.3f} ms/token")
