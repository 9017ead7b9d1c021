"""`pull`: fetch a Hugging Face repo's safe files (safetensors, configs, tokenizer) and verify them."""
from __future__ import annotations

import glob
import errno
import hashlib
import importlib
import importlib.util
import json
import logging
import os
import re
import sys
import tempfile
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from stat import S_ISREG
from typing import Callable, Iterator
from urllib.parse import unquote

from filelock import FileLock, Timeout
from huggingface_hub import (
    HfApi,
    constants,
    get_cached_repo_tree,
    get_token,
    snapshot_download,
    try_to_load_from_cache,
)
from huggingface_hub.errors import (
    CachedRepoTreeNotFoundError,
    GatedRepoError,
    HFValidationError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
    RevisionResolutionError,
)
from huggingface_hub.file_download import repo_folder_name
from huggingface_hub.utils import filter_repo_objects, validate_repo_id
from huggingface_hub.utils.tqdm import tqdm as hf_tqdm

from klconvert.atomic_file import write_atomically
from klconvert.checkpoint.folder_files import INDEX_FILE, MAX_FILE_NAME_BYTES, MAX_INDEX_BYTES, MAX_INDEX_VALUES
from klconvert.checkpoint.regular_file import open_regular, read_json
from klconvert.disk_space import DISK_FULL, free_disk_bytes, quota_exceeded
from klconvert.entry import note_change
from klconvert.errors import (ERROR_CHARS, KLError, argument, controls_escaped, few, first_line, refuse_non_bool,
                              unreadable_reason)
from klconvert.hex_digests import GIT_SHA, HASH_CHUNK_BYTES, SHA256_HEX
from klconvert.hf_cache import BLOBS, SNAPSHOTS
from klconvert.hub_guard import AnswerGuard, PullInterrupted
from klconvert.models import BUNDLED_NAME, DEFAULT_REPO
from klconvert.tokenizer import BPE_FILE
from klconvert.units import counted, size_text, size_texts
from klconvert.user_paths import given_path, refuse_unreachable, shown_path
from klconvert.verified_files import VERIFIED_RECORD, VerifiedFiles, cached_record
from klconvert.waking_for_signals import LeftRunning, run_waking_for_signals

# huggingface_hub 2.x talks through httpx2, 1.x through httpx: a dropped connection surfaces as either's TransportError.
_HTTP_MODULES = [importlib.import_module(m) for m in ("httpx2", "httpx") if importlib.util.find_spec(m) is not None]
TRANSPORT_ERRORS = tuple(m.TransportError for m in _HTTP_MODULES)
# What else the client raises on an answer it cannot follow: redirect loops, bodies that do not decode, bad URLs.
BROKEN_ANSWER_ERRORS = tuple(e for m in _HTTP_MODULES for e in (m.HTTPError, m.InvalidURL))

# A model's files beside its weights: configs (index, tokenizer_config, special_tokens_map included) and the tiktoken
# tokenizer with its chat templates -- what a pull fetches with the weights, and what a quantized copy takes over.
SIDE_FILES = ("*.json", BPE_FILE, "*.jinja")
# Everything a pull may fetch: the weights and their side files. Anything else stays on the hub.
ALLOWED_PATTERNS = ("*.safetensors", *SIDE_FILES)
# Never fetched, whatever --include says: pickles run code when loaded, .py files are remote code.
REFUSED_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".py")
# Provenance of a --local-dir pull, beside the files; never written into the HF cache's snapshots.
LOCAL_DIR_RECORD = Path(".klconvert") / "pull.json"
MAX_PULL_RECORD_BYTES = 1 << 20  # repo, revision, commit and ~160 bytes a file pulled: the release's ~30 take ~5 KB
METADATA_FOLDERS = (".cache/", f"{LOCAL_DIR_RECORD.parent}/")  # huggingface_hub's and klconvert's records in a folder
# Said only of a failure once snapshot_download has begun (AnswerGuard.kept says whether any file is there to keep).
RERUN = "rerun the pull to continue"
# What to do when the hub cannot be reached (or answers 5xx) before anything downloads.
UNREACHABLE = "check the network connection, any proxy (HTTPS_PROXY) and HF_ENDPOINT"
HASH_WORKERS = 4  # hashlib releases the GIL on large buffers, so shards hash in parallel


@dataclass(frozen=True)
class HubFile:
    """One repo file as the hub describes it: size, and sha256 (LFS files) or git blob id (others)."""

    path: str
    size: int | None
    sha256: str | None = None
    blob_id: str | None = None


@dataclass(frozen=True)
class PulledFile:
    """One file of a finished pull; sha256 is None only offline, where nothing was re-hashed."""

    path: str
    size: int
    sha256: str | None


@dataclass(frozen=True)
class PullResult:
    """Where the pulled files are, which commit they come from, and what this run fetched.

    `bytes_downloaded` counts the files this run added to the folder (fetched from the hub, or copied
    from the HF cache into a --local-dir); 0 offline or when everything was already there. A --local-dir's file of
    the listed size that no record vouches for (put there by hand) is hashed first: this commit's is already there
    and does not count (nor does huggingface_hub read it again, _vouch_to_huggingface_hub); another content's is
    fetched, and counts.
    """

    path: Path
    commit: str
    files: list[PulledFile]
    bytes_downloaded: int


class _QuietTqdm(hf_tqdm):
    """huggingface_hub's progress bar, always hidden: what `pull(progress=False)` hands it."""

    def __init__(self, *args, **kwargs):
        kwargs["disable"] = True
        super().__init__(*args, **kwargs)


class _TerminalTqdm(hf_tqdm):
    """huggingface_hub's progress bar on a terminal only (tqdm's disable=None), as git's and pip's: in a log its
    carriage returns run into one long line, and into an error line after it."""

    def __init__(self, *args, **kwargs):
        kwargs["disable"] = None if not kwargs.get("disable") else True
        super().__init__(*args, **kwargs)


