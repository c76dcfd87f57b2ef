"""``catalog://NAME`` references, resolved through a catalog file.

The catalog is a TOML or JSON file named by the ``LOADSTONE_CATALOG`` environment variable. It
maps names to folders (base models or adapters); relative paths are taken from the catalog
file's own folder, so a catalog can travel with the models it lists::

    # models.toml
    [models.llama-8b]
    path = "/shared/models/llama-3.1-8b"
    owner = "ml-platform"

    [models]
    support-bot = "adapters/support-bot-v3"     # short form: just the path

The same catalog in JSON: ``{"models": {"llama-8b": {"path": "...", "owner": "..."}}}``.

An adapter whose ``adapter_config.json`` says ``"base_model_name_or_path": "catalog://llama-8b"``
finds its base through this resolver too.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

from loadstone import ResolutionError, ResolveContext, ResolvedSource, Resolver, hookimpl

SCHEME = "catalog://"
ENV_VAR = "LOADSTONE_CATALOG"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def _parse(path: Path) -> Any:
    """The catalog file's content; TOML by suffix, JSON otherwise."""
    data = path.read_bytes()
    if path.suffix.lower() == ".toml":
        if sys.version_info >= (3, 11):
            import tomllib
        else:  # pragma: no cover - Python 3.10
            import tomli as tomllib
        return tomllib.loads(data.decode("utf-8"))
    return json.loads(data.decode("utf-8"))


def read_catalog(path: str | os.PathLike[str]) -> dict[str, dict[str, Any]]:
    """Read a catalog file into ``{name: {"path": Path, ...other fields}}``.

    Raises :class:`loadstone.ResolutionError` naming the file and field for anything malformed.
    """
    path = Path(path).expanduser()
    try:
        raw = _parse(path)
    except FileNotFoundError:
        raise ResolutionError(f"the catalog file {str(path)!r} does not exist.", file=path, field=ENV_VAR,
                              fix=f"point {ENV_VAR} at an existing catalog file") from None
    except OSError as exc:
        raise ResolutionError(f"the catalog file cannot be read: {exc.strerror or exc}.", file=path,
                              field=ENV_VAR, fix="check the file's permissions") from None
    except ValueError as exc:  # json.JSONDecodeError, tomllib.TOMLDecodeError, UnicodeDecodeError
        raise ResolutionError("the catalog file is not valid TOML/JSON.", file=path, field="(whole file)",
                              expected="a [models] table (TOML) or {\"models\": {...}} (JSON)",
                              found=str(exc)[:160], fix="fix the syntax error") from None
    models = raw.get("models") if isinstance(raw, dict) else None
    if not isinstance(models, dict):
        raise ResolutionError("the catalog file has no models table.", file=path, field="models",
                              expected="a table mapping names to paths", found=type(models).__name__,
                              fix="add a [models] table (TOML) or a \"models\" object (JSON)")
    entries: dict[str, dict[str, Any]] = {}
    for name, entry in models.items():
        if isinstance(entry, str):
            entry = {"path": entry}
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str) or not entry["path"]:
            raise ResolutionError(f"catalog entry {name!r} has no path.", file=path, field=f"models.{name}.path",
                                  expected="a folder path (relative paths are taken from the catalog's folder)",
                                  found=repr(entry)[:120], fix=f"write models.{name}.path = \"/path/to/folder\"")
        folder = Path(entry["path"]).expanduser()
        if not folder.is_absolute():
            folder = path.parent / folder
        entries[str(name)] = {**entry, "path": folder}
    return entries


class CatalogResolver(Resolver):
    """Resolves ``catalog://NAME`` through the catalog file named by ``LOADSTONE_CATALOG``."""

    name = "catalog"
    # Before the Hub resolver (900), which would otherwise try "catalog://x" as a repo id and
    # fail; after the local resolver (100): a folder literally named "catalog:" still wins.
    priority = 200
    description = f"catalog://NAME references, looked up in the file named by {ENV_VAR}"

    def resolve(self, reference: str, ctx: ResolveContext) -> ResolvedSource | None:
        if not reference.startswith(SCHEME):
            return None  # not ours: the next resolver is asked
        name = reference[len(SCHEME):]
        if not _NAME.match(name):
            raise ResolutionError(f"{reference!r} is not a valid catalog reference.", field="reference",
                                  expected="catalog://NAME with NAME made of letters, digits, '.', '_', '-'",
                                  found=reference, fix="use the name of a [models] entry in the catalog file")
        catalog_file = os.environ.get(ENV_VAR)
        if not catalog_file:
            raise ResolutionError(f"{reference!r} needs a catalog, and {ENV_VAR} is not set.", field=ENV_VAR,
                                  expected="the path of a TOML or JSON catalog file", found="unset",
                                  fix=f"export {ENV_VAR}=/path/to/models.toml")
        entries = read_catalog(catalog_file)
        entry = entries.get(name)
        if entry is None:
            close = difflib.get_close_matches(name, entries, n=3)
            raise ResolutionError(
                f"the catalog has no model named {name!r}.", file=catalog_file, field="models",
                expected=", ".join(sorted(entries)) or "(the catalog is empty)", found=name,
                fix=f"did you mean {' or '.join(repr(c) for c in close)}?" if close
                else "add the model to the catalog, or check the spelling")
        folder: Path = entry["path"]
        if not folder.is_dir():
            raise ResolutionError(f"catalog entry {name!r} points at {str(folder)!r}, which is not a folder.",
                                  file=catalog_file, field=f"models.{name}.path", expected="an existing folder",
                                  found=str(folder), fix="fix the path in the catalog, or restore the folder")
        extra = {"catalog": str(Path(catalog_file).resolve()), "entry": name,
                 **{k: v for k, v in entry.items() if k != "path"}}
        return ResolvedSource(reference, folder.resolve(), "catalog", extra=extra)


@hookimpl
def loadstone_register_resolvers(register):
    register(CatalogResolver())
