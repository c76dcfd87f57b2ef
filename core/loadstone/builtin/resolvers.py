"""Built-in resolvers: local folders and Hugging Face Hub ids (through the local cache)."""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..contract.errors import ResolutionError
from ..contract.hookspecs import hookimpl
from ..contract.sources import ResolveContext, ResolvedSource, Resolver
from ..contract.units import shown

_HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*(/[\w.-]+)?)(@(?P<rev>[\w./-]+))?$")
# Files a base model or adapter needs; tokenizers are not loadstone's job.
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt"]
# What a plan downloads: config, shard index, adapter and quantization configs (weights: headers only).
_PLAN_PATTERNS = ["*.json"]


def _looks_like_path(reference: str) -> bool:
    return reference.startswith(("/", "./", "../", "~", ".\\", "..\\")) or reference in {".", ".."} or (
        len(reference) > 1 and reference[1] == ":")


def _state(path: Path) -> str:
    """``"dir"``, ``"file"``, ``"missing"``, or why the path cannot even be looked at (a name too
    long for the filesystem, a NUL byte, a link loop)."""
    try:
        if path.is_dir():
            return "dir"
        return "file" if path.exists() else "missing"
    except (OSError, ValueError) as exc:
        return f"unusable: {getattr(exc, 'strerror', None) or exc}"


class LocalFolderResolver(Resolver):
    name = "local"
    priority = 100
    description = "an existing folder (relative base paths of adapters are taken from the adapter folder)"

    def resolve(self, reference: str, ctx: ResolveContext) -> ResolvedSource | None:
        try:
            raw = Path(reference).expanduser()
        except RuntimeError as exc:  # ~user naming no user (or no home directory to expand ~ to)
            raise ResolutionError(f"{reference!r} starts with ~, which cannot be expanded here: {exc}.",
                                  field="reference", expected="a folder path", found=reference[:200],
                                  fix="write the folder's path out in full") from None
        candidates = [raw]
        if ctx.relative_to is not None and not raw.is_absolute():
            candidates.insert(0, ctx.relative_to / raw)
        states = [_state(c) for c in candidates]
        for candidate, state in zip(candidates, states):
            if state == "dir":
                return ResolvedSource(reference, candidate.resolve(), "local")
        if "file" in states:  # an existing file ("model/model.safetensors") is no Hub id either
            where = " or ".join(str(c) for c, st in zip(candidates, states) if st == "file")[:400]
            raise ResolutionError(f"{reference!r} is a file, not a model folder.", file=where, field="reference",
                                  fix="point at the folder holding config.json (or adapter_config.json)")
        if _looks_like_path(reference):
            where = " or ".join(str(c) for c in candidates)[:400]
            unusable = next((s for s in states if s.startswith("unusable")), None)
            if unusable:
                raise ResolutionError(f"the path {reference[:200]!r} cannot be used ({unusable[10:]}).", file=where,
                                      field="reference", expected="an existing folder", found=reference[:200],
                                      fix="check the path")
            raise ResolutionError(f"the folder {reference!r} does not exist.", file=where, field="reference",
                                  fix="check the path; relative paths are taken from the current directory")
        return None


