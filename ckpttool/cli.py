"""The command line: parse options, call one library function, render, exit.

Errors: a CkptError becomes ``ckpttool: error: <message> (<file>)`` and a
``hint:`` line on stderr, exit 2, no traceback (unless ``--debug`` or
CKPTTOOL_DEBUG=1). Anything else is a bug and shows its traceback.
"""
from __future__ import annotations

import contextlib
import os
import sys
from typing import Optional

import click

from . import __version__
from .errors import CkptError


def _one_line(text: str) -> str:
    # Messages quote bytes from the file: never let them break the one-line contract.
    return text.replace("\r", "\\r").replace("\n", "\\n")


class _Group(click.Group):
    """Translates CkptError into the one-line message and exit code, in one place."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except CkptError as e:
            if ctx.params.get("debug") or os.environ.get("CKPTTOOL_DEBUG") == "1":
                raise
            click.echo(f"ckpttool: error: {_one_line(str(e))}", err=True)
            if e.hint:
                click.echo(f"hint: {_one_line(e.hint)}", err=True)
            ctx.exit(e.exit_code)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="ckpttool", message="%(prog)s %(version)s")
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
def cli(debug: bool) -> None:
    """Inspect, compare, fit, remap, convert and verify PyTorch checkpoints.

    Reads torch.save files (zip and legacy), TorchScript, safetensors (single
    and sharded) and ONNX without running any code from them.

    \b
    Examples:
      ckpttool inspect model.pt
      ckpttool inspect model.safetensors --json
    """


json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
quiet_option = click.option("--quiet", "-q", is_flag=True, help="Print nothing but the result.")


@contextlib.contextmanager
def _progress(quiet: bool, label: str):
    """A progress callback drawing a bar on stderr when it is a terminal."""
    if quiet or not sys.stderr.isatty():
        yield None
        return
    bar = None

    def update(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = click.progressbar(length=max(total, 1), label=label, file=sys.stderr)
            bar.__enter__()
        bar.update(done - bar.pos)

    try:
        yield update
    finally:
        if bar is not None:
            bar.__exit__(None, None, None)


def _emit(record, as_json: bool, text) -> None:
    from .render import to_json
    click.echo(to_json(record) if as_json else text(record))


@cli.command()
@click.argument("path", type=click.Path())
@click.option("--key", "-k", help="Entry holding the state_dict, nested with '/' (default: found automatically).")
@click.option("--filter", "filter_", metavar="REGEX", help="Only tensors whose name matches REGEX.")
@click.option("--sort", type=click.Choice(["file", "name", "size"]), default="file", show_default=True,
              help="Order of the tensor table.")
@click.option("--depth", type=click.IntRange(min=1), help="Fold names into modules N levels deep (a model tree).")
@click.option("--stats", is_flag=True, help="Add min/max/mean/std and NaN/Inf counts (reads the data).")
@json_option
@quiet_option
def inspect(path: str, key: Optional[str], filter_: Optional[str], sort: str, depth: Optional[int], stats: bool,
            as_json: bool, quiet: bool) -> None:
    """Show a checkpoint's tensors (name, shape, dtype, device, size) and what else it holds.

    \b
    Examples:
      ckpttool inspect resnet50.pth
      ckpttool inspect ckpt.tar --key model_state_dict --filter '^layer4' --sort size
      ckpttool inspect model.pt --depth 2          # a model tree with parameter counts
      ckpttool inspect model.safetensors --stats --json
    """
    from .render import inspect_text
    from .summary import inspect as run_inspect
    with _progress(quiet, "reading tensors") as progress:
        result = run_inspect(path, key=key, filter=filter_, sort=sort, depth=depth, stats=stats, progress=progress)
    _emit(result, as_json, inspect_text)
    sys.exit(result.exit_code)


def main(argv=None) -> None:
    """Console-script entry point."""
    try:
        cli.main(args=argv, prog_name="ckpttool")
    except BrokenPipeError:  # `ckpttool inspect x | head`
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        sys.exit(1)
