"""Checking ``adapter_config.json``'s values before peft sees them (part of stage 1, resolve).

peft reads the file into a dataclass without checking types: ``"r": "8"`` or ``"lora_alpha":
"16"`` fail with a raw ``TypeError`` once layers are built, ``"lora_alpha": NaN`` silently makes
every output NaN, a list as ``task_type`` crashes a set lookup. :func:`check_adapter_config`
checks every field the adapter's peft config class declares against that declaration (so it
follows peft's own fields, for every ``peft_type``), plus what the types cannot say: ranks are
positive integers, scales finite and positive, dropout a probability.

Module-name patterns are checked too. peft matches ``target_modules`` and ``exclude_modules``
(when a string), and the keys of ``rank_pattern``/``alpha_pattern``, as regular expressions
against every module name of the base model, with Python's backtracking ``re``; a pattern with
nested quantifiers (``(a+)+``, ``(.*)*``) or repeated alternatives (``(a|aa)+``) takes
exponential time on a name it does not match, and peft hangs. :func:`check_pattern` refuses those
constructs (and backreferences) outright, and bounds the rest: without them the cost of one match
grows like ``n**k`` for a name of ``n`` characters and ``k`` repeats, so ``k`` is capped at
:data:`MAX_REPEATS` (measured on one core: ``.*.*.*.*X`` fails on all 962 module names of an
80-layer Llama in 0.06 s and on 1,063 names of up to 79 characters in 0.5 s; a fifth repeat takes
0.5 s and 11 s). ``modules_to_save`` and ``layers_pattern``, which peft
pastes into patterns of its own, must be plain module names.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import enum
import json
import math
import re
import types
import typing
from pathlib import Path
from typing import Any

from ..contract.errors import AdapterError

#: Repeats (``*``, ``+``, ``{m,n}``) one module-name pattern may hold, the template peft wraps it
#: in included.
MAX_REPEATS = 4
MAX_PATTERN_CHARS = 4096
_PLAIN_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")
_REFERENCE_CHARS = 4096


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _shown(value: Any) -> str:
    return f"{value!r} ({_kind(value)})"[:200]


# ----------------------------------------------------------------------------- types from peft's dataclass


def _fits(value: Any, tp: Any) -> bool:
    """Whether the JSON value ``value`` can stand for a field declared as ``tp``."""
    if tp is Any or tp is object:
        return True
    if tp is None or tp is type(None):
        return value is None
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if origin is typing.Literal:
        return any(_literal_fits(value, a) for a in args)
    if origin in (list, tuple, set, frozenset, collections.abc.Sequence, collections.abc.Iterable):
        if not isinstance(value, list):
            return False
        item = args[0] if args else Any
        return all(_fits(v, item) for v in value)
    if origin in (dict, collections.abc.Mapping):
        return isinstance(value, dict) and all(_fits(v, args[1]) for v in value.values()) if args else isinstance(value, dict)
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return isinstance(value, str) and (value in tp.__members__ or value in {str(m.value) for m in tp})
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return isinstance(value, dict)  # a nested config peft builds from the dict
    if tp in (dict, list):
        return isinstance(value, tp)
    return True  # a type JSON cannot spell (a forward reference, a torch type): peft's to judge


def _literal_fits(value: Any, literal: Any) -> bool:
    if type(value) is not type(literal):
        return False
    if isinstance(literal, str) and "[" in literal:  # peft writes families as 'pissa_niter_[number of iters]'
        return value.startswith(literal.split("[")[0]) and len(value) > len(literal.split("[")[0])
    return value == literal


def _describe(tp: Any) -> str:
    """A declared type in words: ``Union[list[str], str, None]`` -> ``a list of strings, a string or null``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is None or tp is type(None):
        return "null"
    if origin in (typing.Union, types.UnionType):
        words = list(dict.fromkeys(_describe(a) for a in args))
        return ", ".join(words[:-1]) + " or " + words[-1] if len(words) > 1 else words[0]
    if origin is typing.Literal:
        return "one of " + ", ".join(json.dumps(a) for a in args)
    if origin in (list, tuple, set, frozenset, collections.abc.Sequence, collections.abc.Iterable):
        return f"a list of {_plural(args[0])}" if args else "a list"
    if origin in (dict, collections.abc.Mapping) or tp is dict:
        return f"an object of {_plural(args[1])}" if args else "an object"
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string", list: "a list"}
    if tp in names:
        return names[tp]
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return "one of " + ", ".join(str(m.value) for m in tp)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return f"an object (peft's {tp.__name__})"
    return str(tp).replace("typing.", "")[:120]


