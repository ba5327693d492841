"""Held-out metrics for the teacher and the students, measured on the same validation blocks.

Per model: validation loss and perplexity (for masked LM: at the masked positions, with the accuracy
of predicting the original id there), top-1 agreement with a reference model (the teacher),
expected calibration error (ECE) of its top-1 next-token prediction, parameter count, size of the
weight files, and CPU latency per token timed in interleaved rounds so that machine noise hits every
model alike. Also, on request: a Markdown table of those metrics and SVG figures (pipeline/charts.py).
"""

from __future__ import annotations

import csv
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pipeline import runtime
from pipeline.config import EvaluateConfig
from pipeline.data.tokens import TokenStore
from pipeline.errors import KdcacheError
from pipeline.evaluate_classes import check_model_task
from pipeline.models import check_model_fits, load_model, param_count
from pipeline.progress import progress


ECE_BINS = 15


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> float:
    """Σ_b (n_b / N) · |accuracy_b − mean confidence_b| over `bins` equal-width confidence bins.

    confidence (N,) in [0, 1]: the probability of the predicted (top-1) token; correct (N,) bool: the
    prediction was the next token. Bin b holds confidences in [b/bins, (b+1)/bins), the last bin also 1.
    """
    confidence = np.asarray(confidence, dtype=np.float64).ravel()
    correct = np.asarray(correct, dtype=np.float64).ravel()
    if confidence.size == 0:
        return 0.0
    which = np.minimum((confidence * bins).astype(np.int64), bins - 1)
    # Per bin, |Σ (correct − confidence)| = n_b · |accuracy_b − mean confidence_b|.
    gap = np.bincount(which, correct - confidence, minlength=bins)
    return float(np.abs(gap).sum() / confidence.size)


WEIGHT_SUFFIXES = (".safetensors", ".bin")


def calibration_bins(confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS):
    """The reliability diagram behind the ECE: per non-empty bin (as in expected_calibration_error),
    mean confidence, accuracy and count; three arrays of equal length."""
    confidence = np.asarray(confidence, dtype=np.float64).ravel()
    correct = np.asarray(correct, dtype=np.float64).ravel()
    which = np.minimum((confidence * bins).astype(np.int64), bins - 1)
    counts = np.bincount(which, minlength=bins)
    filled = counts > 0
    mean_confidence = np.bincount(which, confidence, minlength=bins)[filled] / counts[filled]
    accuracy = np.bincount(which, correct, minlength=bins)[filled] / counts[filled]
    return mean_confidence, accuracy, counts[filled]


def weights_bytes(model_dir: str | Path) -> int:
    """Bytes of the weight files a user ships (model.safetensors, or its shards), not the rest of the
    directory: a training checkpoint (optimizer state) or logs beside them do not count."""
    return sum(f.stat().st_size for f in Path(model_dir).iterdir()
               if f.is_file() and f.suffix in WEIGHT_SUFFIXES)


@torch.inference_mode()
def score(model, tokens: TokenStore, count: int, batch_size: int, desc: str,
          device: torch.device = torch.device("cpu")):
    """Validation loss per target position summed over rows (P,), labelled rows per position (P,), and
    per labelled target, in row order: top-1 ids, top-1 probability (float32), top-1 correct (bool).
    P: the task's target positions (T for causal LM, whose last one has no label; M masked positions
    for masked LM). Scores the first `count` validation rows; the model must be on `device`; results
    come back on the CPU."""
    task, vocab_size = tokens.task, tokens.vocab_size
    loss_sum, labelled, top1, confidence, correct = 0, 0, [], [], []
    for lo in progress(iterable=range(0, count, batch_size), desc=desc, unit="batch", leave=False):
        batch = {k: v.to(device) for k, v in tokens.rows("validation", lo, min(lo + batch_size, count)).items()}
        logits = task.target_logits(model(**task.model_inputs(batch)).logits[..., :vocab_size], batch).float()
        labels, mask = task.batch_labels(batch)  # (B, P)
        nll = F.cross_entropy(logits.transpose(1, 2), labels, reduction="none")  # (B, P)
        loss_sum = loss_sum + (nll * mask).sum(0).cpu()
        labelled = labelled + mask.sum(0).cpu()
        top_logprob, top_id = torch.log_softmax(logits, -1).max(-1)  # (B, P)
        top1.append(top_id[mask].cpu().numpy().astype(np.int32))
        confidence.append(top_logprob[mask].exp().cpu().numpy())
        correct.append((top_id == labels)[mask].cpu().numpy())
    return (loss_sum.numpy(), labelled.numpy(), np.concatenate(top1), np.concatenate(confidence),
            np.concatenate(correct))


