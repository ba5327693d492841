"""Click options generated from the config dataclasses: defaults and help live in pipeline/config.py.

A field `block_size` becomes `--block-size` plus the alias `--block_size`, which is what DVC's
dictionary unpacking of params.yaml (`${prepare}`) produces. Booleans become `--x/--no-x`, tuples
repeatable options.
"""

from __future__ import annotations

import dataclasses
import errno

import click

from pipeline.errors import KdcacheError


def _option(field: dataclasses.Field):
    dashed, plain = field.name.replace("_", "-"), field.name
    names = [f"--{dashed}"] + ([f"--{plain}"] if plain != dashed else []) + list(field.metadata.get("aliases", ()))
    help_text = field.metadata.get("help", "")
    if field.type in (bool, "bool"):
        flags = [f"--{dashed}/--no-{dashed}"]
        if plain != dashed:  # DVC's boolean_optional writes --key / --no-key with the key as spelled
            flags.append(f"--{plain}/--no-{plain}")
        return click.option(*flags, plain, default=field.default, show_default=True, help=help_text)
    if field.default_factory is not dataclasses.MISSING:
        return click.option(*names, plain, multiple=True, type=field.metadata.get("type", str),
                            help=help_text + " (repeatable)")
    return click.option(*names, plain, type=type(field.default), default=field.default,
                        show_default=True, help=help_text)


def config_options(config_cls):
    """Decorator adding one option per field of `config_cls` (in declaration order)."""

    def decorate(command):
        for field in reversed(dataclasses.fields(config_cls)):
            command = _option(field)(command)
        return command

    return decorate


def build_config(config_cls, options: dict):
    """The config from the command's keyword arguments (other keys are left for the command)."""
    names = {f.name for f in dataclasses.fields(config_cls)}
    values = {k: (tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in options.items() if k in names}
    return config_cls(**values)


def disk_full(error: BaseException) -> OSError | None:
    """The "no space left" OSError that caused `error` (itself or along its chain), if any."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return error
        error = error.__cause__ or error.__context__
    return None


class KdcacheGroup(click.Group):
    """Turns KdcacheError, and a disk that filled up, into a clean `Error: ...` and exit status 1,
    without a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except KdcacheError as e:
            raise click.ClickException(str(e)) from e
        except Exception as e:
            full = disk_full(e)
            if full is None:
                raise
            where = f" writing {full.filename}" if full.filename else ""
            raise click.ClickException(
                f"the disk is full{where} ({full.strerror}). Free space or choose another output, then re-run the "
                f"same command: a capture or a generation resumes from its finished shards or batches, and "
                f"nothing cut short is marked complete.") from e