def _plural(tp: Any) -> str:
    words = _describe(tp)
    for single, plural in (("an integer", "integers"), ("a number", "numbers"), ("a string", "strings"),
                           ("true or false", "booleans"), ("a list of", "lists of"), ("an object", "objects")):
        if words.startswith(single):
            return plural + words[len(single):]
    return words


def _declared_fields(config_class: type) -> dict[str, Any]:
    try:
        hints = typing.get_type_hints(config_class)
    except Exception:  # noqa: BLE001 - an annotation this Python cannot evaluate: check the others
        hints = {}
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(config_class)}


# ----------------------------------------------------------------------------- module-name patterns


def _pattern_problem(pattern: str, extra_repeats: int) -> str | None:
    """Why ``pattern`` may take more than polynomial time to match, or ``None``."""
    from re import _constants as sre
    from re import _parser as sre_parse

    if len(pattern) > MAX_PATTERN_CHARS:
        return f"it is {len(pattern)} characters long (at most {MAX_PATTERN_CHARS})"
    repeat_ops = {sre.MAX_REPEAT, sre.MIN_REPEAT, getattr(sre, "POSSESSIVE_REPEAT", sre.MAX_REPEAT)}
    repeats = extra_repeats

    def walk(items: Any, inside: bool) -> str | None:
        nonlocal repeats
        for op, av in items:
            if op in repeat_ops:
                low, high, body = av
                unbounded = high > 1
                if unbounded and inside:
                    return "it nests a repeat inside a repeat (like (a+)+ or (.*)*): exponential backtracking"
                repeats += unbounded
                problem = walk(body, inside or unbounded)
            elif op is sre.SUBPATTERN:
                problem = walk(av[3], inside)
            elif op is sre.BRANCH:
                if inside:
                    return "it repeats a group of alternatives (like (a|aa)+): exponential backtracking"
                problem = next((p for p in (walk(b, inside) for b in av[1]) if p), None)
            elif op in (sre.ASSERT, sre.ASSERT_NOT):
                problem = walk(av[1], inside)
            elif op is getattr(sre, "ATOMIC_GROUP", None):
                problem = walk(av, inside)
            elif op in (sre.GROUPREF, sre.GROUPREF_EXISTS, getattr(sre, "GROUPREF_IGNORE", None)):
                return "it uses a backreference, which regular expressions cannot match in bounded time"
            else:
                problem = None
            if problem:
                return problem
        return None

    problem = walk(sre_parse.parse(pattern), False)
    if problem is None and repeats > MAX_REPEATS:
        problem = (f"it has {repeats} repeats (*, +, {{m,n}}){' with the pattern peft wraps it in' if extra_repeats else ''};"
                   f" matching costs grow like (name length)**repeats, so at most {MAX_REPEATS} are accepted")
    return problem


def check_pattern(pattern: str, *, field: str, path: Path, extra_repeats: int = 0) -> None:
    """Refuse a module-name regex that is invalid or may take unbounded time (see the module's
    docstring); ``extra_repeats`` counts the repeats of the pattern peft wraps it in."""
    try:
        re.compile(pattern)
    except (re.error, RecursionError, OverflowError) as exc:
        raise AdapterError(f"adapter_config.json: {field} is not a valid regular expression ({exc}).", file=path,
                           field=field, expected="a Python regular expression matching module names",
                           found=pattern[:200], fix="fix the pattern, or list the module names instead "
                           "(e.g. [\"q_proj\", \"v_proj\"])") from None
    problem = _pattern_problem(pattern, extra_repeats)
    if problem:
        raise AdapterError(f"adapter_config.json: {field} is a regular expression that may take unbounded time to "
                           f"match: {problem}.", file=path, field=field,
                           expected=f"a pattern without nested repeats, repeated alternatives or backreferences, "
                                    f"with at most {MAX_REPEATS} repeats", found=pattern[:200],
                           fix="list the module names instead (e.g. [\"q_proj\", \"v_proj\"]), or simplify the "
                               "pattern (e.g. .*\\.(q_proj|v_proj))")


# ----------------------------------------------------------------------------- the whole file


