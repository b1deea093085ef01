"""ONNX graph helpers shared by the export and quantisation passes (onnx and onnxruntime only)."""
