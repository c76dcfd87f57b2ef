"""The native engine's options: what each means (``loadstone plugins`` prints it) and their
validation. Defaults that depend on the plan (the reader, ``in_flight``, ``io``) are settled later,
in :meth:`NativeEngine.extra_bytes <loadstone.engines.native.NativeEngine.extra_bytes>`, the CPU's
reader by :func:`auto_cpu_reader`."""

from __future__ import annotations

from typing import Any

from ..contract.errors import OptionError
from ..contract.units import parse_size
from .instant import INSTANT_BUFFER, checkpoint_files
from .page_cache import is_cold

READERS = ("auto", "pread", "instanttensor", "mmap")
UNLEASED = ("map", "read")
IO_MODES = ("auto", "buffered", "direct")

OPTION_HELP = {
    "readers": "pread reader threads (default: one per core, at least 4 and at most 8); with "
               "reader=instanttensor, its reads in flight (its io_depth)",
    "chunk_bytes": "bytes per read (defaults: 8MiB for pread and for instanttensor's direct reads, 4MiB for its "
                   "buffered ones); each pread reader holds two pinned buffers of this size when loading onto a GPU; "
                   "instanttensor holds one host buffer per read in flight",
    "reader": "auto (default: instanttensor where it is installed, the load goes to one CUDA device and its "
              "ring buffer (1 GiB, or the largest tensor where bigger) fits the budget; mmap for tensors kept on "
              "the CPU where the page cache holds the checkpoint, with unleased=read; else pread), pread (copies "
              "every tensor into memory of its own), instanttensor, or mmap (tensors kept on the CPU as stored become "
              "copy-on-write views of the files, no copy, each file under a read lease that keeps them intact when "
              "the file is rewritten; docs/user-guide.md, memory-mapped CPU loads)",
    "unleased": "what reader=mmap does with a file it cannot lease (another user's, open for writing elsewhere, "
                "a file system without leases): map (the default with reader=mmap: mapped unprotected, as "
                "from_pretrained does) or read (the default where reader=auto chose mmap: copied with pread)",
    "read_ahead": "auto (default: when the placement names one CUDA device and the checkpoint is in the "
                  "page cache, instanttensor starts reading before the plan, into a GPU ring as big as fits "
                  "beside the model, up to 16 GiB; not for a quantizing load), off, or the ring's size, "
                  "e.g. 4GiB (read ahead even then, where it fits)",
    "in_flight": "auto (default: 256 MiB where the budget has room) or a size: GPU bytes of "
                 "full-precision tensors waiting to be quantized or fused beyond the largest one, so "
                 "that readers need not wait for each; counted in the plan's peak (pread reader)",
    "io": "how instanttensor reads the files: auto (default: direct when less than half of the checkpoint "
          "is in the page cache, else buffered), buffered (through the page cache, which keeps the files "
          "for the next load), or direct (O_DIRECT, past the page cache: a cold disk at its full speed, "
          "and the next load reads the disk again)",
}


