"""The offload folder is checked at plan time: never inside what the load reads.

Disk offload writes weight files; inside the checkpoint folder they would sit next to the
weights (a later ``glob("*.safetensors")``, an upload or a copy of the folder would take them
along), inside an adapter folder likewise. So the offload folder may not be, or lie inside, the
checkpoint folder, the folders its weight files really live in (a Hugging Face cache snapshot
links into the repo's ``blobs``; the whole ``models--org--name`` folder counts), or an adapter
folder. Links are followed before comparing.
"""

from __future__ import annotations

import os
from pathlib import Path

from ...contract.checkpoint import CheckpointInventory
from ...contract.errors import PlacementError
from ...contract.request import LoadRequest
from ...contract.sources import Sources


def _real(path: str | os.PathLike) -> Path:
    return Path(os.path.realpath(os.path.abspath(os.fspath(path))))


def _hub_repo(folder: Path) -> Path | None:
    """``.../models--org--name`` when ``folder`` is a snapshot of a Hugging Face cache, else ``None``."""
    if folder.parent.name == "snapshots" and folder.parent.parent.name.startswith(("models--", "datasets--")):
        return folder.parent.parent
    return None


def protected_folders(sources: Sources, inventory: CheckpointInventory) -> list[tuple[Path, str]]:
    """Every folder the load reads from, with what it is (for the message)."""
    base = _real(sources.base.path)
    folders = [(base, "the checkpoint folder")]
    repo = _hub_repo(base)
    if repo is not None:
        folders.append((repo, "the checkpoint's Hugging Face cache folder"))
    for weights in inventory.files:
        parent = _real(weights).parent
        if parent != base:
            folders.append((parent, f"the folder holding the checkpoint file {Path(weights).name}"))
    for adapter in sources.adapters:
        folders.append((_real(adapter.source.path), f"the folder of adapter {adapter.name!r}"))
    return folders


def check_offload_folder(request: LoadRequest, sources: Sources, inventory: CheckpointInventory) -> None:
    """Raise :class:`~loadstone.PlacementError` when ``request.offload_folder`` is not a usable
    folder of its own (see the module docstring)."""
    if not request.offload_folder:
        return
    given = request.offload_folder
    offload = _real(given)
    existing = next(p for p in (offload, *offload.parents) if p.exists())  # "/" exists
    if not existing.is_dir():
        where = "is a file" if existing == offload else f"lies below the file {existing}"
        raise PlacementError(f"the offload folder {given} {where}, not in a folder.", file=existing,
                             field="offload_folder", expected="a folder (it is created if missing)",
                             found="a file", fix="pass another offload_folder (CLI: --offload-folder)")
    for folder, what in protected_folders(sources, inventory):
        if offload == folder or offload.is_relative_to(folder):
            where = "is" if offload == folder else "lies inside"
            raise PlacementError(
                f"the offload folder {given} {where} {what} ({folder}): offloaded weights would be written "
                f"among the files this load reads.", file=offload, field="offload_folder",
                expected=f"a folder outside {folder}", found=str(offload),
                fix="pass an offload folder of its own, outside the checkpoint and adapter folders "
                    "(CLI: --offload-folder), e.g. a fresh folder next to the checkpoint")
