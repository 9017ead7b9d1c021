"""A Hugging Face Hub stand-in on 127.0.0.1 serving repos from local folders, with fault switches for tests."""
from __future__ import annotations

import gzip
import hashlib
import importlib
import json
import sys
import threading
import time
from collections import Counter
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator
from urllib.parse import quote, unquote, urlsplit

import pytest
from huggingface_hub import close_session, constants

# Files the stand-in stores in "git LFS" (as a hub repo's default .gitattributes would).
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".pkl", ".ckpt", ".model", ".h5", ".msgpack")
# Environment huggingface_hub reads at import; cleared so the host's settings never leak into a test.
HUB_ENV_VARS = (
    "HF_ENDPOINT", "HF_HOME", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_ASSETS_CACHE", "HF_XET_CACHE",
    "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH",
    "HUGGINGFACE_CO_STAGING", "HF_HUB_DISABLE_PROGRESS_BARS", "HF_HUB_DISABLE_IMPLICIT_TOKEN",
)


@dataclass(frozen=True)
class ServedFile:
    """One repo file: its bytes, git blob id, and (LFS files) the sha256 the hub publishes."""

    data: bytes
    blob_id: str
    sha256: str | None


@dataclass
class ServedRepo:
    """A model repo: files by path, one commit that `main` points to, and whether it needs a token."""

    files: dict[str, ServedFile]
    commit: str
    private: bool = False


