"""What a pull lets huggingface_hub act on. huggingface_hub names cache files after the hub's ETag and X-Repo-Commit
headers and reads answers to their end, trusting the endpoint; while a pull runs, every answer passes AnswerGuard:
those headers must be the digests and the commit they claim to be, bodies stop at the size the listing gave (file
downloads) or at a budget of bytes and time (the hub's JSON, a redirect's body), a request sent with no timeout gets
one, and a Ctrl-C or SIGTERM stops the download threads at their next chunk."""
from __future__ import annotations

import functools
import re
import signal
import sys
import threading
import time
from urllib.parse import unquote, urljoin, urlsplit

from huggingface_hub import constants, set_client_factory
from huggingface_hub.utils import _http, _xet
from huggingface_hub.utils._xet import abort_xet_session

from klconvert.entry import INTERRUPT_SIGNALS
from klconvert.errors import KLError
from klconvert.hex_digests import GIT_SHA, SHA256_HEX

# Hub answers that are not file downloads (model info, tree listing pages) together, and how many: a model repo's
# listing is kilobytes (~250 bytes a file), and a tree listing that keeps sending a next page would otherwise grow
# without end.
MAX_OTHER_BYTES = 16 << 20
MAX_OTHER_ANSWERS = 10_000
# ... and how long they take together, from each request sent to its last byte (or, for one that never got there, to
# the next request for the same address: huggingface_hub retries a listing that timed out five times): the real hub's
# take seconds, and a server trickling its answers a byte at a time would otherwise hold the pull for good.
MAX_OTHER_SECONDS = 180
# huggingface_hub sends the hub's JSON requests with no timeout (its file downloads with HF_HUB_DOWNLOAD_TIMEOUT): a
# server that accepts and never answers would hang the pull. Seconds to connect, or to wait for the next byte.
SILENCE_SECONDS = 60
# A file's body slower than this, over each window of its download, is given up: huggingface_hub's read timeout (10 s)
# ends a silent one, not one a byte every 9 s (a 5 GB shard: never). 1 KiB/s, eight files at a time, is 64 kbit/s.
SLOW_WINDOW_SECONDS = 300
SLOW_WINDOW_BYTES = 300 << 10
SENT = "klconvert_sent"   # the request extension holding when it was sent (time.monotonic())
DIGEST = re.compile(f"{GIT_SHA.pattern}|{SHA256_HEX.pattern}")  # a blob id or a sha256, as the hub sends them in ETags
RESOLVE = re.compile(r"/(?P<repo>[^/]+/[^/]+)/resolve/(?P<revision>[^/]+)/(?P<path>.+)")
# huggingface_hub 2.4.0 deletes a partly downloaded file when its download fails, so a rerun skips the finished files
# and starts the interrupted ones again: said of a failure once a file's body has arrived whole, not of one before
# (resolving the revision, the listing, a file's headers, the first file's body), where this pull has no file to keep.
FILES_KEPT = " (finished files are kept)"


class PullInterrupted(Exception):
    """Raised in a download or hashing thread of a pull that was stopped (a Ctrl-C, SIGTERM), so that it stops
    instead of finishing its file."""


