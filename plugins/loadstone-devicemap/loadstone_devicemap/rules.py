"""Rules of a device-map file: which names a rule covers, and what device it names.

A rule's key is one of:

* an exact module or tensor name (``model.embed_tokens``, ``lm_head``; ``""`` is the whole model);
* a glob: ``*`` is any run of characters (dots included), ``?`` one character, and brackets hold
  integers: ``[0-15]`` is 0 to 15, ``[0,2,4]`` a list, ``[0-3,8]`` both (``model.layers.[0-15].*``);
* a regular expression after ``re:`` (``re:model\\.layers\\.(1[6-9]|2\\d)``), matched in full.

A rule covers a tensor when its key matches the tensor's full name or the name of a module the
tensor belongs to, so ``model.layers.[0-15]`` and ``model.layers.[0-15].*`` both cover every
tensor of layers 0 to 15.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from loadstone import PlacementError

_DEVICE = re.compile(r"^(cpu|disk|mps|cuda(:\d+)?|(xpu|npu|hpu|mlu)(:\d+)?)$")
_RANGE = re.compile(r"^\s*(\d+)\s*(?:-\s*(\d+))?\s*$")
DEVICE_HELP = "cpu, disk, cuda:N (or just N), mps, xpu:N"


@dataclass(frozen=True)
class Rule:
    """One entry of a device-map file.

    :ivar key: the key as written.
    :ivar device: the device, normalised: a CUDA index (``0``) or a name (``"cpu"``, ``"disk"``).
    :ivar kind: ``"exact"``, ``"glob"`` or ``"regex"``.
    :ivar where: where it was written (``"map.yaml line 4"``), for error messages.
    """

    key: str
    device: Any
    kind: str
    pattern: re.Pattern | None
    where: str

    def matches_name(self, name: str) -> bool:
        """Whether the key matches ``name`` itself (a module or tensor name)."""
        if self.kind == "exact":
            return self.key == name
        assert self.pattern is not None
        return self.pattern.fullmatch(name) is not None

    def covers(self, tensor: str) -> bool:
        """Whether the rule places ``tensor``: its key matches the name or a module prefix of it."""
        if self.kind == "exact":
            return self.key == "" or tensor == self.key or tensor.startswith(self.key + ".")
        parts = tensor.split(".")
        return any(self.matches_name(".".join(parts[:i])) for i in range(1, len(parts) + 1))

    def __str__(self) -> str:
        return f"{self.key!r} -> {device_label(self.device)} ({self.where})"


def device_label(device: Any) -> str:
    return f"cuda:{device}" if isinstance(device, int) else str(device)


def parse_device(value: Any, *, key: str, where: str, file: Any) -> Any:
    """``"cuda:1"``/``1``/``"1"`` -> ``1``; ``"cuda"`` -> ``0``; ``"cpu"``, ``"disk"``, ``"mps"``,
    ``"xpu:0"`` stay names. Anything else (``true``, ``"gpu0"``) is a :class:`PlacementError`."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise _bad_device(value, key, where, file)
    if isinstance(value, int):
        if value < 0:
            raise _bad_device(value, key, where, file)
        return value
    text = value.strip().lower()
    if text.isdigit():
        return int(text)
    if not _DEVICE.match(text):
        raise _bad_device(value, key, where, file)
    if text == "cuda":
        return 0
    if text.startswith("cuda:"):
        return int(text[5:])
    return text


def _bad_device(value: Any, key: str, where: str, file: Any) -> PlacementError:
    return PlacementError(f"the device map gives {key!r} the device {value!r}, which is not a device.",
                          file=file, field=f"{where}: {key!r}", expected=DEVICE_HELP, found=repr(value),
                          fix=f"write it like {key}: cuda:0 (or cpu, disk)")


def _integers(text: str, key: str, where: str, file: Any) -> list[int]:
    values: list[int] = []
    for part in text.split(","):
        match = _RANGE.match(part)
        if match is None:
            raise PlacementError(
                f"the device-map key {key!r} has brackets that do not hold integers: [{text}].", file=file,
                field=where, expected="integers in brackets: [0-15], [0,2,4], [0-3,8]", found=f"[{text}]",
                fix="write layer ranges like model.layers.[0-15].*, or use a regular expression after re:")
        low, high = int(match.group(1)), int(match.group(2) or match.group(1))
        if high < low:
            raise PlacementError(f"the range [{text}] in device-map key {key!r} runs backwards.", file=file,
                                 field=where, expected="[LOW-HIGH] with LOW <= HIGH", found=f"[{text}]",
                                 fix=f"write [{high}-{low}]")
        values.extend(range(low, high + 1))
    return values


def glob_to_regex(key: str, *, where: str = "", file: Any = None) -> str:
    """Translate a glob key (``*``, ``?``, integer brackets) into a regular expression."""
    out, i = [], 0
    while i < len(key):
        char = key[i]
        if char == "*":
            out.append(".*")
        elif char == "?":
            out.append(".")
        elif char == "[":
            end = key.find("]", i)
            if end < 0:
                raise PlacementError(f"the device-map key {key!r} opens a bracket it does not close.", file=file,
                                     field=where, expected="[0-15]", found=key, fix="close the bracket")
            numbers = sorted(set(_integers(key[i + 1:end], key, where, file)))
            out.append("(?:" + "|".join(str(n) for n in numbers) + ")")
            i = end
        else:
            out.append(re.escape(char))
        i += 1
    return "".join(out)


def parse_rule(key: Any, device: Any, *, where: str, file: Any = None) -> Rule:
    if not isinstance(key, str):
        raise PlacementError(f"the device map has a key that is not a name: {key!r}.", file=file, field=where,
                             expected="a module name, a glob or re:REGEX", found=repr(key),
                             fix="quote the key: \"model.layers.[0-15].*\": cuda:0")
    parsed = parse_device(device, key=key, where=where, file=file)
    if key.startswith("re:"):
        try:
            pattern = re.compile(key[3:])
        except re.error as exc:
            raise PlacementError(f"the device-map key {key!r} is not a valid regular expression: {exc}.",
                                 file=file, field=where, expected="a Python regular expression after re:",
                                 found=key, fix="escape dots as \\. and check the parentheses") from None
        return Rule(key, parsed, "regex", pattern, where)
    if any(c in key for c in "*?["):
        return Rule(key, parsed, "glob", re.compile(glob_to_regex(key, where=where, file=file)), where)
    return Rule(key, parsed, "exact", None, where)
