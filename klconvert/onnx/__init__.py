"""ONNX export of a (quantized) Kimi Linear checkpoint, and the onnxruntime session that runs it."""
import os

# onnxruntime (1.32) starts Microsoft's telemetry as it imports: it writes ~/.cache/Microsoft/DeveloperTools/
# .onnxruntime/ and $TMPDIR/.ses, and where it cannot, prints a coloured warning on stderr. ORT_DISABLE_TELEMETRY=1
# (its Privacy.md) stops both if set before that import, which every module here (and the CLI's require) comes after;
# a user's own setting wins.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
