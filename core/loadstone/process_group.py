"""Keeps loadstone's deferred imports from pinning the default process group.

``torch.distributed.nn.functional`` evaluates ``group=group.WORLD`` once, when it is first
imported, and stores the result as the default argument of ten functions. loadstone imports
transformers inside the first load, which in a distributed program comes after
``init_process_group``; transformers imports FSDP, FSDP imports that module, and from then on
those defaults hold the default group, so ``destroy_process_group()`` no longer frees it. The
group then dies during interpreter shutdown instead, where a gloo worker thread that drops its
last work item must take the GIL, is ended by the interpreter in the middle of a C++ destructor,
and aborts the process ("terminate called without an active exception", SIGABRT), after the
program's work is done and at random. A program that imports transformers at the top, before
``init_process_group``, never sees this: the defaults are then ``None``.

Every function in that module passes ``group`` straight to ``torch.distributed``, where ``None``
means the default group, so putting ``None`` back restores exactly what an early import gives
(and a later ``init_process_group`` is then used too, instead of a destroyed group).
"""

from __future__ import annotations

import sys

FUNCTIONAL = "torch.distributed.nn.functional"


def unpin_default_group() -> list[str]:
    """Give the default arguments that captured a process group back their import-time ``None``.

    Returns the names of the functions changed (none when the module was imported before any
    process group existed, or not at all).
    """
    module = sys.modules.get(FUNCTIONAL)
    if module is None:
        return []
    from torch.distributed import ProcessGroup

    changed = []
    for name, value in vars(module).items():
        defaults = getattr(value, "__defaults__", None)
        if getattr(value, "__module__", None) != FUNCTIONAL or not defaults:
            continue
        if any(isinstance(d, ProcessGroup) for d in defaults):
            value.__defaults__ = tuple(None if isinstance(d, ProcessGroup) else d for d in defaults)
            changed.append(name)
    return changed
