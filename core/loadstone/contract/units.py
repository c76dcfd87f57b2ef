"""Byte sizes and device names as users write them ("20GiB", "cuda:0")."""

from __future__ import annotations

import re
from typing import Any, Mapping

from .errors import OptionError

_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_DEVICE_RE = re.compile(r"^(cpu|meta|mps|cuda|xpu|npu|hpu|mlu)(:\d+)?$")
_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*$")


def parse_size(value: Any, *, field: str = "size") -> int:
    """``"20GiB"`` -> 21474836480; ints pass through. Decimal (GB) and binary (GiB) units."""
    if isinstance(value, bool):
        raise OptionError(f"{field} must be a size, not a boolean.", field=field, found=value,
                          fix='write it like "20GiB", "512MB" or a number of bytes')
    if isinstance(value, (int, float)):
        if value != value or value in (float("inf"), float("-inf")):
            raise OptionError(f"{field} must be a finite size.", field=field, found=value,
                              fix='write it like "20GiB", "512MB" or a number of bytes')
        if value < 0:
            raise OptionError(f"{field} must not be negative.", field=field, found=value)
        return int(value)
    match = _SIZE_RE.match(str(value))
    unit = match.group(2).lower() if match else None
    if not match or unit not in _UNITS:
        raise OptionError(f"cannot read {value!r} as a memory size.", field=field, found=value,
                          expected='a number with an optional unit: B, KB, MB, GB, TB, KiB, MiB, GiB, TiB',
                          fix='write it like "20GiB", "512MB" or a number of bytes')
    return int(float(match.group(1)) * _UNITS[unit])


def shown(value: Any, limit: int = 120) -> str:
    """A value as an error's ``found`` shows it: its repr and its type (``'5' (str)`` against
    ``5 (int)``), cut to ``limit`` characters."""
    return f"{value!r} ({type(value).__name__})"[:limit]


def format_size(n: float | int | None) -> str:
    if n is None:
        return "-"
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"  # pragma: no cover


def normalize_device(device: Any) -> str | int:
    """Keys of ``max_memory`` / values of device maps as accelerate wants them.

    ``"cuda:1"``/``"1"``/``1`` -> ``1``; ``"cpu:0"`` -> ``"cpu"``; ``"cpu"``, ``"disk"``, ``"mps"``,
    ``"xpu:0"`` stay strings.
    """
    if isinstance(device, int):
        return device
    text = str(device).strip()
    if text.isdigit():
        return int(text)
    if text.startswith("cuda:") and text[5:].isdigit():
        return int(text[5:])
    if text == "cuda":
        return 0
    if text.startswith("cpu:") and text[4:].isdigit():
        return "cpu"  # torch's cpu:N is the one CPU, and tensors there report plain "cpu"
    return text


def map_device(value: Any, *, field: str) -> str | int:
    """A device-map value, normalised (:func:`normalize_device`), or an :class:`OptionError` when it
    names no device a model can be placed on: a GPU index (``0``, ``"cuda:1"``), ``"cpu"``,
    ``"disk"`` or another accelerator (``"mps"``, ``"xpu:0"``)."""
    if isinstance(value, bool) or not isinstance(value, (int, str)) or (isinstance(value, int) and value < 0):
        raise OptionError(f"{field} is not a device.", field=field, found=shown(value),
                          expected="a GPU index (0, 1 ...) or a device name: cpu, disk, cuda:N, mps, xpu:N",
                          fix='write the map like {"model.embed_tokens": 0, "model.layers": "cpu", "lm_head": "disk"}')
    device = normalize_device(value)
    if isinstance(device, str) and device != "disk" and (not is_device_spec(device) or device == "meta"):
        raise OptionError(f"{field} names {value!r}, which is not a device a model can be placed on.", field=field,
                          found=repr(value)[:120], expected="a GPU index (0, 1 ...) or cpu, disk, cuda:N, mps, xpu:N",
                          fix='write the map like {"model.embed_tokens": 0, "model.layers": "cpu", "lm_head": "disk"}')
    return device


def is_device_spec(spec: str) -> bool:
    """``cuda:1``, ``mps``, ``cpu`` ... (used by the built-in single-device strategy)."""
    return bool(_DEVICE_RE.match(spec))


def device_label(device: Any) -> str:
    """Inverse of :func:`normalize_device` for display: ``0`` -> ``"cuda:0"``."""
    return f"cuda:{device}" if isinstance(device, int) else str(device)


def parse_max_memory(value: Mapping[Any, Any] | None) -> dict[str | int, int] | None:
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise OptionError("max_memory must map devices to sizes.", field="max_memory", found=value,
                          fix='pass e.g. {"cuda:0": "20GiB", "cpu": "64GiB"}')
    return {_memory_device(k): parse_size(v, field=f"max_memory[{k}]") for k, v in value.items()}


def _memory_device(key: Any) -> str | int:
    """A ``max_memory`` key, refused here when accelerate would not take it (``gpu7``, ``-1``,
    ``True``, ``meta``, ``xpu:0``), rather than deep inside accelerate's placement code: it takes
    a GPU's index, ``cpu``, ``mps`` and ``disk``."""
    device = None if isinstance(key, bool) or (isinstance(key, int) and key < 0) else normalize_device(key)
    if isinstance(device, int) or device in ("cpu", "mps", "disk"):
        return device
    named = isinstance(device, str) and is_device_spec(device) and device != "meta"
    raise OptionError(f"max_memory names {key!r}, which is not a device it can budget"
                      + (" (accelerate reads an accelerator's budget by its index)." if named else "."),
                      field="max_memory", found=shown(key),
                      expected="cpu, disk, mps, cuda:N or just N (a GPU's index, N >= 0)",
                      fix='write it like {"cuda:0": "20GiB", "cpu": "64GiB"} (CLI: --max-memory cuda:0=20GiB)')
