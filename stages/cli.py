"""The `kdcache` command: one subcommand per DVC stage, plus inspect and verify."""

import click

from pipeline import runtime
from stages.cache import cache
from stages.evaluate import evaluate
from stages.generate import generate
from stages.inputs import inputs
from stages.inspect import encodings, inspect, verify
from stages.options import KdcacheGroup
from stages.prepare import prepare
from stages.student import student
from stages.teacher import teacher


def installed_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("kdcache")
    except PackageNotFoundError:  # run from a source tree that was never pip-installed
        return "unknown (not installed)"


@click.group(cls=KdcacheGroup)
@click.version_option(installed_version(), "--version", prog_name="kdcache")
def cli():
    """kdcache: run a teacher once, cache its targets, train many students from the cache.

    Stages in order: inputs -> prepare -> teacher -> cache -> student -> evaluate (see dvc.yaml).
    """
    runtime.keep_freed_memory()  # large CPU tensors reused, not page-faulted in each step


for command in (inputs, prepare, teacher, cache, student, evaluate, inspect, verify, encodings, generate):
    cli.add_command(command)


def main():
    cli()
