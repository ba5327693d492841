"""Held-out metrics for classifiers (`evaluate` on a classification token store).

Per model, on the same validation examples: cross-entropy loss, accuracy, macro-F1 (the mean of the
per-label F1 scores, labels absent from both predictions and truth left out), agreement of top-1
predictions with the reference model, ECE of the top-1 class, parameters, bytes on disk, and CPU
latency per example (one example at a time, models timed in interleaved rounds).
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pipeline import runtime
from pipeline.config import EvaluateConfig
from pipeline.errors import KdcacheError
from pipeline.models import INFO_FILE, check_fits, load_model, param_count
from pipeline.progress import progress


def macro_f1(predicted: np.ndarray, truth: np.ndarray, num_labels: int) -> float:
    """Mean over labels of 2·TP / (2·TP + FP + FN), over the labels that occur in truth or predictions."""
    scores = []
    for label in range(num_labels):
        tp = int(((predicted == label) & (truth == label)).sum())
        fp = int(((predicted == label) & (truth != label)).sum())
        fn = int(((predicted != label) & (truth == label)).sum())
        if tp + fp + fn:
            scores.append(2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores)) if scores else 0.0


@torch.inference_mode()
def class_logprobs(model, rows: dict, num_labels: int, batch_size: int, desc: str,
                   device: torch.device = torch.device("cpu")) -> torch.Tensor:
    """(N, C) log-probabilities of every validation example (rows: TokenStore.rows tensors). The model
    must be on `device`; the result comes back on the CPU."""
    out = []
    for lo in progress(iterable=range(0, len(rows["labels"]), batch_size), desc=desc, unit="batch", leave=False):
        logits = model(input_ids=rows["input_ids"][lo:lo + batch_size].to(device),
                       attention_mask=rows["attention_mask"][lo:lo + batch_size].to(device)).logits[:, :num_labels]
        out.append(torch.log_softmax(logits.float(), -1).cpu())
    return torch.cat(out)


@torch.inference_mode()
def latency_per_example(models: dict, example: dict, rounds: int) -> dict[str, float]:
    """Median seconds of one forward pass over one example (batch 1), models timed in turn each round."""
    times = {name: [] for name in models}
    for model in models.values():  # warm-up
        model(**example)
    for _ in range(rounds):
        for name, model in models.items():
            start = time.perf_counter()
            model(**example)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def check_model_task(path: str, name: str) -> None:
    """A kdcache model directory records its task: refuse one trained for another (its head differs)."""
    info_path = Path(path) / INFO_FILE
    if info_path.exists():
        task = json.loads(info_path.read_text()).get("task", "causal")
        if task != "classification":
            raise KdcacheError(f"model {name} ({path}) is a {task} model but the token store holds classification "
                               f"examples; evaluate it on the token store it was trained on.")


def evaluate_classifiers(config: EvaluateConfig, tokens, model_dirs: dict[str, str]) -> tuple[dict, dict]:
    """Metrics of every model on the validation split of a classification token store, and the
    calibration bins of each model's top-1 predictions (for the reliability diagram)."""
    from pipeline.evaluate import calibration_bins, expected_calibration_error, weights_bytes

    models = {}
    for name, path in model_dirs.items():
        check_model_task(path, name)
        models[name] = load_model(path, f"model {name}", task=tokens.task).eval()
        check_fits(models[name], tokens, f"model {name}")
    count = tokens.num_rows("validation")
    if config.max_batches:
        count = min(count, config.max_batches * config.batch_size)
    rows = tokens.rows("validation", 0, count)
    labels, num_labels = rows["labels"], tokens.num_outputs
    metrics, top1, calibration = {}, {}, {}
    device = runtime.resolve_device(config.device)
    for name, model in models.items():
        model.to(device)
        logprobs = class_logprobs(model, rows, num_labels, config.batch_size, f"eval {name}", device)  # (N, C)
        model.to("cpu")  # latency is timed on CPU, and one model at a time sits on the device
        confidence, top1[name] = logprobs.max(-1)
        correct = (top1[name] == labels).numpy()
        calibration[name] = calibration_bins(confidence.exp().numpy(), correct)
        metrics[name] = {"val_loss": float(F.nll_loss(logprobs, labels)), "accuracy": float(correct.mean()),
                         "macro_f1": macro_f1(top1[name].numpy(), labels.numpy(), num_labels),
                         "ece": expected_calibration_error(confidence.exp().numpy(), correct),
                         "params": param_count(model), "disk_bytes": weights_bytes(model_dirs[name])}
    if config.reference:
        for name in models:
            metrics[name]["top1_agreement"] = float((top1[name] == top1[config.reference]).float().mean())
    example = {"input_ids": rows["input_ids"][:1], "attention_mask": rows["attention_mask"][:1]}
    for name, seconds in latency_per_example(models, example, config.latency_rounds).items():
        metrics[name]["latency_ms_per_example"] = seconds * 1e3
    result = {"models": metrics, "validation_examples": int(count), "block_size": tokens.block_size,
              "task": "classification", "label_names": tokens.label_names}
    return result, calibration
