"""Quantisation: integer kernels as onnxruntime computes them, and what they mean per device."""
