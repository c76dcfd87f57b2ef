"""Safetensors headers of a Hub repo read with HTTP range requests, for plans of uncached repos.

A plan needs each weight file's header and size, never its data. huggingface_hub's
``get_safetensors_metadata`` reads the first 100 kB of every file (for a small shard that is all
of its weights), decodes the header leniently, keeps the last of two equal tensor names and does
not return the header's length, so the kernel's checks (duplicate names, data end = file size -
8 - header length) could not be applied to what it returns. So the two ranges are fetched here,
with huggingface_hub's own URL builder, HTTP session, auth headers and error mapping: bytes 0-7
(the header length), then exactly the header. The raw bytes are validated by the kernel like a
local file's (``safetensors_header.remote_safetensors_header``).
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath

from ..contract.checkpoint import PICKLE_INDEX, PICKLE_SINGLE, SAFE_INDEX, SAFE_SINGLE, RemoteHeader
from ..contract.sources import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from ..safetensors_header import MAX_HEADER_BYTES


def snapshot_has_weights(folder: Path) -> bool:
    """Whether a cached snapshot holds the weight files it needs (a plan may have left only configs)."""
    if (folder / ADAPTER_CONFIG).is_file():
        return any((folder / name).is_file() for name in ADAPTER_WEIGHTS)
    if (folder / SAFE_SINGLE).is_file():  # read before an index, as the inspect stage does
        return True
    if (folder / SAFE_INDEX).is_file():
        try:
            names = set(json.loads((folder / SAFE_INDEX).read_text(encoding="utf-8"))["weight_map"].values())
            return all((folder / name).is_file() for name in names)
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return True  # a broken index is the inspect stage's to report, as it is for any folder
    return (any(folder.glob("*.safetensors")) or (folder / PICKLE_SINGLE).is_file()
            or (folder / PICKLE_INDEX).is_file())


def weight_files(folder: Path, sizes: dict[str, int]) -> list[str]:
    """The safetensors files whose headers a plan needs: ``model.safetensors`` where the repo has it
    (the inspect stage, like ``from_pretrained``, reads it before an index), else the index's
    shards, else the root's files.

    ``sizes`` is the repo's file listing. Shards the listing lacks, or whose names leave the folder,
    are not fetched: the inspect stage then reports them exactly as for a local folder.
    """
    if SAFE_SINGLE in sizes:
        return [SAFE_SINGLE]
    index = folder / SAFE_INDEX
    if index.is_file():
        try:
            names = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return []  # inspect reports the broken index
        return sorted(n for n in names if isinstance(n, str) and n in sizes and ".." not in PurePosixPath(n).parts)
    return sorted(n for n in sizes if n.endswith(".safetensors") and "/" not in n)


def fetch_remote_headers(repo_id: str, commit: str, folder: Path, token: str | bool | None) -> dict[str, RemoteHeader]:
    """Headers (and sizes) of the weight files of ``repo_id`` at ``commit``, without their data."""
    from huggingface_hub import HfApi, hf_hub_url
    from huggingface_hub.errors import HfHubHTTPError
    from huggingface_hub.hf_api import RepoFile
    from huggingface_hub.utils import build_hf_headers, get_session

    # The HTTP library's own errors (connection refused, timeouts) are HfHubHTTPError's other base.
    transport_errors = tuple(b for b in HfHubHTTPError.__bases__ if b is not OSError)
    try:
        sizes = {f.path: f.size for f in HfApi().list_repo_tree(repo_id, revision=commit, recursive=True, token=token)
                 if isinstance(f, RepoFile)}
        names = weight_files(folder, sizes)
        headers = build_hf_headers(token=token)
        session = get_session()

        def fetch(name: str) -> tuple[str, RemoteHeader]:
            url = hf_hub_url(repo_id, name, revision=commit)
            return name, _read_header(session, url, headers, sizes[name])

        with ThreadPoolExecutor(max_workers=max(1, min(8, len(names)))) as pool:
            return dict(pool.map(fetch, names))
    except transport_errors as exc:
        if isinstance(exc, OSError):
            raise
        raise OSError(f"{type(exc).__name__}: {exc}") from exc


def _read_header(session, url: str, headers: dict[str, str], size: int) -> RemoteHeader:
    if size < 8:
        return RemoteHeader(size, None, b"", url)
    n = int.from_bytes(_read_range(session, url, headers, 0, 8), "little")
    if n == 0 or n > MAX_HEADER_BYTES or n > size - 8:
        return RemoteHeader(size, n, b"", url)  # the kernel's checks say what is wrong
    return RemoteHeader(size, n, _read_range(session, url, headers, 8, n), url)


def _read_range(session, url: str, headers: dict[str, str], start: int, length: int) -> bytes:
    """``length`` bytes from ``start``. Streamed and cut off, so that a server that ignores ``Range``
    and answers 200 with the whole file still costs no more than the bytes asked for."""
    from huggingface_hub.utils import hf_raise_for_status

    with session.stream("GET", url, headers={**headers, "Range": f"bytes={start}-{start + length - 1}"}) as response:
        if response.status_code >= 400:
            response.read()
            hf_raise_for_status(response)
        skip = 0 if response.status_code == 206 else start  # 200: the body starts at byte 0
        data = bytearray()
        for chunk in response.iter_bytes():
            data += chunk
            if len(data) >= skip + length:
                break
    return bytes(data[skip:skip + length])
