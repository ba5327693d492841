import click

from pipeline import distributed
from pipeline.config import StudentConfig
from pipeline.errors import KdcacheError
from pipeline.teacher import mutual_peer_dir, run_mutual_students, run_online_student
from pipeline.distill import run_student
from stages.options import build_config, config_options, train_file_options


@click.command()
@click.option("--tokens", required=True, type=click.Path(), help="Token store from `prepare`.")
@click.option("--targets", multiple=True, help="Targets store from `cache`, as PATH or PATH:WEIGHT (a weight only "
              "when the part after the last ':' is a number); repeat for several teachers over the same tokens "
              "(weights equal by default, normalised to sum 1; see --multi-teacher; hidden states from one "
              "store only). Without it: CE-only training.")
@click.option("--out", required=True, type=click.Path(), help="Directory for the trained student.")
@train_file_options("student")
@click.option("--online/--no-online", default=False, help="Baseline: run --teacher in the loop instead of reading a cache.")
@click.option("--teacher", "teacher_dir", type=click.Path(), help="Teacher directory, for --online.")
@click.option("--online-top-k", default=32, show_default=True, help="Top-k of the online teacher (0: full vocabulary).")
@click.option("--mutual/--no-mutual", default=False, help="Baseline without a teacher: deep mutual learning "
              "(Zhang et al., 2018). Two students (seeds s, s+1) train on the same batches, each with CE + KD "
              "towards the other's current full distribution; saved to --out and its sibling OUT-peer.")
@config_options(StudentConfig)
def student(tokens, targets, out, files, online, teacher_dir, online_top_k, mutual, **options):
    """Train a student from the token store and the cached targets; save it with save_pretrained.

    Under torchrun (WORLD_SIZE > 1) it trains data-parallel: see docs/DDP.md.
    """
    config = build_config(StudentConfig, options)
    distributed.start(config.device)
    if mutual:
        if online or targets:
            raise KdcacheError("--mutual trains two students from each other: leave out --online and --targets.")
        last = run_mutual_students(config, tokens, out, files)
        click.echo(f"students -> {out}, {mutual_peer_dir(out)} (final losses {last['student_loss']:.4f}, "
                   f"{last['peer_loss']:.4f})")
        return
    if online:
        if not teacher_dir or targets:
            raise KdcacheError("--online needs --teacher DIR and no --targets.")
        last = run_online_student(config, tokens, out, teacher_dir, online_top_k, files)
    else:
        last = run_student(config, tokens, out, list(targets) or None, files)
    if distributed.is_main():
        click.echo(f"student -> {out} (final loss {last['loss']:.4f})")
