"""The resolver kit: :class:`ResolverKit` and :func:`check_resolver`."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

from ...contract.errors import LoadstoneError, PluginHookError
from ...contract.sources import ADAPTER_CONFIG, ResolveContext, ResolvedSource
from .report import CheckResult, ConformanceReport, Kit

RESOLVER_CHECKS = {
    "listing": "a fresh `loadstone plugins --json` lists the resolver from its distribution without importing a "
               "heavy library",
    "foreign_references": "references of other resolvers' kinds get None (the next resolver is asked), never an "
                          "exception",
    "own_references": "its own references resolve to a model or adapter folder, plan through loadstone, and the "
                      "report's source decision names the plugin and distribution",
    "broken_references": "its own broken references raise a typed LoadstoneError with a fix, directly and through "
                         "loadstone.plan, so no later resolver guesses",
}

#: References no resolver of a new scheme should claim: Hub ids, paths, URLs of other schemes.
FOREIGN_REFERENCES = ("org/model", "org/model@main", "./models/not-here", "/nonexistent/model/folder",
                      "s3://bucket/model", "https://example.com/model.tar", "hf://org/model")


class ResolverKit(Kit):
    """Checks a resolver with references it owns, broken ones it owns, and foreign ones.

    :param name: the resolver's name.
    :param own: references it must resolve (e.g. ``"catalog://tiny-llama"``).
    :param broken: references of its own kind that cannot resolve.
    :param foreign: references it must leave to others (default :data:`FOREIGN_REFERENCES`).
    :param context: ``ResolveContext`` fields for every resolution (``cache_dir``, ``offline``,
        ``revision``, ``token``); ``loadstone.plan`` gets the same keywords.
    """

    kind = "resolver"
    checks = RESOLVER_CHECKS

    def __init__(self, name: str, *, own: Iterable[str] = (), broken: Iterable[str] = (),
                 foreign: Iterable[str] = FOREIGN_REFERENCES, context: dict[str, Any] | None = None, **kwargs: Any):
        self.name = name
        self.context = dict(context or {})
        self.own = list(own)
        self.broken = list(broken)
        self.foreign = list(foreign)
        super().__init__(**kwargs)

    def _find(self) -> Any:
        for reg in self.plugins.resolvers():
            if reg.name == self.name:
                return reg
        raise LookupError(f"no resolver named {self.name!r} is registered "
                          f"(registered: {', '.join(r.name for r in self.plugins.resolvers())})")

    @property
    def resolver(self) -> Any:
        return self.registration.component

    def ctx(self, **fields: Any) -> ResolveContext:
        return ResolveContext(**{**self.context, **fields})

    def plan(self, reference: str) -> Any:
        import loadstone

        return loadstone.plan(reference, plugins=self.plugins, **self.context)

    # -- checks ----------------------------------------------------------------------------
    def check_foreign_references(self, result: CheckResult) -> None:
        for reference in self.foreign:
            for weights in (True, False):
                try:
                    found = self.resolver.resolve(reference, self.ctx(offline=True, weights=weights))
                except Exception as exc:
                    result.expect(False, f"{reference!r} (weights={weights}) raised {type(exc).__name__}: {exc}")
                    continue
                result.expect(found is None, f"{reference!r} (weights={weights}) was claimed: {found}")
        result.record("foreign", self.foreign)

    def check_own_references(self, result: CheckResult) -> None:
        if not self.own:
            result.skip("no own references were given (own=[...])")
            return
        for reference in self.own:
            for weights in (True, False):
                found = self.resolver.resolve(reference, self.ctx(weights=weights))
                if not result.expect(isinstance(found, ResolvedSource),
                                     f"{reference!r} (weights={weights}) resolved to {found!r}, not a ResolvedSource"):
                    continue
                folder = Path(found.path)
                result.expect(folder.is_dir() and ((folder / "config.json").is_file()
                                                   or (folder / ADAPTER_CONFIG).is_file()),
                              f"{reference!r} resolved to {folder}, which holds neither config.json nor "
                              f"{ADAPTER_CONFIG}")
                result.expect(found.reference == reference,
                              f"{reference!r}: ResolvedSource.reference is {found.reference!r}")
            plan = self.plan(reference)
            for problem in self.owner_problems(plan.report.decision("source"), "source"):
                result.expect(False, f"{reference!r}: {problem}")
        result.record("own", self.own)

    def check_broken_references(self, result: CheckResult) -> None:
        if not self.broken:
            result.skip("no broken references were given (broken=[...])")
            return
        errors = {}
        for reference in self.broken:
            try:
                found = self.resolver.resolve(reference, self.ctx())
            except LoadstoneError as exc:
                result.expect(exc.fix, f"{reference!r}: {type(exc).__name__} without a fix: {exc.message}")
                errors[reference] = f"{type(exc).__name__}: {exc.message}"
            except Exception as exc:
                result.expect(False, f"{reference!r} raised {type(exc).__name__}, not a LoadstoneError: {exc}")
            else:
                result.expect(False, f"{reference!r} is broken but resolved to {found!r} (return None only for "
                                     f"references that are not yours; raise ResolutionError for yours)")
            try:
                self.plan(reference)
            except PluginHookError as exc:
                result.expect(False, f"{reference!r}: through loadstone.plan it became a PluginHookError: {exc}")
            except LoadstoneError:
                pass
            else:
                result.expect(False, f"{reference!r} planned without error through loadstone.plan")
        result.record("errors", errors)


def check_resolver(name: str, *, only: Iterable[str] | None = None, skip: Iterable[str] = (),
                   **kwargs: Any) -> ConformanceReport:
    """Run the resolver checks (:data:`RESOLVER_CHECKS`) for the resolver registered as ``name``;
    the keyword arguments are :class:`ResolverKit`'s (``own``, ``broken``, ``foreign``, ``context``,
    ``plugins``, ``distribution``, ``heavy_modules``, ``workdir``)."""
    return ResolverKit(name, **kwargs).run(only=only, skip=skip)