def git_blob_id(data: bytes) -> str:
    """What `git hash-object` prints for these bytes."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    """The git LFS pointer file that stands in the git tree for an LFS file."""
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


# The hub's X-Error-Message for an account past its download allowance (huggingface_hub 2.5's EgressLimitError)
EGRESS_MESSAGE = ("You've downloaded 5.1 TB over the last 30 days, compared to your account's egress allowance of "
                  "5 TB.")
TREE_PAGES_BOUND = 1_000   # far past the pages the bounds under test stop a listing at (40 answers; 64 KiB)
API_STALL_BOUND = 30.0     # seconds, far past the bounds under test (a second or two)


class HubStandIn:
    """Serves repos over HTTP the way huggingface_hub 2.4.0 expects from huggingface.co.

    Endpoints: GET /api/models/{repo}[/revision/{rev}] (model_info, `?blobs=true` for sizes and LFS
    sha256), GET /api/models/{repo}/tree/{rev} (list_repo_tree), HEAD/GET /{repo}/resolve/{rev}/{path}
    (X-Repo-Commit, ETag, X-Linked-Etag, X-Linked-Size, Range); {repo} is owner/name or, as huggingface.co also
    serves (gpt2), a name alone. Sends Xet headers only under xet_stall.

    Switches, set by tests between requests:
      wrong_sha256: paths whose published sha256 (API and ETag) is not the content's.
      cut_short: path -> bytes; the next GET of that path sends that many bytes and drops the connection.
      unavailable: paths whose GETs answer 503 (after any cut_short has fired).
      tokens: bearer tokens accepted for private repos.
      info_edit: a function given each model_info answer (a dict) that returns what is sent instead (a dict, or
        bytes sent as they are): a hostile hub's listing.
      header_edit: path -> headers sent in place of the usual ones on its resolve answers (a hostile endpoint's
        ETag or X-Repo-Commit).
      gone: paths whose resolve answers 404 EntryNotFound, with X-Repo-Commit as the hub sends it.
      egress_limited: paths whose resolve answers (HEAD and GET) 402 EgressLimitReached with EGRESS_MESSAGE, as the
        hub answers an account past its download allowance (huggingface_hub 2.5's EgressLimitError).
      body_edit: path -> how its GETs misstate the body: "longer" (twice the bytes, declared), "unframed" (four
        times the bytes, no Content-Length, until the connection closes), "gzip" (gzip-encoded).
      tree_next_forever: every tree listing page links to itself as the next one -- up to TREE_PAGES_BOUND pages,
        so that a client that does not stop it fails its test, not hangs it.
      slow_body: path -> seconds its GETs wait between 1 KiB pieces of the body.
      api_silence: seconds the API's answers (model info, tree listing) wait before they start (up to
        API_STALL_BOUND, so that a client that does not give up fails its test, not hangs it).
      api_trickle: seconds the API's answers wait between the bytes of their body (their whole body, up to
        API_STALL_BOUND).
      tree_silence: as api_silence, for the tree listing's pages alone.
      api_redirect_body: where set, the API answers each request first with a 307 to the same address (as the hub
        does for a renamed repo) that carries these bytes as its body.
      via_cdn: resolve answers an LFS file (HEAD and GET) with the hub's 302, its metadata headers and a Location on
        /cdn/{repo}/{path}, which serves the body, as huggingface.co hands LFS files to its CDN.
      cdn_endpoint: where via_cdn's Location points in place of the stand-in itself (a hostile hub's file:// URL).
      xet_stall: resolve answers an LFS file with the Xet headers (X-Xet-Hash, a Link to GET /xet-read-token, which
        names /cas as the Xet storage), and /cas answers nothing for API_STALL_BOUND seconds, then 404: a download
        hf_xet makes through its own client (HF_HUB_DISABLE_XET=0), stuck in flight.
    Counters: requests[(method, path)] for resolve calls, ranges[path] the Range headers received, cas_requests.
    """

    def __init__(self) -> None:
        self.repos: dict[str, ServedRepo] = {}
        self.wrong_sha256: set[str] = set()
        self.cut_short: dict[str, int] = {}
        self.unavailable: set[str] = set()
        self.tokens: set[str] = set()
        self.info_edit = None
        self.header_edit: dict[str, dict[str, str]] = {}
        self.gone: set[str] = set()
        self.egress_limited: set[str] = set()
        self.body_edit: dict[str, str] = {}
        self.tree_next_forever = False
        self.tree_pages = 0
        self.via_cdn = False
        self.cdn_endpoint: str | None = None
        self.slow_body: dict[str, float] = {}
        self.api_silence = 0.0
        self.api_trickle = 0.0
        self.tree_silence = 0.0
        self.api_redirect_body = b""
        self.xet_stall = False
        self.cas_requests = 0
        self.requests: Counter[tuple[str, str]] = Counter()
        self.ranges: dict[str, list[str]] = {}
        self._lock = threading.Lock()
        self._server = _QuietServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True
        self._server.block_on_close = False
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="hub-standin", daemon=True
        )

    @property
    def endpoint(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def add_repo(self, repo_id: str, folder: Path, private: bool = False) -> str:
        """Serve every file under `folder` as `repo_id`; return the commit sha `main` points to."""
        files = {}
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            data = path.read_bytes()
            is_lfs = path.name.endswith(LFS_SUFFIXES)
            sha256 = hashlib.sha256(data).hexdigest() if is_lfs else None
            blob_id = git_blob_id(lfs_pointer(sha256, len(data)) if is_lfs else data)
            files[path.relative_to(folder).as_posix()] = ServedFile(data, blob_id, sha256)
        commit = hashlib.sha1(json.dumps({p: f.blob_id for p, f in files.items()}).encode()).hexdigest()
        self.repos[repo_id] = ServedRepo(files, commit, private)
        return commit

    def gets(self, path: str) -> int:
        """How many GETs of `path` (any repo) the stand-in answered."""
        return self.requests[("GET", path)]

    def published_sha256(self, path: str, served: ServedFile) -> str | None:
        if served.sha256 is None or path not in self.wrong_sha256:
            return served.sha256
        return hashlib.sha256(b"not " + served.data).hexdigest()

    def count(self, method: str, path: str, range_header: str | None) -> None:
        with self._lock:
            self.requests[(method, path)] += 1
            if range_header:
                self.ranges.setdefault(path, []).append(range_header)

    def __enter__(self) -> HubStandIn:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
        close_session()  # drop huggingface_hub's pooled keep-alive connections to this server


class _QuietServer(ThreadingHTTPServer):
    """A client that drops its connection mid-request (a pull refused, its pool closed) is no fault of the stand-in's:
    socketserver printed its traceback into the stderr of the test that ran the pull, failing it now and then."""

    def handle_error(self, request, client_address) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


def _handler_for(hub: HubStandIn) -> type[BaseHTTPRequestHandler]:
    class HubRequestHandler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as httpx expects
        timeout = 10  # an idle keep-alive connection frees its thread after this

        def log_message(self, *args) -> None:
            pass

        def do_HEAD(self) -> None:
            self._route(send_body=False)

        def do_GET(self) -> None:
            self._route(send_body=True)

        def _route(self, send_body: bool) -> None:
            parts = [unquote(p) for p in urlsplit(self.path).path.strip("/").split("/")]
            if parts[:2] == ["api", "models"] and len(parts) >= 3:
                # an id without an owner (gpt2's) unless the next part is a served repo's name
                owner_less = len(parts) == 3 or (parts[3] in ("revision", "tree")
                                                 and "/".join(parts[2:4]) not in hub.repos)
                self._api(parts[2] if owner_less else f"{parts[2]}/{parts[3]}", parts[3 if owner_less else 4:],
                          send_body)
            elif len(parts) >= 5 and parts[2] == "resolve":
                self._resolve(f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:]), send_body)
            elif len(parts) >= 4 and parts[1] == "resolve":
                self._resolve(parts[0], parts[2], "/".join(parts[3:]), send_body)
            elif len(parts) >= 4 and parts[0] == "cdn" and "/".join(parts[1:3]) in hub.repos:
                self._from_cdn(hub.repos["/".join(parts[1:3])], "/".join(parts[3:]), send_body)
            elif hub.xet_stall and parts == ["xet-read-token"]:
                self._json({}, send_body, {"X-Xet-Cas-Url": f"{hub.endpoint}/cas", "X-Xet-Access-Token": "xet",
                                           "X-Xet-Token-Expiration": str(int(time.time()) + 3600)})
            elif hub.xet_stall and parts[0] == "cas":
                with hub._lock:
                    hub.cas_requests += 1
                time.sleep(API_STALL_BOUND)
                self._error(404, None, "Not found", send_body)
            else:
                self._error(404, None, "Not found", send_body)

        def _api(self, repo_id: str, rest: list[str], send_body: bool) -> None:
            time.sleep(min(hub.api_silence, API_STALL_BOUND))
            if hub.api_redirect_body and "redirected" not in urlsplit(self.path).query:
                self.send_response(307)
                self.send_header("Location", self.path + ("&" if urlsplit(self.path).query else "?") + "redirected")
                self.send_header("Content-Length", str(len(hub.api_redirect_body)))
                self.end_headers()
                if send_body:
                    self.wfile.write(hub.api_redirect_body)
                return
            repo = self._visible_repo(repo_id, send_body)
            if repo is None:
                return
            blobs = "blobs=true" in urlsplit(self.path).query.lower()
            if rest == [] or (rest[0] == "revision" and len(rest) == 2):
                if not rest or self._known_revision(repo, rest[1], send_body):
                    self._model_info(repo_id, repo, blobs, send_body)
            elif rest[0] == "tree" and len(rest) >= 2:
                time.sleep(min(hub.tree_silence, API_STALL_BOUND))
                if self._known_revision(repo, rest[1], send_body):
                    with hub._lock:
                        hub.tree_pages += 1
                        more = hub.tree_next_forever and hub.tree_pages < TREE_PAGES_BOUND
                    self._json([self._tree_entry(path, f) for path, f in repo.files.items()], send_body,
                               {"Link": f'<{hub.endpoint}{self.path}>; rel="next"'} if more else {})
            else:
                self._error(404, None, "Not found", send_body)

        def _model_info(self, repo_id: str, repo: ServedRepo, blobs: bool, send_body: bool) -> None:
            siblings = []
            for path, f in repo.files.items():
                sibling = {"rfilename": path}
                if blobs:
                    sibling |= {"size": len(f.data), "blobId": f.blob_id}
                    if f.sha256 is not None:
                        sha256 = hub.published_sha256(path, f)
                        sibling["lfs"] = {"size": len(f.data), "sha256": sha256, "pointerSize": 134}
                siblings.append(sibling)
            info = {"id": repo_id, "modelId": repo_id, "sha": repo.commit, "private": repo.private}
            info |= {"siblings": siblings}
            self._json(hub.info_edit(info) if hub.info_edit else info, send_body)

        def _tree_entry(self, path: str, f: ServedFile) -> dict:
            entry = {"type": "file", "oid": f.blob_id, "size": len(f.data), "path": path}
            if f.sha256 is not None:
                entry["lfs"] = {"oid": hub.published_sha256(path, f), "size": len(f.data), "pointerSize": 134}
            return entry

        def _resolve(self, repo_id: str, revision: str, path: str, send_body: bool) -> None:
            hub.count(self.command, path, self.headers.get("Range"))
            repo = self._visible_repo(repo_id, send_body)
            if repo is None or not self._known_revision(repo, revision, send_body):
                return
            served = repo.files.get(path)
            if served is None or path in hub.gone:
                self._error(404, "EntryNotFound", f"{path} does not exist", send_body,
                            hub.header_edit.get(path, {"X-Repo-Commit": repo.commit}))
                return
            if path in hub.egress_limited:
                self._error(402, "EgressLimitReached", EGRESS_MESSAGE, send_body)
            elif hub.via_cdn and served.sha256 is not None:   # the hub's 302 for an LFS file, with its metadata
                self.send_response(302)
                cdn = f"{hub.cdn_endpoint or hub.endpoint}/cdn/{repo_id}/{quote(path)}"
                for name, value in {**self._file_headers(repo, path, served), "Location": cdn,
                                    "Content-Length": "0"}.items():
                    self.send_header(name, value)
                self.end_headers()
            elif send_body and path in hub.cut_short:
                self._send_file(repo, path, served, cut_at=hub.cut_short.pop(path))
            elif send_body and path in hub.unavailable:
                self._error(503, None, "Service Unavailable", send_body)
            else:
                self._send_file(repo, path, served, cut_at=None, send_body=send_body)

        def _file_headers(self, repo, path: str, served: ServedFile) -> dict[str, str]:
            etag = hub.published_sha256(path, served) or served.blob_id
            headers = {"ETag": f'"{etag}"', "X-Repo-Commit": repo.commit}
            if served.sha256 is not None:
                headers |= {"X-Linked-Etag": f'"{etag}"', "X-Linked-Size": str(len(served.data))}
            if served.sha256 is not None and hub.xet_stall:   # the content's sha256 stands in for its Xet hash
                headers |= {"X-Xet-Hash": served.sha256, "Link": f'<{hub.endpoint}/xet-read-token>; rel="xet-auth"'}
            return hub.header_edit.get(path, headers)

        def _from_cdn(self, repo, path: str, send_body: bool) -> None:
            """The CDN's answer for a file the hub redirected to it: the body (Range and body_edit as ever)."""
            served = repo.files.get(path)
            if served is None:
                self._error(404, None, "Not found", send_body)
            else:
                self._send_file(repo, path, served, cut_at=None, send_body=send_body)

        def _send_file(self, repo, path, served: ServedFile, cut_at: int | None, send_body: bool = True) -> None:
            data = served.data
            start = 0
            range_header = self.headers.get("Range")
            if range_header and range_header.startswith("bytes="):
                first, _, last = range_header[len("bytes="):].partition("-")
                start = int(first)
                data = served.data[start : int(last) + 1 if last else None]
            misstated = hub.body_edit.get(path) if send_body else None
            data = {"longer": data * 2, "unframed": data * 4, "gzip": gzip.compress(data)}.get(misstated, data)
            self.send_response(206 if range_header else 200)
            if range_header:
                self.send_header("Content-Range", f"bytes {start}-{start + len(data) - 1}/{len(served.data)}")
            for name, value in self._file_headers(repo, path, served).items():
                self.send_header(name, value)
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Type", "application/octet-stream")
            if misstated == "gzip":
                self.send_header("Content-Encoding", "gzip")
            if misstated == "unframed":  # the body runs until the connection closes
                self.send_header("Connection", "close")
                self.close_connection = True
            else:
                self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if cut_at is not None:  # an interruption: part of the body, then the connection drops
                self.wfile.write(data[:cut_at])
                self.close_connection = True
            elif send_body and path in hub.slow_body:
                for piece in range(0, len(data), 1024):
                    self.wfile.write(data[piece:piece + 1024])
                    self.wfile.flush()
                    time.sleep(hub.slow_body[path])
            elif send_body:
                self.wfile.write(data)

        def _visible_repo(self, repo_id: str, send_body: bool) -> ServedRepo | None:
            """The repo, or None after answering 401/404 as the hub does for unknown or private repos."""
            auth = self.headers.get("Authorization")
            repo = hub.repos.get(repo_id)
            if repo is not None and (not repo.private or auth in {f"Bearer {t}" for t in hub.tokens}):
                return repo
            if repo is not None and auth is not None:
                self._error(401, None, "Invalid credentials in Authorization header", send_body)
            else:  # like huggingface.co: 401 without a token, 404 with one, never saying which
                self._error(401 if auth is None else 404, "RepoNotFound", "Repository not found", send_body)
            return None

        def _known_revision(self, repo: ServedRepo, revision: str, send_body: bool) -> bool:
            if revision in ("main", repo.commit):
                return True
            self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}", send_body)
            return False

        def _json(self, body, send_body: bool, headers: dict[str, str] | None = None) -> None:
            payload = body if isinstance(body, bytes) else json.dumps(body).encode()
            self.send_response(200)
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if send_body:
                self._send_api_body(payload)

        def _send_api_body(self, payload: bytes) -> None:
            """An API answer's body: at once, or a byte at a time (api_trickle)."""
            if not hub.api_trickle:
                self.wfile.write(payload)
                return
            delay = min(hub.api_trickle, API_STALL_BOUND / len(payload))
            with suppress(OSError):   # the client gave up
                for byte in range(len(payload)):
                    self.wfile.write(payload[byte:byte + 1])
                    self.wfile.flush()
                    time.sleep(delay)

        def _error(self, status: int, error_code: str | None, message: str, send_body: bool,
                   headers: dict[str, str] | None = None) -> None:
            payload = json.dumps({"error": message}).encode()
            self.send_response(status)
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            if error_code is not None:
                self.send_header("X-Error-Code", error_code)
            self.send_header("X-Error-Message", message)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if send_body:
                self._send_api_body(payload)

    return HubRequestHandler


@contextmanager
def hub_environment(endpoint: str, hf_home: Path, **extra_env: str) -> Iterator[None]:
    """Point huggingface_hub at `endpoint` with its cache in `hf_home`, then restore the host's settings.

    huggingface_hub reads its environment once, into `huggingface_hub.constants`, so the module is
    reloaded after the variables change and again after they are restored.
    """
    with pytest.MonkeyPatch.context() as env:
        for name in HUB_ENV_VARS:
            env.delenv(name, raising=False)
        env.setenv("HF_ENDPOINT", endpoint)
        env.setenv("HF_HOME", str(hf_home))
        env.setenv("HF_HUB_DISABLE_XET", "1")  # plain HTTP downloads only
        env.setenv("HF_HUB_DISABLE_TELEMETRY", "1")  # else the user agent asks the hub for /api/agent-harnesses
        env.setenv("HF_HUB_DISABLE_UPDATE_CHECK", "1")
        for name, value in extra_env.items():
            env.setenv(name, value)
        importlib.reload(constants)
        try:
            yield
        finally:
            close_session()
    importlib.reload(constants)
