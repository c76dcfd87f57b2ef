"""An audit log: one JSON line per load and per failed load.

Active when ``LOADSTONE_AUDIT_LOG`` names a file; lines are appended, never rewritten. Each line
is a self-contained JSON object, so the log can be shipped as it is to any log collector.

The log fails closed: if a successful load cannot be recorded, the load fails (loadstone turns
the ``OSError`` into a :class:`loadstone.PluginHookError` naming this plugin). Failures of
``loadstone_load_failed`` are only logged by loadstone, so a failed load always surfaces its own
error.
"""

from __future__ import annotations

import datetime as _dt
import getpass
import json
import os
import socket
from typing import Any

from loadstone import LoadstoneError, hookimpl

ENV_VAR = "LOADSTONE_AUDIT_LOG"


def _who() -> dict[str, Any]:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (containers) and no USER variable
        user = None
    return {"time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds"),
            "user": user, "host": socket.gethostname(), "pid": os.getpid()}


def write_record(record: dict[str, Any], path: str | None = None) -> None:
    """Append ``record`` as one JSON line to ``path`` (default: ``$LOADSTONE_AUDIT_LOG``)."""
    path = path or os.environ.get(ENV_VAR)
    if not path:
        return
    line = json.dumps(record, default=str, sort_keys=True) + "\n"
    # One write() on a file opened for appending: concurrent writers do not interleave lines.
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(line)


@hookimpl
def loadstone_after_load(result):
    report = result.report.to_dict()
    sources = report["sources"]
    write_record({
        **_who(),
        "event": "load",
        "reference": report["reference"],
        "base": {k: sources["base"].get(k) for k in ("path", "kind", "repo_id", "commit", "resolver")},
        "adapters": [{"name": a["name"], "path": a["source"]["path"]} for a in sources.get("adapters", [])],
        "quantization": {k: report["quantization"].get(k) for k in ("method", "backend", "distribution", "version")},
        "placement": report["placement"].get("strategy"),
        "bytes_per_device": report["placement"].get("bytes_per_device"),
        "dtype": report["dtype"],
        "parameters": report["parameters"],
        "trust_remote_code": report["request"].get("trust_remote_code"),
        "seconds": round(sum(report["stages"].values()), 3),
        "loadstone_version": report["loadstone_version"],
    })


@hookimpl
def loadstone_load_failed(request, stage, error):
    details = error.to_dict() if isinstance(error, LoadstoneError) else {
        "error": type(error).__name__, "message": str(error)}
    write_record({**_who(), "event": "load_failed", "reference": request.reference, "stage": stage, **details})