@torch.inference_mode()
def latency_per_token(models: dict, block: torch.Tensor, rounds: int) -> dict[str, float]:
    """Median seconds per token of a forward pass over one block, models timed in turn each round."""
    times = {name: [] for name in models}
    for name, model in models.items():  # warm-up
        model(input_ids=block)
    for _ in range(rounds):
        for name, model in models.items():
            start = time.perf_counter()
            model(input_ids=block)
            times[name].append((time.perf_counter() - start) / block.numel())
    return {name: statistics.median(t) for name, t in times.items()}


def run_evaluate(config: EvaluateConfig, tokens_dir: str, model_dirs: dict[str, str], out: str,
                 plot_path: str | None = None, table_path: str | None = None, figures_dir: str | None = None,
                 curves: dict[str, list[str]] | None = None, summary_path: str | None = None) -> dict:
    """Score every model on the same validation blocks; write metrics JSON to `out`, and optionally the
    loss-by-position CSV (`plot_path`), a Markdown table of the metrics (`table_path`), the metrics as
    one CSV row per model in the order given (`summary_path`: a DVC plot by model) and SVG figures
    (`figures_dir`: loss by position, reliability diagram, and the training and validation curves of
    the `curves` logs, NAME -> CSVs written by the training loop's --log and --val-log).

    val_loss is the mean next-token cross-entropy over the first max_batches × batch_size validation
    blocks (all with max_batches 0): the quantity the training loop logs as val_loss, which uses the
    first eval_batches × batch_size blocks, so the two agree when they cover the same blocks.
    """
    tokens = TokenStore(tokens_dir)
    if config.reference and config.reference not in model_dirs:
        raise KdcacheError(f"reference model {config.reference!r} is not among --model names "
                           f"{list(model_dirs)}; pass --model {config.reference}=DIR or set --reference.")
    if curves:
        missing = [f"{name}={path}" for name, paths in curves.items() for path in paths if not Path(path).is_file()]
        if missing:
            raise KdcacheError(f"--curve logs {missing} do not exist; give CSVs written by --log/--val-log.")
    if tokens.task_name == "classification":  # accuracy, macro-F1, ... per example (evaluate_classes.py)
        from pipeline.evaluate_classes import evaluate_classifiers

        result, calibration = evaluate_classifiers(config, tokens, model_dirs)
        per_position = {name: np.array([m["val_loss"]]) for name, m in result["models"].items()}  # one per row
        return write_results(result, out, per_position, calibration, curves, plot_path, table_path, figures_dir,
                             summary_path)
    models = {}
    for name, path in model_dirs.items():
        check_model_task(path, name, tokens.task_name)
        models[name] = load_model(path, f"model {name}", task=tokens.task).eval()
        check_model_fits(models[name], tokens.vocab_size, tokens.block_size, f"model {name}")
    count = tokens.num_rows("validation")
    if config.max_batches:
        count = min(count, config.max_batches * config.batch_size)
    per_position, top1, metrics, calibration = {}, {}, {}, {}
    device = runtime.resolve_device(config.device)
    for name, model in models.items():
        model.to(device)
        loss_sum, labelled, top1[name], confidence, correct = score(model, tokens, count, config.batch_size,
                                                                    f"eval {name}", device)
        model.to("cpu")  # latency is timed on CPU, and one model at a time sits on the device
        per_position[name] = loss_sum[labelled > 0] / labelled[labelled > 0]
        calibration[name] = calibration_bins(confidence, correct)
        val_loss = float(loss_sum.sum() / labelled.sum())
        metrics[name] = {"val_loss": val_loss, "perplexity": float(np.exp(val_loss)),
                         "ece": expected_calibration_error(confidence, correct),
                         "params": param_count(model), "disk_bytes": weights_bytes(model_dirs[name])}
        if tokens.task_name == "masked":  # the masked-token loss above; accuracy of the original id
            metrics[name]["accuracy"] = float(correct.mean())
    if config.reference:
        for name in models:
            metrics[name]["top1_agreement"] = float((top1[name] == top1[config.reference]).mean())
    block = tokens.rows("validation", 0, 1)["input_ids"]
    for name, seconds in latency_per_token(models, block, config.latency_rounds).items():
        metrics[name]["latency_ms_per_token"] = seconds * 1e3
    result = {"models": metrics, "validation_blocks": int(count), "block_size": tokens.block_size}
    if tokens.task_name == "masked":
        result.update(task="masked", mask_count=int(tokens.meta["mask_count"]))
    return write_results(result, out, per_position, calibration, curves, plot_path, table_path, figures_dir,
                             summary_path)


