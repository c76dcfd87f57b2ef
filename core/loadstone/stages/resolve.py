"""Stage 1: turn the user's reference into a base model folder plus adapter folders."""

from __future__ import annotations

from pathlib import Path

from ..contract.errors import AdapterError, PluginHookError, ResolutionError
from ..contract.report import Decision
from ..contract.request import LoadRequest
from ..contract.sources import ADAPTER_CONFIG, ADAPTER_WEIGHTS, AdapterSource, ResolveContext, ResolvedSource, Sources
from ..jsonfile import read_json_object
from ..plugins import PluginManager
from .adapter_config import check_adapter_config


def resolve_reference(reference: str, ctx: ResolveContext, plugins: PluginManager, *,
                      field: str = "reference") -> ResolvedSource:
    """Ask resolvers in priority order; the first non-None answer wins.

    ``field`` names the argument the reference came from (``reference``, ``adapters['math']`` ...):
    a resolver only knows it was given "a reference", so its refusals are relabelled with it.
    """
    tried = []
    for reg in plugins.resolvers():
        try:
            with plugins.guard(reg, "resolve", "resolve"):
                found = reg.component.resolve(reference, ctx)
        except ResolutionError as exc:
            if field == "reference" or exc.field != "reference":
                raise
            raise ResolutionError(exc.message, file=exc.file, field=field, expected=exc.expected,
                                  found=exc.found if exc.found is not None else reference, fix=exc.fix) from exc
        tried.append(reg.name)
        if found is not None and not isinstance(found, ResolvedSource):
            raise plugins.hook_error(reg.plugin, "resolve", TypeError(
                f"resolve() returned {type(found).__name__} {str(found)[:120]!r}, not a ResolvedSource or None"),
                f"resolver {reg.name!r}: resolve")
        if found is not None:
            # .strip(): in-process plugins have no version
            found.resolver, found.distribution = reg.name, f"{reg.distribution} {reg.version}".strip()
            return found
    fix = f"check the path or id (resolvers tried, in order: {', '.join(tried) or 'none'})"
    disabled = plugins.disabled_summary()
    if disabled:
        fix += f"; {disabled}"
    raise ResolutionError(
        f"no resolver recognised the reference {reference!r}.", field=field, found=reference,
        expected="an existing folder, a Hub id like org/name[@revision], or a scheme a resolver plugin handles",
        fix=fix)


def is_adapter_folder(path: Path) -> bool:
    return (path / ADAPTER_CONFIG).is_file()


def read_adapter(name: str, source: ResolvedSource) -> AdapterSource:
    """Read and check an adapter folder's config (never importing anything it names)."""
    folder = source.path
    cfg_path = folder / ADAPTER_CONFIG
    config = read_json_object(
        cfg_path, AdapterError, missing=f"{folder} is not an adapter folder: it has no {ADAPTER_CONFIG}.",
        expected="a folder written by peft's save_pretrained",
        missing_fix="point at the folder holding adapter_config.json and adapter_model.safetensors",
        repair_fix="re-save the adapter with peft's save_pretrained")
    if "peft_type" not in config:
        looks_like_model = "model_type" in config or "architectures" in config
        raise AdapterError(
            f"{ADAPTER_CONFIG} has no peft_type"
            + (": it looks like a model config.json saved under the adapter's name." if looks_like_model else "."),
            file=cfg_path, field="peft_type", expected="e.g. \"LORA\"",
            found="a model config (model_type/architectures)" if looks_like_model else "missing",
            fix="save the adapter with peft's save_pretrained; a model config belongs in config.json")
    check_adapter_config(config, cfg_path)  # peft's metadata only; never imports anything the config names
    weights = next((folder / w for w in ADAPTER_WEIGHTS if (folder / w).is_file()), None)
    if weights is None:
        raise AdapterError(
            f"adapter {name!r} at {folder} has no weights file.", file=folder / ADAPTER_WEIGHTS[0],
            field="adapter weights", expected=" or ".join(ADAPTER_WEIGHTS), found="neither",
            fix="copy the adapter's weights next to its adapter_config.json")
    return AdapterSource(name, source, config, weights)


