"""What a targets store holds and what it costs: bytes per token per array, tail-mass distribution
(percentiles, a histogram over every finished shard, drawn as text or as a self-contained SVG)."""

from __future__ import annotations

from xml.sax.saxutils import escape

import numpy as np

from pipeline.targets import format as fmt
from pipeline.targets.reader import TargetsStore

TAIL_PERCENTILES = (1, 10, 50, 90, 99)
TAIL_BINS = 20  # equal-width bins of the tail mass over [0, 1]


def stored_bytes(store: TargetsStore, name: str) -> int:
    return store.location.size(name)


def summarize(store: TargetsStore, tail_sample_rows: int = 256) -> dict:
    """A JSON-able description: sizes, settings, fingerprints, completion, tail-mass percentiles."""
    attrs = store.attrs
    tokens = store.rows * int(attrs["block_size"])
    arrays, raw_total, stored_total = {}, 0, 0
    missing = store.missing_arrays()
    for name in store.array_names() + list(attrs.get("unsharded", {})):  # + hidden bases
        if name in missing or name not in store.group:
            continue
        array = store.group[name]
        raw = int(np.prod(array.shape)) * array.dtype.itemsize
        stored = stored_bytes(store, name)
        arrays[name] = {"dtype": str(array.dtype), "shape": list(array.shape),
                        "bytes_per_token": stored / tokens, "compression_ratio": raw / max(stored, 1)}
        raw_total, stored_total = raw_total + raw, stored_total + stored
    if store.top_k and not missing:
        tail = store.group[fmt.TAIL_LOGMASS][: min(store.rows, tail_sample_rows)]
        tail_mass = np.exp(tail.astype(np.float64)).ravel()
        # Kept entries per position: all K, unless top-p trimmed them (then `topk_count` holds them).
        kept = (store.group[fmt.TOPK_COUNT][: min(store.rows, tail_sample_rows)].astype(np.float64).ravel()
                if store.top_p < 1.0 else np.full(1, float(store.top_k)))
    else:  # sampled targets only: no tail
        tail_mass, kept = np.zeros(1), np.zeros(1)
    return {
        "path": str(store.path), "complete": bool(attrs.get("complete")),
        "format_version": attrs["format_version"], "rows": store.rows, "tokens": tokens,
        "bytes_per_token": stored_total / tokens, "compression_ratio": raw_total / max(stored_total, 1),
        "fp16_full_logits_bytes_per_token": 2 * store.vocab_size,
        "arrays": {name: a["bytes_per_token"] for name, a in arrays.items()}, "array_details": arrays,
        "encoding": attrs["encoding"], "top_k": attrs["top_k"], "samples": attrs["samples"],
        "capture_temperature": store.capture_temperature,
        "layers": attrs["layers"], "vocab_size": store.vocab_size, "split": attrs["split"],
        "missing_arrays": missing, "shards_done": len(store.records), "shards": len(store.shard_ranges),
        "tokens_fingerprint": attrs["tokens_fingerprint"], "teacher_fingerprint": attrs["teacher_fingerprint"],
        "tail_mass_percentiles": {str(p): float(np.percentile(tail_mass, p)) for p in TAIL_PERCENTILES},
        "tail_mass_mean": float(tail_mass.mean()),
        "tail_mass_histogram": tail_mass_histogram(store),
        "hidden_rank": store.hidden_rank, "hidden_size": attrs["hidden_size"],
        "hidden_variance_kept": attrs.get("hidden_variance_kept"),
        "top_p": store.top_p, "min_k": int(fmt.attribute(attrs, "min_k")), "kept_mean": float(kept.mean()),
        "kept_percentiles": {str(p): float(np.percentile(kept, p)) for p in TAIL_PERCENTILES},
    }


def tail_mass_histogram(store: TargetsStore, bins: int = TAIL_BINS) -> dict | None:
    """Counts of positions per tail-mass bin over every finished shard (read one shard at a time).

    {"bin_edges": bins + 1 floats from 0 to 1, "counts": bins ints}; None without top-k targets.
    """
    if not store.top_k:
        return None
    edges = np.linspace(0.0, 1.0, bins + 1)
    counts = np.zeros(bins, dtype=np.int64)
    done = store.records if fmt.TAIL_LOGMASS in store.group else {}
    for index, (start, stop) in enumerate(store.shard_ranges):
        if str(index) in done:  # unfinished shards hold fill values, not targets
            tail_mass = np.exp(store.group[fmt.TAIL_LOGMASS][start:stop].astype(np.float64))
            counts += np.histogram(tail_mass, bins=edges)[0]
    return {"bin_edges": edges.tolist(), "counts": counts.tolist()}


def text_histogram(histogram: dict, width: int = 40) -> list[str]:
    """One line per bin: its range, a bar of `#` scaled to the largest count, the count."""
    edges, counts = histogram["bin_edges"], histogram["counts"]
    top = max(max(counts), 1)
    lines = []
    for i, (lo, hi, count) in enumerate(zip(edges, edges[1:], counts)):
        bracket = "]" if i == len(counts) - 1 else ")"  # the last bin includes 1
        lines.append(f"[{lo:.2f}, {hi:.2f}{bracket} {'#' * round(width * count / top):<{width}} {count:,}")
    return lines


def histogram_svg(histogram: dict, title: str, xlabel: str = "tail mass") -> str:
    """A standalone SVG bar chart (one <rect class="bar"> per bin): no plotting library needed."""
    edges, counts = histogram["bin_edges"], histogram["counts"]
    width, height, left, right, top, bottom = 640, 360, 70, 20, 40, 50
    plot_w, plot_h = width - left - right, height - top - bottom
    peak = max(max(counts), 1)
    span = edges[-1] - edges[0]

    def x(value: float) -> float:
        return left + plot_w * (value - edges[0]) / span

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">',
             f'<rect width="{width}" height="{height}" fill="white"/>',
             f'<text x="{width / 2}" y="22" text-anchor="middle" font-size="14">{escape(title)}</text>']
    for lo, hi, count in zip(edges, edges[1:], counts):
        bar_h = plot_h * count / peak
        parts.append(f'<rect class="bar" data-count="{count}" x="{x(lo) + 1:.2f}" y="{top + plot_h - bar_h:.2f}" '
                     f'width="{max(x(hi) - x(lo) - 2, 0.5):.2f}" height="{bar_h:.2f}" fill="#4c72b0">'
                     f'<title>[{lo:.3g}, {hi:.3g}): {count:,}</title></rect>')
    base = top + plot_h
    parts.append(f'<line x1="{left}" y1="{base}" x2="{width - right}" y2="{base}" stroke="black"/>')
    parts.append(f'<line x1="{left}" y1="{top}" x2="{left}" y2="{base}" stroke="black"/>')
    for tick in np.linspace(edges[0], edges[-1], 5):
        parts.append(f'<text x="{x(tick):.2f}" y="{base + 16}" text-anchor="middle">{tick:.2f}</text>')
    for fraction in (0.0, 0.5, 1.0):
        y = base - plot_h * fraction
        parts.append(f'<text x="{left - 6}" y="{y + 4:.2f}" text-anchor="end">{round(peak * fraction):,}</text>')
    parts.append(f'<text x="{left + plot_w / 2}" y="{height - 12}" text-anchor="middle">{escape(xlabel)}</text>')
    parts.append(f'<text x="16" y="{top + plot_h / 2}" text-anchor="middle" '
                 f'transform="rotate(-90 16 {top + plot_h / 2})">positions</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"
