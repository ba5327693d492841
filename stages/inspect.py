import json
from pathlib import Path

import click

from pipeline.location import write_text
from pipeline.targets.codecs import ENCODINGS
from pipeline.targets.reader import TargetsStore
from pipeline.targets.stats import histogram_svg, summarize, text_histogram


@click.command()
@click.argument("store", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("--plot", type=click.Path(dir_okay=False),
              help="Write the tail-mass histogram as an SVG bar chart to this file (e.g. tail.svg).")
def inspect(store, as_json, plot):
    """Describe a targets store: rows, bytes per token per array, settings, fingerprints, tail mass."""
    summary = summarize(TargetsStore(store, require_complete=False))
    histogram = summary["tail_mass_histogram"]
    if plot and histogram is None:
        raise click.UsageError(f"{store} holds no top-k targets, so no tail mass to plot; drop --plot.")
    if plot:
        title = (f"tail mass per position: {Path(store).name}, top-{summary['top_k']}, "
                 f"{sum(histogram['counts']):,} positions")
        write_text(plot, histogram_svg(histogram, title), "--plot")
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    click.echo(f"{summary['path']}: {'complete' if summary['complete'] else 'INCOMPLETE'} "
               f"({summary['shards_done']}/{summary['shards']} shards), format v{summary['format_version']}")
    if summary["missing_arrays"]:
        click.echo(f"  missing arrays (re-run `kdcache cache` with the same settings): "
                   f"{', '.join(summary['missing_arrays'])}")
    click.echo(f"  {summary['rows']} rows, {summary['tokens']:,} tokens, split {summary['split']}, "
               f"vocab {summary['vocab_size']}, top-{summary['top_k']} {summary['encoding']}, "
               f"{summary['samples']} samples, "
               f"capture T={summary['capture_temperature']}, layers {summary['layers']}")
    for name, bpt in summary["arrays"].items():
        click.echo(f"  {name:>20}: {bpt:8.2f} bytes/token")
    click.echo(f"  {'total':>20}: {summary['bytes_per_token']:8.2f} bytes/token "
               f"(fp16 full logits: {summary['fp16_full_logits_bytes_per_token']}), "
               f"compression {summary['compression_ratio']:.2f}x")
    if summary["top_k"]:
        pct = ", ".join(f"p{k}={v:.3g}" for k, v in summary["tail_mass_percentiles"].items())
        click.echo(f"  tail mass: mean {summary['tail_mass_mean']:.3g}; {pct}")
        for line in text_histogram(histogram):
            click.echo(f"    {line}")
    if summary["top_k"] and summary["top_p"] < 1.0:  # without trimming every position keeps all K
        kept = ", ".join(f"p{k}={v:.3g}" for k, v in summary["kept_percentiles"].items())
        click.echo(f"  kept entries (top-p {summary['top_p']}, min-k {summary['min_k']}): "
                   f"mean {summary['kept_mean']:.3g} of {summary['top_k']}; {kept}")
    if summary["hidden_rank"]:
        click.echo(f"  hidden states: rank {summary['hidden_rank']} of {summary['hidden_size']}, variance kept "
                   f"per layer {summary['hidden_variance_kept']}")
    click.echo(f"  fingerprints: tokens {summary['tokens_fingerprint']}, teacher {summary['teacher_fingerprint']}")


@click.command()
@click.argument("store", type=click.Path())
def verify(store):
    """Recompute every shard's checksum; exit non-zero naming each shard that does not match, or if
    the store was never marked complete."""
    targets = TargetsStore(store, require_complete=False)
    targets.verify()
    click.echo(f"{store}: all {len(targets.shard_ranges)} shards match their checksums")


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def encodings(as_json):
    """List the encodings of cached top-k log-probs (for `kdcache cache --encoding`)."""
    described = {name: encoding.description for name, encoding in ENCODINGS.items()}
    if as_json:
        click.echo(json.dumps(described, indent=2))
        return
    for name, text in described.items():
        click.echo(f"{name:>6}  {text}")
