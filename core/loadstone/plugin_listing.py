"""What ``loadstone plugins`` shows: each discovered plugin with its components, as JSON-ready
dicts, and as the text table. A listing must survive a buggy component and a conflict: it is how
a user finds out what is wrong."""

from __future__ import annotations

from typing import Any

from .contract.records import PluginRecord


def describe_record(record: PluginRecord) -> dict[str, Any]:
    """One plugin and its components (``loadstone plugins --json`` prints a list of these)."""
    item = record.to_dict()
    details = []
    for reg in record.components:
        comp = reg.component
        entry: dict[str, Any] = {"kind": reg.kind, "name": reg.name, "description": getattr(comp, "description", "")}
        if reg.kind == "quantization":
            # A listing must survive a buggy component: show its crash as a problem.
            try:
                problems = list(comp.environment_problems())
            except Exception as exc:
                problems = [f"environment_problems() raised {type(exc).__name__}: {exc}"]
            try:
                options = dict(comp.option_help())
            except Exception as exc:
                options, problems = {}, problems + [f"option_help() raised {type(exc).__name__}: {exc}"]
            entry.update(methods=list(comp.methods), checkpoint_formats=list(comp.checkpoint_formats),
                         requirements=list(comp.requirements), available=not problems,
                         problems=problems, options=options)
        elif reg.kind == "resolver":
            entry["priority"] = comp.priority
        elif reg.kind == "engine":
            entry["preference"] = comp.preference
            try:
                entry["options"] = dict(comp.option_help())
            except Exception as exc:  # a listing survives a buggy component
                entry["options"], entry["problems"] = {}, [f"option_help() raised {type(exc).__name__}: {exc}"]
        details.append(entry)
    item["components"] = details
    return item


def render_listing(described: list[dict[str, Any]], disable_source: str) -> str:
    """The text form of :func:`describe_record`'s dicts, one paragraph per plugin."""
    lines = []
    for item in described:
        origin = "built-in" if item["builtin"] else "entry point"
        lines.append(f"{item['name']}  [{item['distribution']} {item['version']}, {origin}]  {item['status']}")
        if item["error"]:
            lines.append(f"    error: {item['error']}")
        for comp in item["components"]:
            lines.append(f"    {comp['kind']:<13} {comp['name']:<12} {comp.get('description', '')}".rstrip())
            if comp["kind"] == "quantization":
                state = "available" if comp["available"] else "unavailable: " + "; ".join(comp["problems"])
                lines.append(f"                  methods: {', '.join(comp['methods'])}"
                             + (f"; checkpoints: {', '.join(comp['checkpoint_formats'])}"
                                if comp["checkpoint_formats"] else "")
                             + f"; {state}")
                for opt, text in comp.get("options", {}).items():
                    lines.append(f"                  -o {opt}=...  {text}")
            elif comp["kind"] == "engine":
                for opt, text in comp.get("options", {}).items():
                    lines.append(f"                  -e {opt}=...  {text}")
        for disabled in item.get("disabled_components", []):
            lines.append(f"    {disabled} (disabled by {disable_source})")
    return "\n".join(lines)
