"""ONNX export of a (quantized) Kimi Linear checkpoint, and the onnxruntime session that runs it."""
import os
from pathlib import Path

# onnxruntime (1.32) starts Microsoft's telemetry as it imports: it writes ~/.cache/Microsoft/DeveloperTools/
# .onnxruntime/ and $TMPDIR/.ses, and where it cannot, prints a coloured warning on stderr. ORT_DISABLE_TELEMETRY=1
# (its Privacy.md) stops both if set before that import, which every module here (and the CLI's require) comes after;
# a user's own setting wins.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

from klconvert.checkpoint.folder_files import GENAI_CONFIG  # noqa: E402 -- after the setting, as every import here
from klconvert.errors import KLError  # noqa: E402


def refuse_export_under_way(folder: Path, named: str | Path) -> None:
    """KLError when `folder` lacks GENAI_CONFIG as an export-onnx --force fills it in place, or since one was stopped
    doing so: its files come and go one by one, and the one missing was blamed on the folder (helper-139). Before any
    file of the folder is read."""
    if os.path.lexists(folder / GENAI_CONFIG):   # moved aside first and back last by a replace: the folder is whole
        return
    from klconvert.whole_folder import fill_under_way   # only then

    if (state := fill_under_way(folder)) is not None:
        raise KLError(f"{named}: an export into it is {state}: rerun when it ends, or export it again")