class HubResolver(Resolver):
    name = "hub"
    priority = 900
    description = "Hugging Face Hub ids org/name[@revision], via the local cache (works with HF_HUB_OFFLINE=1)"

    def resolve(self, reference: str, ctx: ResolveContext) -> ResolvedSource | None:
        match = _HUB_ID.match(reference)
        if not match or "/" not in match.group("repo"):
            return None
        repo_id = match.group("repo")
        pinned = match.group("rev")
        _check_repo_id(reference, repo_id)
        if pinned and ctx.revision and pinned != ctx.revision:
            # Silently preferring one of them would load a snapshot the user did not ask for.
            raise ResolutionError(
                f"{reference!r} pins revision {pinned!r} but revision={ctx.revision!r} was also given.",
                field="revision", expected="one revision", found=f"{pinned!r} and {ctx.revision!r}",
                fix=f"drop one: {repo_id}@{ctx.revision}, or {reference} without revision= (CLI: --revision)")
        revision = pinned or ctx.revision or "main"
        _check_revision(revision)
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import (
            HfHubHTTPError,
            HFValidationError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )

        try:
            if not ctx.weights and not ctx.offline:
                return self._headers_only(reference, repo_id, revision, ctx)
            path = snapshot_download(repo_id, revision=revision, cache_dir=ctx.cache_dir,
                                     local_files_only=ctx.offline, token=ctx.token, allow_patterns=_HUB_PATTERNS)
        except LocalEntryNotFoundError as exc:
            if ctx.offline:
                fix = (f"download it first (`hf download {repo_id} --revision {revision}`), or leave offline mode "
                       f"so that loadstone can download it ({_how_to_go_online()})")
            else:
                fix = (f"check the id and the network, or download it first "
                       f"(`hf download {repo_id} --revision {revision}`)")
            if ctx.cache_dir:
                fix += f"; cache folder: {ctx.cache_dir}"
            if not match.group("rev"):
                # "models/llama" may be a mistyped local folder rather than a Hub id.
                fix += f"; if you meant a local folder: {Path(reference).resolve()} does not exist"
            # huggingface_hub >= 2 tells a snapshot with files missing (e.g. a plan's: configs only) apart.
            partly = type(exc).__name__ == "IncompleteSnapshotError"
            raise ResolutionError(
                f"{repo_id} at revision {revision!r} is {'only partly' if partly else 'not'} in the local Hugging "
                f"Face cache and downloads are {'disabled (offline mode)' if ctx.offline else 'unavailable'}"
                + (" (a plan downloads configs and weight headers only)." if partly else "."), field="reference",
                found=f"{repo_id}@{revision}", expected="a cached snapshot", fix=fix) from exc
        except (RepositoryNotFoundError, RevisionNotFoundError) as exc:
            raise ResolutionError(f"the Hub has no {repo_id} at revision {revision!r}.", field="reference",
                                  found=f"{repo_id}@{revision}",
                                  fix="check the id and revision (private repos need a token)") from exc
        except HFValidationError as exc:  # whatever huggingface_hub refuses that the checks above let through
            raise ResolutionError(f"huggingface_hub refuses {repo_id}@{revision}: {exc}", field="reference",
                                  found=f"{repo_id}@{revision}"[:300], fix="check the id and revision") from exc
        except (HfHubHTTPError, OSError) as exc:
            raise ResolutionError(f"could not fetch {repo_id}@{revision}: {exc}", field="reference",
                                  found=f"{repo_id}@{revision}", fix="check the network, or use the cache "
                                  "with HF_HUB_OFFLINE=1") from exc
        path = Path(path)
        return ResolvedSource(reference, path, "hub", repo_id=repo_id, revision=revision, commit=path.name)

    def _headers_only(self, reference: str, repo_id: str, revision: str, ctx: ResolveContext) -> ResolvedSource:
        """For a plan: a complete cached snapshot if there is one, else configs plus remote headers.

        A plan needs configs and weight headers only: for a 70B model that is a few hundred kB to
        fetch instead of 140 GB.
        """
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError

        from .hub_headers import ADAPTER_CONFIG, fetch_remote_headers, snapshot_has_weights

        def download(patterns: list[str], local_files_only: bool = False, at: str = revision) -> Path:
            return Path(snapshot_download(repo_id, revision=at, cache_dir=ctx.cache_dir, token=ctx.token,
                                          local_files_only=local_files_only, allow_patterns=patterns))

        try:
            # No network at all when the cache already holds it. An earlier plan may have left a
            # snapshot with configs only; huggingface_hub refuses it (IncompleteSnapshotError) when
            # it cached the repo's file list, snapshot_has_weights() when it did not.
            cached = download(_HUB_PATTERNS, local_files_only=True)
            if snapshot_has_weights(cached):
                return ResolvedSource(reference, cached, "hub", repo_id=repo_id, revision=revision,
                                      commit=cached.name)
        except LocalEntryNotFoundError:
            pass
        path = download(_PLAN_PATTERNS)
        commit = path.name  # later requests use the commit, so every file comes from the same one
        if (path / ADAPTER_CONFIG).is_file():
            # An adapter's weights are small and its validation reads them: download it whole.
            path = download(_HUB_PATTERNS, at=commit)
            return ResolvedSource(reference, path, "hub", repo_id=repo_id, revision=revision, commit=commit)
        headers = fetch_remote_headers(repo_id, commit, path, ctx.token)
        return ResolvedSource(reference, path, "hub", repo_id=repo_id, revision=revision, commit=commit,
                              remote_headers=headers)


def _check_repo_id(reference: str, repo_id: str) -> None:
    """The Hub's own rules for ids (huggingface_hub's validator), as a ResolutionError: ``org/..``
    or a 5000-character name is a mistyped reference, not a crash."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise ResolutionError(f"{reference[:200]!r} is neither an existing folder nor a valid Hub id.",
                              field="reference", expected="a folder, or org/name with letters, digits, '-', '_' and "
                              "'.' (not starting or ending with '-' or '.', no '--' or '..', at most 96 characters)",
                              found=repo_id[:200], fix=f"check the path or id ({str(exc).split(':')[0][:200]})") from None


_MAX_REVISION = 255


def _check_revision(revision: str) -> None:
    """A branch, tag or commit: text without '..' components, NUL or whitespace, of a sane length
    (it becomes part of a path in the cache and of a URL)."""
    if not isinstance(revision, str):
        raise ResolutionError("the revision must be text.", field="revision", expected="a branch, tag or commit",
                              found=shown(revision, 200),
                              fix="pass the branch, tag or commit id as text, e.g. revision=\"main\"")
    parts = revision.split("/")
    if (not revision or len(revision) > _MAX_REVISION or any(p in ("", ".", "..") for p in parts)
            or any(c.isspace() or ord(c) < 32 for c in revision)):
        raise ResolutionError(f"{revision[:80]!r} is not a usable revision.", field="revision",
                              expected=f"a branch, tag or commit: at most {_MAX_REVISION} characters, no '..' "
                                       f"components, no whitespace", found=revision[:200],
                              fix="pass the branch, tag or commit id as the Hub shows it (e.g. main, v1.0, or a "
                                  "40-character commit hash)")


def _how_to_go_online() -> str:
    """Undo whichever switch made this load offline."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}:
        return "unset HF_HUB_OFFLINE, which is set in the environment, and drop offline=True / --offline if given"
    return "drop offline=True (CLI: --offline)"


@hookimpl
def loadstone_register_resolvers(register):
    register(LocalFolderResolver())
    register(HubResolver())
