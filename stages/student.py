import click

from pipeline import runtime
from pipeline.config import StudentConfig
from pipeline.errors import KdcacheError
from pipeline.student import mutual_peer_dir, run_student
from stages.options import build_config, config_options
from stages.train_options import train_file_options


@click.command()
@click.option("--tokens", required=True, type=click.Path(), help="Token store from `prepare`.")
@click.option("--targets", multiple=True, help="Targets store from `cache`, as PATH or PATH:WEIGHT (a weight only "
              "when the part after the last ':' is a number); repeat for several teachers over the same tokens "
              "(weights equal by default, normalised to sum 1; see --multi-teacher; hidden states from one "
              "store only). Without it: CE-only training.")
@click.option("--teacher-tokens", type=click.Path(), help="Cross-tokenizer student: the teacher's token store that "
              "--targets was captured from, when --tokens is the student's own (another tokenizer, prepared over "
              "the same documents). Each student position reads the teacher position whose prediction covers the "
              "same next characters; unaligned positions get CE only. Needs --loss uld.")
@click.option("--out", required=True, type=click.Path(), help="Directory for the trained student.")
@train_file_options("student")
@click.option("--online/--no-online", default=False, help="Same as --mode online: run --teacher in the loop instead of reading "
              "a cache (the baseline offline KD is measured against).")
@click.option("--teacher", "teacher_dir", type=click.Path(), help="Teacher directory, for --mode online.")
@click.option("--mutual/--no-mutual", default=False, help="Same as --mode mutual: deep mutual learning (Zhang et al., 2018), "
              "two students (seeds s, s+1) on the same batches, each with CE + KD towards the other's current "
              "full distribution; saved to --out and its sibling OUT-peer.")
@config_options(StudentConfig)
def student(tokens, targets, teacher_tokens, out, files, online, teacher_dir, mutual, **options):
    """Train a student from the token store and the cached targets; save it with save_pretrained.

    Under torchrun (WORLD_SIZE > 1) it trains data-parallel: see docs/DDP.md.
    """
    flags = [mode for mode, given in (("online", online), ("mutual", mutual)) if given]
    if len(flags) > 1 or (flags and options["mode"] not in ("offline", flags[0])):
        raise KdcacheError(f"--{' --'.join(flags)} and --mode {options['mode']} ask for different modes; give one.")
    if flags and targets:  # typed together: the user expects both to matter
        raise KdcacheError(f"--{flags[0]} computes its targets while training: leave out --targets.")
    if flags:
        options["mode"] = flags[0]
    config = build_config(StudentConfig, options)
    runtime.start(config.device)
    last = run_student(config, tokens, out, list(targets), files, teacher_dir, teacher_tokens=teacher_tokens)
    if config.mode == "mutual":
        click.echo(f"students -> {out}, {mutual_peer_dir(out)} (final losses {last['student_loss']:.4f}, "
                   f"{last['peer_loss']:.4f})")
    elif runtime.is_main():
        click.echo(f"student -> {out} (final loss {last['loss']:.4f})")
