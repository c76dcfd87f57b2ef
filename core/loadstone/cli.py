"""``loadstone`` command line: load, plan, plugins, demo."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any, NoReturn, Sequence

from .contract.errors import LoadstoneError, OptionError
from .jsonfile import JSONProblem, parse_json, problem_fields, read_json

EPILOG_LOAD = """examples:
  loadstone load ./my-model
  loadstone load ./my-lora-adapter --quantization nf4 --placement cuda:0
  loadstone load meta-llama/Llama-3.1-8B@main -q nf4 -o double_quant=true --json
  loadstone load ./base --adapter a=./lora-a --adapter b=./lora-b --active-adapter b --frozen
"""
EPILOG_PLAN = """examples:
  loadstone plan ./my-model --quantization nf4 --max-memory cuda:0=20GiB
  loadstone plan org/name --placement sequential --max-memory cuda:0=10GiB --max-memory cpu=64GiB --json
  loadstone plan ./my-model --max-memory cpu=2GiB --offload-folder /tmp/offload
"""


class UsageError(Exception):
    """A command line argparse refused; :func:`main` reports it like every other error."""

    exit_code = 2

    def __init__(self, prog: str, message: str):
        self.prog, self.message = prog, message
        super().__init__(f"{prog}: {message}")

    def to_dict(self) -> dict[str, Any]:
        return {"error": "usage", "message": f"{self.prog}: {self.message}", "file": None, "field": None,
                "expected": None, "found": None, "fix": f"run `{self.prog} --help` for every option, with examples"}


class _Parser(argparse.ArgumentParser):
    """Usage errors in the one-paragraph form every other error has (argparse would print the whole
    usage block first), and as JSON under ``--json``. Subcommand parsers inherit it."""

    def error(self, message: str) -> "NoReturn":  # type: ignore[override]
        raise UsageError(self.prog, message)


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key.strip(), value.strip()


def _option_value(flag: str, key: str, value: str) -> Any:
    """``-o KEY=VALUE`` (or ``-e``): booleans by their usual words, JSON where the value is JSON (``4``,
    ``[1, 2]``), else the text itself. JSON that parses but no option can take (``NaN``, a key
    given twice, deep nesting) is refused rather than passed on."""
    lowered = value.lower()
    if lowered in {"true", "yes", "on"}:
        return True
    if lowered in {"false", "no", "off"}:
        return False
    try:
        return parse_json(value)
    except JSONProblem as problem:
        if problem.kind == "syntax":
            return value
        fields = {**problem_fields(problem), "field": f"{flag} {key}"}
        raise OptionError(f"{flag} {key}=...: the value is JSON no option can take.", **fields,
                          fix="pass a plain value (text, a number, true/false) or simple JSON") from None


def _add_load_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("reference", metavar="REF",
                   help="model folder, Hub id org/name[@revision], adapter folder, or a reference a resolver "
                        "plugin handles (e.g. ./llama-8b, Qwen/Qwen2-0.5B@main, ./my-lora)")
    g = p.add_argument_group("what to load")
    g.add_argument("--adapter", action="append", default=[], metavar="[NAME=]REF",
                   help="attach another adapter (repeatable), e.g. --adapter math=./lora-math")
    g.add_argument("--active-adapter", metavar="NAME", help="adapter to activate (default: the first), e.g. --active-adapter math")
    g.add_argument("--base", metavar="REF", help="base model overriding the adapter's base_model_name_or_path, "
                                                 "e.g. --base /models/llama-moved")
    g.add_argument("--task", metavar="TASK",
                   help="model head: causal-lm (default), sequence-classification, token-classification, "
                        "question-answering, seq2seq-lm, feature-extraction")
    g.add_argument("--revision", metavar="REV", help="Hub revision (branch, tag or commit), e.g. --revision v1.0")
    g.add_argument("--cache-dir", metavar="DIR", help="Hugging Face cache folder (default: HF_HUB_CACHE), e.g. --cache-dir /data/hf-cache")
    g.add_argument("--offline", action="store_true", default=None,
                   help="use only the local cache (also: HF_HUB_OFFLINE=1)")
    g = p.add_argument_group("how to load it")
    g.add_argument("-q", "--quantization", metavar="METHOD",
                   help="quantize on load: none, nf4, fp4, int8, ... (`loadstone plugins` lists them); "
                        "pre-quantized checkpoints load as they are without this option")
    g.add_argument("-o", "--quant-option", action="append", default=[], type=_key_value, metavar="KEY=VALUE",
                   help="backend option (repeatable), e.g. -o double_quant=true -o compute_dtype=bfloat16")
    g.add_argument("-p", "--placement", default="auto", metavar="SPEC",
                   help="auto (default), balanced, sequential, cpu, a device such as cuda:1, rank (one copy per "
                        "torchrun process), or a plugin's strategy")
    g.add_argument("--device-map", metavar="FILE.json",
                   help="explicit device map from a JSON file {module: device}; overrides --placement, "
                        "e.g. --device-map map.json holding {\"model\": \"cpu\", \"lm_head\": \"disk\"}")
    g.add_argument("--dtype", default="auto", help="auto (checkpoint's own, default), bfloat16, float16, float32")
    g.add_argument("--engine", default="auto", metavar="NAME",
                   help="weight-loading engine: auto (default: loadstone where it can run the load, else "
                        "transformers), loadstone, transformers, or a plugin's engine")
    g.add_argument("-e", "--engine-option", action="append", default=[], type=_key_value, metavar="KEY=VALUE",
                   help="engine option (repeatable), e.g. -e readers=8 -e chunk_bytes=16MiB")
    g.add_argument("--max-memory", action="append", default=[], type=_key_value, metavar="DEVICE=SIZE",
                   help="memory budget (repeatable), e.g. --max-memory cuda:0=20GiB --max-memory cpu=64GiB")
    g.add_argument("--offload-folder", metavar="DIR", help="allow disk offload into DIR, e.g. --offload-folder /tmp/offload")
    g.add_argument("--frozen", action="store_true", help="freeze adapters too (inference); default: trainable")
    g.add_argument("--gradient-checkpointing", action="store_true", help="enable gradient checkpointing")
    g.add_argument("--attn-implementation", metavar="NAME", help="e.g. sdpa, eager")
    g.add_argument("--trust-remote-code", action="store_true",
                   help="allow code shipped with the checkpoint to run (off by default; shown in the report)")
    g.add_argument("--allow-pickle", action="store_true",
                   help="accept pytorch_model.bin checkpoints, read with torch.load(weights_only=True)")
    g = p.add_argument_group("output")
    g.add_argument("--json", action="store_true", help="print the report as JSON (an error as a JSON object)")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_diagnostics(g)


def _add_diagnostics(p: Any) -> None:
    p.add_argument("--verbose", action="store_true",
                   help="show the warnings and log lines of the libraries loadstone drives (transformers, "
                        "accelerate, peft, bitsandbytes, torch), silenced by default, and loadstone's debug lines")
    p.add_argument("--debug", action="store_true", help="like --verbose, and print the traceback of an error")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="loadstone", description="Load pretrained base models for parameter-efficient fine-tuning, "
        "explaining every decision.", formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  loadstone demo\n  loadstone plan ./my-model --max-memory cuda:0=20GiB\n"
               "  loadstone load ./my-lora-adapter --quantization nf4 --json\n  loadstone plugins --json\n\n"
               "run `loadstone COMMAND --help` for each command's options")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("load", help="load a model (and adapters) and print the load report",
                       description="Load a model the way loadstone.load() does and print its report.",
                       epilog=EPILOG_LOAD, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_load_options(p)
    p = sub.add_parser("plan", help="say where every byte would go, without reading weights",
                       description="Compute the device map and bytes per device after quantization from "
                       "config.json and safetensors headers only, and say whether it fits.",
                       epilog=EPILOG_PLAN, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_load_options(p)
    p = sub.add_parser("plugins", help="list installed plugins and their components",
                       description="List discovered plugins (built-in and from entry points), their status, "
                       "distributions and components.",
                       epilog="examples:\n  loadstone plugins\n  loadstone plugins --json\n"
                              "  LOADSTONE_PLUGINS= loadstone plugins      # built-ins only",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="print JSON (an error as a JSON object)")
    _add_diagnostics(p)
    p = sub.add_parser("demo", help="build a tiny Llama + LoRA, load it, train one step",
                       description="Build (once, cached) a small random Llama checkpoint and a LoRA adapter for "
                       "it, load the adapter on the CPU (NF4 when loadstone-bnb is installed), print the report "
                       "and run one forward/backward pass showing that only adapter weights get gradients.",
                       epilog="examples:\n  loadstone demo\n  loadstone demo --no-quantize --json\n"
                              "  loadstone demo --rebuild --cache-dir /tmp/demo",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache-dir", metavar="DIR",
                   help="where the demo checkpoint lives (default: user cache): a new or empty folder, or one the "
                        "demo built; a folder holding other files is refused, never emptied")
    p.add_argument("--rebuild", action="store_true", help="rebuild the demo checkpoint")
    p.add_argument("--no-quantize", action="store_true", help="skip NF4 even when loadstone-bnb is installed")
    p.add_argument("--json", action="store_true", help="print the report as JSON (an error as a JSON object)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_diagnostics(p)
    return parser


def _once(flag: str, pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """``KEY=VALUE`` pairs of a repeatable option, refused where a key is given twice: the last would
    win silently, and which of two budgets or settings was meant is the user's to say."""
    seen: dict[str, str] = {}
    for key, value in pairs:
        if key in seen:
            raise OptionError(f"{flag} {key} is given twice.", field=f"{flag} {key}",
                              expected="each key once", found=f"{key}={seen[key]} and {key}={value}",
                              fix=f"keep one {flag} {key}=...")
        seen[key] = value
    return pairs


