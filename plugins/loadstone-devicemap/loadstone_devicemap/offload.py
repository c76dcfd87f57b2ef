"""Disk offload: how much a load will write into the offload folder, checked against the free
space there before any weight is read (``loadstone_after_plan``).

What is written depends on the engine. transformers (the engine that offloads to disk) reads an
offloaded tensor straight from the checkpoint's safetensors file when it is stored there as the
model holds it, and re-saves only tensors it assembles while loading (fused MoE experts) or
that come from a pickle checkpoint, one ``NAME.safetensors`` file each. Any other engine is
assumed to write every offloaded tensor. The check is a forecast: a disk that fills up during
the load anyway ends the load with a :class:`~loadstone.PlacementError`, and the kernel removes
what the load wrote.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Callable

from loadstone import PlacementError, map_entry

from .units import size

_HEADER = 256  # a one-tensor safetensors header: 8 length bytes + JSON with the name, dtype, shape


def free_bytes(folder: str | os.PathLike) -> int:
    """Bytes an unprivileged writer may still use on the filesystem that holds (or would hold) ``folder``."""
    path = Path(folder).expanduser().absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def blocksize(folder: str | os.PathLike) -> int:
    path = Path(folder).expanduser().absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return os.statvfs(path).f_frsize or 4096
    except (AttributeError, OSError):  # not POSIX
        return 4096


#: The probe the check asks; tests and embedders replace it (``set_free_space_probe``).
_probe: Callable[[str], int] = free_bytes


def set_free_space_probe(probe: Callable[[str], int] | None) -> Callable[[str], int]:
    """Replace the function that says how many bytes are free for an offload folder (``None``
    restores :func:`free_bytes`); returns the previous one. For quota systems statvfs does not
    see, and for tests."""
    global _probe
    previous, _probe = _probe, probe or free_bytes
    return previous


def offloaded_writes(plan: Any) -> dict[str, int]:
    """Model tensor name -> bytes the load writes into the offload folder."""
    import torch

    device_map = plan.device_map
    skeleton = plan.build_skeleton()
    params = dict(skeleton.named_parameters())

    def on_disk(name: str) -> bool:
        key = map_entry(name, device_map)
        return key is not None and str(device_map[key]) == "disk"

    tensor_map = plan.tensor_map
    engine = plan.engine.name if plan.engine is not None else None
    if engine == "transformers" and tensor_map is not None and plan.inventory.format == "safetensors":
        names = [t for group in tensor_map.groups if group.converter is not None for t in group.targets]
    else:
        names = list(params)
    out = {}
    for name in names:
        if name in params and on_disk(name):
            dtype = tensor_map.dtypes.get(name) if tensor_map is not None else None
            element = getattr(torch, dtype).itemsize if dtype else plan.torch_dtype.itemsize
            out[name] = params[name].numel() * element
    return out


def check_offload_space(plan: Any) -> None:
    """Refuse a load whose offloaded tensors would not fit the offload folder's filesystem; for a
    plan, mark it as not fitting and say why. Either way the report's notes say what is written."""
    folder = plan.request.offload_folder
    if not folder or "disk" not in {str(d) for d in plan.device_map.values()}:
        return
    writes = offloaded_writes(plan)
    block = blocksize(folder)
    need = sum(-(-(nbytes + _HEADER) // block) * block for nbytes in writes.values())
    free = int(_probe(str(folder)))
    # free space is a measurement of the moment, so it stays out of the plan (a load's plan equals it)
    plan.report.placement["offload"] = {"folder": str(folder), "files": len(writes), "write_bytes": need}
    if not writes:
        plan.report.notes.append(f"disk offload writes nothing into {folder}: the offloaded tensors are read from the "
                                 f"checkpoint's own safetensors files")
        return
    plan.report.notes.append(f"disk offload writes {size(need)} ({len(writes)} files) into {folder}; "
                             f"{size(free)} free there")
    if need <= free:
        return
    message = (f"disk offload would write {size(need)} ({len(writes)} tensors) into {folder}, but only {size(free)} "
               f"is free there")
    fix = ("free space there, pass another offload_folder on a larger disk (CLI: --offload-folder), or raise "
           "max_memory['cpu'] so that fewer tensors go to disk")
    if plan.report.kind == "plan":
        plan.fits = False
        plan.advice.append(f"{message}: {fix}")
        plan.report.fit = {"fits": False, "advice": list(plan.advice)}
        return
    raise PlacementError(message + "; nothing was written.", file=folder, field="offload_folder",
                         expected=f"at least {size(need)} free", found=f"{size(free)} free", fix=fix)

