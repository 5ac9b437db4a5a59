"""The command line: parse options, call one library function, render, exit.

Errors: a CkptError becomes ``ckpttool: error: <message> (<file>)`` and a
``hint:`` line on stderr, exit 2, no traceback (unless ``--debug`` or
CKPTTOOL_DEBUG=1). Anything else is a bug and shows its traceback.
"""
from __future__ import annotations

import contextlib
import os
import sys
import time
from typing import Optional, Tuple

import click

from . import __version__
from .errors import CkptError


def _one_line(text: str) -> str:
    # Messages quote bytes from the file: never let them break the one-line contract.
    return text.replace("\r", "\\r").replace("\n", "\\n")


# optional packages -> the extra that installs them (setup.cfg); the core (inspect, diff, convert to .pt and
# safetensors, remap, scan) needs none of them
_EXTRAS = {"torch": "torch", "torchvision": "torch", "onnx": "onnx", "onnxruntime": "onnx", "onnxscript": "onnx"}


class _Group(click.Group):
    """Translates CkptError into the one-line message and exit code, in one place."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except ImportError as e:  # an optional dependency of this command is not installed: say which extra
            extra = _EXTRAS.get((e.name or "").partition(".")[0])
            if extra is None or ctx.params.get("debug") or os.environ.get("CKPTTOOL_DEBUG") == "1":
                raise
            what = ctx.invoked_subcommand or "this command"
            click.echo(f"ckpttool: error: {what} needs {e.name.partition('.')[0]}, which is not installed here: "
                       f"pip install 'ckpttool[{extra}]'", err=True)
            ctx.exit(2)
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
    """Inspect, compare, fit, remap, convert, verify and scan PyTorch checkpoints.

    Reads torch.save files (zip and legacy), TorchScript, safetensors (single
    and sharded) and ONNX without running any code from them; only --trust
    lets a command import and run a checkpoint's own classes.

    \b
    Examples:
      ckpttool inspect model.pt
      ckpttool diff model.pt model.safetensors
      ckpttool filter resnet50.pth --model torchvision.models:resnet50 --arg num_classes=120 -o fit.pt
      ckpttool remap gpu_ckpt.pt -o cpu_ckpt.pt --map cuda=cpu
      ckpttool convert full_model.pth -o model.safetensors
      ckpttool verify model.safetensors --against full_model.pth --trust --input-shape 1x3x224x224
      ckpttool scan downloaded.pt
    """


json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
quiet_option = click.option("--quiet", "-q", is_flag=True, help="Print at most the verdict line (result: ...); the "
                                                                 "exit code says the rest.")


@contextlib.contextmanager
def _progress(quiet: bool, label: str):
    """A progress callback drawing a bar on stderr when it is a terminal and the work takes a while."""
    if quiet or sys.stderr is None or not sys.stderr.isatty():
        yield None
        return
    bar = None
    start = time.monotonic()

    def update(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            if time.monotonic() - start < 0.5 or done >= total:
                return  # quick work draws nothing
            bar = click.progressbar(length=max(total, 1), label=label, file=sys.stderr)
            bar.__enter__()
        bar.update(done - bar.pos)

    try:
        yield update
    finally:
        if bar is not None:
            bar.__exit__(None, None, None)


def _emit(record, as_json: bool, text) -> None:
    """Print a result: one JSON object (``--json``), the human report, or with ``-q`` at most its verdict
    line (``result: ...``), as ``cmp -s`` / ``diff -q`` users expect; the exit code says the rest."""
    from .render import to_json
    quiet = bool(click.get_current_context().params.get("quiet"))
    if as_json:  # indented for a person at a terminal, one line for a pipe (jq, CI logs): the same object
        click.echo(to_json(record, indent=2 if sys.stdout.isatty() else None))
        return
    if quiet and text.__name__ == "inspect_text":  # no verdict to print: skip rendering 20,000 rows
        return
    out = text(record)
    if quiet:
        last = out.rpartition("\n")[2]
        if not last.startswith("result:"):
            return
        out = last
    click.echo(_coloured(out))


# verdict words and their colours, on the verdict line only
_VERDICTS = (("DANGEROUS", "red"), ("UNREADABLE", "red"), ("FAIL", "red"), ("DIFFERENT", "yellow"), ("PASS", "green"),
             ("EQUAL", "green"), ("no dangerous globals", "green"))


def _coloured(text: str) -> str:
    """The verdict line's word in colour when stdout is a terminal; never with NO_COLOR set (no-color.org)
    or TERM=dumb, never into a pipe or file."""
    if os.environ.get("NO_COLOR") or os.environ.get("TERM") == "dumb" or sys.stdout is None or \
            not sys.stdout.isatty():
        return text
    head, sep, last = text.rpartition("\n")
    if not last.startswith("result: "):
        return text
    for word, colour in _VERDICTS:
        i = last.find(word, len("result: "))
        if i == len("result: "):
            last = last[:i] + click.style(word, fg=colour, bold=True) + last[i + len(word):]
            break
    return head + sep + last


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
    from .formats.safe_pickle import gc_paused
    from .render import inspect_text
    from .summary import inspect as run_inspect
    with gc_paused():  # the record and what it is made of live until printed (--stats reads chunks refcount frees)
        with _progress(quiet, "reading tensors") as progress:
            result = run_inspect(path, key=key, filter=filter_, sort=sort, depth=depth, stats=stats,
                                 progress=progress)
        _emit(result, as_json, inspect_text)
    sys.exit(result.exit_code)


@cli.command()
@click.argument("a", type=click.Path())
@click.argument("b", type=click.Path())
@click.option("--key-a", help="Entry of A holding the state_dict (default: found automatically).")
@click.option("--key-b", help="Entry of B holding the state_dict (default: found automatically).")
@click.option("--no-values", is_flag=True, help="Compare names, shapes and dtypes only; read no tensor data.")
@click.option("--atol", type=float, help="Absolute tolerance for floating tensors (default by dtype: 1e-5; "
                                         "float64 1e-7).")
@click.option("--rtol", type=float, help="Relative tolerance for floating tensors, against B (default by dtype: "
                                         "float32 1.3e-6, float16 1e-3, bfloat16 1.6e-2, float64 1e-7). "
                                         "Integers and bools always compare exactly.")
@click.option("--no-align", is_flag=True, help="Do not strip a wrapper prefix (module., _orig_mod., model.) "
                                               "that every key of one side carries.")
@click.option("--sort", type=click.Choice(["change", "name", "size", "file"]), default="change", show_default=True,
              help="Row order of every table (and the JSON lists): change = largest relative change "
                   "||A-B||/||B|| first (integer tensors such as step counters after the floating ones), "
                   "name, size = most elements first, file = A's order.")
@click.option("--filter", "filter_", metavar="REGEX",
              help="Only pairs whose name in A matches REGEX (re.search); the counts, the tables and the "
                   "result (and exit code) then cover those only, and the header says how many of all.")
@click.option("--top", type=click.IntRange(min=1), default=20, show_default=True, metavar="N",
              help="At most N rows in each table.")
@click.option("--all", "show_all", is_flag=True, help="Every row of every table (instead of --top).")
@click.option("--depth", type=click.IntRange(min=1), metavar="N",
              help="Add a table per module (names folded N levels, as inspect --depth): tensors, how many "
                   "changed, the largest relative change, and a bar of it.")
@click.option("--rename", "renames", multiple=True, metavar="REGEX=REPL",
              help="Rename A's keys before they are matched with B's (re.sub, in order, repeatable): line up a "
                   "GGUF file's names with a transformers model's.")
@json_option
@quiet_option
def diff(a: str, b: str, key_a: Optional[str], key_b: Optional[str], no_values: bool, atol: Optional[float],
         rtol: Optional[float], no_align: bool, sort: str, filter_: Optional[str], top: int, show_all: bool,
         depth: Optional[int], renames: Tuple[str, ...], as_json: bool, quiet: bool) -> None:
    """Compare the state_dicts of A and B: keys, shapes, dtypes and values.

    Any two formats ckpttool reads. Exit 0 when equal (within tolerance), 1 when
    they differ, 2 on an error. Values are read tensor by tensor from the files.
    Tables show the largest relative change ||A-B||/||B|| first, 20 rows each.

    \b
    Examples:
      ckpttool diff model.pt model.safetensors
      ckpttool diff base.pt finetuned.pt --depth 1          # which modules changed, and how much
      ckpttool diff base.pt finetuned.pt --filter '^layer4\\.' --all
      ckpttool diff ddp_ckpt.pt plain.pt --key-a model_state_dict   # module. aligned
      ckpttool diff a.pt b.pt --atol 1e-4 --rtol 1e-3 --json
      ckpttool diff a.pt b.pt --no-values --sort name
      ckpttool diff model.gguf hf_model/ --rename '^blk[.](\\d+)[.]=model.layers.\\1.'
    """
    import functools
    from .diffing import diff as run_diff
    from .render import diff_text
    with _progress(quiet, "comparing values") as progress:
        result = run_diff(a, b, key_a=key_a, key_b=key_b, values=not no_values, atol=atol, rtol=rtol,
                          align=not no_align, progress=progress, filter=filter_, sort=sort, depth=depth,
                          renames=renames)
    view = functools.update_wrapper(functools.partial(diff_text, top=None if show_all else top), diff_text)
    _emit(result, as_json, view)
    sys.exit(result.exit_code)


@cli.command(name="filter")
@click.argument("source", type=click.Path())
@click.option("--model", "-m", "model", metavar="SPEC",
              help="Target model: MODULE:FACTORY (torchvision.models:resnet50) or FILE.py:CLASS.")
@click.option("--arg", "model_args", multiple=True, metavar="NAME=VALUE",
              help="Argument for the model's constructor, a Python literal (repeatable): --arg num_classes=120.")
@click.option("--target", "-t", metavar="PATH", help="Target checkpoint whose names and shapes to fit.")
@click.option("--target-key", help="Entry of the target checkpoint holding its state_dict.")
@click.option("--output", "-o", "out", required=True, metavar="OUT",
              help="Output file; .pt/.pth/.bin (torch.save state_dict) or .safetensors.")
@click.option("--key", "-k", help="Entry of SOURCE holding the state_dict (default: found automatically).")
@click.option("--rename", "renames", multiple=True, metavar="REGEX=REPL",
              help="Rename source keys (after prefix alignment) before matching; applied in order, repeatable.")
@click.option("--no-align", is_flag=True, help="Do not strip a wrapper prefix (module., _orig_mod., model.).")
@click.option("--to", type=click.Choice(["pt", "state_dict", "safetensors"]), help="Output format (default: "
                                                                                      "from OUT's extension).")
@click.option("--max-shard-size", metavar="SIZE", help="Write OUT as a folder of shards of at most SIZE (5GB, 500MiB): "
                                                         "safetensors + model.safetensors.index.json, or with --to pt "
                                                         "pytorch_model-*.bin + pytorch_model.bin.index.json.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--complete", is_flag=True, help="Write the target's full state_dict: each key the source lacks is the "
                                               "model's own initialisation (seeded; with --target, the target's "
                                               "tensor), listed; the output then loads with strict=True.")
@click.option("--seed", type=int, default=0, show_default=True, help="--complete: torch.manual_seed before the model "
                                                                      "is built.")
@json_option
@quiet_option
def filter_cmd(source: str, model: Optional[str], model_args, target: Optional[str], target_key: Optional[str],
               out: str, key: Optional[str], renames, no_align: bool, to: Optional[str], max_shard_size: Optional[str],
               force: bool, complete: bool, seed: int, as_json: bool, quiet: bool) -> None:
    """Keep the tensors of SOURCE that fit a target model, and report the rest.

    A source key is kept when its name (after stripping a wrapper prefix such as
    module. or _orig_mod., and after the --rename rules) is one of the target's
    and its shape is the target's; dtypes are cast to the target's. The report
    groups kept, dropped (no such key / shape differs) and missing keys. The
    output is read back and, with --model, loaded into the model (strict=False)
    to check that the missing keys are exactly the reported ones.

    \b
    Examples:
      ckpttool filter resnet50.pth --model torchvision.models:resnet50 --arg num_classes=120 -o fit.pt
      ckpttool filter ddp_ckpt.tar --model nets.py:ClassNet -o net.safetensors
      ckpttool filter big.pt --target small.safetensors -o fit.pt --rename '^encoder\\.=backbone.'
      ckpttool filter resnet50.pth -m torchvision.models:resnet50 --arg num_classes=120 -o full.pt --complete
    """
    from .filtering import filter_checkpoint
    from .render import filter_text
    with _progress(quiet, "reading tensors") as progress:
        result = filter_checkpoint(source, out, model=model, model_args=model_args, target=target,
                                   target_key=target_key, key=key, renames=renames, align=not no_align, to=to,
                                   force=force, progress=progress, max_shard_size=max_shard_size,
                                   complete=complete, seed=seed)
    _emit(result, as_json, filter_text)
    sys.exit(result.exit_code)


@cli.command()
@click.argument("source", type=click.Path())
@click.option("--output", "-o", "out", required=True, metavar="OUT", help="Output file (or folder with "
                                                                           "--max-shard-size).")
@click.option("--to", type=click.Choice(["state_dict", "pt", "safetensors", "onnx", "dcp"]),
              help="Target format (default: from OUT's extension: .pt/.pth/.bin, .safetensors, .onnx).")
@click.option("--key", "-k", help="Entry holding the state_dict (default: found automatically).")
@click.option("--dtype", metavar="DTYPE", help="Cast floating tensors only: float16 (fp16, half), bfloat16 (bf16), "
                                               "float32 (fp32), float64 (fp64); torch.float16 too.")
@click.option("--metadata", multiple=True, metavar="KEY=VALUE", help="Add to the safetensors header (repeatable).")
@click.option("--max-shard-size", metavar="SIZE", help="Write a folder of shards of at most SIZE (5GB, 500MiB): "
                                                         "safetensors + model.safetensors.index.json, or with --to pt "
                                                         "pytorch_model-*.bin + pytorch_model.bin.index.json.")
@click.option("--check", is_flag=True, help="After writing, compare every byte of the output with the source.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--dense", is_flag=True, help="safetensors: write each tensor it cannot hold (sparse, quantized, a "
                                            "conj view...) as the plain tensor torch gives for it (the form is not kept; "
                                            "each one listed).")
@click.option("--rename", "renames", multiple=True, metavar="REGEX=REPL",
              help="Rename keys (after the wrapper prefix is stripped); applied in order, repeatable.")
@click.option("--no-align", is_flag=True, help="Keep a wrapper prefix every key carries (module. of DataParallel/"
                                               "DDP, _orig_mod. of torch.compile); stripped by default.")
@click.option("--trust", is_flag=True, help="ONNX: allow importing and running the code a pickled full model names.")
@click.option("--import-path", multiple=True, type=click.Path(), metavar="DIR",
              help="ONNX with --trust: where the pickled model's code lives (repeatable).")
@click.option("--model", "-m", metavar="SPEC", help="ONNX from a state_dict: MODULE:FACTORY or FILE.py:CLASS.")
@click.option("--arg", "model_args", multiple=True, metavar="NAME=VALUE", help="Argument for --model (repeatable).")
@click.option("--input", "input_", multiple=True, metavar="NAME:1x3x224x224",
              help="ONNX: name and shape of each input, in forward's order (repeatable); names the graph's inputs.")
@click.option("--input-shape", multiple=True, metavar="1x3x224x224", help="ONNX: shape of each input (repeatable).")
@click.option("--opset", type=int, help="ONNX opset version (default: the exporter's).")
@click.option("--dynamic-batch", is_flag=True, help="ONNX: make the first dimension of inputs and outputs dynamic.")
@click.option("--legacy-exporter", is_flag=True, help="ONNX: use torch's TorchScript-based exporter (deprecated by "
                                                      "torch; the only one for a TorchScript archive) instead of "
                                                      "torch.onnx.export(dynamo=True).")
@json_option
@quiet_option
def convert(source: str, out: str, to: Optional[str], key: Optional[str], dtype: Optional[str], metadata,
            max_shard_size: Optional[str], check: bool, force: bool, dense: bool, renames, no_align: bool,
            trust: bool, import_path,
            model: Optional[str],
            model_args, input_, input_shape, opset: Optional[int], dynamic_batch: bool, legacy_exporter: bool,
            as_json: bool, quiet: bool) -> None:
    """Convert a checkpoint's state_dict to a torch.save state_dict, safetensors or ONNX.

    From a state_dict in any format, a checkpoint dict (its state_dict entry or
    --key), or a pickled full model without running its code. Tensors are
    streamed from the source to the output; the output is read back and checked
    before it is put in place. ONNX needs code that runs: --model SPEC for a
    state_dict, or --trust for a pickled full model.

    \b
    Examples:
      ckpttool convert full_model.pth -o model.safetensors
      ckpttool convert ckpt.tar -o weights.pt --key model_state_dict --dtype fp16
      ckpttool convert ddp_ckpt.pt -o model.safetensors   # module. stripped, said in the report
      ckpttool convert ckpt.pt -o model.pt --rename '^backbone[.]=encoder.'
      ckpttool convert big.pt -o big_hf/ --to safetensors --max-shard-size 5GB
      ckpttool convert resnet.pt -o resnet.onnx --model torchvision.models:resnet50 --input-shape 1x3x224x224
      ckpttool convert full_model.pth -o model.onnx --trust --input image:1x3x224x224 --dynamic-batch
      ckpttool convert scripted.pt -o model.onnx --trust --legacy-exporter --input-shape 1x3x224x224
    """
    from .converting import convert as run_convert
    from .render import convert_text
    with _progress(quiet, "converting") as progress:
        result = run_convert(source, out, to=to, key=key, dtype=dtype, metadata=metadata,
                             max_shard_size=max_shard_size, force=force, check=check, progress=progress,
                             dense=dense, renames=tuple(renames), align=not no_align, trust=trust, import_path=tuple(import_path), model=model, model_args=tuple(model_args),
                             input_shapes=tuple(input_shape), opset=opset, dynamic_batch=dynamic_batch,
                             inputs=tuple(input_), legacy_exporter=legacy_exporter)
    _emit(result, as_json, convert_text)
    sys.exit(result.exit_code)


@cli.command()
@click.argument("path", type=click.Path())
@click.option("--output", "-o", "out", required=True, metavar="OUT",
              help="Output file (same format as PATH; a folder when PATH is a folder of .bin shards).")
@click.option("--map", "maps", multiple=True, required=True, metavar="SRC=DST",
              help="Device mapping, first match wins (repeatable): cuda=cpu, cuda:1=cuda:0, cpu=cuda, mps=cpu.")
@click.option("--to", type=click.Choice(["zip", "legacy"]), help="Write the other torch.save format (default: "
                                                                   "PATH's own).")
@click.option("--check", is_flag=True, help="After writing, compare every tensor's bytes with the source.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@json_option
@quiet_option
def remap(path: str, out: str, maps, to: Optional[str], check: bool, force: bool, as_json: bool,
          quiet: bool) -> None:
    """Rewrite the device tags of a checkpoint's storages, so plain torch.load works.

    The fix, made once on the file, for "Attempting to deserialize object on a
    CUDA device but torch.cuda.is_available() is False" and for a cuda:1 file
    on a one-GPU machine. Works on torch.save zip and legacy files, HF folders
    of .bin shards (OUT is a folder) and TorchScript archives, full pickled
    models and optimizer state included,
    without running anything and without a GPU; tensor bytes are copied as they are.

    \b
    Examples:
      ckpttool remap gpu_ckpt.pt -o cpu_ckpt.pt --map cuda=cpu
      ckpttool remap ckpt.pt -o ckpt0.pt --map cuda:1=cuda:0
      ckpttool remap cpu.pt -o gpu.pt --map cpu=cuda
      ckpttool remap old_gpu.pt -o new_cpu.pt --map cuda=cpu --to zip   # legacy file -> zip format
    """
    from .remapping import remap as run_remap
    from .render import remap_text
    with _progress(quiet, "rewriting") as progress:
        result = run_remap(path, out, list(maps), force=force, check=check, to=to, progress=progress)
    _emit(result, as_json, remap_text)
    sys.exit(result.exit_code)


@cli.command()
@click.argument("path", type=click.Path())
@click.option("--model", "-m", metavar="SPEC", help="Model to load the state_dict into: MODULE:FACTORY or FILE.py:CLASS.")
@click.option("--arg", "model_args", multiple=True, metavar="NAME=VALUE", help="Argument for --model (repeatable).")
@click.option("--against", metavar="ORIGINAL", help="Compare outputs with ORIGINAL's on the same input (a full model "
                                                    "with --trust, a state_dict with --model, TorchScript, ONNX).")
@click.option("--device", "devices", multiple=True, metavar="D",
              help="Device to check (repeatable): cpu, cuda, cuda:1, mps. Default: cpu, plus cuda:0 when available.")
@click.option("--input", "input_", multiple=True, metavar="NAME:1x3x224x224",
              help="Name and shape of a model input (repeatable); an ONNX graph's names. Default for an ONNX "
                   "graph: the input shapes it declares.")
@click.option("--input-shape", multiple=True, metavar="1x3x224x224", help="Shape of each model input, in order "
                                                                          "(repeatable).")
@click.option("--map-location", "map_location", multiple=True, metavar="DEVICE|SRC=DST",
              help="Check the file as torch.load(map_location=...) reads it: a device (cpu: every storage there) "
                   "or SRC=DST tags (cuda:1=cuda:0, repeatable). Default: a plain torch.load.")
@click.option("--atol", type=float, help="Output tolerance (default by output dtype: float32 1e-4, float16 1e-2, "
                                         "bfloat16 5e-2, float64 1e-7).")
@click.option("--rtol", type=float, help="Relative output tolerance (defaults as --atol's).")
@click.option("--key", "-k", help="Entry holding the state_dict (default: found automatically).")
@click.option("--trust", is_flag=True, help="Allow importing and running the code a pickled model names.")
@click.option("--import-path", multiple=True, type=click.Path(), metavar="DIR",
              help="With --trust: where the pickled model's code lives (repeatable).")
@json_option
@quiet_option
def verify(path: str, model: Optional[str], model_args, against: Optional[str], devices, input_, input_shape,
           map_location, atol: Optional[float], rtol: Optional[float], key: Optional[str], trust: bool, import_path,
           as_json: bool, quiet: bool) -> None:
    """Prove a checkpoint loads, round-trips and computes the same on CPU and GPU.

    Runs the checks that apply and reports each as pass / fail / skip: readable
    without running code; format round trip (torch zip, safetensors) bit for bit;
    device round trip on each device; load_state_dict(strict=True) into the model
    (--model, or --trust for a pickled model); a seeded forward pass on each device
    in eval mode with TF32 off, compared with the CPU's (and with --against's).

    PASS means nothing failed, a plain torch.load(weights_only=True) of the file
    works on this machine (or with --map-location's), and every comparison asked
    for ran; the report lists what was proven and what was not. A comparison
    with --against that cannot run is an error naming all it needs.
    Exit 0 on PASS, 1 when a check failed, 2 on an error.

    \b
    Examples:
      ckpttool verify model.safetensors
      ckpttool verify weights.pt --model torchvision.models:resnet50 --input-shape 1x3x224x224
      ckpttool verify model.onnx --against full_model.pth --trust     # input shapes from the graph
      ckpttool verify model.onnx --against full_model.pth --trust --input image:1x3x224x224
      ckpttool verify model.safetensors --against full_model.pth --trust --input-shape 1x3x32x32
      ckpttool verify gpu_ckpt.pt --map-location cpu                  # as torch.load(map_location='cpu')
      ckpttool verify ckpt.pt --device cuda:1 --json
    """
    from .render import verify_text
    from .verifying import verify as run_verify
    with _progress(quiet, "round trips") as progress:
        result = run_verify(path, model=model, model_args=tuple(model_args), against=against,
                            devices=tuple(devices), input_shapes=tuple(input_shape), atol=atol, rtol=rtol, key=key,
                            trust=trust, import_path=tuple(import_path), inputs=tuple(input_),
                            map_location=tuple(map_location), progress=progress)
    _emit(result, as_json, verify_text)
    sys.exit(result.exit_code)


@cli.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@json_option
@quiet_option
def scan(paths, as_json: bool, quiet: bool) -> None:
    """List every global the pickles in each file would import, and flag the dangerous ones.

    Reads every pickle a file holds (a zip's data.pkl and other .pkl records,
    the legacy format's pickles, a DCP folder's .metadata, a bare pickle, and
    pickles nested in bytes) opcode by opcode, without unpickling. Each global
    is safe (torch.load(weights_only=True) allows it, or a benign type),
    needs code (a class only instantiated and filled, like a pickled model), or
    dangerous (anything called that is not allowed).

    A folder is walked to any depth and each file in it is reported on its own
    (path, format, verdict): every file named .pt .pth .pt2 .ptl .bin .ckpt
    .tar .pkl .pickle .joblib .npy .npz .safetensors .onnx .gguf, and any other
    file whose bytes a loader reads (zip, tar, numpy, safetensors, a pickle);
    the rest are listed as not scanned (beside an .onnx model, a file that is
    no checkpoint is its external data). A torch.distributed.checkpoint
    folder (.metadata) is one entry. With several files, a safe one is one
    line (--json lists every global). Symbolic links to folders are not followed (no
    loops, nothing outside the tree); links to files are. A file that cannot be
    read gets a one-line error in its entry and the scan goes on (one file named
    alone that cannot be read is the command's error).

    Exit 1 when anything is dangerous, else 2 when anything is unreadable, else 0.

    \b
    Examples:
      ckpttool scan downloaded.pt
      ckpttool scan models/ --json          # every checkpoint under models/
      ckpttool scan *.pt *.bin hf_folder/ -q  # just the verdict line
    """
    from .render import scan_text
    from .scanning import scan as run_scan
    with _progress(quiet, "scanning files") as progress:
        result = run_scan(list(paths), walk=True, keep_going=True, progress=progress)
    _emit(result, as_json, scan_text)
    sys.exit(result.exit_code)


_SIGNALLED = []  # the signal that stopped the command, for its exit code


def _on_signal(signum, frame) -> None:
    if _SIGNALLED:  # a second signal while the first one's cleanup runs: let that cleanup finish
        return
    _SIGNALLED.append(signum)
    from .writing import hold_signal
    if not hold_signal(signum):  # inside an output's rename into place, it is raised once that is done
        raise KeyboardInterrupt()


def main(argv=None) -> None:
    """Console-script entry point.

    SIGTERM (a cancelled CI job, ``timeout``, ``docker stop``) unwinds like Ctrl-C: click prints
    "Aborted!" and the temporary file or folder the command was writing is removed (SIGTERM's default
    action kills the process where it stands and leaves them). A signal that arrives while an output
    is being renamed into place waits until it is in place; a second one during the cleanup is
    ignored. Then the console script dies by that signal, as a shell expects (``$?`` 130 or 143, and a
    loop over files stops); called with ``argv``, main() raises SystemExit(128 + the signal's number).
    """
    import signal
    _SIGNALLED.clear()
    installed = []
    for sig, default in ((signal.SIGTERM, signal.SIG_DFL), (signal.SIGINT, signal.default_int_handler)):
        if signal.getsignal(sig) is default:  # a caller's own handler stays
            with contextlib.suppress(ValueError):  # not the main thread: leave it
                signal.signal(sig, _on_signal)
                installed.append((sig, default))
    try:
        try:
            cli.main(args=_hoist_debug(sys.argv[1:] if argv is None else list(argv)), prog_name="ckpttool")
        finally:
            for sig, default in installed:  # main() called from other code leaves its signals as they were
                signal.signal(sig, default)
    except BrokenPipeError:  # `ckpttool inspect x | head`
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        sys.exit(1)
    except SystemExit as e:
        if _SIGNALLED and argv is None:
            _flush()
            sig = _SIGNALLED[0]
            signal.signal(sig, signal.SIG_DFL)
            os.kill(os.getpid(), sig)  # dies here; what follows is for a signal that does not kill
            os._exit(128 + int(sig))
        code = 128 + int(_SIGNALLED[0]) if _SIGNALLED else e.code
        if argv is None and _teardown_skippable():
            _exit_now(code)
        raise SystemExit(code) from None


def _hoist_debug(args: list) -> list:
    """``--debug`` is the group's option; accept it after the subcommand too (``ckpttool diff a b --debug``):
    moved to the front, up to a ``--`` that ends the options."""
    end = args.index("--") if "--" in args else len(args)
    if "--debug" not in args[:end]:
        return args
    return ["--debug"] + [a for a in args[:end] if a != "--debug"] + args[end:]


def _teardown_skippable() -> bool:
    """No profiler, tracer or coverage is waiting for the interpreter's exit to write its data."""
    return sys.getprofile() is None and sys.gettrace() is None and "coverage" not in sys.modules


def _flush() -> bool:
    """Flush stdout and stderr; False when one could not take it (a closed pipe, a full disk)."""
    ok = True
    for stream in (sys.stdout, sys.stderr):
        if stream is None:  # started with the descriptor closed (`>&-`)
            continue
        try:
            stream.flush()
        except (OSError, ValueError):
            ok = False
    return ok


def _exit_now(code) -> None:
    """Leave without the interpreter's teardown: the work is done and its output written.

    Teardown frees every object one by one (30 ms after a 20,000-tensor inspect) and, once torch is
    imported, runs its exit hooks (0.4-0.7 s). Only for the console script (``argv is None``), never
    when called as a library function, nor under a profiler or coverage (their data is written at
    exit). Every file the commands write is fsynced and renamed, and every temporary file removed,
    before they return; stdout and stderr are flushed here.
    """
    status = code if isinstance(code, int) else (0 if code is None else 1)
    if not isinstance(code, (int, type(None))) and sys.stderr is not None:
        print(code, file=sys.stderr)
    if not _flush():
        status = status or 1
    os._exit(status)