def request_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    placement: Any = args.placement
    if args.device_map:
        example = 'write it like {"": "cpu"} or {"model.embed_tokens": 0, "model.layers": "cpu", "lm_head": "disk"}'
        placement = read_json(Path(args.device_map), OptionError, what="a JSON object {module: device}",
                              missing="the --device-map file does not exist.", missing_fix="check the path",
                              repair_fix=example, field="--device-map")
        if not isinstance(placement, dict):
            raise OptionError("the --device-map file must hold a JSON object {module: device}.", file=args.device_map,
                              field="--device-map", expected="a JSON object {module: device}",
                              found=type(placement).__name__, fix=example)
    kwargs: dict[str, Any] = {
        "quantization": args.quantization,
        "quantization_options": {k: _option_value("-o", k, v) for k, v in _once("-o", args.quant_option)},
        "placement": placement,
        "dtype": args.dtype,
        "trainable": not args.frozen,
        "adapters": list(args.adapter),
        "active_adapter": args.active_adapter,
        "base": args.base,
        "task": args.task,
        "max_memory": dict(_once("--max-memory", args.max_memory)) or None,
        "offload_folder": args.offload_folder,
        "revision": args.revision,
        "cache_dir": args.cache_dir,
        "trust_remote_code": args.trust_remote_code,
        "allow_pickle": args.allow_pickle,
        "attn_implementation": args.attn_implementation,
        "gradient_checkpointing": args.gradient_checkpointing,
        "progress": False if getattr(args, "quiet", False) else None,
        "engine": args.engine,
        "engine_options": {k: _option_value("-e", k, v) for k, v in _once("-e", args.engine_option)},
    }
    if args.offline:
        kwargs["offline"] = True
    return kwargs