class AnswerGuard:
    """Installed around a pull's huggingface_hub calls (`with AnswerGuard(...)`): a client factory whose clients ask
    for uncompressed bodies and check each answer. The pull sets `commit` once resolved, before it asks for any file,
    and `sizes` once listed."""

    def __init__(self, endpoint: str, repo: str):
        self.endpoint, self.repo = endpoint, repo
        self.commit: str | None = None   # once resolved, the only X-Repo-Commit let through
        self.sizes: dict[str, int] = {}  # once listed: repo path -> bytes the listing gives it
        self._files: dict[str, tuple[str, int]] = {}  # URL (a file's, or its redirect target) -> (file, size)
        self._other_bytes = 0
        self._other_answers = 0
        self._other_seconds = 0.0   # the time the finished ones took, and the attempts that never finished
        self._unanswered: dict[str, float] = {}   # address -> when its latest request not for a file was sent
        self._lock = threading.Lock()
        self.cancelled = False
        self._aborting = False   # while _interrupt aborts hf_xet's session
        self.file_finished = False   # once a file's body has arrived whole: from then this pull has a file to keep

    # ---- installation --------------------------------------------------------------------------
    def __enter__(self) -> AnswerGuard:
        self._factory_before = _http._GLOBAL_CLIENT_FACTORY
        set_client_factory(self._client)          # closes the shared client; the next call makes a guarded one
        # SIGINT and SIGTERM alike: the entry point raises either in the main thread, which then waits for the download
        # threads -- left untold, they finished every file in flight (5 GB shards) before the command ended. From the
        # main thread only (signal's rule), and only a signal whose handler is Python's (the entry point's, Python's
        # KeyboardInterrupt): an ignored one (nohup) stops nothing, and the default one ends the process at once.
        # hf_xet's session, which every hf_xet download asks huggingface_hub's holder for (_xet_session)
        self._xet_holder = _xet._GLOBAL_XET_HOLDER
        self._xet_get_before = self._xet_holder.__dict__.get("get")   # another guard's, around this one
        self._xet_holder.get = functools.partial(self._xet_session, self._xet_holder.get)
        self._before = {}
        if threading.current_thread() is threading.main_thread():
            self._before = {signum: signal.signal(signum, self._interrupt) for signum in INTERRUPT_SIGNALS
                            if callable(signal.getsignal(signum))}
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._before.items():
            signal.signal(signum, handler)
        set_client_factory(self._factory_before)
        if self._xet_get_before is None:
            del self._xet_holder.get   # the holder's own method again
        else:
            self._xet_holder.get = self._xet_get_before

    def _client(self):
        client = self._factory_before()
        client.event_hooks["request"].append(self._on_request)
        client.event_hooks["response"].append(self._on_response)
        return client

    def _interrupt(self, signum, frame) -> None:
        """Stop the downloads (cancel), then do what the signal did before (raise an interrupt, usually)."""
        self.cancel()
        self._before[signum](signum, frame)

    def cancel(self) -> None:
        """Tell the download threads, and cancel hf_xet's downloads."""
        self.cancelled = True
        # hf_xet downloads through its own client, past the chunks that tell the threads; huggingface_hub aborts it
        # only on an interrupt raised in the thread that downloads, never one of snapshot_download's. Not from a
        # signal landing in this handler's abort: that holds huggingface_hub's lock (a plain one), which the nested
        # abort would wait on forever; a later signal aborts again (a session made since)
        if not self._aborting:
            self._aborting = True
            try:
                abort_xet_session()
            finally:
                self._aborting = False

    def _xet_session(self, get_session):
        """hf_xet's session for a download thread, refused once the pull is interrupted. A thread past its file's
        request (which the guard stops) and not yet at hf_xet when the interrupt aborted the session made a new one
        here, unaborted, and downloaded through it to the end (a storage server that does not answer: 60 s on the
        stand-in) before the command ended. Asked before the abort, the session is the one the abort cancels; after
        it, `cancelled` is already set (_interrupt sets it first)."""
        session = get_session()
        if self.cancelled:
            raise PullInterrupted
        return session

    # ---- the checks ----------------------------------------------------------------------------
    def _on_request(self, request) -> None:
        request.headers["Accept-Encoding"] = "identity"   # huggingface_hub asks so for files; the JSON too, so
        if self.cancelled:                                # that a body's size on the wire is its size
            raise PullInterrupted
        timeout = request.extensions.get("timeout") or {}
        request.extensions["timeout"] = {key: SILENCE_SECONDS if timeout.get(key) is None else timeout[key]
                                         for key in ("connect", "read", "write", "pool")}
        url, sent = str(request.url), time.monotonic()
        request.extensions[SENT] = sent
        if RESOLVE.fullmatch(urlsplit(url).path) is None and url not in self._files:   # not a file's
            with self._lock:
                earlier = self._unanswered.get(url)
                self._unanswered[url] = sent
            if earlier is not None:   # an attempt that never finished (timed out): it took until now
                self.count_time(url, sent - earlier, finished=True)

    def _on_response(self, response) -> None:
        url = str(response.request.url)
        resolve = RESOLVE.fullmatch(urlsplit(url).path)
        if resolve is not None:
            path = unquote(resolve["path"])
            self._check_file_headers(response, path)
            if path in self.sizes:
                self._files.setdefault(url, (path, self.sizes[path]))
        file = self._files.get(url)
        what = repr(file[0][:80]) if file is not None else urlsplit(url).path[:200]
        if response.is_redirect and "location" in response.headers:
            target = urljoin(url, response.headers["location"])
            if urlsplit(target).scheme not in ("http", "https"):   # the client cannot follow it
                raise self._bad(f"redirected {what} to {target[:100]!r}, which is not a web address")
            if file is not None:
                self._files[target] = file   # the CDN answers for the file
        if response.request.method == "HEAD":
            return
        encoding = response.headers.get("content-encoding", "identity").lower()
        if encoding != "identity":
            raise self._bad(f"answered {what} in {encoding[:20]!r} encoding when asked for none")
        # a redirect's body, which the client reads whole before it follows, is bounded as the hub's JSON is
        limit = file[1] if file is not None and not response.is_redirect else None
        if limit is None:
            with self._lock:
                self._other_answers += 1
                if self._other_answers > MAX_OTHER_ANSWERS:
                    raise self._bad(f"sent over {MAX_OTHER_ANSWERS:,} answers that are not file downloads (a tree "
                                    "listing whose next page never ends?)")
        declared = response.headers.get("content-length")
        if limit is not None and declared is not None and declared.isdigit() and int(declared) > limit:
            raise self._bad(f"answered {what} with {int(declared):,} bytes where the listing gives {limit:,}")
        response.stream = _bounded_stream_type(sys.modules[type(response).__module__.partition(".")[0]])(
            response.stream, self, url, what, limit, response.request.extensions[SENT])

    def _check_file_headers(self, response, path: str) -> None:
        """The headers huggingface_hub builds cache paths from: ETag / X-Linked-Etag (the blob's file name) and
        X-Repo-Commit (the snapshot's, and on a 404 the .no_exist marker's, folder name)."""
        if self.commit is None:   # the pull resolves it through the hub's JSON first: a file asked for before is a bug
            raise RuntimeError(f"{path[:80]!r} was asked for before the pull resolved its commit")
        header = next((h for h in (constants.HUGGINGFACE_HEADER_X_LINKED_ETAG, "ETag") if h in response.headers),
                      None)                                           # the one huggingface_hub takes
        if header is not None:
            value = response.headers[header]
            if not DIGEST.fullmatch(value.removeprefix("W/").strip('"')):
                raise self._bad(f"answered for {path[:80]!r} with {header} {value[:80]!r}, which is not a digest "
                                "(huggingface_hub would name a cache file after it)")
        commit = response.headers.get(constants.HUGGINGFACE_HEADER_X_REPO_COMMIT)
        # huggingface_hub refuses a file's answer without one, in words that say rerun (a redirect it follows, as a
        # renamed repo's, need not have one; an error answer is the hub's error)
        if commit is None and response.is_success:
            raise self._bad(f"answered for {path[:80]!r} with no X-Repo-Commit, which the hub sends with every file")
        if commit is not None and commit != self.commit:
            raise self._bad(f"answered for {path[:80]!r} from commit {commit[:80]!r}, not {self.commit}")

    def count(self, what: str, limit: int | None, total: int) -> None:
        """A body reached `total` bytes: past its file's size, or past the shared budget, it is refused."""
        if self.cancelled:
            raise PullInterrupted
        if limit is not None:
            if total > limit:
                raise self._bad(f"sent over {limit:,} bytes for {what}, the size the listing gives")
            return
        with self._lock:
            if total > MAX_OTHER_BYTES:
                raise self._bad(f"sent over {MAX_OTHER_BYTES >> 20} MiB in answers that are not file downloads")

    def count_time(self, url: str, seconds: float, finished: bool) -> None:
        """An answer that is not a file download (at `url`) has taken `seconds` since its request (all of it if
        `finished`): past MAX_OTHER_SECONDS with the time the others took, it is refused."""
        with self._lock:
            seconds += self._other_seconds
            if finished:
                self._other_seconds = seconds
                self._unanswered.pop(url, None)
        if seconds > MAX_OTHER_SECONDS:
            raise KLError(f"{self.endpoint} took over {MAX_OTHER_SECONDS} s to answer the requests that are not file "
                          f"downloads while pulling {self.repo}, the last {urlsplit(url).path[:200]}; check the "
                          "network connection and HF_ENDPOINT, then try again")

    def refuse_slow(self, what: str, window_bytes: int) -> None:
        """KLError where a file's body sent under SLOW_WINDOW_BYTES in the last SLOW_WINDOW_SECONDS."""
        if window_bytes < SLOW_WINDOW_BYTES:
            floor = SLOW_WINDOW_BYTES // SLOW_WINDOW_SECONDS
            raise KLError(f"{self.endpoint} sent {window_bytes:,} bytes of {what} in {SLOW_WINDOW_SECONDS} s, under "
                          f"{floor:,} a second, while pulling {self.repo}; check the network connection and "
                          f"HF_ENDPOINT, then rerun the pull{self.kept()}")

    def kept(self) -> str:
        """What a line that ends the pull says of the files it fetched: FILES_KEPT once a file's body has arrived
        whole, nothing before."""
        return FILES_KEPT if self.file_finished else ""

    def add_other(self, n: int) -> int:
        with self._lock:
            self._other_bytes += n
            return self._other_bytes

    def _bad(self, what: str) -> KLError:
        return KLError(f"{self.endpoint} {what} while pulling {self.repo}; the endpoint is not answering as the "
                       f"hub does -- check HF_ENDPOINT{self.kept()}")