def resolve_sources(request: LoadRequest, plugins: PluginManager, *, weights: bool = True) -> Sources:
    """Resolve the reference, its adapters and its base. ``weights=False`` (a plan) lets resolvers
    skip downloading weight files when they can supply their headers another way."""
    ctx = ResolveContext(revision=request.revision, cache_dir=request.cache_dir, offline=request.offline,
                         token=request.token, request=request, weights=weights)
    main = resolve_reference(request.reference, ctx, plugins)
    decisions = [_resolved_by("source", main, plugins, f"resolved {request.reference!r}")]
    adapters: list[AdapterSource] = []
    if is_adapter_folder(main.path):
        adapters.append(read_adapter("default", main))
    for name, ref in request.adapters.items():
        source = resolve_reference(ref, ResolveContext(cache_dir=request.cache_dir, offline=request.offline,
                                                        token=request.token, request=request, weights=weights),
                                   plugins, field=f"adapters[{name!r}] (CLI: --adapter)")
        if any(a.name == name for a in adapters):
            raise AdapterError(f"two adapters are named {name!r}.", field="adapters", found=name,
                               fix="name the extra adapter differently: adapters={'other': path}")
        adapters.append(read_adapter(name, source))

    names = [a.name for a in adapters]
    if request.active_adapter is not None and request.active_adapter not in names:
        # Checked here, before any weight is read, rather than after the base model is loaded.
        raise AdapterError(f"active_adapter {request.active_adapter!r} is not one of the adapters of this load.",
                           field="active_adapter", expected=", ".join(names) or "no adapters (none were given)",
                           found=request.active_adapter,
                           fix="pass the name of an adapter of this load (adapters={name: path}), or drop "
                               "active_adapter")
    if request.base is not None and not (adapters and adapters[0].source is main):
        # The reference is itself the base model; silently loading base= instead would ignore it.
        raise AdapterError(f"base= is given, but {request.reference!r} is a model, not an adapter folder.",
                           field="base", found=request.base, expected="an adapter folder as the reference",
                           fix="drop base=, or pass the adapter folder as the reference")
    if request.base is not None:
        base = resolve_reference(request.base, ResolveContext(cache_dir=request.cache_dir, offline=request.offline,
                                                              token=request.token, request=request,
                                                              weights=weights), plugins,
                                 field="base (CLI: --base)")
        decisions.append(Decision("base", request.base, "user", "explicit base= overrides the adapter's base"))
    elif adapters and adapters[0].source is main:
        base = _adapter_base(adapters[0], request, plugins, weights)
        decisions.append(Decision("base", adapters[0].config.get("base_model_name_or_path"), "kernel",
                                  "adapter_config.json base_model_name_or_path"))
    else:
        base = main
    if base is not main:
        decisions.append(_resolved_by("base source", base, plugins, f"resolved {base.reference!r}"))
    if is_adapter_folder(base.path):
        raise AdapterError(f"the base model {base.path} is itself an adapter folder.", file=base.path / ADAPTER_CONFIG,
                           field="base_model_name_or_path", found=str(base.path),
                           fix="point base= at the full model the adapter was trained on")
    return Sources(base, adapters, decisions)


def _resolved_by(topic: str, found: ResolvedSource, plugins: PluginManager, reason: str) -> Decision:
    """The decision of the resolver that claimed a reference, naming its plugin, distribution and version."""
    reg = next((r for r in plugins.resolvers() if r.name == found.resolver), None)
    if reg is None:  # pragma: no cover - resolve_reference always sets a registered resolver
        return Decision(topic, found.kind, f"resolver {found.resolver}", reason)
    return Decision.from_registration(topic, found.kind, reg, reason)


def _adapter_base(adapter: AdapterSource, request: LoadRequest, plugins: PluginManager,
                  weights: bool) -> ResolvedSource:
    cfg_path = adapter.source.path / ADAPTER_CONFIG
    base_ref = adapter.config.get("base_model_name_or_path")
    if not base_ref:
        raise AdapterError(
            f"adapter {adapter.source.path} does not say which base model it belongs to.", file=cfg_path,
            field="base_model_name_or_path", expected="a folder or Hub id", found=repr(base_ref),
            fix="pass base=PATH (CLI: --base PATH) to name the base model")
    ctx = ResolveContext(revision=adapter.config.get("revision") or None, cache_dir=request.cache_dir,
                         offline=request.offline, token=request.token, relative_to=adapter.source.path,
                         request=request, weights=weights)
    try:
        return resolve_reference(base_ref, ctx, plugins)
    except ResolutionError as exc:
        raise AdapterError(
            f"the adapter's base model {base_ref[:200]!r} cannot be found: {exc.message}", file=cfg_path,
            field="revision" if exc.field == "revision" else "base_model_name_or_path",
            expected="an existing folder (relative paths are taken from the adapter folder) or a Hub id",
            found=base_ref[:200] if exc.field != "revision" else exc.found,
            fix=f"{exc.fix + '; or ' if exc.fix else ''}pass base=PATH (CLI: --base PATH) if the base model moved"
        ) from exc
    except PluginHookError as exc:  # a resolver plugin crashed: say where the reference came from
        raise PluginHookError(f"{exc.message} (resolving base_model_name_or_path {base_ref[:200]!r} of {cfg_path})",
                              plugin=exc.plugin, distribution=exc.distribution, stage=exc.stage, file=cfg_path,
                              field="base_model_name_or_path", expected=exc.expected, found=exc.found,
                              fix=exc.fix) from exc.__cause__
