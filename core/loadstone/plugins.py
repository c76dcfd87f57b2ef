"""Plugin discovery and the typed registry the kernel uses instead of calling ``pm.hook`` untyped.

Policy (see docs/plugins.md):

* Plugins are entry points in the ``loadstone`` group. Built-in plugins go through the same
  loading path, with loadstone's own distribution as their owner.
* Discovery is lazy: nothing is imported until a component or the plugin list is needed.
* A plugin that fails to import or register is skipped with a warning naming its distribution
  and the error; ``LOADSTONE_STRICT_PLUGINS=1`` (or ``strict=True``) raises instead.
* ``LOADSTONE_PLUGINS`` is an allow-list of entry-point or distribution names; set but empty
  means built-ins only. ``LOADSTONE_DISABLE_PLUGINS`` disables named plugins (entry-point or
  distribution names), built-ins included, or single components by name (``hub``, ``auto``),
  so that one built-in can be switched off without losing its siblings. Plugins passed in
  Python (``extra_plugins``) obey the disable list too.
* Two plugins registering one component name (or one quantization method) is a conflict: the
  later plugin is not registered, its status is ``conflict``, listing still works and shows it,
  and every other use of the manager raises :class:`PluginConflictError` until one is disabled
  or uninstalled.
"""

from __future__ import annotations

import importlib.metadata as md
import logging
import threading
import warnings
from typing import Any, Callable, Iterable

import pluggy

from .contract import hookspecs
from .contract.errors import (
    ComponentNotFoundError,
    LoadstoneError,
    PluginConflictError,
    PluginLoadError,
)
from .contract.records import PluginLoadWarning, PluginRecord, Registration, RequestChange
from .plugin_policy import (  # noqa: F401  (re-exported: loadstone.plugins is where users look)
    BUILTIN_ENTRY_POINTS,
    ENTRY_POINT_GROUP,
    IN_PROCESS,
    KERNEL_DISTRIBUTION,
    KNOWN_PROVIDERS,
    REGISTRATION_HOOKS,
    canonical_distribution_name,
    _env_flag,
    _env_list,
    _kernel_version,
    in_process_value,
    installed_entry_points,
)
from .plugin_listing import describe_record
from .plugin_messages import conflict_error, hook_error, missing_component_error

log = logging.getLogger("loadstone.plugins")