def _cmd_plugins(args: argparse.Namespace) -> int:
    from .plugin_listing import render_listing
    from .plugins import get_plugin_manager

    manager = get_plugin_manager()
    described = manager.describe()
    for conflict in manager.conflicts:  # listed below too; every load and plan refuses until it is resolved
        print(f"error ({type(conflict).__name__}): {conflict}".replace("\n", " "), file=sys.stderr)
    print(json.dumps(described, indent=2) if args.json else render_listing(described, manager.disable_source))
    return 0


def _library_stdout(stack: contextlib.ExitStack, args: argparse.Namespace) -> Any:
    """Where what libraries print (gptqmodel's banner and kernel choice) goes while loadstone works:
    stdout carries the report alone (`--json` is parsed by programs), so it is library output, shown
    on stderr with --verbose and dropped otherwise, like their warnings."""
    if args.verbose or args.debug:
        return sys.stderr
    return stack.enter_context(open(os.devnull, "w"))


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    with contextlib.ExitStack() as stack:
        return run_demo(cache_dir=args.cache_dir, rebuild=args.rebuild, quantize=not args.no_quantize,
                        as_json=args.json, progress=False if args.quiet else None,
                        library_stdout=_library_stdout(stack, args))


def _cmd_load_or_plan(args: argparse.Namespace) -> int:
    import loadstone

    kwargs = request_kwargs(args)
    with contextlib.ExitStack() as stack:
        stack.enter_context(contextlib.redirect_stdout(_library_stdout(stack, args)))
        try:
            if args.command == "plan":
                kwargs.pop("progress")
                report = loadstone.plan(args.reference, **kwargs).report
            else:
                report = loadstone.load(args.reference, **kwargs).report
        except OptionError as exc:
            raise _options_without_method(exc, args) from exc
    print(report.to_json() if args.json else report.render())
    return 0