def normalize_native_options(out: dict[str, Any]) -> dict[str, Any]:
    """``out`` (unknown names already refused) with every value checked and sizes parsed; raises
    :class:`~loadstone.OptionError` naming the option, what it got and what it takes."""
    if "readers" in out:
        readers = out["readers"]
        if isinstance(readers, bool) or not isinstance(readers, int) or not 1 <= readers <= 256:
            raise OptionError(f"engine option readers={readers!r} is not a thread count.",
                              field="engine option readers", expected="an integer from 1 to 256",
                              found=repr(readers), fix="pass e.g. readers=8")
    for name, allowed, fix, default in (("reader", READERS, "pass reader=pread", "auto"),
                                        ("io", IO_MODES, "pass io=buffered", "auto"),
                                        ("unleased", UNLEASED, "pass unleased=read", "map")):
        value = out.get(name, default)
        if not isinstance(value, str) or value not in allowed:
            raise OptionError(f"engine option {name}={value!r} is not one of {', '.join(allowed)}.",
                              field=f"engine option {name}", expected=", ".join(allowed), found=repr(value)[:80],
                              fix=fix)
    if "read_ahead" in out:
        out["read_ahead"] = read_ahead_option(out["read_ahead"])
    if "in_flight" in out:
        out["in_flight"] = in_flight_option(out["in_flight"])
    if "chunk_bytes" in out:
        out["chunk_bytes"] = parse_size(out["chunk_bytes"], field="engine option chunk_bytes")
        if not (1 << 20) <= out["chunk_bytes"] <= (1 << 30):
            raise OptionError("engine option chunk_bytes must lie between 1 MiB and 1 GiB.",
                              field="engine option chunk_bytes", expected="1MiB .. 1GiB",
                              found=out["chunk_bytes"], fix="pass e.g. chunk_bytes=16MiB")
    if "unleased" in out and out.get("reader", "auto") not in ("auto", "mmap"):
        raise OptionError(f"engine option unleased says what reader=mmap does without a lease, and "
                          f"reader={out['reader']} maps nothing.", field="engine option unleased",
                          found=repr(out["unleased"]), expected="reader=mmap or reader=auto beside it",
                          fix="drop unleased, or pass reader=mmap")
    if out.get("io") == "direct" and out.get("reader", "auto") not in ("auto", "instanttensor"):
        raise OptionError(f"engine option io=direct is instanttensor's, and reader={out['reader']} was asked for.",
                          field="engine option io", found="direct", expected="io=auto or io=buffered with this reader",
                          fix="drop io=direct, or pass reader=instanttensor")
    return out


def auto_cpu_reader(plan: Any) -> str:
    """``reader=auto`` for a placement that keeps tensors on the CPU: ``mmap`` (leased views, no
    copy) where the page cache holds the checkpoint, else ``pread``; the plan's notes say why."""
    from .leases import leases_supported  # the mapping machinery, imported only by a plan that may map

    if not leases_supported():
        why, chosen = "this platform has no file leases to keep a mapped model intact (Linux has)", "pread"
    elif is_cold(checkpoint_files(plan.inventory)):
        why, chosen = ("less than half of the checkpoint is in the page cache: reader threads read a disk "
                       "faster than a mapping's page faults do"), "pread"
    else:
        why, chosen = ("the page cache holds the checkpoint: tensors kept on the CPU as stored are views of "
                       "its pages, and weights packed on the CPU are packed straight from them, no copy, each "
                       "file under a read lease (a file that cannot be leased is read)"), "mmap"
    plan.report.notes.append(f"engine loadstone: reader=auto chose {chosen} for the CPU: {why}")
    return chosen


def read_ahead_option(value: Any) -> str | int:
    """``read_ahead``: ``"auto"``, ``"off"`` (0), or a ring size from 1 GiB to 1 TiB."""
    if value == "auto":
        return "auto"
    if value in ("off", 0, "0") and not isinstance(value, bool):
        return 0
    size = parse_size(value, field="engine option read_ahead")
    if not INSTANT_BUFFER <= size <= 1 << 40:
        raise OptionError("engine option read_ahead is a ring size from 1 GiB to 1 TiB, 'auto' or 'off'.",
                          field="engine option read_ahead", expected="auto, off, or 1GiB .. 1TiB",
                          found=repr(value)[:80], fix="pass e.g. read_ahead=4GiB, or read_ahead=off")
    return size


def in_flight_option(value: Any) -> str | int:
    """The engine option ``in_flight``: ``"auto"`` or a size from 0 to 1 TiB."""
    if value == "auto":
        return "auto"
    size = parse_size(value, field="engine option in_flight")
    if size > 1 << 40:
        raise OptionError("engine option in_flight is a size from 0 to 1 TiB, or 'auto'.",
                          field="engine option in_flight", expected="auto, or 0 .. 1TiB", found=repr(value)[:80],
                          fix="pass e.g. in_flight=256MiB, or in_flight=0")
    return size