@functools.cache
def _bounded_stream_type(http_module):
    """A SyncByteStream of `http_module` (httpx or httpx2, whichever huggingface_hub talks through) that hands the
    guard a running count of each chunk, which may raise."""

    class BoundedStream(http_module.SyncByteStream):
        def __init__(self, stream, guard: AnswerGuard, url: str, what: str, limit: int | None, sent: float):
            self.stream, self.guard, self.url, self.what, self.limit, self.sent = stream, guard, url, what, limit, sent

        def __iter__(self):
            total = 0
            window_start, window_total = time.monotonic(), 0   # a file's: the bytes its window began at
            for chunk in self.stream:
                if self.limit is not None:
                    total += len(chunk)
                    if time.monotonic() - window_start >= SLOW_WINDOW_SECONDS:
                        self.guard.refuse_slow(self.what, total - window_total)
                        window_start, window_total = time.monotonic(), total
                else:
                    total = self.guard.add_other(len(chunk))
                    self.guard.count_time(self.url, time.monotonic() - self.sent, finished=False)
                self.guard.count(self.what, self.limit, total)
                yield chunk
            if self.limit is None:
                self.guard.count_time(self.url, time.monotonic() - self.sent, finished=True)
            elif total == self.limit:   # a file's whole body (an error page's is not its size)
                self.guard.file_finished = True

        def close(self) -> None:
            self.stream.close()

    return BoundedStream
