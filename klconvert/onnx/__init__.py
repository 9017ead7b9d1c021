"""ONNX export of a (quantized) Kimi Linear checkpoint, and the onnxruntime session that runs it."""
