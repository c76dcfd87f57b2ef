"""``loadstone-gptq`` command line: ``loadstone-gptq quantize MODEL OUTPUT --calibration FILE``."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Any, NoReturn, Sequence

from loadstone import LoadstoneError, OptionError

EPILOG = """examples:
  loadstone-gptq quantize ./llama-8b ./llama-8b-gptq --calibration texts.txt
  loadstone-gptq quantize ./llama-8b ./llama-8b-gptq --calibration samples.jsonl --bits 4 --group-size 128 \\
      --desc-act --device cuda:0
  loadstone load ./llama-8b-gptq
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> "NoReturn":  # type: ignore[override]
        self.exit(2, f"error (usage): {self.prog}: {message}. Run `{self.prog} --help` for every option.\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="loadstone-gptq", description="GPTQ for loadstone: quantize a model ahead of time "
                     "(loading a GPTQ checkpoint needs no command: `loadstone load FOLDER`).")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    p = sub.add_parser("quantize", help="quantize a model folder to GPTQ with gptqmodel, from calibration texts",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="the model folder (config.json, safetensors, and its tokenizer)")
    p.add_argument("output", help="where the GPTQ checkpoint is written")
    p.add_argument("--calibration", required=True, metavar="FILE",
                   help="calibration samples: a text file (one sample per non-empty line) or .jsonl with "
                        "{\"text\": ...} or {\"input_ids\": [...]} per line")
    p.add_argument("--bits", type=int, default=4, help="2, 3, 4 (default) or 8")
    p.add_argument("--group-size", type=int, default=128, help="inputs per scale and zero point (default 128; -1: "
                                                                "one group per column)")
    p.add_argument("--desc-act", action="store_true", help="act-order: quantize columns by decreasing activation")
    p.add_argument("--asym", action="store_true", help="asymmetric: a zero point per group (default symmetric)")
    p.add_argument("--format", dest="checkpoint_format", default="gptq", choices=["gptq", "gptq_v2"],
                   help="zero-point layout written: gptq (v1, read by every GPTQ loader; default) or gptq_v2")
    p.add_argument("--damp-percent", type=float, default=None, help="Hessian dampening (default: gptqmodel's)")
    p.add_argument("--batch-size", type=int, default=1, help="calibration samples per forward (default 1)")
    p.add_argument("--device", default="cpu", help="where gptqmodel calibrates: cpu (default), cuda:0 ...")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def read_calibration(path: Path) -> list[Any]:
    """Samples from a text file (one per non-empty line) or a .jsonl file (text or input_ids)."""
    try:
        lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except OSError as exc:
        raise OptionError(f"the calibration file cannot be read: {exc.strerror or exc}.", field="calibration",
                          expected="a text or .jsonl file", found=str(path),
                          fix="pass --calibration a file with one sample per line") from None
    if path.suffix != ".jsonl":
        return lines
    samples = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
            samples.append(record["text"] if "text" in record else {"input_ids": record["input_ids"]})
        except (ValueError, KeyError, TypeError):
            raise OptionError(f"{path.name} line {number} is not a calibration record.", field="calibration",
                              expected='{"text": "..."} or {"input_ids": [...]}', found=line[:80],
                              fix="write one JSON object per line") from None
    return samples


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .quantize import quantize

    started = time.monotonic()
    try:
        # gptqmodel logs to stdout; stdout is for the summary below, so its lines go to stderr.
        with contextlib.redirect_stdout(sys.stderr):
            out = quantize(args.model, args.output, read_calibration(Path(args.calibration)), bits=args.bits,
                           group_size=args.group_size, desc_act=args.desc_act, sym=not args.asym,
                           checkpoint_format=args.checkpoint_format, damp_percent=args.damp_percent,
                           batch_size=args.batch_size, device=args.device, progress=not args.quiet)
    except LoadstoneError as exc:
        print(f"error ({type(exc).__name__}): {exc}".replace("\n", " "), file=sys.stderr)
        return exc.exit_code
    settings = {"bits": args.bits, "group_size": args.group_size, "desc_act": args.desc_act, "sym": not args.asym,
                "checkpoint_format": args.checkpoint_format}
    print(json.dumps({"output": str(out), "settings": settings, "seconds": round(time.monotonic() - started, 1)}))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