def pull(
    repo: str = DEFAULT_REPO,
    revision: str | None = None,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    local_dir: Path | None = None,
    cache_dir: Path | None = None,
    progress: bool = True,
    check_files: Callable[[list[HubFile]], None] | None = None,
) -> PullResult:
    """Download `repo@revision`'s allowed files into the HF cache (or `local_dir`) and verify them.

    `include`/`exclude` are `hf download`-style fnmatch patterns that narrow ALLOWED_PATTERNS.
    With HF_HUB_OFFLINE=1 the pull is answered from the cache alone. `check_files` is given the files to pull, as
    the hub lists them, before any download: what its caller would refuse once they are here, it refuses now.
    """
    refuse_bundled_name(repo)
    refuse_bad_repo_id(repo)
    refuse_bad_revision(revision)
    refuse_non_bool(progress, "progress")
    refuse_unsafe_includes(include)
    given_cache_dir = cache_dir is not None
    cache_dir = given_path(cache_dir, "cache_dir") if cache_dir is not None else Path(constants.HF_HUB_CACHE)
    local_dir = given_path(local_dir, "local_dir") if local_dir is not None else None
    if local_dir is not None:
        refuse_file_as_local_dir(local_dir)
    target = local_dir if local_dir is not None else cache_dir
    offline = constants.is_offline_mode()
    writes_local_dir = local_dir is not None and not offline   # offline, huggingface_hub writes no repo file there
    if not offline:   # said before huggingface_hub's own "Ignored error ..." lines, and before any download
        refuse_unwritable_target(target, local_dir is not None, given_cache_dir)
    with _local_dir_lock(local_dir) if writes_local_dir else nullcontext():
        api = HfApi()
        guard = AnswerGuard(api.endpoint, repo)
        with (_as_user_errors(guard, revision, target) as stage, nullcontext() if offline else guard,
              _no_retold_log_lines()):
            with _malformed_answers(repo, api.endpoint):
                resolved = api.resolve_revision(repo, revision=revision, cache_dir=cache_dir, local_files_only=offline)
                commit = guard.commit = _checked_commit(resolved.resolved, repo, api.endpoint)
                where = f"{repo}@{commit}"
                listing = (_cached_listing(repo, commit, cache_dir, local_dir) if offline
                           else _published_listing(api, repo, commit))
                if listing is not None:
                    _check_listing(listing, where, api.endpoint, published=not offline)
                    guard.sizes = {f.path: f.size for f in listing if f.size is not None}
            wanted = _select_from(listing, include, exclude, where) if listing is not None else None
            if local_dir is not None:
                _refuse_mixing_pulls(local_dir, repo, commit, listing, wanted, offline)
            fetch_bytes = 0
            # what klconvert verified in a --local-dir: with huggingface_hub's records, what says a file there is
            # this commit's (_local_copy_is_this_commits)
            verified = VerifiedFiles(local_dir / VERIFIED_RECORD) if local_dir is not None else None
            if not offline:
                _refuse_unwritable_names(wanted, where, local_dir is not None)
                if local_dir is not None:
                    _refuse_what_is_in_the_way(local_dir, wanted, where)
                if check_files is not None:
                    check_files(wanted)
                hashed = (_hash_copies_no_record_speaks_for(local_dir, wanted, commit, where, verified, progress)
                          if local_dir is not None else [])
                outdated = _copies_not_of_this_commit(wanted, repo, commit, cache_dir, local_dir, verified)
                missing = [f for f in wanted if f.path in outdated
                           or not _is_already_here(f, repo, commit, cache_dir, local_dir, verified)]
                fetch_bytes = stage.needed = sum(f.size or 0 for f in missing)
                free = free_disk_bytes(target)
                # removed before the download, they give their room to it (huggingface_hub 2.5 would replace a
                # --local-dir's file only once the new one is whole, needing room for both)
                outdated_paths = [path for paths in outdated.values() for path in paths]
                # what huggingface_hub left of downloads a killed process had begun, which no download reuses
                unfinished = _unfinished_downloads(repo, cache_dir, local_dir)
                freed = _room_of(outdated_paths + unfinished)
                removing = _once_removed(len(outdated_paths), len(unfinished))
                if progress:
                    _announce(repo, revision, commit, listing, wanted, fetch_bytes, target, free, freed, removing)
                if fetch_bytes > free + freed:
                    need_text, free_text = size_texts(fetch_bytes, free + freed)
                    raise KLError(
                        f"not enough disk space in {target}: pulling {where} needs {need_text} for "
                        f"{counted(len(missing), 'file')} but only {free_text} is free{removing if freed else ''}; "
                        "free space or pass a --local-dir or --cache-dir on a larger disk"
                    )
                # past the last refusal: a refused pull removes nothing
                blobs = None if local_dir is not None else \
                    cache_dir / repo_folder_name(repo_id=repo, repo_type="model") / BLOBS
                for path in outdated_paths:
                    _remove(path, blobs)
                for path in unfinished:
                    try:
                        path.unlink(missing_ok=True)
                    except OSError:   # not this user's to remove (another's in a shared cache of sticky folders):
                        pass          # tidying, which the download does not need
                if local_dir is not None:  # a record of an earlier pull must not describe a half-updated folder
                    (local_dir / LOCAL_DIR_RECORD).unlink(missing_ok=True)
                    if hashed:   # what the copies here hold, which a failed download keeps (_keep_only_...)
                        for path in outdated:
                            verified.forget(path)
                        verified.save()
                    for f in wanted:   # this commit's by klconvert's record: huggingface_hub takes it as it is
                        if f.path not in outdated:
                            _vouch_to_huggingface_hub(local_dir, f, commit, verified)
            if listing is None:  # offline, no cached listing: huggingface_hub 1.x would ask the hub for one, so look
                folder = _snapshot_on_disk(repo, commit, cache_dir, local_dir, where)
            else:
                note_change(target)   # hf_xet's downloads are written in Rust, which Python's audit events do not show
                stage.fetching = True
                try:
                    with _no_disk_space_warnings(), _bars_closed():
                        # in a thread of its own, waited for awake to a signal that one of its download threads
                        # took (run_waking_for_signals); a Ctrl-C or SIGTERM returns here once they have all stopped
                        # -- or, a download not stopping, at a second one (LeftRunning): what it leaves is a
                        # huggingface_hub download's temporary file (_unfinished_downloads) or a file cut short
                        # (_is_already_here), which the next pull removes or fetches again
                        folder = Path(run_waking_for_signals(lambda: snapshot_download(
                            repo,
                            revision=resolved,
                            cache_dir=cache_dir,
                            local_dir=local_dir,
                            allow_patterns=[glob.escape(f.path) for f in wanted],
                            tqdm_class=_TerminalTqdm if progress else _QuietTqdm,
                        ), stop=guard.cancel, stopping="the downloads",
                            left=f"partial downloads may remain in {target}; the next pull removes or replaces them"))
                except LeftRunning:   # the downloads still write: what they write is not to be cleaned up now
                    raise
                except BaseException:
                    if writes_local_dir:
                        _keep_only_this_commits_files(local_dir, wanted, repo, commit, cache_dir, verified)
                    raise
        if listing is None:  # offline, and the cache holds no tree listing (older huggingface_hub): use the disk
            listing = _listing_on_disk(folder) if local_dir is None else _finished_pull_listing(local_dir, repo, commit,
                                                                                                where)
            wanted = _select_from(listing, include, exclude, where)
        if offline:
            files = _check_sizes(folder, wanted, where)
        else:
            storage = cache_dir / repo_folder_name(repo_id=repo, repo_type="model")
            record = local_dir / VERIFIED_RECORD if local_dir is not None else cached_record(storage, commit)
            blobs = None if local_dir is not None else storage / BLOBS
            files = _verify(folder, wanted, where, progress, VerifiedFiles(record), blobs)
        _check_index_shards(folder, listing, wanted, where)
        if writes_local_dir:
            _write_local_dir_record(folder, repo, revision, commit, files)
        return PullResult(path=folder, commit=commit, files=files, bytes_downloaded=fetch_bytes)


def _local_dir_lock(local_dir: Path):
    """One pull into a --local-dir at a time: the lock quantize takes on its OUT (a second is refused naming the
    first; two at once each removed the other's files as its own unfinished ones, or failed for a false reason), on
    the folder's full path (`.` and `..` name none to put a lock beside); none for the file system's root."""
    from klconvert.convert.output_folder import OutputLock, lock_goes_inside   # not for the cache

    folder = Path(os.path.abspath(local_dir))
    return OutputLock(folder, inside=lock_goes_inside(folder)) if folder.name else nullcontext()


