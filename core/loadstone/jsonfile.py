"""Reading the JSON a load is given (config.json, adapter_config.json, the shard index, a
``--device-map`` file, ``-o`` values) strictly, with typed errors.

Python's ``json`` accepts more than any loader should: a key given twice (the last one silently
wins), ``NaN``/``Infinity`` and numbers that overflow to infinity, and nesting so deep that
parsing or any later recursive walk (``copy.deepcopy``, ``repr``) raises ``RecursionError``.
:func:`parse_json` refuses all of them; :func:`read_json` also refuses files that are not regular
files (a FIFO would block the read forever), are too large, or cannot be read.
"""

from __future__ import annotations

import errno
import json
import math
import os
import stat
from pathlib import Path
from typing import Any

from .contract.errors import LoadstoneError

#: The largest JSON file read (the safetensors format caps its header at the same size); a shard
#: index of the largest public checkpoints is a few MB.
MAX_JSON_BYTES = 100_000_000
#: Deeper nesting is refused. Real configs nest 3-4 levels (quantization_config, rope_parameters,
#: sub-model configs); Python's own parser gives up near 1000.
MAX_JSON_DEPTH = 32


class JSONProblem(ValueError):
    """Why a JSON text was refused: ``kind`` is ``syntax``, ``duplicate``, ``non-finite`` or ``depth``;
    ``key`` names the duplicated key or the path to the offending value where known."""

    def __init__(self, kind: str, detail: str, key: str | None = None):
        super().__init__(detail)
        self.kind, self.detail, self.key = kind, detail, key


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise JSONProblem("duplicate", f"the key {key!r} is given twice (JSON keeps only the last one)", key)
        seen[key] = value
    return seen


def _no_constant(name: str) -> Any:
    raise JSONProblem("non-finite", f"{name} is not a number a loader can use")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise JSONProblem("non-finite", f"{text} overflows to infinity")
    return value


def _check_depth(value: Any) -> None:
    """Iteratively (a recursive walk would itself overflow on the input it is meant to refuse)."""
    stack: list[tuple[Any, int, str]] = [(value, 1, "")]
    while stack:
        item, depth, where = stack.pop()
        if not isinstance(item, (dict, list)):
            continue
        if depth > MAX_JSON_DEPTH:
            raise JSONProblem("depth", f"nested more than {MAX_JSON_DEPTH} levels deep", where or None)
        children = item.items() if isinstance(item, dict) else enumerate(item)
        for key, child in children:
            if isinstance(child, (dict, list)):
                stack.append((child, depth + 1, f"{where}[{key}]" if isinstance(key, int)
                              else (f"{where}.{key}" if where else str(key))))


def parse_json(text: str | bytes) -> Any:
    """Parse ``text`` strictly; raises :class:`JSONProblem`."""
    try:
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        value = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant,
                           parse_float=_finite_float)
    except JSONProblem:
        raise
    except RecursionError:
        raise JSONProblem("depth", f"nested more than {MAX_JSON_DEPTH} levels deep") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, an integer of more than 4300 digits
        raise JSONProblem("syntax", str(exc)[:160] or type(exc).__name__) from None
    _check_depth(value)
    return value


def problem_fields(problem: JSONProblem, *, whole: str = "(whole file)") -> dict[str, Any]:
    """The ``field``/``expected``/``found`` of an error about ``problem``."""
    expected = {"syntax": "valid JSON", "duplicate": "each key once", "non-finite": "finite numbers (or null)",
                "depth": f"at most {MAX_JSON_DEPTH} levels of nesting"}[problem.kind]
    return {"field": problem.key or whole, "expected": expected, "found": problem.detail}


def read_json(path: Path, error: type[LoadstoneError], *, what: str, missing: str, missing_fix: str,
              repair_fix: str, field: str | None = None) -> Any:
    """Read and strictly parse the JSON file ``path``; every failure is ``error`` naming the file.

    ``what`` describes the expected content (``"a JSON object"``); ``missing``/``missing_fix`` word
    the error for an absent file, ``repair_fix`` the fix for a file that is there but unusable.
    ``field`` names what the user gave (``--device-map``) where the file itself is at fault; by
    default, the file's name.
    """
    path = Path(path)
    field = field or path.name
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except (FileNotFoundError, NotADirectoryError):
        raise error(missing, file=path, field=field, expected=what, found="no such file",
                    fix=missing_fix) from None
    except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the path
        raise _unreadable(path, exc, error, what, field) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file (a pipe, socket or device)"
            raise error(f"{path.name} is {kind}.", file=path, field=field, expected=f"a regular file holding {what}",
                        found=kind, fix=repair_fix)
        if st.st_size > MAX_JSON_BYTES:
            raise error(f"{path.name} is too large to be {what}.", file=path, field=field,
                        expected=f"at most {MAX_JSON_BYTES} bytes", found=f"{st.st_size} bytes", fix=repair_fix)
        with os.fdopen(fd, "rb", closefd=False) as fh:
            raw = fh.read(MAX_JSON_BYTES + 1)
    except OSError as exc:
        raise _unreadable(path, exc, error, what, field) from None
    finally:
        os.close(fd)
    try:
        return parse_json(raw)
    except JSONProblem as problem:
        message = {"syntax": f"{path.name} is not valid JSON.",
                   "duplicate": f"{path.name} gives the key {problem.key!r} twice.",
                   "non-finite": f"{path.name} holds a number that is not finite.",
                   "depth": f"{path.name} is nested too deeply."}[problem.kind]
        raise error(message, file=path, **problem_fields(problem), fix=repair_fix) from None


def _unreadable(path: Path, exc: BaseException, error: type[LoadstoneError], what: str,
                field: str) -> LoadstoneError:
    reason = getattr(exc, "strerror", None) or str(exc)
    code = getattr(exc, "errno", None)
    fix = ("give your user read permission on it (chmod a+r), or run as a user who has it" if code == errno.EACCES
           else "check the path: it must be a readable regular file")
    return error(f"{path.name} cannot be read: {reason}.", file=path, field=field,
                 expected=f"a readable file holding {what}", found=type(exc).__name__, fix=fix)


def read_json_object(path: Path, error: type[LoadstoneError], *, missing: str, expected: str,
                     missing_fix: str, repair_fix: str) -> dict[str, Any]:
    """:func:`read_json` for a file that must hold one JSON object (``expected`` describes it)."""
    data = read_json(path, error, what=expected, missing=missing, missing_fix=missing_fix, repair_fix=repair_fix)
    if not isinstance(data, dict):
        raise error(f"{Path(path).name} is not a JSON object.", file=path, field="(whole file)", expected="a JSON object",
                    found=type(data).__name__, fix=repair_fix)
    return data
