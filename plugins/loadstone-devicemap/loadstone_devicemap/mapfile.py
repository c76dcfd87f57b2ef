"""Reading a device-map file (YAML or JSON): a mapping of rules to devices.

.. code-block:: yaml

    model.embed_tokens: cuda:0
    model.layers.[0-15]: cuda:0
    model.layers.[16-31]: cuda:1
    model.norm: cuda:1
    model.rotary_emb: cuda:1
    lm_head: cuda:1

A duplicated key is an error (YAML and JSON parsers would silently keep the last one); every
rule remembers its line so that errors can point at it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from loadstone import PlacementContext, PlacementError, PlacementStrategy

from .resolve import resolve
from .rules import Rule, device_label, parse_rule

SUFFIXES = {".yaml": "yaml", ".yml": "yaml", ".json": "json"}


def read_rules(path: str | Path) -> list[Rule]:
    """The rules of the device-map file at ``path``, in file order."""
    path = Path(path).expanduser()
    kind = SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise PlacementError(f"{path.name} is not a device-map file loadstone-devicemap reads.", file=path,
                             field="placement", expected="a file ending in .yaml, .yml or .json", found=path.suffix
                             or "(no suffix)", fix="rename it, e.g. placement='file:map.yaml'")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PlacementError(f"the device-map file {path} does not exist.", file=path, field="placement",
                             found="no such file", fix="check the path after file: (relative paths start at the "
                             "current directory)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PlacementError(f"the device-map file {path} cannot be read: {exc}.", file=path, field="placement",
                             fix="check the file's permissions and that it is UTF-8 text") from None
    entries = _yaml_entries(text, path) if kind == "yaml" else _json_entries(text, path)
    if not entries:
        raise PlacementError(f"the device-map file {path.name} places nothing.", file=path, field="rules",
                             expected="at least one line like model.layers.[0-15]: cuda:0", found="an empty mapping",
                             fix="add rules; `loadstone plan MODEL --placement auto --json` shows a map to start from")
    return [parse_rule(key, device, where=f"{path.name} line {line}", file=path) for key, device, line in entries]


def _not_mapping(path: Path, found: str) -> PlacementError:
    return PlacementError(f"the device-map file {path.name} is not a mapping of rules to devices.", file=path,
                          field="top level", expected="name: device pairs, e.g. model.layers.[0-15]: cuda:0",
                          found=found, fix="write one rule per line: RULE: DEVICE")


def _duplicate(path: Path, key: Any, first: int, second: int) -> PlacementError:
    return PlacementError(f"the device-map file {path.name} has the key {key!r} twice (lines {first} and {second}).",
                          file=path, field=f"line {second}", expected="each rule once", found=f"{key!r} twice",
                          fix="keep one of them")


def _yaml_entries(text: str, path: Path) -> list[tuple[Any, Any, int]]:
    import yaml

    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else "the file"
        raise PlacementError(f"{path.name} is not valid YAML: {getattr(exc, 'problem', None) or exc}.", file=path,
                             field=where, fix="check the indentation and quote keys that start with [ or *") from None
    if root is None:
        return []
    if not isinstance(root, yaml.MappingNode):
        raise _not_mapping(path, type(root).__name__.replace("Node", "").lower())
    constructor = yaml.SafeLoader("")
    entries, seen = [], {}
    for key_node, value_node in root.value:
        if not isinstance(key_node, yaml.ScalarNode) or not isinstance(value_node, yaml.ScalarNode):
            raise _not_mapping(path, f"a nested structure at line {key_node.start_mark.line + 1}")
        key = constructor.construct_object(key_node)
        value = constructor.construct_object(value_node)
        line = key_node.start_mark.line + 1
        if key in seen:
            raise _duplicate(path, key, seen[key], line)
        seen[key] = line
        entries.append((key, value, line))
    return entries


def _json_entries(text: str, path: Path) -> list[tuple[Any, Any, int]]:
    def pairs(items: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
        return items  # keep duplicates and order; checked below

    try:
        data = json.loads(text, object_pairs_hook=pairs)
    except json.JSONDecodeError as exc:
        raise PlacementError(f"{path.name} is not valid JSON: {exc.msg}.", file=path, field=f"line {exc.lineno}",
                             fix="check commas and quotes (JSON needs double quotes)") from None
    if not isinstance(data, list) or (data and not all(isinstance(i, tuple) for i in data)):
        raise _not_mapping(path, type(data).__name__)
    lines = text.splitlines()
    entries, seen = [], {}
    for key, value in data:
        if isinstance(value, list):  # a nested object arrives as a list of pairs
            raise _not_mapping(path, f"a nested object under {key!r}")
        line = _json_line(lines, key, after=seen.get(key, 0))
        if key in seen:
            raise _duplicate(path, key, seen[key], line)
        seen[key] = line
        entries.append((key, value, line))
    return entries


def _json_line(lines: list[str], key: str, *, after: int) -> int:
    quoted = json.dumps(key)
    for number, line in enumerate(lines, start=1):
        if number > after and quoted in line:
            return number
    return after or 1


class FilePlacement(PlacementStrategy):
    name = "file"
    description = "file:PATH: a device map from a YAML or JSON file of rules (names, globs, re:), checked"

    def matches(self, spec: str) -> bool:
        return spec == self.name or spec.startswith(self.name + ":")

    def place(self, ctx: PlacementContext) -> dict[str, Any]:
        path = str(ctx.spec).partition(":")[2].strip()
        if not path:
            raise PlacementError("placement 'file' needs the path of a device-map file.", field="placement",
                                 expected="file:PATH, e.g. file:map.yaml", found=ctx.spec,
                                 fix="write placement='file:map.yaml' (CLI: --placement file:map.yaml)")
        rules = read_rules(path)
        device_map = resolve(rules, ctx, file=Path(path).expanduser())
        devices = sorted({device_label(d) for d in device_map.values()})
        ctx.note(f"{len(rules)} rule(s) from {path} -> {len(device_map)} map entries on {', '.join(devices)}")
        return device_map
