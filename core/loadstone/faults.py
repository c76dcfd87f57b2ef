"""What a failed or interrupted load leaves behind: nothing, and nothing of anyone else's is lost.

Three leaks survive a plain ``except`` block:

* the exception's traceback keeps the frames of every function it passed through, and their
  locals (the half-loaded model inside ``from_pretrained``, the model argument of a plugin hook)
  stay alive for as long as the caller holds the exception; a caller that catches an
  out-of-memory error to retry with 4-bit quantization would run out of memory again;
* disk offload writes weight files while loading, and a failed or interrupted load would leave
  them behind. Each load therefore writes into a folder of its own inside ``offload_folder``
  (:func:`offload_workspace`), and removes that folder, and nothing else, when it fails: the
  offload folder may be shared (``/tmp``, another load offloading there at the same time);
* a full disk during offload surfaces from safetensors as an untyped error
  (:func:`offload_disk_full` makes it a :class:`~loadstone.PlacementError`).

Signals that end the process (SIGTERM from SLURM, docker or ``timeout``) are turned into the
same unwinding by :mod:`loadstone.termination`.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import os
import shutil
import sys
import tempfile
import threading
import traceback
import weakref
from pathlib import Path
from typing import Any, Iterator

from .contract.errors import PlacementError

# transformers 5 builds models under process-wide patches: ``from_pretrained`` replaces
# ``PreTrainedModel.tie_weights`` and torch's init functions with no-ops and restores them
# afterwards, and ``from_config``/``from_pretrained`` call ``torch.set_default_dtype``. Two
# threads doing this at once leave each other's patches in place (seen here: every later GPT-2
# load came back with untied embeddings). Model construction in this process therefore takes
# this lock; concurrent loads still succeed, their construction steps take turns.
TRANSFORMERS_GLOBAL_STATE = threading.RLock()


def release_failed_load(exc: BaseException, *, allocated: bool = True) -> None:
    """Drop what the failed load allocated: locals of finished frames, then cached device memory.

    The line numbers and code of every frame stay in the traceback (``--debug`` still shows
    them); only the frames' local variables are cleared. ``allocated=False`` (the load failed
    before reading weights) skips the full garbage collection, which costs tenths of a second in
    a process holding torch and transformers.
    """
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        # clear_frames skips frames still running (the caller's own), which is what we want.
        traceback.clear_frames(exc.__traceback__)
        exc = exc.__cause__ or exc.__context__
    if not allocated:
        return
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


WORKSPACE_PREFIX = "loadstone-offload-"

# Every offload workspace this process still owns: a load in progress, or a loaded model's. The
# termination handler removes them all before the process ends (see loadstone.termination). A
# forked child inherits this table; the owner's pid keeps it off its parent's folders.
_LIVE: dict[Path, tuple[int, tuple[Path, ...]]] = {}  # workspace -> (owner pid, folders created above it)
_LIVE_LOCK = threading.Lock()


def _remove_workspace(path: Path, owner_pid: int, created: tuple[Path, ...] = ()) -> None:
    """Remove ``path``, then the folders in ``created`` (outermost first in the tuple) left empty."""
    # A forked child inherits the finalizers of its parent's models; the files are the parent's.
    if os.getpid() != owner_pid:
        return
    shutil.rmtree(path, ignore_errors=True)
    with _LIVE_LOCK:
        _LIVE.pop(path, None)
    for made in reversed(created):  # deepest first; a folder another load still uses stays
        with contextlib.suppress(OSError):
            made.rmdir()


def remove_every_workspace() -> None:
    """Remove every offload workspace this process created (it is about to end)."""
    with _LIVE_LOCK:
        live = list(_LIVE.items())
    for path, (owner, created) in live:
        _remove_workspace(path, owner, created)


class OffloadWorkspace:
    """The folder one load writes its offloaded weights into: ``<offload_folder>/loadstone-offload-<pid>-<random>``.

    Created with mode 0700 (offloaded weights in a shared folder are readable by their owner
    only). :meth:`remove` deletes it, and the folders the load created above it if they are
    empty; :meth:`keep_for` keeps it while a loaded model needs it and removes it when that model
    is garbage-collected or the process exits normally.
    """

    def __init__(self, root: Path, path: Path, created: list[Path]):
        self.root, self.path, self._created = root, path, tuple(created)
        self._owner = os.getpid()

    @classmethod
    def create(cls, folder: str | os.PathLike) -> "OffloadWorkspace":
        root = Path(os.path.abspath(os.fspath(folder)))  # the offload index stores these paths; cwd may change
        created: list[Path] = []
        try:
            for parent in reversed([root, *root.parents]):
                if parent.is_dir():
                    continue
                try:
                    parent.mkdir()
                    created.append(parent)  # ours to remove if it stays empty
                except FileExistsError:  # another load made it meanwhile, or it is not a folder
                    if not parent.is_dir():
                        raise
            path = Path(tempfile.mkdtemp(prefix=f"{WORKSPACE_PREFIX}{os.getpid()}-", dir=root))
        except OSError as exc:
            for made in reversed(created):
                with contextlib.suppress(OSError):
                    made.rmdir()
            raise PlacementError(
                f"the offload folder {root} cannot be used: {exc.strerror or exc}.", file=exc.filename or root,
                field="offload_folder", expected="a folder this process can create and write to",
                found=type(exc).__name__, fix="pass another offload_folder (CLI: --offload-folder), on a disk with "
                "room for the offloaded weights") from None
        with _LIVE_LOCK:
            _LIVE[path] = (os.getpid(), tuple(created))
        return cls(root, path, created)

    def remove(self) -> None:
        _remove_workspace(self.path, self._owner, self._created)

    def keep_for(self, model: Any) -> bool:
        """Keep the files while ``model`` lives (``True``); an empty workspace (nothing was
        re-saved: the offloaded weights are read from the checkpoint itself) is removed at once
        (``False``). A failure after this call still removes the workspace."""
        if not any(self.path.iterdir()):
            self.remove()
            return False
        weakref.finalize(model, _remove_workspace, self.path, self._owner, self._created)
        return True


@contextlib.contextmanager
def offload_workspace(folder: str | os.PathLike | None, needed: bool) -> Iterator[OffloadWorkspace | None]:
    """This load's own offload folder (``None`` when the plan puts nothing on disk); removed,
    with whatever the load wrote into it, if the block fails or is interrupted."""
    if folder is None or not needed:
        yield None
        return
    workspace = OffloadWorkspace.create(folder)
    try:
        yield workspace
    except BaseException:
        workspace.remove()
        raise


# no room: a full disk, a quota, a file size limit (EFBIG)
_FULL = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC), errno.EFBIG)


def _is_disk_full(exc: BaseException) -> bool:
    if isinstance(exc, OSError) and exc.errno in _FULL:
        return True
    # safetensors (Rust) reports I/O errors as text: "I/O error: No space left on device (os error 28)"
    return type(exc).__name__ == "SafetensorError" and any(f"(os error {code})" in str(exc) for code in _FULL)


def offload_disk_full(exc: BaseException, workspace: OffloadWorkspace | None,
                      needed: int | None = None) -> PlacementError | None:
    """The typed error for an offload that ran out of disk space (or quota); ``None`` when ``exc``
    (or an exception it was raised from) is not that."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen and not _is_disk_full(cause):
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    if cause is None or id(cause) in seen or workspace is None:
        return None
    try:
        free = f"{shutil.disk_usage(workspace.root).free} bytes free"
    except OSError:
        free = "unknown free space"
    return PlacementError(
        f"writing offloaded weights into {workspace.root} failed: {cause} (the disk filled up, or a quota or "
        f"file size limit was reached). The files this load wrote there were removed.", file=workspace.root, field="offload_folder",
        expected=f"room for the {needed} bytes placed on 'disk'" if needed else "room for the weights placed on 'disk'",
        found=free,
        fix="free space there, pass an offload_folder on a bigger disk (CLI: --offload-folder), or give the CPU "
            "more memory (max_memory) so less goes to disk")
