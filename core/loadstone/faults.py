"""What a failed or interrupted load leaves behind: nothing.

Two leaks survive a plain ``except`` block:

* the exception's traceback keeps the frames of every function it passed through, and their
  locals (the half-loaded model inside ``from_pretrained``, the model argument of a plugin hook)
  stay alive for as long as the caller holds the exception; a caller that catches an
  out-of-memory error to retry with 4-bit quantization would run out of memory again;
* disk offload writes weight files into the offload folder while loading, and an interrupted
  load would leave them there.
"""

from __future__ import annotations

import contextlib
import gc
import os
import shutil
import sys
import threading
import traceback
from pathlib import Path
from typing import Iterator

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


def _listing(folder: Path) -> set[Path]:
    return {Path(root) / name for root, dirs, files in os.walk(folder) for name in files + dirs}


@contextlib.contextmanager
def offload_guard(folder: str | os.PathLike | None) -> Iterator[None]:
    """On failure, remove what the load wrote into ``folder`` (and ``folder`` itself if the load
    created it); files that were there before are never touched."""
    if folder is None:
        yield
        return
    root = Path(folder)
    existed = root.exists()
    before = _listing(root) if existed else set()
    try:
        yield
    except BaseException:
        if not existed:
            shutil.rmtree(root, ignore_errors=True)
        elif root.is_dir():
            for path in sorted(_listing(root) - before, key=lambda p: len(p.parts), reverse=True):
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
        raise