def check_adapter_config(config: dict[str, Any], path: Path) -> None:
    """Refuse an adapter config whose values peft would crash on, silently misuse, or hang on.

    Raises :class:`~loadstone.AdapterError` naming ``path`` and the field.
    """
    from peft import PeftType
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    def refuse(field: str, expected: str, value: Any, fix: str, message: str | None = None) -> AdapterError:
        return AdapterError(message or f"adapter_config.json: {field} must be {expected}.", file=path, field=field,
                            expected=expected, found=_shown(value), fix=fix)

    peft_type = config.get("peft_type")
    known = {t.value for t in PeftType}
    if not isinstance(peft_type, str) or peft_type not in known:
        raise refuse("peft_type", ", ".join(sorted(known)), peft_type,
                     "upgrade peft if the adapter was made with a newer version, or fix the file",
                     message="adapter_config.json names an unknown peft_type.")
    for field in ("base_model_name_or_path", "revision"):
        value = config.get(field)
        if value is not None and not (isinstance(value, str) and len(value) <= _REFERENCE_CHARS):
            what = "a folder or Hub id" if field == "base_model_name_or_path" else "a branch, tag or commit"
            raise refuse(field, f"{what} (text of at most {_REFERENCE_CHARS} characters)", value,
                         "write the base model's folder or Hub id as text, or pass base=PATH (CLI: --base)"
                         if field == "base_model_name_or_path" else "write the base model's revision as text, e.g. \"main\"")
    config_class = PEFT_TYPE_TO_CONFIG_MAPPING.get(peft_type)
    declared = _declared_fields(config_class) if config_class is not None else {}
    for field, tp in declared.items():
        if field in config and not _fits(config[field], tp) and not _numeric_alpha(field, config[field]):
            raise refuse(field, _describe(tp), config[field],
                         f"write {field} as peft's {config_class.__name__} declares it, or re-save the adapter with "
                         f"peft's save_pretrained")
    _check_values(config, path, refuse)
    _check_patterns(config, path, refuse)


def _numeric_alpha(field: str, value: Any) -> bool:
    """``lora_alpha`` is declared ``int``; peft divides it by the rank, and 16.0 is as good as 16."""
    return field in ("lora_alpha", "alpha") and isinstance(value, float)


def _check_values(config: dict[str, Any], path: Path, refuse: Any) -> None:
    from peft import TaskType

    task_type = config.get("task_type")
    if task_type is not None and task_type not in {t.value for t in TaskType}:
        raise refuse("task_type", "null or one of " + ", ".join(sorted(t.value for t in TaskType)), task_type,
                     "write the task_type the adapter was trained for (CAUSAL_LM for a language model)")
    rank = config.get("r")
    if "r" in config and not (isinstance(rank, int) and not isinstance(rank, bool) and rank >= 1):
        raise refuse("r", "a positive integer (the LoRA rank)", rank, "write the rank the adapter was trained with")
    for field in ("lora_alpha", "alpha"):
        value = config.get(field)
        if field in config and value is not None and not (
                isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0):
            raise refuse(field, "a positive number (the scale of the adapter's update)", value,
                         "write the lora_alpha the adapter was trained with")
    for field, value in config.items():
        if field.endswith("dropout") and value is not None and isinstance(value, (int, float)) \
                and not isinstance(value, bool) and not 0 <= value < 1:
            raise refuse(field, "a probability in [0, 1)", value, "write a dropout rate such as 0.05 (or 0)")
    for field, positive_int in (("rank_pattern", True), ("alpha_pattern", False)):
        pattern = config.get(field) or {}
        if not isinstance(pattern, dict):
            raise refuse(field, "an object mapping module-name patterns to numbers", pattern,
                         f"write {field} like {{\"q_proj\": 8}}, or drop it")
        for key, value in pattern.items():
            ok = (isinstance(value, int) and not isinstance(value, bool) and value >= 1) if positive_int else (
                isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0)
            if not ok:
                raise refuse(f"{field}[{key!r}]", "a positive integer" if positive_int else "a positive number",
                             value, f"write the value the adapter was trained with")
    if config.get("megatron_config") is not None:
        raise refuse("megatron_config", "null (loadstone loads transformers models)", config.get("megatron_config"),
                     "drop megatron_config: it makes peft import the module named by megatron_core, which loadstone "
                     "never does for a file it reads",
                     message="adapter_config.json asks for Megatron layers (megatron_config).")


def _check_patterns(config: dict[str, Any], path: Path, refuse: Any) -> None:
    for field in ("target_modules", "exclude_modules"):
        value = config.get(field)
        if isinstance(value, str):
            check_pattern(value, field=field, path=path)
    for field in ("rank_pattern", "alpha_pattern"):
        for key in config.get(field) or {}:
            # peft matches each key as (.*\.)?(KEY)$: one repeat of its own
            check_pattern(key, field=f"{field} key {key!r}"[:120], path=path, extra_repeats=1)
    for field in ("modules_to_save", "layers_pattern"):
        value = config.get(field)
        names = [value] if isinstance(value, str) else (value or [])
        for name in names:
            if not (isinstance(name, str) and _PLAIN_NAME.match(name)):
                raise refuse(field, "module names (letters, digits, '_', '-', '.')", name,
                             f"list plain module names in {field}, e.g. [\"lm_head\"]")
