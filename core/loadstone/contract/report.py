"""The load report: every decision, who made it, what it cost."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from .units import format_size


@dataclass
class Decision:
    """One choice made during a load and who made it.

    ``by`` is ``"user"`` (an explicit argument), ``"kernel"``, or a component name; ``plugin``,
    ``distribution`` and ``version`` identify the plugin when a component decided.
    """

    topic: str
    choice: Any
    by: str
    reason: str = ""
    plugin: str | None = None
    distribution: str | None = None
    version: str | None = None

    @classmethod
    def from_registration(cls, topic: str, choice: Any, reg: Any, reason: str = "") -> "Decision":
        label = {"quantization": "backend", "placement": "strategy", "resolver": "resolver",
                 "engine": "engine"}.get(reg.kind, reg.kind)
        return cls(topic, choice, f"{label} {reg.name}", reason, reg.plugin, reg.distribution, reg.version)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class LoadReport:
    """JSON-serialisable account of a load (or of a plan when ``kind == "plan"``)."""

    kind: str
    reference: str
    loadstone_version: str
    request: dict[str, Any] = field(default_factory=dict)
    sources: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)
    checkpoint: dict[str, Any] = field(default_factory=dict)
    dtype: str | None = None
    quantization: dict[str, Any] = field(default_factory=dict)
    placement: dict[str, Any] = field(default_factory=dict)
    engine: dict[str, Any] = field(default_factory=dict)
    parameters: dict[str, Any] = field(default_factory=dict)
    adapters: list[dict[str, Any]] = field(default_factory=list)
    training: dict[str, Any] = field(default_factory=dict)
    decisions: list[Decision] = field(default_factory=list)
    stages: dict[str, float] = field(default_factory=dict)
    memory: dict[str, Any] = field(default_factory=dict)
    fit: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def decide(self, decision: Decision) -> None:
        self.decisions = [d for d in self.decisions if d.topic != decision.topic] + [decision]

    def decision(self, topic: str) -> Decision | None:
        return next((d for d in self.decisions if d.topic == topic), None)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["decisions"] = [d.to_dict() for d in self.decisions]
        return data

    def to_json(self, **kw: Any) -> str:
        return json.dumps(self.to_dict(), indent=kw.pop("indent", 2), default=str, **kw)

    # ------------------------------------------------------------------ text rendering

    def render(self) -> str:
        """A readable table for terminals (``--json`` prints :meth:`to_dict` instead)."""
        title = "loadstone plan" if self.kind == "plan" else "loadstone load report"
        rows: list[tuple[str, str]] = []
        base = self.sources.get("base", {})
        rows.append(("reference", self.reference))
        rows.append(("base", _source_line(base)))
        for ad in self.sources.get("adapters", []):
            rows.append((f"adapter {ad['name']}", _source_line(ad.get("source", {}))))
        if self.model:
            rows.append(("model", f"{self.model.get('architecture')} ({self.model.get('model_type')}), "
                                  f"{self.model.get('auto_class')}, task {self.model.get('task')}"))
        if self.checkpoint:
            rows.append(("checkpoint", f"{self.checkpoint.get('format')}, {len(self.checkpoint.get('files', []))} "
                                       f"file(s), {format_size(self.checkpoint.get('bytes'))}"))
        rows.append(("dtype", str(self.dtype)))
        q = self.quantization
        if q:
            rows.append(("quantization", f"{q.get('method')} by {q.get('backend')} ({q.get('distribution')} "
                                         f"{q.get('version')})" + (", pre-quantized" if q.get("pre_quantized") else "")))
        e = self.engine
        if e:
            options = ", ".join(f"{k}={format_size(v) if _is_size(k, v) else v}" for k, v in (e.get("options") or {}).items())
            rows.append(("engine", f"{e.get('name')} ({e.get('distribution')} {e.get('version')})".replace(" )", ")")
                         + (f", {options}" if options else "")))
        p = self.placement
        if p:
            rows.append(("placement", f"{p.get('strategy')} ({p.get('distribution')} {p.get('version')})"))
            shards = p.get("sharded_over")
            for dev, nbytes in (p.get("bytes_per_device") or {}).items():
                modules = [k or "(everything)" for k, v in (p.get("device_map") or {}).items() if str(v) == dev]
                share = f" (1/{shards} of each tensor: sharded over {shards} process{'es' if shards > 1 else ''})" \
                    if shards else ""
                rows.append((f"  {dev}", f"{format_size(nbytes)}{share}: {compact_names(modules)}"))
        if self.fit:
            rows.append(("fits", "yes" if self.fit.get("fits") else "NO"))
            for line in self.fit.get("advice", []):
                rows.append(("  advice", line))
        prm = self.parameters
        if prm:
            rows.append(("parameters", f"{prm.get('total', 0):,} total"
                         + (f", {prm.get('trainable', 0):,} trainable ({prm.get('trainable_percent', 0):.4f}%), "
                            f"{prm.get('frozen', 0):,} frozen" if "trainable" in prm else "")))
        for ad in self.adapters:
            rows.append((f"adapter {ad['name']}", f"{ad.get('peft_type')} r={ad.get('r')} "
                         f"{'trainable' if ad.get('trainable') else 'frozen'}"
                         + (", active" if ad.get("active") else "")))
        for note in self.training.get("notes", []):
            rows.append(("training prep", note))
        if self.stages:
            rows.append(("stages", ", ".join(f"{k} {v:.2f}s" for k, v in self.stages.items())))
            rows.append(("total time", f"{sum(self.stages.values()):.2f}s"))
        m = self.memory
        if m.get("peak_host_rss_bytes") is not None:
            rows.append(("peak host RSS", format_size(m["peak_host_rss_bytes"])))
        for dev, nbytes in (m.get("peak_device_bytes") or {}).items():
            rows.append((f"peak {dev}", format_size(nbytes)))
        width = max(len(k) for k, _ in rows)
        lines = [title, "=" * len(title)]
        lines += [f"{k.ljust(width)}  {v}" for k, v in rows]
        if self.decisions:
            lines += ["", "decisions"]
            for d in self.decisions:
                who = d.by if d.plugin is None else f"{d.by} [{d.distribution} {d.version}]"
                lines.append(f"  {d.topic.ljust(14)} {str(d.choice).ljust(16)} by {who}"
                             + (f": {d.reason}" if d.reason else ""))
        if self.notes:
            lines += ["", "notes"] + [f"  - {n}" for n in self.notes]
        return "\n".join(lines)


def compact_names(names: list[str], show: int = 8) -> str:
    """Module names with numbered runs folded: ``model.layers.0`` ... ``model.layers.15`` ->
    ``model.layers.0-15``; at most ``show`` items, then how many more."""
    items: list[list] = []  # [prefix, first, last] for numbered names, [name] otherwise
    for name in names:
        match = _NUMBERED.match(name)
        if match and items and len(items[-1]) == 3 and items[-1][0] == match.group(1) \
                and items[-1][2] + 1 == int(match.group(2)):
            items[-1][2] += 1
        elif match:
            items.append([match.group(1), int(match.group(2)), int(match.group(2))])
        else:
            items.append([name])
    text = [item[0] if len(item) == 1 else f"{item[0]}{item[1]}" + (f"-{item[2]}" if item[2] > item[1] else "")
            for item in items]
    return ", ".join(text[:show]) + (f" ... ({len(text) - show} more)" if len(text) > show else "")


_NUMBERED = re.compile(r"^(.*\.)(\d+)$")


def _source_line(src: dict[str, Any]) -> str:
    if not src:
        return "-"
    line = f"{src.get('path')} ({src.get('kind')}"
    if src.get("repo_id"):
        line += f" {src['repo_id']}"
    if src.get("commit"):
        line += f" @ {src['commit'][:12]}"
    return line + f", via {src.get('resolver')})"


# Engine options that hold sizes: ``*_bytes`` by convention, and the native engine's two whose
# names say what they hold rather than the unit (a size of 0 reads better as "0" there: off).
_SIZE_OPTIONS = ("read_ahead", "in_flight")


def _is_size(key: str, value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and (
        key.endswith("_bytes") or key in _SIZE_OPTIONS and value > 0)
