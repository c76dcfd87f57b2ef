"""Turning rules into a device map, checked against the model skeleton.

Every tensor (parameter or buffer) must be placed by exactly one rule. Errors list every problem
of one kind at once: rules that match nothing (with the closest real names), rules that overlap
(with the tensors both claim), tensors no rule places (with lines to add), tied weights on
different devices, and modules or decoder layers split over devices. Tied weights are one
tensor: a rule placing one name of a tied group places the group.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from loadstone import PlacementContext, PlacementError

from .rules import Rule, device_label

SHOW = 6


def listing(names: list[str], show: int = SHOW) -> str:
    """``a, b, c ... (12 more)``."""
    return ", ".join(names[:show]) + (f" ... ({len(names) - show} more)" if len(names) > show else "")


def owner(tensor: str) -> str:
    return tensor.rpartition(".")[0]


def model_tensors(model: Any) -> list[str]:
    """Every parameter and buffer name in model order, each name of a tied tensor included."""
    names = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    names += [n for n, _ in model.named_buffers(remove_duplicate=False)]
    return list(dict.fromkeys(names))


def resolve(rules: list[Rule], ctx: PlacementContext, *, file: Any = None) -> dict[str, Any]:
    """The device map the rules describe for ``ctx.model``: the fewest module prefixes that place
    every tensor as the rules say."""
    tensors = model_tensors(ctx.model)
    modules = [name for name, _ in ctx.model.named_modules()]
    claims: dict[str, list[Rule]] = {t: [] for t in tensors}
    unknown = []
    for rule in rules:
        matched = [t for t in tensors if rule.covers(t)]
        if not matched:
            unknown.append(rule)
        for t in matched:
            claims[t].append(rule)
    if unknown:
        raise _unknown_error(unknown, modules, tensors, file)
    _check_overlaps(claims, file)
    placed = {t: rules_[0].device for t, rules_ in claims.items() if rules_}
    _place_tied(placed, ctx, claims, file)
    unplaced = [t for t in tensors if t not in placed]
    if unplaced:
        raise _unplaced_error(unplaced, ctx, file)
    _check_whole(placed, ctx, file)
    return compact(placed, ctx.model)


def _unknown_error(unknown: list[Rule], modules: list[str], tensors: list[str], file: Any) -> PlacementError:
    import difflib  # only for this error's hints: 5 ms that plugin discovery would pay on every load

    hints = []
    for rule in unknown:
        close = difflib.get_close_matches(rule.key.removeprefix("re:"), modules + tensors, n=2, cutoff=0.6)
        hints.append(f"{rule}" + (f" (did you mean {' or '.join(close)}?)" if close else ""))
    examples = [m for m in modules if m and m.count(".") <= 1][:5]
    return PlacementError(
        f"{len(unknown)} device-map rule(s) match no module or tensor of the model: " + "; ".join(hints) + ".",
        file=file, field="rules", expected="names such as " + ", ".join(examples), found=listing([r.key for r in unknown]),
        fix="fix the names (print(model) shows them; `loadstone plan MODEL --json` lists a device map)")


def _check_overlaps(claims: dict[str, list[Rule]], file: Any) -> None:
    pairs: dict[tuple[Rule, ...], list[str]] = defaultdict(list)
    for tensor, rules in claims.items():
        if len(rules) > 1:
            pairs[tuple(rules)].append(tensor)
    if not pairs:
        return
    parts = []
    for rules, tensors in pairs.items():
        owners = list(dict.fromkeys(owner(t) or t for t in tensors))
        parts.append(" and ".join(str(r) for r in rules) + f" both place {listing(owners, 3)} ({len(tensors)} tensors)")
    raise PlacementError(
        f"device-map rules overlap: {len(pairs)} group(s) of rules place the same tensors: " + "; ".join(parts) + ".",
        file=file, field="rules", expected="every tensor placed by exactly one rule", found=f"{len(pairs)} overlap(s)",
        fix="narrow the rules so that they do not intersect, e.g. model.layers.[0-15] and model.layers.[16-31]")


def _place_tied(placed: dict[str, Any], ctx: PlacementContext, claims: dict[str, list[Rule]], file: Any) -> None:
    """A tied group is one tensor: it takes the device its placed names agree on."""
    for group in ctx.tied_groups():
        devices = {placed[n] for n in group if n in placed}
        if len(devices) > 1:
            where = "; ".join(f"{n} -> {device_label(placed[n])} by {claims[n][0]}" for n in sorted(group) if n in placed)
            raise PlacementError(
                f"the device map puts tied weights on different devices: {', '.join(sorted(group))} are one tensor.",
                file=file, field="rules", expected="the same device for all of them", found=where,
                fix="place " + " and ".join(sorted({owner(n) for n in group})) + " on the same device")
        if devices:
            device = devices.pop()
            for name in group:
                placed.setdefault(name, device)


def _unplaced_error(unplaced: list[str], ctx: PlacementContext, file: Any) -> PlacementError:
    """Names the largest modules left entirely unplaced (``model.layers.1``, not its seven linears)."""
    missing = set(unplaced)
    under: dict[str, list[str]] = defaultdict(list)
    for tensor in model_tensors(ctx.model):
        parts = tensor.split(".")
        for i in range(1, len(parts)):
            under[".".join(parts[:i])].append(tensor)
    names: list[str] = []
    for module, _ in ctx.model.named_modules():
        if module and under[module] and set(under[module]) <= missing \
                and not any(module.startswith(n + ".") for n in names):
            names.append(module)
    names += [t for t in unplaced if not any(t.startswith(n + ".") for n in names)]
    params = {n for n, _ in ctx.model.named_parameters(remove_duplicate=False)}
    buffers_only = [n for n in names if n in under and not any(t in params for t in under[n])]
    note = f" ({listing(buffers_only, 3)} hold only buffers, e.g. rotary frequencies)" if buffers_only else ""
    return PlacementError(
        f"the device map leaves {len(unplaced)} tensor(s) unplaced: {listing(names)}{note}.", file=file,
        field="rules", expected="every parameter and buffer placed by one rule", found=listing(unplaced),
        fix="add rules for them, e.g. " + "; ".join(f"{n}: cpu" for n in names[:3]))


def _check_whole(placed: dict[str, Any], ctx: PlacementContext, file: Any) -> None:
    """A module's own tensors share a device, and so does each decoder layer: transformers runs a
    layer's residual stream on one device."""
    split_modules = []
    by_owner: dict[str, set] = defaultdict(set)
    for tensor, device in placed.items():
        by_owner[owner(tensor)].add(device_label(device))
    split_modules = [f"{m or '(model)'} ({', '.join(sorted(d))})" for m, d in by_owner.items() if len(d) > 1]
    if split_modules:
        raise PlacementError(
            f"the device map splits the tensors of {len(split_modules)} module(s) over devices: "
            f"{listing(split_modules)}.", file=file, field="rules", expected="one device per module",
            found=listing(split_modules), fix="place whole modules: write rules for module names, not tensor names")
    split_layers = []
    for layer in ctx.decoder_layers():
        devices = {device_label(d) for t, d in placed.items() if t.startswith(layer + ".")}
        if len(devices) > 1:
            split_layers.append(f"{layer} ({', '.join(sorted(devices))})")
    if split_layers:
        raise PlacementError(
            f"the device map splits {len(split_layers)} decoder layer(s) over devices: {listing(split_layers)}.",
            file=file, field="rules", expected="each of " + ", ".join(ctx.no_split_module_classes) + " on one device",
            found=listing(split_layers), fix="place whole layers, e.g. model.layers.[0-15]: cuda:0")


def compact(placed: dict[str, Any], model: Any) -> dict[str, Any]:
    """The fewest prefixes: a module whose every tensor shares a device is one entry."""
    out: dict[str, Any] = {}

    def visit(prefix: str, module: Any) -> None:
        inside = {d for t, d in placed.items() if prefix == "" or t == prefix or t.startswith(prefix + ".")}
        if len(inside) == 1:
            out[prefix] = next(iter(inside))
            return
        for leaf, _ in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            name = f"{prefix}.{leaf}" if prefix else leaf
            if name in placed:
                out[name] = placed[name]
        for child_name, child in module.named_children():
            visit(f"{prefix}.{child_name}" if prefix else child_name, child)

    visit("", model)
    return out