def write_results(result: dict, out: str, per_position: dict, calibration: dict, curves: dict | None,
                  plot_path: str | None, table_path: str | None, figures_dir: str | None,
                  summary_path: str | None = None) -> dict:
    """Write the metrics JSON and whichever of the plot CSV, Markdown table, summary CSV and figures are
    asked for."""
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=2))
    if plot_path:
        write_position_plot(per_position, plot_path)
    if table_path:
        Path(table_path).parent.mkdir(parents=True, exist_ok=True)
        Path(table_path).write_text(markdown_table(result))
    if summary_path:
        write_summary(result["models"], summary_path)
    if figures_dir:  # no loss-by-position figure unless targets sit at fixed block positions (causal LM)
        by_position = {} if result.get("task") in ("classification", "masked") else per_position
        write_figures(figures_dir, by_position, calibration, curves or {})
    return result


def read_log(path: str | Path) -> dict[str, list[float]]:
    """A training-loop CSV (--log, --val-log) as columns of floats."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return {key: [float(row[key]) if row[key] not in ("", None) else float("nan") for row in rows]
            for key in (rows[0] if rows else {})}


def write_figures(figures_dir: str | Path, per_position: dict, calibration: dict,
                  curves: dict[str, list[str]]) -> list[Path]:
    """SVG files: loss_by_position (when per_position is given), reliability, and training_loss /
    validation_loss from the logs."""
    from pipeline.charts import line_chart_svg

    figures = Path(figures_dir)
    figures.mkdir(parents=True, exist_ok=True)
    charts = {}
    if per_position:
        charts["loss_by_position.svg"] = line_chart_svg(
            {name: (np.arange(1, len(loss) + 1), loss) for name, loss in per_position.items()},
            "Validation loss by position in the block", "position", "cross-entropy (nats)")
    charts.update({
        "reliability.svg": line_chart_svg(
            {name: (bins[0], bins[1]) for name, bins in calibration.items()},
            f"Reliability of the top-1 prediction ({ECE_BINS} confidence bins)", "mean confidence", "accuracy",
            bounds=(0.0, 1.0, 0.0, 1.0), diagonal=True)})
    logs = [(name, read_log(path)) for name, paths in curves.items() for path in paths]
    for column, file_name, title in (("loss", "training_loss.svg", "Training loss (objective)"),
                                     ("val_loss", "validation_loss.svg", "Validation loss during training")):
        series = {name: (log["step"], log[column]) for name, log in logs if column in log and "step" in log}
        if series:
            charts[file_name] = line_chart_svg(series, title, "step", column)
    for file_name, svg in charts.items():
        (figures / file_name).write_text(svg)
    return [figures / file_name for file_name in charts]


# (metrics key, column header, format) of the Markdown table, in reading order.
# Columns no model has are left out (perplexity for classifiers, accuracy for language models).
TABLE_COLUMNS = (("val_loss", "val loss", "{:.4f}"), ("perplexity", "perplexity", "{:.2f}"),
                 ("accuracy", "accuracy", "{:.4f}"), ("macro_f1", "macro-F1", "{:.4f}"),
                 ("top1_agreement", "top-1 agreement", "{:.3f}"), ("ece", "ECE", "{:.4f}"),
                 ("params", "params", "{:,}"), ("disk_bytes", "weights (MB)", "{:.2f}"),
                 ("latency_ms_per_token", "CPU ms/token", "{:.4f}"),
                 ("latency_ms_per_example", "CPU ms/example", "{:.4f}"))


def markdown_table(result: dict) -> str:
    """The metrics as one row per model (what `dvc metrics show` prints as one wide row)."""
    models = result["models"]
    columns = [column for column in TABLE_COLUMNS if any(column[0] in m for m in models.values())]
    lines = ["| model | " + " | ".join(header for _, header, _ in columns) + " |",
             "|---|" + "---:|" * len(columns)]
    for name, metrics in models.items():
        cells = []
        for key, _, form in columns:
            value = metrics.get(key)
            value = value / 1e6 if key == "disk_bytes" and value is not None else value
            cells.append("" if value is None else form.format(value))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if "validation_examples" in result:  # classification: one padded example per row
        heading = f"Validation: {result['validation_examples']} examples of up to {result['block_size']} tokens."
    else:
        heading = f"Validation: {result['validation_blocks']} blocks of {result['block_size']} tokens."
    return heading + "\n\n" + "\n".join(lines) + "\n"


def write_summary(models: dict[str, dict], path: str) -> None:
    """CSV of the metrics, one row per model in the order given, numbered from 0 (`index`): a DVC plot
    of a metric by model, e.g. by generation of a self-distillation chain."""
    keys = [key for key, _, _ in TABLE_COLUMNS if any(key in m for m in models.values())]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["index", "model", *keys])
        for index, (name, metrics) in enumerate(models.items()):
            writer.writerow([index, name, *(metrics.get(key, "") for key in keys)])


def write_position_plot(per_position: dict[str, np.ndarray], path: str) -> None:
    """CSV of validation loss by position in the block, one column per model (a DVC plot)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    names = list(per_position)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["position", *names])
        for t in range(len(per_position[names[0]])):
            writer.writerow([t + 1, *(f"{per_position[n][t]:.5f}" for n in names)])
