"""What a line about a damaged quantized folder says to do, by where the folder came from: one a pull fetched is pulled
again (the command said), one klconvert wrote is converted again, one of unknown origin gets both."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from klconvert.hf_cache import SNAPSHOTS
from klconvert.shell_command import shell_command
from klconvert.verified_files import redownload_advice, verified_at_pull

WRITTEN_REMEDY = "re-run the klconvert command that wrote it"
UNKNOWN_ORIGIN_REMEDY = "re-run the conversion if klconvert wrote it, or download it again"


def damaged_folder_remedy(folder: Path | None = None, files: Sequence[Path] = ()) -> str:
    """What ends a line about damage found in the model folder `folder` (None: a folder not known), in `files` where
    the line rests on them. A folder a pull fetched (its pull record, or its place among the HF cache's snapshots:
    source_origin) is pulled again -- unless that pull verified every one of `files`, unchanged since, when a pull
    brings the same bytes (redownload_advice); one whose output record says klconvert wrote it is converted again
    (a pulled folder may hold the record its uploader's run wrote: its origin is the pull); else both. A snapshot in
    a cache other than the one a plain pull fills is pulled with --cache-dir, else the pull would fill that one and
    leave the damaged snapshot as it is."""
    if folder is None:
        return UNKNOWN_ORIGIN_REMEDY
    # both import the checkpoint reader, whose lines end so, and provenance huggingface_hub too, which reading a
    # model loads nowhere else: imported only once such a line is said
    from klconvert.convert.output_folder import files_klconvert_wrote
    from klconvert.convert.provenance import source_origin

    origin = source_origin(folder)
    if origin.repo is not None:
        command = shell_command("klconvert", "pull", origin.repo, "--revision", origin.commit,
                                *_pull_target(origin.folder))
        pull = f"download it again ({command})"
        return redownload_advice(files[0], pull) if files and all(map(verified_at_pull, files)) else pull
    if files_klconvert_wrote(Path(folder)) is not None:
        return WRITTEN_REMEDY
    return UNKNOWN_ORIGIN_REMEDY


def _pull_target(folder: Path) -> tuple[str | Path, ...]:
    """The option that makes `klconvert pull` write into `folder` again (resolved, as source_origin gives it): a
    snapshot's cache (CACHE/models--ORG--NAME/snapshots/COMMIT) when not the default one, else its --local-dir."""
    if folder.parent.name != SNAPSHOTS:
        return "--local-dir", folder
    from huggingface_hub import constants  # as provenance: loaded only once such a line is said

    cache = folder.parent.parent.parent
    return () if cache == Path(constants.HF_HUB_CACHE).resolve() else ("--cache-dir", cache)
