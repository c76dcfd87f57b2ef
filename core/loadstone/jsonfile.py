"""Reading the small JSON files of a checkpoint (config.json, adapter_config.json) with typed errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .contract.errors import LoadstoneError


def read_json_object(path: Path, error: type[LoadstoneError], *, missing: str, expected: str,
                     missing_fix: str, repair_fix: str) -> dict[str, Any]:
    """Parse ``path`` as a JSON object; every failure is ``error`` naming the file.

    ``missing``/``expected``/``missing_fix`` word the error for an absent file; ``repair_fix`` is
    the fix for a file that exists but is not a JSON object.
    """
    if not path.is_file():
        raise error(missing, file=path, field=path.name, expected=expected, found="no such file", fix=missing_fix)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise error(f"{path.name} is not valid JSON.", file=path, field="(whole file)", expected="a JSON object",
                    found=str(exc)[:160], fix=repair_fix) from None
    if not isinstance(data, dict):
        raise error(f"{path.name} is not a JSON object.", file=path, field="(whole file)", expected="a JSON object",
                    found=type(data).__name__, fix=repair_fix)
    return data