class PluginManager:
    """Discovers plugins and holds their components.

    :param allow: entry-point or distribution names allowed besides built-ins; ``None`` allows
        all (default: ``LOADSTONE_PLUGINS``).
    :param disable: plugin, distribution or component names to skip, built-ins and
        ``extra_plugins`` included (default: ``LOADSTONE_DISABLE_PLUGINS``).
    :param strict: raise on a broken plugin instead of skipping it (default:
        ``LOADSTONE_STRICT_PLUGINS``).
    :param extra_plugins: objects to register directly as plugins (tests, notebooks), as
        ``(name, plugin)`` pairs; they count as owned by distribution ``"<in-process>"`` and
        are recorded with the plugin object's class (or module) name.
    """

    def __init__(self, *, allow: Iterable[str] | None = None, disable: Iterable[str] | None = None,
                 strict: bool | None = None, extra_plugins: Iterable[tuple[str, Any]] = ()):
        self.allow = list(allow) if allow is not None else _env_list("LOADSTONE_PLUGINS")
        self.disable = set(disable) if disable is not None else set(_env_list("LOADSTONE_DISABLE_PLUGINS") or [])
        self._disable_given = disable is not None
        #: Where the disable list came from, for messages: the argument or the environment variable.
        self.disable_source = (f"PluginManager(disable={sorted(self.disable)!r})" if disable is not None
                               else f"LOADSTONE_DISABLE_PLUGINS={','.join(sorted(self.disable))}")
        self.strict = _env_flag("LOADSTONE_STRICT_PLUGINS") if strict is None else strict
        self._extra = list(extra_plugins)
        self._lock = threading.RLock()
        self._forget()

    def _forget(self) -> None:
        """Start from nothing: a fresh pluggy manager, no records, no components."""
        self._pm = pluggy.PluginManager(hookspecs.PROJECT)
        self._pm.add_hookspecs(hookspecs)
        self._records: list[PluginRecord] = []
        self._registry: dict[str, dict[str, Registration]] = {k: {} for k in REGISTRATION_HOOKS}
        self._method_index: dict[str, Registration] = {}
        self._conflicts: list[PluginConflictError] = []
        self._discovered = False

    # ------------------------------------------------------------------ discovery

    def _entry_points(self) -> list[tuple[md.EntryPoint, str, str, bool]]:
        kernel_version = _kernel_version()
        found = [
            (md.EntryPoint(name, value, ENTRY_POINT_GROUP), KERNEL_DISTRIBUTION, kernel_version, True)
            for name, value in BUILTIN_ENTRY_POINTS
        ]
        seen = set()
        for ep in installed_entry_points(ENTRY_POINT_GROUP):
            dist = ep.dist.name if ep.dist is not None else "<unknown>"
            version = ep.dist.version if ep.dist is not None else "?"
            key = (ep.name, ep.value)
            if key in seen:  # the same distribution visible twice on sys.path
                continue
            seen.add(key)
            found.append((ep, dist, version, False))
        return found

    def _selected(self, record: PluginRecord) -> str:
        # Distribution names compare as pip compares them: loadstone_bnb is loadstone-bnb.
        names = {record.name, canonical_distribution_name(record.distribution)}
        if names & ({canonical_distribution_name(n) for n in self.disable} | self.disable):
            return "disabled"
        if self.allow is not None and not record.builtin and not (
                names & ({canonical_distribution_name(n) for n in self.allow} | set(self.allow))):
            return "not-allowed"
        return "loaded"

    def discover(self) -> "PluginManager":
        """Import and register every selected plugin (idempotent, thread-safe)."""
        with self._lock:
            if self._discovered:
                return self
            try:
                for ep, dist, version, builtin in self._entry_points():
                    record = PluginRecord(ep.name, ep.value, dist, version, builtin)
                    self._records.append(record)
                    verdict = self._selected(record)
                    if verdict != "loaded":
                        record.status = verdict
                        log.debug("plugin %s (%s) %s", record.name, dist, verdict)
                        continue
                    self._load(record, ep.load)
                for name, obj in self._extra:
                    record = PluginRecord(name, in_process_value(obj), IN_PROCESS, "", False)
                    self._records.append(record)
                    if name in self.disable:  # the allow-list is for entry points; this was passed explicitly
                        record.status = "disabled"
                        log.debug("plugin %s (in-process) disabled", name)
                        continue
                    self._load(record, lambda obj=obj: obj)
            except BaseException:
                # All or nothing (strict mode): the next call retries from scratch instead of
                # re-registering into a half-filled manager.
                self._forget()
                raise
            self._discovered = True
            return self

    def _load(self, record: PluginRecord, loader: Callable[[], Any]) -> None:
        try:
            plugin = loader()
            self._pm.register(plugin, name=record.name)
            try:
                self._pm.check_pending()
                self._refuse_wrappers(record, plugin)
                record.components = self._collect_components(record)
            except BaseException:
                self._pm.unregister(name=record.name)
                raise
        except Exception as exc:  # a broken plugin must not break every other load
            if isinstance(exc, PluginConflictError):
                # Kept out, like a broken plugin, but never silently: which of the two a load would
                # get is an accident of install order, so every use refuses until it is resolved.
                record.status, record.error = "conflict", str(exc).replace("\n", " ")
                self._conflicts.append(exc)
                return
            record.status = "failed"
            record.error = f"{type(exc).__name__}: {exc}"
            origin = (record.origin() if record.distribution == IN_PROCESS
                      else f"from distribution {f'{record.distribution} {record.version}'.strip()}")
            message = f"loadstone plugin {record.name!r} {origin} failed to load: {record.error}"
            if self.strict:
                raise PluginLoadError(
                    message, field="entry point", found=record.value,
                    fix=f"fix or uninstall {record.distribution}, or unset LOADSTONE_STRICT_PLUGINS "
                        f"to skip it, or disable it with {self.disable_hint(record.name)}",
                ) from exc
            warnings.warn(message + "; it was skipped (set LOADSTONE_STRICT_PLUGINS=1 to make this an error)",
                          PluginLoadWarning, stacklevel=3)
            return
        record.status = "loaded"
        for reg in record.components:
            self._registry[reg.kind][reg.name] = reg
            if reg.kind == "quantization":
                for method in reg.component.methods:
                    self._method_index[method] = reg

    def _refuse_wrappers(self, record: PluginRecord, plugin: Any) -> None:
        # The kernel calls each implementation itself (to name the plugin in errors), so a
        # wrapper's generator would silently never run; refuse it instead.
        for caller in self._pm.get_hookcallers(plugin) or []:
            for impl in caller.get_hookimpls():
                if impl.plugin is plugin and (impl.hookwrapper or getattr(impl, "wrapper", False)):
                    raise TypeError(f"{caller.name} is declared with wrapper=True/hookwrapper=True, which loadstone "
                                    f"hooks do not support; implement it as a plain hook (docs/hooks.md)")

    def _collect_components(self, record: PluginRecord) -> list[Registration]:
        collected: list[Registration] = []
        for kind, (hook_name, base) in REGISTRATION_HOOKS.items():
            for impl in getattr(self._pm.hook, hook_name).get_hookimpls():
                if impl.plugin_name != record.name:
                    continue

                def register(component: Any, _kind: str = kind, _base: type = base) -> None:
                    reg = self._check_component(record, _kind, _base, component, collected)
                    if reg is None:
                        record.disabled_components.append(f"{_kind} {component.name}")
                    else:
                        collected.append(reg)

                impl.function(**{arg: register for arg in impl.argnames})
        return collected

    def _check_component(self, record: PluginRecord, kind: str, base: type, component: Any,
                         pending: list[Registration]) -> Registration | None:
        if not isinstance(component, base):
            raise TypeError(f"register() for {kind} expects a {base.__name__} instance, got {component!r}")
        name = getattr(component, "name", None)
        if not isinstance(name, str) or not name:
            raise TypeError(f"{type(component).__name__} has no 'name'")
        if name in self.disable:  # switched off by name: it neither registers nor clashes
            log.debug("component %s %s of plugin %s disabled", kind, name, record.name)
            return None
        reg = Registration(kind, name, component, record.name, record.distribution, record.version, record.value)
        # Same name, or (backends) a method another backend already provides.
        methods = set(getattr(component, "methods", ()) if kind == "quantization" else ())
        clashes = [r for r in [*self._registry[kind].values(), *pending]
                   if r.kind == kind and (r.name == name or methods & set(getattr(r.component, "methods", ())))]
        if clashes:
            raise conflict_error(clashes[0], reg, methods, self._records, self.disable_hint)
        return reg

    def disable_hint(self, plugin_name: str) -> str:
        """How to disable ``plugin_name`` for this manager: through the environment variable, or,
        when the manager was given ``disable=`` (which replaces the variable), through that argument."""
        names = sorted(self.disable | {plugin_name})
        if self._disable_given:
            return f"PluginManager(disable={names!r})"
        return f"LOADSTONE_DISABLE_PLUGINS={','.join(names)}"

    # ------------------------------------------------------------------ queries

    @property
    def records(self) -> list[PluginRecord]:
        """Every discovered plugin and what became of it (works even while plugins conflict)."""
        self.discover()
        return list(self._records)

    @property
    def conflicts(self) -> list[PluginConflictError]:
        """The conflicts discovery found; while there is one, every query but listing raises it."""
        self.discover()
        return list(self._conflicts)

    def _usable(self) -> None:
        """Discover, then refuse to hand out components while two plugins claim the same one."""
        self.discover()
        if self._conflicts:
            first = self._conflicts[0]
            more = f" ({len(self._conflicts) - 1} more conflict(s): run `loadstone plugins`)" if len(self._conflicts) > 1 else ""
            raise PluginConflictError(first.message + more, field=first.field, found=first.found, fix=first.fix)

    def disabled_summary(self) -> str:
        """What the allow and disable lists switched off, and where they came from ("" if nothing)."""
        self.discover()
        parts = []
        disabled = [r.name for r in self._records if r.status == "disabled"]
        components = [c for r in self._records for c in r.disabled_components]
        if disabled or components:
            parts.append(f"disabled by {self.disable_source}: " + ", ".join(
                [f"plugin {name}" for name in disabled] + components))
        not_allowed = [r.name for r in self._records if r.status == "not-allowed"]
        if not_allowed:
            parts.append(f"not in the allow-list LOADSTONE_PLUGINS={','.join(self.allow or [])}: "
                         + ", ".join(f"plugin {name}" for name in not_allowed))
        return "; ".join(parts)

    def components(self, kind: str) -> list[Registration]:
        self._usable()
        return list(self._registry[kind].values())

    def _missing(self, kind: str, name: str, available: list[str], field_name: str) -> ComponentNotFoundError:
        return missing_component_error(self, kind, name, available, field_name)

    def quantization_backend(self, method: str) -> Registration:
        """The backend registration providing ``method``; :class:`ComponentNotFoundError` if none."""
        self._usable()
        reg = self._method_index.get(method)
        if reg is None:
            raise self._missing("quantization", method, list(self._method_index), "quantization")
        return reg

    def backend_for_checkpoint(self, quantization_config: dict) -> Registration | None:
        self._usable()
        for reg in self._registry["quantization"].values():
            with self.guard(reg, "plan", "claims_checkpoint"):
                claimed = reg.component.claims_checkpoint(quantization_config)
            if claimed:
                return reg
        return None

    def missing_checkpoint_backend(self, quant_method: str) -> ComponentNotFoundError:
        formats = [f for r in self._registry["quantization"].values() for f in r.component.checkpoint_formats]
        return self._missing("quantization", quant_method, formats, "config.json quantization_config.quant_method")

    def placement_strategy(self, spec: str) -> Registration:
        self._usable()
        regs = self._registry["placement"]
        if spec in regs:
            return regs[spec]
        for reg in sorted(regs.values(), key=lambda r: r.name):
            if reg.component.matches(spec):
                return reg
        raise self._missing("placement", spec, list(regs), "placement")

    def engine(self, name: str) -> Registration:
        """The engine registered as ``name``; :class:`ComponentNotFoundError` if none."""
        self._usable()
        reg = self._registry["engine"].get(name)
        if reg is None:
            raise self._missing("engine", name, [*self._registry["engine"], "auto"], "engine")
        return reg

    def engines(self) -> list[Registration]:
        """Every engine, in the order ``engine="auto"`` tries them (ascending preference, then name)."""
        self._usable()
        return sorted(self._registry["engine"].values(), key=lambda r: (r.component.preference, r.name))

    def resolvers(self) -> list[Registration]:
        self._usable()
        return sorted(self._registry["resolver"].values(), key=lambda r: (r.component.priority, r.name))

    def owner_of(self, plugin_name: str) -> PluginRecord | None:
        return next((r for r in self._records if r.name == plugin_name), None)

    # ------------------------------------------------------------------ lifecycle hooks

    def call(self, hook_name: str, stage: str, /, **kwargs: Any) -> list[RequestChange]:
        """Call every implementation of a lifecycle hook; a failure names the plugin.

        ``hook_name`` and ``stage`` are positional-only because ``loadstone_load_failed`` itself
        takes a ``stage`` argument, which arrives in ``kwargs``. Returns the request fields each
        implementation changed (only ``loadstone_before_load`` may), so the report can say who
        changed what.
        """
        if hook_name == "loadstone_load_failed":
            self.discover()  # a conflict may be why the load failed: still tell the plugins
        else:
            self._usable()
        hook = getattr(self._pm.hook, hook_name)
        request = kwargs.get("request") if hook_name == "loadstone_before_load" else None
        changes: list[RequestChange] = []
        # pluggy calls implementations last-registered first; keep that order.
        for impl in reversed(hook.get_hookimpls()):
            before = request.to_dict() if request is not None else None
            try:
                impl.function(**{arg: kwargs[arg] for arg in impl.argnames})
            except Exception as exc:
                if hook_name == "loadstone_load_failed":
                    log.warning("plugin %s raised in loadstone_load_failed: %s", impl.plugin_name, exc)
                    continue
                raise self.hook_error(impl.plugin_name, stage, exc, hook_name) from exc
            if before is not None:
                after = request.to_dict()
                changes += [RequestChange(impl.plugin_name, self.owner_of(impl.plugin_name), key, before[key], after[key])
                            for key in after if after[key] != before.get(key)]
        return changes

    def guard(self, reg: Registration, stage: str, what: str) -> "_Guard":
        """Run a component method: a deliberate :class:`LoadstoneError` passes through as it is;
        anything else becomes a :class:`PluginHookError` naming the plugin, distribution and stage.

        A plain class, not a generator context manager: the kernel enters it once per tensor for
        some methods (estimates, ``load_tensor``), where a generator's overhead adds up."""
        return _Guard(self, reg, stage, what)

    def hook_error(self, plugin_name: str, stage: str, exc: BaseException, what: str) -> LoadstoneError:
        """The :class:`PluginHookError` for ``exc``, raised by ``plugin_name`` during ``stage``."""
        return hook_error(self, plugin_name, stage, exc, what)

    def describe(self) -> list[dict[str, Any]]:
        """JSON-serialisable description of every discovered plugin and its components (what
        ``loadstone plugins --json`` prints; works while plugins conflict)."""
        self.discover()
        return [describe_record(record) for record in self._records]


class _Guard:
    __slots__ = ("manager", "reg", "stage", "what")

    def __init__(self, manager: PluginManager, reg: Registration, stage: str, what: str):
        self.manager, self.reg, self.stage, self.what = manager, reg, stage, what

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: Any, exc: Any, tb: Any) -> bool:
        if exc is None or not isinstance(exc, Exception) or isinstance(exc, LoadstoneError):
            return False
        raise self.manager.hook_error(self.reg.plugin, self.stage, exc,
                                      f"{self.reg.kind} {self.reg.name!r}: {self.what}") from exc


_default: PluginManager | None = None
_default_lock = threading.Lock()


def get_plugin_manager() -> PluginManager:
    """The process-wide manager configured from the environment (created on first use)."""
    global _default
    with _default_lock:
        if _default is None:
            _default = PluginManager()
        return _default


def reset_plugin_manager() -> None:
    """Forget the process-wide manager so the next use re-reads the environment."""
    global _default
    with _default_lock:
        _default = None
