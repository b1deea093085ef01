"""ONNX passes that round a graph: int8 (dynamic, static, weight-only), int4, float16, smoothing."""
