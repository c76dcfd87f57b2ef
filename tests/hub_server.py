"""A small Hub-shaped HTTP server over local folders, for testing against huggingface_hub's real client.

It serves what huggingface_hub calls for ``snapshot_download`` (repo info, the file tree, HEAD
and GET on ``/{repo}/resolve/{revision}/{file}``), for file sizes (the tree) and for range reads
of safetensors headers (GET with ``Range`` answered 206 with ``Content-Range``), with the headers
the client checks (``X-Repo-Commit``, ``ETag``, ``Content-Length``). Errors carry the Hub's
``X-Error-Code`` so the client raises its own typed errors. Every request is logged (method, file,
range, bytes sent) so that tests can say what was read. Not a mock of loadstone: loadstone and
huggingface_hub run unchanged against it.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

_API = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/(?P<what>revision|tree)/(?P<rev>[^/]+)(?P<path>/.*)?$")
_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)$")
_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")


@dataclass(frozen=True)
class Logged:
    method: str
    path: str
    file: str | None  # for /resolve/ requests: the file's name in the repo
    range: tuple[int, int] | None  # inclusive byte range asked for
    sent: int  # body bytes sent


@dataclass
class Repo:
    folder: Path
    commit: str

    def files(self) -> dict[str, Path]:
        return {p.name: p for p in sorted(self.folder.iterdir()) if p.is_file()}


class HubServer:
    """``with HubServer({"org/tiny": Repo(folder, commit)}) as hub: hub.url, hub.log``."""

    def __init__(self, repos: dict[str, Repo]):
        self.repos = repos
        self.log: list[Logged] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> "HubServer":
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def record(self, entry: Logged) -> None:
        with self._lock:
            self.log.append(entry)

    def take_log(self) -> list[Logged]:
        """The requests since the last call (one test step's)."""
        with self._lock:
            taken, self.log = self.log, []
        return taken


def _etag(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _handler_for(hub: HubServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as the Hub; every answer has a Content-Length

        def log_message(self, *args: object) -> None:  # quiet: the test reads hub.log instead
            pass

        def do_GET(self) -> None:
            self._serve(body=True)

        def do_HEAD(self) -> None:
            self._serve(body=False)

        def _serve(self, body: bool) -> None:
            path = unquote(urlsplit(self.path).path)
            api, resolve = _API.match(path), _RESOLVE.match(path)
            match = api or resolve
            repo = hub.repos.get(match.group("repo")) if match else None
            if repo is None:
                return self._error(404, "RepoNotFound", path)
            rev = match.group("rev")
            if rev not in ("main", repo.commit):
                return self._error(404, "RevisionNotFound", path)
            files = repo.files()
            if api and api.group("what") == "revision":
                info = {"id": api.group("repo"), "sha": repo.commit, "private": False,
                        "siblings": [{"rfilename": name} for name in files]}
                return self._send(200, json.dumps(info).encode(), body, path)
            if api:  # the tree: the client's file sizes (flat repos only)
                tree = [{"type": "file", "path": name, "size": p.stat().st_size, "oid": _etag(p)}
                        for name, p in files.items()]
                return self._send(200, json.dumps(tree).encode(), body, path)
            name = resolve.group("file")
            if name not in files:
                return self._error(404, "EntryNotFound", path, commit=repo.commit)
            data = files[name].read_bytes()
            headers = {"X-Repo-Commit": repo.commit, "ETag": f'"{_etag(files[name])}"', "Accept-Ranges": "bytes"}
            wanted = _RANGE.match(self.headers.get("Range", ""))
            if wanted:
                start, end = int(wanted.group(1)), min(int(wanted.group(2) or len(data) - 1), len(data) - 1)
                headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
                return self._send(206, data[start:end + 1], body, path, name, (start, end), headers)
            return self._send(200, data, body, path, name, None, headers)

        def _error(self, status: int, code: str, path: str, commit: str | None = None) -> None:
            headers = {"X-Error-Code": code, **({"X-Repo-Commit": commit} if commit else {})}
            self._send(status, json.dumps({"error": code}).encode(), True, path, None, None, headers)

        def _send(self, status: int, payload: bytes, body: bool, path: str, file: str | None = None,
                  span: tuple[int, int] | None = None, headers: dict[str, str] | None = None) -> None:
            self.send_response(status)
            content_type = "application/json" if path.startswith("/api/") or status >= 400 else "application/octet-stream"
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(payload)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            sent = 0
            if body:
                try:
                    self.wfile.write(payload)
                    sent = len(payload)
                except (BrokenPipeError, ConnectionResetError):  # the client stopped reading: fine
                    pass
            hub.record(Logged(self.command, path, file, span, sent))

    return Handler
