"""A small fake Hugging Face Hub on 127.0.0.1 for download tests.

It implements only what ``huggingface_hub`` (2.x) calls for ``HfApi().model_info`` and
``snapshot_download(..., local_dir=...)``:

* ``GET /api/models/{repo}[/revision/{rev}]``: repo info with the resolved commit (``sha``);
* ``GET /api/models/{repo}/tree/{rev}``: the recursive file listing (one page);
* ``HEAD``/``GET /{repo}/resolve/{rev}/{path}``: file metadata (``X-Repo-Commit``, ``ETag``,
  ``Content-Length``) and content, with ``Range: bytes=N-`` support.

Errors carry the ``X-Error-Code`` header the real Hub sends (``RepoNotFound``, ``RevisionNotFound``,
``EntryNotFound``), so huggingface_hub raises its usual exceptions.
"""
from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

LFS_MIN_BYTES = 1024  # files at least this large are listed as LFS files (sha256 ETag), like the Hub


@dataclass
class FakeRepo:
    """One model repository with a single commit, reachable by branch names or commit prefixes."""

    repo_id: str
    files: dict[str, bytes]
    commit: str
    branches: tuple[str, ...] = ("main",)

    def resolve(self, revision: str) -> str | None:
        """The commit for ``revision``: a branch, the full commit or a prefix of at least 7 hex digits."""
        if revision in self.branches or revision == self.commit:
            return self.commit
        if re.fullmatch(r"[0-9a-f]{7,40}", revision) and self.commit.startswith(revision):
            return self.commit
        return None

    def etag(self, path: str) -> str:
        """sha256 for LFS-sized files, the git blob id otherwise (as the Hub does)."""
        data = self.files[path]
        if len(data) >= LFS_MIN_BYTES:
            return hashlib.sha256(data).hexdigest()
        return git_blob_id(data)

    def tree(self) -> list[dict]:
        """The recursive tree listing in the Hub's JSON shape."""
        entries = []
        for path in sorted(self.files):
            data = self.files[path]
            entry = {"type": "file", "path": path, "size": len(data), "oid": git_blob_id(data)}
            if len(data) >= LFS_MIN_BYTES:
                entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
            entries.append(entry)
        return entries


def git_blob_id(data: bytes) -> str:
    """The git object id of a blob holding ``data``."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def repo_from_dir(repo_id: str, model_dir: str | Path, commit_prefix: str = "",
                  extra_files: dict[str, bytes] | None = None) -> FakeRepo:
    """A repo holding every file of ``model_dir`` (plus ``extra_files``); the commit id is derived
    from the contents and starts with ``commit_prefix`` (to match a pinned short revision)."""
    files = {p.name: p.read_bytes() for p in sorted(Path(model_dir).iterdir()) if p.is_file()}
    files.update(extra_files or {})
    digest = hashlib.sha1()
    for name in sorted(files):
        digest.update(name.encode() + b"\0" + git_blob_id(files[name]).encode())
    commit = (commit_prefix + digest.hexdigest())[:40]
    return FakeRepo(repo_id, files, commit)


@dataclass
class RequestLog:
    """Requests the server answered, as ``(method, path)`` with the query string dropped."""

    entries: list[tuple[str, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, method: str, path: str) -> None:
        with self.lock:
            self.entries.append((method, path))

    def snapshot(self) -> list[tuple[str, str]]:
        with self.lock:
            return list(self.entries)


class FakeHub:
    """``with FakeHub() as hub: hub.add(repo); ... hub.endpoint``: a threaded server on 127.0.0.1."""

    def __init__(self) -> None:
        self.repos: dict[str, FakeRepo] = {}
        self.log = RequestLog()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1},
                                        name="fake-hub", daemon=True)

    @property
    def endpoint(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def add(self, repo: FakeRepo) -> FakeRepo:
        self.repos[repo.repo_id] = repo
        return repo

    def start(self) -> "FakeHub":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    def __enter__(self) -> "FakeHub":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


_API_RE = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)(?:/(?P<kind>revision|tree)/(?P<rev>[^/]+)(?P<sub>/.*)?)?$")
_RESOLVE_RE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")


def _make_handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (stdlib signature)
            """Quiet: the request log is kept in ``hub.log`` instead."""

        def do_GET(self) -> None:  # noqa: N802 (stdlib name)
            self._dispatch(head=False)

        def do_HEAD(self) -> None:  # noqa: N802 (stdlib name)
            self._dispatch(head=True)

        def _dispatch(self, head: bool) -> None:
            path = urlsplit(self.path).path
            hub.log.add(self.command, path)
            api = _API_RE.match(path)
            if api and not head:
                self._api(unquote(api["repo"]), api["kind"], unquote(api["rev"] or "main"), api["sub"])
                return
            resolve = _RESOLVE_RE.match(path)
            if resolve:
                self._resolve(unquote(resolve["repo"]), unquote(resolve["rev"]), unquote(resolve["path"]), head)
                return
            self._error(404, "", "not found", head)

        def _lookup(self, repo_id: str, revision: str, head: bool) -> tuple[FakeRepo, str] | None:
            repo = hub.repos.get(repo_id)
            if repo is None:
                self._error(404, "RepoNotFound", f"Repository not found: {repo_id}", head)
                return None
            commit = repo.resolve(revision)
            if commit is None:
                self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}", head, commit=None)
                return None
            return repo, commit

        def _api(self, repo_id: str, kind: str | None, revision: str, sub: str | None) -> None:
            found = self._lookup(repo_id, revision, head=False)
            if found is None:
                return
            repo, commit = found
            if kind == "tree":
                if sub:
                    self._error(404, "EntryNotFound", f"no folder {sub} in this fake hub", False, commit)
                    return
                self._send_json(repo.tree(), commit)
                return
            info = {"id": repo.repo_id, "modelId": repo.repo_id, "sha": commit, "private": False,
                    "siblings": [{"rfilename": p} for p in sorted(repo.files)]}
            self._send_json(info, commit)

        def _resolve(self, repo_id: str, revision: str, path: str, head: bool) -> None:
            found = self._lookup(repo_id, revision, head)
            if found is None:
                return
            repo, commit = found
            if path not in repo.files:
                self._error(404, "EntryNotFound", f"{path} does not exist at {commit}", head, commit)
                return
            data = repo.files[path]
            start = 0
            status = 200
            match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", "").strip())
            if match and not head:
                start = min(int(match[1]), len(data))
                status = 206
            body = data[start:]
            self.send_response(status)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("ETag", f'"{repo.etag(path)}"')
            self.send_header("X-Repo-Commit", commit)
            self.send_header("Accept-Ranges", "bytes")
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.end_headers()
            if not head:
                self.wfile.write(body)

        def _send_json(self, value: object, commit: str) -> None:
            body = json.dumps(value).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("X-Repo-Commit", commit)
            self.end_headers()
            self.wfile.write(body)

        def _error(self, status: int, code: str, message: str, head: bool, commit: str | None = None) -> None:
            body = json.dumps({"error": message}).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            if code:
                self.send_header("X-Error-Code", code)
                self.send_header("X-Error-Message", message)
            if commit:
                self.send_header("X-Repo-Commit", commit)
            self.end_headers()
            if not head:
                self.wfile.write(body)

    return Handler