def _options_without_method(exc: OptionError, args: argparse.Namespace) -> OptionError:
    """``-o`` without ``-q`` on an unquantized checkpoint reaches the no-op method "none", whose
    refusal ("method 'none' does not take the option(s) ...") does not say what the user left out.
    (A pre-quantized checkpoint takes -o without -q: its backend's own refusal stays as it is.)"""
    if args.quantization or not args.quant_option or exc.field != "quantization options" \
            or not exc.message.startswith("quantization method 'none' "):
        return exc
    return OptionError(f"-o {', '.join(k for k, _ in args.quant_option)} given without -q: backend options go "
                       f"with a quantization method, and none was asked for.", field="-o/--quant-option",
                       expected="-q METHOD with its -o options, e.g. -q nf4 -o double_quant=true", found=exc.found,
                       fix="add -q METHOD (`loadstone plugins` lists the methods and their options), or drop -o")


def _one_line(text: str) -> str:
    """One paragraph for a terminal: line breaks become spaces, and other control characters (a
    hostile file's value may hold escape sequences or a record separator) are shown escaped."""
    text = text.replace("\r\n", " ").replace("\n", " ")
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Known before parsing, so that a usage error is reported in the form asked for.
    as_json = "--json" in argv
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except UsageError as exc:
        return _report_error(exc, as_json=as_json)
    if args.version:
        from . import __version__

        print(f"loadstone {__version__}")
        return 0
    if not args.command:
        parser.print_help()
        return 0
    from .quiet import library_output

    with library_output(verbose=args.verbose or args.debug):
        try:
            if args.command == "plugins":
                return _cmd_plugins(args)
            if args.command == "demo":
                return _cmd_demo(args)
            return _cmd_load_or_plan(args)
        except LoadstoneError as exc:
            if args.debug:
                traceback.print_exc()
            return _report_error(exc, as_json=args.json)
        except KeyboardInterrupt:
            if args.json:
                # the keys every error object has, so that a script reads this one the same way
                print(json.dumps({"error": "interrupted", "message": "interrupted", "file": None, "field": None,
                                  "expected": None, "found": None, "exit_code": 130,
                                  "fix": "run the command again; an interrupted load leaves no files behind"}, indent=2))
            print("interrupted", file=sys.stderr)
            return 130
        except Exception as exc:
            # A bug, not a refusal: the traceback follows on stderr; a script still gets an object.
            if args.json:
                print(json.dumps({"error": type(exc).__name__, "message": str(exc), "file": None, "field": None,
                                  "expected": None, "found": None, "exit_code": 1,
                                  "fix": "this is a bug in loadstone or a plugin: please report it with the "
                                         "traceback printed on stderr"}, indent=2))
            raise


def _report_error(exc: LoadstoneError | UsageError, *, as_json: bool) -> int:
    """One paragraph on stderr; under ``--json`` also the error as a JSON object on stdout."""
    if as_json:
        print(json.dumps({**exc.to_dict(), "exit_code": exc.exit_code}, indent=2, default=str))
    if isinstance(exc, UsageError):
        print(f"error (usage): {exc.prog}: {exc.message}. Run `{exc.prog} --help` for every option, "
              f"with examples.", file=sys.stderr)
    else:
        print(_one_line(f"error ({type(exc).__name__}): {exc}"), file=sys.stderr)
    return exc.exit_code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
