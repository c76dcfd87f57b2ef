"""The texts of plugin errors: exactly what two plugins clash on, why a component is missing,
which plugin failed and how. Each says how to fix it in the form the manager reads its disable
list (``LOADSTONE_DISABLE_PLUGINS``, or the ``disable=`` argument that replaces it)."""

from __future__ import annotations

from typing import Any, Callable

from .contract.errors import ComponentNotFoundError, LoadstoneError, PluginConflictError, PluginHookError
from .contract.records import PluginRecord, Registration
from .plugin_policy import IN_PROCESS, KNOWN_PROVIDERS


def conflict_error(first: Registration, second: Registration, methods: set[str], records: list[PluginRecord],
                   disable_hint: Callable[[str], str]) -> PluginConflictError:
    """The error for ``second`` registering what ``first`` already provides: exactly what clashes
    (a component name, or quantization methods), who registered each, and both ways out.
    ``disable_hint(plugin)`` says how to disable a plugin where this manager's disable list comes from."""
    what_kind = {"quantization": "quantization backend", "placement": "placement strategy",
                 "resolver": "resolver", "engine": "engine"}.get(second.kind, second.kind)
    shared = sorted(methods & set(getattr(first.component, "methods", ()))) if second.kind == "quantization" else []
    if first.name == second.name:
        clash, field_name, found = f"the {what_kind} name {second.name!r}", f"{second.kind} name", second.name
    else:
        clash = (f"the quantization method{'s' if len(shared) > 1 else ''} {', '.join(map(repr, shared))} "
                 f"(backends {first.name!r} and {second.name!r})")
        field_name, found = "quantization method", ", ".join(shared)
    if first.plugin == second.plugin:
        return PluginConflictError(
            f"{second.owner()} registers {clash} twice.", field=field_name, found=found,
            fix=f"fix the plugin so that each name is registered once, or disable it ({disable_hint(second.plugin)})")
    records_by_name = {r.name: r for r in records}
    ways = []
    for reg in (second, first):
        record = records_by_name.get(reg.plugin)
        if reg.distribution == IN_PROCESS:
            ways.append(f"drop {reg.plugin!r} from extra_plugins")
        elif record is not None and record.builtin:
            ways.append(f"disable the built-in {reg.plugin!r} to replace it")
        else:
            ways.append(f"pip uninstall {reg.distribution}")
    return PluginConflictError(
        f"two plugins provide {clash}: {first.owner()} and {second.owner()}; loadstone will not guess which "
        f"one you mean.", field=field_name, found=found,
        fix=f"keep one of them: disable one by plugin name ({disable_hint(second.plugin)}, or "
            f"{disable_hint(first.plugin)}), or remove one ({', or '.join(ways)})")


def missing_component_error(manager: Any, kind: str, name: str, available: list[str],
                            field_name: str) -> ComponentNotFoundError:
    """Nobody provides ``name``: what is available, and why the usual provider is not there
    (not installed, failed, disabled, not allowed), the disable list's source included."""
    known = KNOWN_PROVIDERS.get(kind, {})
    provider = known.get(name) or known.get(name.partition(":")[0])  # "file:map.yaml" -> "file"
    what = {"quantization": "quantization method", "placement": "placement strategy",
            "resolver": "resolver", "engine": "engine"}[kind]
    fix = f"choose one of: {', '.join(sorted(available)) or '(none installed)'}"
    if name in manager.disable:
        fix = f"it is disabled by {manager.disable_source}; remove it from there, or " + fix
    elif provider:
        record = next((r for r in manager.records if r.distribution == provider), None)
        if record is None:
            fix = f"pip install {provider}  (it provides {what} {name!r}); or " + fix
        elif record.status == "failed":
            fix = f"{provider} is installed but failed to load ({record.error}); reinstall it, or " + fix
        elif record.status == "disabled":
            fix = f"{provider} is installed but disabled by {manager.disable_source}; remove it from there, or " + fix
        else:
            fix = (f"{provider} is installed but not in the allow-list LOADSTONE_PLUGINS="
                   f"{','.join(manager.allow or [])}; add it, or " + fix)
    elif not available:
        disabled = manager.disabled_summary()
        if disabled:
            fix += f" ({disabled})"
    return ComponentNotFoundError(f"no installed plugin provides the {what} {name!r}.",
                                  field=field_name, found=name, fix=fix)


def hook_error(manager: Any, plugin_name: str, stage: str, exc: BaseException, what: str) -> LoadstoneError:
    if isinstance(exc, PluginHookError):
        return exc
    record = manager.owner_of(plugin_name)
    dist = f"{record.distribution} {record.version}".strip() if record else None
    who = f"plugin {plugin_name!r} " + (record.origin() if record else "")
    if isinstance(exc, LoadstoneError):
        # A deliberate, typed refusal: keep its fields, say who raised it.
        return PluginHookError(
            f"{who} refused the load during stage {stage!r} in {what}: {exc.message}",
            plugin=plugin_name, distribution=dist, stage=stage, file=exc.file, field=exc.field,
            expected=exc.expected, found=exc.found, fix=exc.fix)
    if record is not None and record.distribution == IN_PROCESS:
        fix = (f"fix {record.value} (passed as extra_plugins), or leave it out, or disable it with "
               f"{manager.disable_hint(plugin_name)}")
    else:
        fix = (f"report it to the maintainers of {record.distribution if record else plugin_name}, or disable "
               f"the plugin with {manager.disable_hint(plugin_name)}")
    return PluginHookError(f"{who} raised {type(exc).__name__} during stage {stage!r} in {what}: {exc}",
                           plugin=plugin_name, distribution=dist, stage=stage, fix=fix)