def refuse_file_as_local_dir(local_dir: Path) -> None:
    """KLError when --local-dir, or the nearest of the folders above it that exists, is a file: no rerun makes a
    folder of it."""
    existing = next((p for p in (local_dir, *local_dir.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        where = "is a file" if existing == local_dir else f"goes in {existing}, which is a file"
        raise KLError(f"--local-dir {local_dir}: {where}, not a folder; name a folder to download into (one that "
                      "does not exist yet is made)")


def _cache_setting(given: bool) -> str:
    """What set the Hugging Face cache folder a pull writes into: --cache-dir, or the variable it comes from."""
    if given:
        return "--cache-dir"
    return next((name for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME")
                 if os.environ.get(name)), "HOME (~/.cache/huggingface)")


def refuse_unwritable_target(target: Path, local: bool, given_cache_dir: bool = False) -> None:
    """KLError when the folder a pull writes into -- `target`, the --local-dir (`local`) or the Hugging Face cache --
    cannot take files: it, or the nearest folder above it that exists, is a file or takes no new file (read-only, no
    write access). A cache is named with what set it (_cache_setting), which is what to change."""
    if local:
        named, advice = f"--local-dir {shown_path(target)}", "name a folder you can write to"
    else:
        setting = _cache_setting(given_cache_dir)
        named = f"the Hugging Face cache {shown_path(target)} (set by {setting})"
        advice = ("give a --cache-dir you can write to, or a --local-dir" if given_cache_dir else
                  "set HF_HOME (or HF_HUB_CACHE) to a folder you can write to, or pass --cache-dir or --local-dir")
        advice += "; a read-only cache that holds the model already is read with HF_HUB_OFFLINE=1"
    refuse_unreachable(target, named)   # a folder on its way that cannot be entered, a path past the system's length
    existing = next((p for p in (target, *target.parents) if os.path.lexists(p)), Path("."))
    if not existing.is_dir():
        raise KLError(f"{named}: {'is' if existing == target else f'goes in {existing}, which is'} not a folder; "
                      f"{advice}")
    try:
        fd, probe = tempfile.mkstemp(prefix=".klconvert-write-test-", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        where = "it" if existing == target else f"the folder it goes in, {existing}"
        raise KLError(f"{named}: cannot create files in {where} ({e.strerror}); {advice}") from None


def _hash_copies_no_record_speaks_for(local_dir: Path, wanted: list[HubFile], commit: str, where: str,
                                      verified: VerifiedFiles, progress: bool) -> list[HubFile]:
    """Hash each --local-dir file of a wanted path and its listed size that no record speaks for
    (_local_copy_is_this_commits: None) -- a copy put there by hand, or by a tool that keeps no record -- and note
    its digests in `verified` (saved once past the refusals: a refused pull leaves the folder as it found it). Such a
    copy is then this commit's, already here, or another content, removed before the download as an earlier
    commit's is. Left to huggingface_hub, which hashes it only as it reaches it, a failed or interrupted download
    removed every copy it had yet to reach (_keep_only_this_commits_files keeps what a record vouches for): the
    release's 98 GB put there by hand, gone at a Ctrl-C (h305). A copy that cannot be read (another user's, a read
    error) is a KLError naming it, before anything changes: it was an OSError out of the pull, said as the folder not
    being one the user can write. A Ctrl-C or SIGTERM saves the hashes finished of this commit's copies. Returns the
    copies it hashed."""
    unknown = [f for f in wanted if (local_dir / f.path).is_file()
               and (local_dir / f.path).stat().st_size == f.size
               and _local_copy_is_this_commits(f, local_dir, commit, verified) is None]

    def note(f: HubFile, bar, stopped: threading.Event) -> None:
        local = local_dir / f.path
        stat = local.stat()   # before hashing, so that a change during it shows next time
        try:
            digests = _digests(local, stat.st_size, bar, stopped)
        except OSError as e:
            raise KLError(f"--local-dir {local_dir}: cannot read {f.path} ({unreadable_reason(e)}), a file of the size "
                          f"{where} lists, which a pull hashes before the download to keep it if it is that file; "
                          "make it readable, or remove it, and rerun the pull") from None
        verified.remember(f.path, stat, *digests)

    if unknown:
        try:
            _hash_in_parallel(local_dir, unknown, "Checking files here", progress, note)
        except LeftRunning:   # the hashing threads still note hashes in `verified`: saved now, it could be half
            raise
        except KeyboardInterrupt:
            # as _verify keeps what it finished: the copies hashed whole and this commit's, so that the rerun after a
            # Ctrl-C or SIGTERM does not hash them again (minutes for the release's 98 GB); not another content's,
            # which verified_at_pull would take as checked against the hub's hash
            for f in unknown:
                entry = verified.entries.get(f.path)
                if entry is not None and not _published_as(f, entry["sha256"], entry["git_blob_id"]):
                    verified.forget(f.path)
            verified.save()
            raise
    return unknown


def _vouch_to_huggingface_hub(local_dir: Path, f: HubFile, commit: str, verified: VerifiedFiles) -> None:
    """Where klconvert's record proves the --local-dir's copy of `f` this commit's (`verified`: hashed by this pull,
    _hash_copies_no_record_speaks_for, or by one a Ctrl-C cut short, and unchanged since) and huggingface_hub has no
    record of its own naming this commit, write huggingface_hub's record of it, as its write_download_metadata writes
    one for a file it downloaded (1.33 to 2.5): the commit, the ETag (`f`'s sha256 for an LFS file, else its git blob
    id) and a time, the three lines _download_record reads. Without it huggingface_hub, given the copy, had no record
    of its own to skip it by: it hashed every LFS copy again (98 GB for the release: minutes) and downloaded every
    other again (config.json, the tokenizer's files), which _verify then hashed a third time, while the pull said it
    fetched 0 bytes (h309). With a record of the commit it is asked for, beside a file no more than a second newer than
    the record's time, it takes the file as it is and asks the hub nothing. The time is the copy's modification time
    as klconvert hashed it, not the clock's now: the record then stands for the bytes hashed, and not for a copy
    changed since (minutes of hashing the release's other copies, before this is written), nor goes unread beside a
    copy whose time is ahead of this machine's clock (copied with its times from a machine whose clock runs ahead).
    Written whole or not at all (write_atomically), where huggingface_hub's writer empties the record first, and
    removes one it cannot parse. (Leaving such copies out of snapshot_download instead, which needs no record of
    huggingface_hub's, would leave a --local-dir that holds every file without the tree listing snapshot_download
    caches, and an offline pull would then take the folder's other JSON files for the repo's.)"""
    local = local_dir / f.path
    try:
        stat = local.stat()
    except OSError:   # not here: fetched
        return
    recorded = verified.digests(f.path, stat)
    downloaded = _download_record(local_dir, f.path)
    if recorded is None or not _published_as(f, *recorded) or (downloaded is not None and downloaded[0] == commit):
        return
    record = _download_record_path(local_dir, f.path)
    record.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(record, f"{commit}\n{f.sha256 or f.blob_id}\n{stat.st_mtime}\n".encode())


def _keep_only_this_commits_files(local_dir: Path, wanted: list[HubFile], repo: str, commit: str, cache_dir: Path,
                                  verified: VerifiedFiles) -> None:
    """After a failed or interrupted download into a --local-dir: remove each wanted file a rerun would not take as
    already here (_is_already_here), so that what is left under their names is this commit's and whole. That is a
    file cut short (huggingface_hub up to 2.4 copies a file the HF cache holds straight under its final name, 2.5
    under a temporary name first), and one nothing vouches for as this commit's: one of an earlier commit that
    huggingface_hub had yet to replace (2.4 deleted it before its download, 2.5 replaces it once the new one is
    whole). A link goes, not what it points to."""
    for f in wanted:
        path = local_dir / f.path
        if os.path.lexists(path) and not _is_already_here(f, repo, commit, cache_dir, local_dir, verified):
            try:
                _remove(path, None)
            except OSError:   # not ours to remove after all (a folder, a read-only one): a rerun replaces it
                pass


@contextmanager
def _no_disk_space_warnings() -> Iterator[None]:
    """Without huggingface_hub's UserWarning "Not enough free disk space ..." (two lines a file, each time it checks):
    klconvert checks the space before a pull, and says a full disk once, in its own line."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Not enough free disk space", category=UserWarning)
        yield


@contextmanager
def _bars_closed() -> Iterator[None]:
    """Close, at its end, the progress bars opened inside and still open: huggingface_hub 2.x leaves its "Download
    complete" and "Reconstruction complete" bars open, and on a terminal they were drawn again at exit, after pull's
    summary line. (tqdm keeps every open bar in the class's `_instances`.)"""
    before = set(hf_tqdm._instances)
    try:
        yield
    finally:
        for bar in set(hf_tqdm._instances) - before:
            bar.close()


def refuse_bundled_name(repo: str) -> None:
    """KLError for the bundled model's name: it comes installed, and no hub repo has that id."""
    if repo == BUNDLED_NAME:
        raise KLError(f"{BUNDLED_NAME} is the bundled model, installed with klconvert, not a hub repo: give it where "
                      f"a model goes (`klconvert run --model {BUNDLED_NAME}`); pull takes a hub repo id (owner/name, "
                      f"like {DEFAULT_REPO})")


def is_repo_id(text: str) -> bool:
    """Whether `text` is a hub repo id (name or owner/name); a path (./x, /x, ~/x, a/b/c) is not."""
    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True


def refuse_bad_repo_id(repo: str) -> None:
    """Raise KLError unless `repo` is a hub repo id (owner/name), e.g. not a path."""
    if not is_repo_id(repo):
        raise KLError(f"{repo!r} is not a hub repo id (name or owner/name, like {DEFAULT_REPO}); check the "
                      "name")


MAX_REVISION_CHARS = 256  # a branch, tag or commit id is far shorter


def refuse_bad_revision(revision: str | None) -> None:
    """Raise KLError unless `revision` is a plain branch, tag or commit name: huggingface_hub keeps it as the path
    refs/<revision> in the cache, so "..", "/" or an absolute path there would write outside it."""
    if revision is None:
        return
    if (len(revision) > MAX_REVISION_CHARS or not revision.isprintable()
            or any(part in ("", ".", "..") for part in revision.split("/"))):  # "" also: empty, leading "/"
        raise KLError(f"--revision {revision[:80]!r} is not a branch, tag or commit name (no empty, '.' or '..' "
                      "parts, no leading '/', only printable characters); check the revision")


def refuse_unsafe_includes(include: list[str] | None) -> None:
    """Raise KLError when an --include pattern asks for pickles or Python files."""
    for pattern in include or ():
        if pattern.lower().endswith(REFUSED_SUFFIXES):
            raise KLError(
                f"--include {pattern!r} asks for files klconvert never downloads ({', '.join(REFUSED_SUFFIXES)}): "
                "pickles run code when loaded and .py files are remote code; pull the safetensors weights instead"
            )


def select_files(
    paths: list[str], include: list[str] | None = None, exclude: list[str] | None = None
) -> list[str]:
    """The repo paths a pull fetches: ALLOWED_PATTERNS, narrowed by include, minus exclude; never a file in the
    folders huggingface_hub and klconvert keep their own records in (a repo's .klconvert/pull.json would name
    another origin)."""
    ours = [p for p in paths if not p.startswith(METADATA_FOLDERS)]
    allowed = filter_repo_objects(ours, allow_patterns=list(ALLOWED_PATTERNS))
    return sorted(filter_repo_objects(allowed, allow_patterns=include, ignore_patterns=exclude))


HEX = {"sha256": SHA256_HEX, "blob_id": GIT_SHA}   # a listed file's hashes, by HubFile field
MAX_PATH_CHARS = 1024
LOCAL_DIR_METADATA_SUFFIX = ".metadata"   # huggingface_hub's record of a file in a --local-dir: NAME.metadata
MAX_FILE_BYTES = 1 << 40  # past any one file of a checkpoint (the release's shards are ~5 GB)
# A model repo holds tens of files (the release: 29); past these a listing is hostile, and huggingface_hub's
# filtering of it by the files a pull asks for (one pattern each) grows as their product (20,000 x 1,000: 7 s).
MAX_LISTED_FILES = 20_000
MAX_PULLED_FILES = 1_000


# The loggers of huggingface_hub (in each version README's Interop row names) that write what a pull's own line says
# (_is_not_retold)
RETELLING_LOGGERS = ("huggingface_hub.hf_api", "huggingface_hub.file_download", "huggingface_hub.utils._http")


def _is_not_retold(record: logging.LogRecord) -> bool:
    """Whether a line huggingface_hub logs is not one klconvert's own line tells: each retry of a request (two lines,
    up to six times a file: 86 lines before a dead file server's one), and its fallback to a cached commit where the
    hub cannot be reached (the listing asked for next cannot be reached either, and that error says so)."""
    message = record.getMessage()
    return not (message.startswith(("Could not reach the Hub", "Error while downloading from", "Retrying in "))
                or " thrown while requesting " in message)


@contextmanager
def _no_retold_log_lines() -> Iterator[None]:
    loggers = [logging.getLogger(name) for name in RETELLING_LOGGERS]
    for logger in loggers:
        logger.addFilter(_is_not_retold)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(_is_not_retold)


@contextmanager
def _malformed_answers(repo: str, endpoint: str) -> Iterator[None]:
    """What huggingface_hub raises when the hub's JSON is not what it should be (HTML, nested past the stack, the
    wrong types, a model info without its commit, which huggingface_hub asserts) as one line; its own errors are
    OSErrors, for _as_user_errors."""
    try:
        yield
    except (ValueError, TypeError, AttributeError, KeyError, RecursionError, AssertionError) as e:
        raise KLError(f"{endpoint} answered for {repo} with something that is not the hub's JSON "
                      f"({unreadable_reason(e)}); check HF_ENDPOINT, or retry later") from None


def _checked_commit(commit, repo: str, endpoint: str) -> str:
    """The commit a revision resolves to: 40 hex digits (it names cache folders, so nothing else is let through)."""
    if not isinstance(commit, str) or not GIT_SHA.fullmatch(commit):
        raise KLError(f"{endpoint} resolved {repo} to commit {str(commit)[:80]!r}, which is not a 40-digit sha; "
                      "check HF_ENDPOINT")
    return commit


def _check_listing(listing: list[HubFile], where: str, endpoint: str, published: bool) -> None:
    """At most MAX_LISTED_FILES; every path a relative POSIX path inside the repo, once, no file also a folder; sizes
    whole bytes in range; hashes hex of their length; and in the hub's own listing (`published`, not the cache's) a
    size and a hash for every file, which the pull is verified against. The listing names what is written, hashed
    and removed on this disk."""
    def bad(what: str) -> KLError:
        return KLError(f"{endpoint}'s listing of {where} {what}; the repo or the endpoint is broken -- check "
                       "HF_ENDPOINT, or report it to the repo's owner")

    if len(listing) > MAX_LISTED_FILES:
        raise bad(f"names {len(listing):,} files, more than the {MAX_LISTED_FILES:,} a model repo could hold")
    paths = set()
    for f in listing:
        if not _is_path_in_repo(f.path):
            raise bad(f"names a file {str(f.path)[:80]!r}, not a path inside the repo")
        if f.path in paths:
            raise bad(f"names {f.path!r} twice")
        paths.add(f.path)
        if published and (f.size is None or (f.sha256 is None and f.blob_id is None)):
            raise bad(f"gives {f.path!r} no size or no hash, so it could not be verified")
        if f.size is not None and (type(f.size) is not int or not 0 <= f.size <= MAX_FILE_BYTES):
            raise bad(f"gives {f.path!r} the size {str(f.size)[:40]}, not a number of bytes up to 1 TiB")
        for name, pattern in HEX.items():
            value = getattr(f, name)
            if value is not None and (not isinstance(value, str) or not pattern.fullmatch(value)):
                raise bad(f"gives {f.path!r} a {name} {str(value)[:80]!r} that is not a hex digest")
    folders = {"/".join(p.split("/")[:i]) for p in paths for i in range(1, p.count("/") + 1)}
    if paths & folders:
        raise bad(f"names {sorted(paths & folders)[0]!r} both as a file and as a folder")


def _is_path_in_repo(path) -> bool:
    """Whether `path` is a relative POSIX path inside a repo: a string of at most MAX_PATH_CHARS, printable (a newline
    or an escape sequence would reach the terminal), no backslash, and no empty, '.' or '..' part."""
    return (isinstance(path, str) and len(path) <= MAX_PATH_CHARS and "\\" not in path and path.isprintable()
            and not any(part in ("", ".", "..") for part in path.split("/")))


def _refuse_unwritable_names(wanted: list[HubFile], where: str, local: bool) -> None:
    """KLError when a file to pull has a name (one part of its path) longer than a file system takes: said before
    anything is downloaded, not as ENAMETOOLONG after the rest. In a --local-dir huggingface_hub also writes a record
    of each file under its name plus LOCAL_DIR_METADATA_SUFFIX."""
    limit = MAX_FILE_NAME_BYTES - (len(LOCAL_DIR_METADATA_SUFFIX) if local else 0)
    for f in wanted:
        longest = max(f.path.split("/"), key=lambda part: len(os.fsencode(part)))
        if len(os.fsencode(longest)) > limit:
            shown_path = f.path.replace(longest, f"{longest[:20]}...{longest[-5:]}")
            raise KLError(f"{where} names {shown_path!r}, whose name is {len(os.fsencode(longest))} bytes, over the "
                          f"{limit} a file system takes here; leave it out with --exclude, or report it to the "
                          "repo's owner")


def _refuse_what_is_in_the_way(local_dir: Path, wanted: list[HubFile], where: str) -> None:
    """KLError, before anything is announced or changes, where the --local-dir holds a folder (not a link to one, which
    goes as a file's link does) under the name of a file to pull: it was taken for a copy not of this commit, of the
    wrong size, announced as to be removed, and its removal failed the pull, "... (Is a directory); check that DIR is
    a folder you can write". A user's folder is not the pull's to remove. Likewise where it holds a file (or a link to
    none) under the name of a folder a file to pull goes in: the pull fetched every other file, then failed "... failed
    at DIR/NAME (File exists); rerun the pull to continue", on every rerun."""
    for f in wanted:
        path = local_dir / f.path
        if path.is_dir() and not path.is_symlink():
            raise KLError(f"--local-dir {local_dir}: holds a folder {f.path}, where {where} has a file; move it out of "
                          "the way, or pull into another --local-dir")
        for folder in list(Path(f.path).parents)[-2::-1]:   # sub, then sub/deeper: not ".", the folder itself
            if os.path.lexists(local_dir / folder) and not (local_dir / folder).is_dir():
                raise KLError(f"--local-dir {local_dir}: holds a file {folder.as_posix()}, where {where} has a folder "
                              f"(of {f.path}); move it out of the way, or pull into another --local-dir")


def _published_listing(api: HfApi, repo: str, commit: str) -> list[HubFile]:
    """Every file of the repo at `commit` with the size and hashes the hub publishes."""
    info = api.model_info(repo, revision=commit, files_metadata=True)
    return [
        HubFile(path=s.rfilename, size=s.size, sha256=s.lfs.sha256 if s.lfs else None, blob_id=s.blob_id)
        for s in info.siblings or []
    ]


def _cached_listing(repo: str, commit: str, cache_dir: Path, local_dir: Path | None) -> list[HubFile] | None:
    """The repo listing an earlier online pull left in the cache (sizes and blob ids), if any."""
    try:
        tree = get_cached_repo_tree(repo, revision=commit, cache_dir=cache_dir, local_dir=local_dir)
    except CachedRepoTreeNotFoundError:
        return None
    return [HubFile(path=f.path, size=f.size) for f in tree]


def _snapshot_on_disk(repo: str, commit: str, cache_dir: Path, local_dir: Path | None, where: str) -> Path:
    """Where an earlier pull left `repo@commit`: the --local-dir, or the cache's snapshot folder."""
    folder = local_dir if local_dir is not None else (
        cache_dir / repo_folder_name(repo_id=repo, repo_type="model") / SNAPSHOTS / commit)
    if not folder.is_dir():
        raise KLError(f"HF_HUB_OFFLINE is set and {folder} holds no copy of {where}: unset HF_HUB_OFFLINE and "
                      "pull once online")
    return folder


def _listing_on_disk(folder: Path) -> list[HubFile]:
    """The files under a downloaded folder, skipping huggingface_hub's and klconvert's own metadata."""
    files = (p for p in folder.rglob("*") if p.is_file())
    listing = [HubFile(path=p.relative_to(folder).as_posix(), size=p.stat().st_size) for p in files]
    return [f for f in listing if not f.path.startswith(METADATA_FOLDERS)]


def _select_from(listing: list[HubFile], include, exclude, where: str) -> list[HubFile]:
    """The listing's files that select_files keeps; KLError when that is nothing."""
    by_path = {f.path: f for f in listing}
    chosen = select_files(list(by_path), include, exclude)
    if not chosen:
        raise KLError(
            f"no file of {where} matches the allowed set {list(ALLOWED_PATTERNS)} narrowed by "
            f"include={include} exclude={exclude}; the repo has: {', '.join(sorted(by_path)[:10]) or 'no files'}"
        )
    if len(chosen) > MAX_PULLED_FILES:
        raise KLError(f"{where} has {len(chosen):,} files to pull, more than the {MAX_PULLED_FILES:,} one pull "
                      "takes; narrow it with --include/--exclude")
    return [by_path[p] for p in chosen]


def _is_already_here(f: HubFile, repo: str, commit: str, cache_dir: Path, local_dir: Path | None,
                     verified: VerifiedFiles | None) -> bool:
    """Whether this commit's file is here, which huggingface_hub skips: in --local-dir with the right size and
    vouched for as this commit's (_local_copy_is_this_commits), or in the cache (in the commit's snapshot, or as the
    blob of another commit, which the cache names by its content)."""
    if local_dir is not None:
        local = local_dir / f.path
        return local.is_file() and local.stat().st_size == f.size and \
            _local_copy_is_this_commits(f, local_dir, commit, verified) is True
    if isinstance(try_to_load_from_cache(repo, f.path, cache_dir=cache_dir, revision=commit), str):
        return True
    blob_name = f.sha256 or f.blob_id  # huggingface_hub names a blob by its ETag: sha256 (LFS) or git blob id
    storage = cache_dir / repo_folder_name(repo_id=repo, repo_type="model")
    return blob_name is not None and (storage / BLOBS / blob_name).is_file()


def _local_copy_is_this_commits(f: HubFile, local_dir: Path, commit: str, verified: VerifiedFiles) -> bool | None:
    """Whether the --local-dir's file of `f`'s path and size holds this commit's `f`: True where a record vouches for
    it, False where one shows another content, None where none speaks. The records: klconvert's of the hashes it
    verified (`verified`, standing while the file is unchanged), which know the bytes, else huggingface_hub's of its
    download (standing likewise), by which it skips the file -- naming this commit, or the ETag the hub publishes
    for `f` (its sha256 for an LFS file, else its git blob id). With none, huggingface_hub hashes an LFS file and
    keeps it if it is `f`, and fetches any other. huggingface_hub's record is read as it is (_download_record): a
    pull refused after this must leave a folder as it found it."""
    local = local_dir / f.path
    recorded = verified.digests(f.path, local.stat())
    if recorded is not None:
        return _published_as(f, *recorded)
    downloaded = _download_record(local_dir, f.path)
    if downloaded is None:
        return None
    downloaded_commit, downloaded_etag = downloaded
    return downloaded_commit == commit or downloaded_etag == (f.sha256 or f.blob_id)


def _download_record_path(local_dir: Path, path: str) -> Path:
    """Where huggingface_hub keeps its record of the --local-dir file at `path` (its _local_folder's layout)."""
    return local_dir / LOCAL_DIR_DOWNLOADS / f"{path}{LOCAL_DIR_METADATA_SUFFIX}"


def _download_record(local_dir: Path, path: str) -> tuple[str, str] | None:
    """(commit, ETag) of huggingface_hub's record of the --local-dir file at `path` where it stands, read as its
    read_download_metadata reads it (from 1.33 to 2.5): three lines, the commit, the ETag and the time it was
    written, standing while the file has not changed since (its modification time at most a second past). None
    where there is none, or none it would read. Read here rather than by read_download_metadata, which makes its
    folders, takes the file's lock (making it, and waiting as long as another process holds it) and removes a record
    it cannot parse: a pull refused after this leaves a folder as it found it. A regular file only, no further than
    MAX_DOWNLOAD_RECORD_BYTES (read_download_metadata reads each line whole, a record of GBs without a break too)."""
    try:
        with open_regular(_download_record_path(local_dir, path)) as record:
            data = record.read(MAX_DOWNLOAD_RECORD_BYTES + 1)
        lines = data.split(b"\n", 3)
        if len(lines) < 3 or (len(data) > MAX_DOWNLOAD_RECORD_BYTES and len(lines) < 4):
            return None   # fewer than three lines, or lines past the bound
        commit, etag, written = (line.decode().strip() for line in lines[:3])
        if not (local_dir / path).stat().st_mtime - 1 <= float(written):   # not, where NaN: as huggingface_hub
            return None
        return commit, etag
    except (OSError, ValueError):   # none, not a regular file, not text: huggingface_hub takes it as none too
        return None


def _copies_not_of_this_commit(wanted: list[HubFile], repo: str, commit: str, cache_dir: Path,
                               local_dir: Path | None, verified: VerifiedFiles | None) -> dict[str, list[Path]]:
    """Each wanted file's copies already here that are not this commit's, by the file's path in the repo: in the
    --local-dir, or in the cache (the commit's snapshot file or the blob of another commit), one of a size other
    than the hub lists (a download or a disk that failed; what an offline pull calls the copy incomplete for), which
    huggingface_hub takes as fetched whatever its size; and in the --local-dir one of the listed size that a record
    shows to be another content (_local_copy_is_this_commits: an earlier commit's), which huggingface_hub up to 2.4
    deleted before its download and 2.5 keeps until the new one is whole, beside it on the disk and in place after a
    failure. The pull removes them once past its refusals."""
    storage = cache_dir / repo_folder_name(repo_id=repo, repo_type="model")
    out: dict[str, list[Path]] = {}
    for f in wanted:
        blob_name = f.sha256 or f.blob_id
        copies = ([local_dir / f.path] if local_dir is not None else
                  [storage / SNAPSHOTS / commit / f.path, *([storage / BLOBS / blob_name] if blob_name else [])])
        for path in copies:
            try:
                size = path.stat().st_size
            except OSError:   # not there (a link: not what it points to)
                continue
            if size != f.size or (local_dir is not None and path.is_file()
                                  and _local_copy_is_this_commits(f, local_dir, commit, verified) is False):
                out.setdefault(f.path, []).append(path)
    return out


def _room_of(paths: list[Path]) -> int:
    """The bytes removing these files gives back: each file's once (a snapshot's link and its blob are one), none
    for a link (_remove keeps a user's target) or a file linked from elsewhere too."""
    sizes = {}
    for path in paths:
        try:
            st = path.lstat()
        except OSError:
            continue
        if S_ISREG(st.st_mode) and st.st_nlink == 1:
            sizes[(st.st_dev, st.st_ino)] = st.st_size
    return sum(sizes.values())


# huggingface_hub's names for a file it is writing (1.33 to 2.5), each one process's own: a download's
# `<its incomplete name's stem>.<8 hex>.incomplete` (file_download._download_to_tmp_and_move: `<etag>` in the cache's
# blobs, `<short hash>.<etag>` in a --local-dir's), and 2.5's copy of a cached file into a --local-dir,
# `<32 hex>.incomplete`. The process removes it as it ends, on an error, Ctrl-C or SIGTERM too, but not when killed
# (SIGKILL, out of memory, power lost), and no later download reuses it. Not `<etag>.incomplete`, which
# huggingface_hub before 1.33 (another environment's, sharing the cache) resumes.
UNFINISHED_DOWNLOAD = re.compile(r"(?:.+\.[0-9a-f]{8}|[0-9a-f]{32})\.incomplete")
LOCKS = ".locks"   # the cache's folder of huggingface_hub's per-file locks, one folder a repo (file_download)
LOCAL_DIR_DOWNLOADS = Path(".cache") / "huggingface" / "download"   # a --local-dir's (_local_folder)
MAX_DOWNLOAD_RECORD_BYTES = 4096   # huggingface_hub's record of a file there: a commit, an ETag, a time (~130 bytes)


def _unfinished_downloads(repo: str, cache_dir: Path, local_dir: Path | None) -> list[Path]:
    """What huggingface_hub left of this repo's downloads that no process is writing (UNFINISHED_DOWNLOAD): in the
    cache, the repo's blobs, under the locks of .locks/models--ORG--NAME; in a --local-dir, its record folders, each
    under the locks beside it. A process writes such a file only while it holds its file's lock, so those of a folder
    are unwritten where every lock there is free, taken without waiting (not by the files' age: a download stalled
    for hours is still in flight). Anything else named so -- outside these folders, or another repo's -- is not
    huggingface_hub's here, and is left."""
    if local_dir is None:
        folder = repo_folder_name(repo_id=repo, repo_type="model")
        places = [(cache_dir / folder / BLOBS, cache_dir / LOCKS / folder)]
    else:
        places = [(Path(folder), Path(folder)) for folder, _, _ in os.walk(local_dir / LOCAL_DIR_DOWNLOADS)]
    unfinished = []
    for written_in, locks_in in places:
        try:
            found = [path for path in written_in.iterdir()
                     if UNFINISHED_DOWNLOAD.fullmatch(path.name) and S_ISREG(path.lstat().st_mode)]
        except OSError:   # no such folder: nothing downloaded there
            continue
        if found and _locks_free(sorted(locks_in.glob("*.lock"))):
            unfinished += found
    return unfinished


def _locks_free(locks: list[Path]) -> bool:
    """Whether no process holds any of huggingface_hub's `locks` (its FileLocks): each taken without waiting and let
    go before the next. One at a time tells what all at once would: the files were listed first, and a process holds
    its file's lock from before it makes its temporary file until it has renamed or removed it, so a lock free now
    is one whose files listed then are abandoned or gone. Held all at once, a cache's locks of the repo (one for each
    file version it ever fetched, none removed) could pass `ulimit -n`, and one that could not be opened counted as
    held, for good (h305). One that cannot be taken (another user's, a file system without locks) counts as held."""
    for lock in locks:
        try:
            with FileLock(lock, timeout=0):
                pass
        except (Timeout, OSError, NotImplementedError):
            return False
    return True


def _once_removed(copies: int, unfinished: int) -> str:
    """What the room a pull states stands on where it first removes `copies` copies not of this commit and
    `unfinished` downloads killed processes left (_unfinished_downloads); "" where it removes nothing."""
    removed = [*([f"the {copies} {'copy' if copies == 1 else 'copies'} here not of this commit"] if copies else []),
               *([f"the {unfinished} unfinished {'download' if unfinished == 1 else 'downloads'} a killed pull left"]
                 if unfinished else [])]
    return f" once {' and '.join(removed)} {'is' if copies + unfinished == 1 else 'are'} removed" if removed else ""


def _announce(repo, revision, commit, listing: list[HubFile], wanted: list[HubFile], fetch_bytes, target, free,
              freed: int, removing: str):
    """Tell the terminal what this pull takes, leaves on the hub, and fetches, and the room it has for that: `free`,
    and `freed` more once it removes what `removing` says (_once_removed)."""
    left_out = sorted({f.path for f in listing} - {f.path for f in wanted})
    total = sum(f.size or 0 for f in wanted)
    leaving = (f", leaving {len(left_out)} on the hub ({', '.join(left_out[:5])}{', ...' if len(left_out) > 5 else ''})"
               if left_out else "")
    print(
        f"{repo}@{revision or constants.DEFAULT_REVISION} is commit {commit}: pulling {counted(len(wanted), 'file')} "
        f"({size_text(total)}){leaving}; {size_text(total - fetch_bytes)} already here, "
        f"fetching {size_text(fetch_bytes)} into {target} ({size_text(free)} free"
        f"{f', {size_text(freed)} more' + removing if removing else ''})",
        file=sys.stderr,
    )


def _verify(folder: Path, wanted: list[HubFile], where: str, progress: bool, record: VerifiedFiles,
            blobs: Path | None) -> list[PulledFile]:
    """Check each file's size and hash against the hub's (hashing only files changed since `record` saw them);
    remove the bad ones (_remove; blobs: the cache's blob folder, None in a --local-dir) and raise KLError."""
    try:
        checks = _hash_in_parallel(folder, wanted, "Verifying", progress,
                                   lambda f, bar, stopped: _check_file(folder, f, bar, record, stopped))
    except LeftRunning:   # the hashing threads still note hashes in `record`: saved now, it could be half
        raise
    except BaseException:
        # the pool has let its threads go: `record` holds the files they finished, each whole and as the hub
        # publishes it, so that the rerun after a Ctrl-C does not hash them again (minutes for the release's 98 GB)
        record.save()
        raise
    problems = [problem for _, problem in checks if problem is not None]
    for f, (_, problem) in zip(wanted, checks):
        if problem is not None:
            record.forget(f.path)
    record.save()
    if problems:
        for f, (_, problem) in zip(wanted, checks):
            if problem is not None:
                _remove(folder / f.path, blobs)
        # a download cut or damaged on the way comes right on a rerun; bytes the hub serves that are not what it
        # publishes for them fail again every time, which the line cannot tell apart from the first
        raise KLError(
            f"{counted(len(problems), 'file')} of {where} failed verification and "
            f"{'was' if len(problems) == 1 else 'were'} removed "
            f"({'; '.join(problems[:3])}{'; ...' if len(problems) > 3 else ''}); rerun the pull to fetch "
            f"{'it' if len(problems) == 1 else 'them'} again "
            "-- if the same file fails again, the repo's file does not match the hash the hub publishes for it, "
            f"which no rerun fixes: tell the repo's owner, or pull another {argument('revision', '--revision')}"
        )
    return [pulled for pulled, _ in checks]


def _hash_in_parallel(folder: Path, files: list[HubFile], desc: str, progress: bool, each: Callable) -> list:
    """each(f, bar, stopped) for every file, HASH_WORKERS at a time, under one progress bar of their bytes."""
    total = sum((folder / f.path).stat().st_size for f in files if (folder / f.path).is_file())
    # set once the hashes are given up (a Ctrl-C or SIGTERM raised in the main thread, a file's error): the pool's
    # shutdown waits for the running ones, which would otherwise read their files to the end (seconds a GB)
    stopped = threading.Event()
    with hf_tqdm(total=total, unit="B", unit_scale=True, desc=desc, disable=None if progress else True) as bar:
        def hash_all() -> list:
            with ThreadPoolExecutor(max_workers=HASH_WORKERS) as pool:
                try:
                    return list(pool.map(lambda f: each(f, bar, stopped), files))
                except BaseException:
                    stopped.set()
                    raise

        # the map waits for each result with no timeout: waited for from a thread of its own, awake to a signal a
        # hashing thread took (run_waking_for_signals); given up on, a hash not stopping, nothing of this run's
        # hashing is recorded (LeftRunning)
        return run_waking_for_signals(hash_all, stop=stopped.set, stopping="the hashing",
                                      left="the hashes of this run are not recorded: the next pull reads those files "
                                           "again")


def _check_file(folder: Path, f: HubFile, bar, record: VerifiedFiles,
                stopped: threading.Event) -> tuple[PulledFile | None, str | None]:
    """(the verified file, None) or (None, what is wrong with it). A file `record` saw unchanged, with the hashes
    the hub publishes, is not read again; one being hashed once `stopped` is set raises PullInterrupted."""
    local = folder / f.path
    if not local.is_file():
        return None, f"{f.path} is missing after the download"
    stat = local.stat()
    size = stat.st_size
    if f.size is not None and size != f.size:
        return None, f"{f.path} has {counted(size, 'byte')}, the hub published {f.size:,}"
    recorded = record.digests(f.path, stat)
    if recorded is not None and _published_as(f, *recorded):
        bar.update(size)
        return PulledFile(path=f.path, size=size, sha256=recorded[0]), None
    sha256, git_blob_id = _digests(local, size, bar, stopped)
    if f.sha256 is not None and sha256 != f.sha256:
        return None, f"{f.path} has sha256 {sha256}, the hub published {f.sha256}"
    if f.sha256 is None and f.blob_id is not None and git_blob_id != f.blob_id:
        return None, f"{f.path} has git blob id {git_blob_id}, the hub published {f.blob_id}"
    # only a file as published: the record, saved by an interrupted pull too, is what verified_at_pull believes
    record.remember(f.path, stat, sha256, git_blob_id)
    return PulledFile(path=f.path, size=size, sha256=sha256), None


def _published_as(f: HubFile, sha256: str, git_blob_id: str) -> bool:
    """Whether these digests are the ones the hub publishes for `f` (sha256 for LFS files, else git blob id)."""
    return sha256 == f.sha256 if f.sha256 is not None else f.blob_id is not None and git_blob_id == f.blob_id


def _digests(path: Path, size: int, bar, stopped: threading.Event) -> tuple[str, str]:
    """(sha256, git blob sha1) of a file, streamed in HASH_CHUNK_BYTES chunks; PullInterrupted at the first chunk
    after `stopped` is set."""
    sha256 = hashlib.sha256()
    git_blob = hashlib.sha1(b"blob %d\0" % size)  # git hashes the header "blob <size>\0" then the bytes
    chunk_bytes = min(HASH_CHUNK_BYTES, max(size, 1))   # read(n) takes n bytes first: not 8 MiB for a config file
    with open(path, "rb") as stream:
        while chunk := stream.read(chunk_bytes):
            if stopped.is_set():
                raise PullInterrupted
            sha256.update(chunk)
            git_blob.update(chunk)
            bar.update(len(chunk))
    return sha256.hexdigest(), git_blob.hexdigest()


def _check_sizes(folder: Path, wanted: list[HubFile], where: str) -> list[PulledFile]:
    """Offline check: every wanted file is on disk with the size the cached listing records."""
    problems = []
    for f in wanted:
        local = folder / f.path
        if not local.is_file():
            problems.append(f"{f.path} is missing")
        elif f.size is not None and local.stat().st_size != f.size:
            problems.append(f"{f.path} has {counted(local.stat().st_size, 'byte')}, the hub published {f.size:,}")
    if problems:
        raise KLError(
            f"the cached copy of {where} in {folder} is incomplete and HF_HUB_OFFLINE is set: "
            f"{'; '.join(problems[:3])}; unset HF_HUB_OFFLINE and rerun to fetch the rest"
        )
    return [PulledFile(path=f.path, size=(folder / f.path).stat().st_size, sha256=f.sha256) for f in wanted]


def _check_index_shards(folder: Path, listing: list[HubFile], wanted: list[HubFile], where: str) -> None:
    """Every shard the safetensors index names is a file of the repo, and downloaded unless include/exclude left it
    out."""
    if INDEX_FILE not in {f.path for f in wanted}:
        return
    try:
        index = read_json(folder / INDEX_FILE, MAX_INDEX_BYTES, INDEX_FILE, MAX_INDEX_VALUES)
        shards = index["weight_map"].values()
        if not all(isinstance(shard, str) for shard in shards):
            raise ValueError("a shard name that is not a string")
        shards = set(shards)
    except (OSError, ValueError, KeyError, AttributeError, TypeError, RecursionError) as e:
        raise KLError(f"{INDEX_FILE} of {where} is not a safetensors index ({unreadable_reason(e)}); the repo is "
                      "broken") from None
    listed = {f.path for f in listing}
    strays = sorted(shard for shard in shards if shard not in listed)
    if strays:
        raise KLError(f"{INDEX_FILE} of {where} names {counted(len(strays), 'shard')} that "
                      f"{'is not a file' if len(strays) == 1 else 'are not files'} of the repo "
                      f"({', '.join(repr(s[:80]) for s in strays[:3])}); the repo is broken")
    left_out_by_filters = set(select_files([f.path for f in listing])) - {f.path for f in wanted}
    missing = sorted(s for s in shards - left_out_by_filters if not (folder / s).is_file())
    if missing:
        raise KLError(
            f"{INDEX_FILE} of {where} names {counted(len(missing), 'shard')} that "
            f"{'was' if len(missing) == 1 else 'were'} not downloaded ({', '.join(missing[:3])}): "
            f"{'it is' if len(missing) == 1 else 'they are'} not in the repo at this commit"
        )


def _remove(path: Path, blobs: Path | None) -> None:
    """Delete a bad file. A link goes, and what it points to only when that is a blob in `blobs` (the HF cache's,
    which its snapshot links point to): a link a user put in a --local-dir keeps its target."""
    if blobs is not None and path.is_symlink() and path.resolve().parent == blobs.resolve():
        path.resolve().unlink(missing_ok=True)
    path.unlink(missing_ok=True)


def _refuse_mixing_pulls(local_dir: Path, repo: str, commit: str, listing: list[HubFile] | None,
                         wanted: list[HubFile] | None, offline: bool) -> None:
    """KLError, before any download, where --local-dir's LOCAL_DIR_RECORD names another repo or commit and this pull
    would leave it describing the folder wrongly: offline, where no record is written (nor a file hashed), it would
    go on naming the earlier pull while this one takes the files as its commit's; online, where files the record
    lists, still there, are not among `wanted`, the new record would name this commit for a folder that holds the
    earlier one's files too (quantize's model card, and its resume, take the record's commit for all of them).
    Repo ids are compared as the hub resolves them, without regard to case.

    Those files are of two kinds, each with its own remedy: files `listing` (this commit's) has, which the
    --include/--exclude leave out, and files the repo no longer has at this commit (deleted or resharded upstream),
    which no pull fetches. Those are named for the user to remove, not removed here: the record says only what the
    earlier pull wrote, and a file there since edited or put back by hand would be lost with no word."""
    earlier = _pull_record(local_dir)
    if earlier is None or (earlier["repo"].lower(), earlier["commit"]) == (repo.lower(), commit):
        return
    held = f"{earlier['repo']}@{earlier['commit']}"
    if offline:
        raise KLError(f"--local-dir {local_dir}: holds {held} (its {LOCAL_DIR_RECORD}), not {repo}@{commit}, and "
                      "HF_HUB_OFFLINE is set, so nothing is fetched or checked to make it this one; unset "
                      "HF_HUB_OFFLINE and rerun to pull it into the folder, or pull into another --local-dir")
    pulled, published = {f.path for f in wanted}, {f.path for f in listing}
    left = [path for path in earlier["files"] if path not in pulled and os.path.lexists(local_dir / path)]
    gone = [path for path in left if path not in published]
    if gone:
        raise KLError(f"--local-dir {local_dir}: holds files of {held} (its {LOCAL_DIR_RECORD}) that {repo}@{commit} "
                      f"no longer has, {few(gone)}, so the folder would hold files of both; remove them, or pull into "
                      "another --local-dir")
    if left:
        raise KLError(f"--local-dir {local_dir}: holds files of {held} (its {LOCAL_DIR_RECORD}) that this pull of "
                      f"{repo}@{commit} does not fetch, {few(left)}, so the folder would hold files of both; pull "
                      "without the --include/--exclude that leave them out, remove them, or pull into another "
                      "--local-dir")


def _finished_pull_listing(local_dir: Path, repo: str, commit: str, where: str) -> list[HubFile]:
    """The files of `repo@commit` a finished pull into the --local-dir wrote there, as its LOCAL_DIR_RECORD lists them:
    what an offline pull takes where the cache holds no tree listing of the commit. The folder's own listing took
    whatever was there for the repo's files -- after a pull cut short, the few it had fetched and the user's own JSON
    beside them -- and said them verified. KLError where no finished pull of this commit is recorded there."""
    record = _pull_record(local_dir)
    if (record is None or (record["repo"].lower(), record["commit"]) != (repo.lower(), commit)
            or not all(_is_path_in_repo(path) and path in record["sizes"] and not path.startswith(METADATA_FOLDERS)
                       for path in record["files"])):   # no pull records its own or huggingface_hub's records
        raise KLError(f"HF_HUB_OFFLINE is set and --local-dir {local_dir} holds no finished pull of {where} (its "
                      f"{LOCAL_DIR_RECORD} names none): unset HF_HUB_OFFLINE and rerun the pull to finish it")
    # with the sizes the pull verified, which _check_sizes holds the copies to as it does a cached listing's
    return [HubFile(path=path, size=record["sizes"][path]) for path in record["files"]]


def _pull_record(folder: Path) -> dict | None:
    """The repo, commit and file paths of `folder`'s LOCAL_DIR_RECORD, and the sizes it gives them (`sizes`: path ->
    bytes, for those whose size is a count of bytes); None where there is none, or one not of this shape -- a hub
    repo id, a commit sha, paths, as provenance.source_origin takes one (the folder's, as untrusted as the rest of it:
    a pull removes it before fetching anything)."""
    try:
        record = read_json(folder / LOCAL_DIR_RECORD, MAX_PULL_RECORD_BYTES, "pull record")
        validate_repo_id(record["repo"])   # a ValueError unless a hub repo id
        paths = [entry["path"] for entry in record["files"]]
        sizes = {entry["path"]: entry.get("size") for entry in record["files"]
                 if type(entry.get("size")) is int and entry["size"] >= 0}   # not a bool, nor a float
        if GIT_SHA.fullmatch(record["commit"]) and all(isinstance(path, str) for path in paths):
            return {"repo": record["repo"], "commit": record["commit"], "files": paths, "sizes": sizes}
    except (OSError, ValueError, RecursionError, KLError, KeyError, TypeError):
        pass
    return None


def _write_local_dir_record(folder: Path, repo, revision, commit, files: list[PulledFile]) -> None:
    """Write LOCAL_DIR_RECORD (repo, revision, commit, files with sizes and sha256) atomically."""
    record = folder / LOCAL_DIR_RECORD
    record.parent.mkdir(parents=True, exist_ok=True)
    body = {
        "repo": repo,
        "revision": revision or constants.DEFAULT_REVISION,
        "commit": commit,
        "files": [asdict(f) for f in files],
    }
    write_atomically(record, (json.dumps(body, indent=1) + "\n").encode())


def _space_said(needed: int | None, target: Path) -> str:
    """What a full disk's line says of the space: the bytes the pull fetches in all (where known) beside those free in
    `target` now, as quantize's line says them (size_texts)."""
    free = free_disk_bytes(target)
    if needed is None:
        return f"{size_text(free)} free there"
    needed_said, free_said = size_texts(needed, free)
    return f"it fetches {needed_said} in all, {free_said} free there"


# The hub's answer to an account past its download (egress) allowance: huggingface_hub 2.5 raises it as its own
# EgressLimitError, up to 2.4 as an HfHubHTTPError, which a download's LocalEntryNotFoundError wraps
PAYMENT_REQUIRED = 402


def _allowance_used_up(error: HfHubHTTPError, guard: AnswerGuard, where: str) -> KLError:
    """The line for the hub's PAYMENT_REQUIRED: the file it refused (its URL where that is no file's), the hub's
    reason (its X-Error-Message and its body's errors, which huggingface_hub joins in lines: here one line of
    printable text, at most ERROR_CHARS), and that a rerun can work only once the allowance does."""
    url = str(error.response.request.url)
    _, resolve, path = url.partition("/resolve/")
    refused = controls_escaped(unquote(path.partition("/")[2]) if resolve else url)
    reason = controls_escaped(" ".join((error.server_message or "the hub gave no reason").split()))
    reason = reason if len(reason) <= ERROR_CHARS else reason[:ERROR_CHARS - 3] + "..."
    return KLError(f"{guard.endpoint} refused {refused} of {where} with 402 Payment Required, the account's download "
                   f"(egress) allowance used up ({reason}); rerun the pull once the allowance allows{guard.kept()}, or "
                   "set HF_TOKEN to an account with a larger one")


@dataclass
class _Stage:
    """How far a pull got: `fetching` once snapshot_download has started writing files (only then does a rerun
    resume anything); `needed`, the bytes it fetches in all, once known (what a full disk's line states)."""

    fetching: bool = False
    needed: int | None = None


@contextmanager
def _as_user_errors(guard: AnswerGuard, revision: str | None, target: Path) -> Iterator[_Stage]:
    """Turn huggingface_hub's errors a user can cause, pulling guard.repo from guard.endpoint, into one-line KLErrors
    saying what to do: a rerun only where files were downloading (the finished ones kept, where a file's body had
    begun to arrive), the network where the hub could not be reached before."""
    repo, endpoint = guard.repo, guard.endpoint
    revision = revision or constants.DEFAULT_REVISION
    where = f"{repo}@{revision}"
    stage = _Stage()
    try:
        yield stage
    except GatedRepoError as e:
        raise KLError(f"{repo} is gated: accept its terms at {endpoint}/{repo}, then set HF_TOKEN") from e
    except RepositoryNotFoundError as e:
        if e.response.status_code == 401 and get_token() is None:
            raise KLError(
                f"{endpoint} has no repo {repo} it will show without a token: check the name, or if it is "
                "private set HF_TOKEN (or run `hf auth login`)"
            ) from e
        raise KLError(f"{endpoint} has no repo {repo} visible to your token: check the name") from e
    except RevisionNotFoundError as e:
        raise KLError(f"{repo} has no revision {revision!r}: pass a branch, tag or commit sha that exists") from e
    except (RevisionResolutionError, LocalEntryNotFoundError, OfflineModeIsEnabled) as e:
        if constants.is_offline_mode():
            raise KLError(
                f"HF_HUB_OFFLINE is set and {target} holds no complete copy of {where}: "
                "unset HF_HUB_OFFLINE and pull once online"
            ) from e
        # what huggingface_hub's own words ("An error happened while trying to locate the file on the Hub ...") leave
        # out: the error it met -- the hub down (5xx), the connection refused, a download allowance used up
        cause = e.__cause__ if e.__cause__ is not None else e
        if isinstance(cause, HfHubHTTPError) and cause.response.status_code == PAYMENT_REQUIRED:
            raise _allowance_used_up(cause, guard, where) from e
        if stage.fetching:
            raise KLError(f"cannot fetch {where} from {endpoint} ({type(cause).__name__}: {first_line(cause)}); "
                          f"{RERUN}{guard.kept()}") from e
        # the hub unreachable (or down) and no commit of `revision` in the cache: HF_HUB_OFFLINE=1 would find none
        raise KLError(f"cannot resolve {where} at {endpoint} ({type(cause).__name__}: {first_line(cause)}), and the "
                      f"cache holds no copy of it; {UNREACHABLE}, then try again") from e
    except HfHubHTTPError as e:
        if e.response.status_code == 401:
            raise KLError(f"{endpoint} rejected the token for {repo}: check HF_TOKEN") from e
        if e.response.status_code == PAYMENT_REQUIRED:
            raise _allowance_used_up(e, guard, where) from e
        raise KLError(f"{endpoint} failed while pulling {where}: {first_line(e)}; "
                      + (RERUN + guard.kept() if stage.fetching else "check HF_ENDPOINT, or retry later")) from e
    except TRANSPORT_ERRORS as e:
        if stage.fetching:
            # no HF_HUB_OFFLINE=1 here: the cache's copy of this revision is the one left short, which an offline pull
            # refuses as incomplete
            raise KLError(f"lost the connection to {endpoint} while pulling {where} ({first_line(e)}); "
                          f"{RERUN}{guard.kept()}") from e
        raise KLError(f"cannot reach {endpoint} to look up {where} ({type(e).__name__}: {first_line(e)}); "
                      f"{UNREACHABLE}, then try again (or, where an earlier pull left a copy in the cache, set "
                      "HF_HUB_OFFLINE=1 to use it)") from e
    except BROKEN_ANSWER_ERRORS as e:  # after TRANSPORT_ERRORS, which are HTTPErrors too
        raise KLError(f"{endpoint} sent an answer the client cannot follow while pulling {where} ({first_line(e)}); "
                      "check HF_ENDPOINT, or report it to the repo's owner") from e
    except OSError as e:
        if e.errno == errno.EDQUOT:
            raise KLError(f"{quota_exceeded(f'while pulling {where} into {target}')} and rerun") from e
        if e.errno in DISK_FULL:
            raise KLError(f"disk full while pulling {where} into {target} ({_space_said(stage.needed, target)}); "
                          "free space and rerun") from e
        at = f" at {e.filename}" if e.filename else ""   # the file, and the system's reason: not Python's "[Errno 5]"
        raise KLError(f"pulling {where} into {target} failed{at} ({unreadable_reason(e)}); " + (
            RERUN + guard.kept() if stage.fetching else f"check that {target} is a folder you can write")) from e
    except ValueError as e:   # huggingface_hub refusing what the server sent (a file size past its limits, a name)
        raise KLError(f"{endpoint} sent something huggingface_hub refuses while pulling {where} ({first_line(e)}); "
                      "check HF_ENDPOINT, or retry later") from None
