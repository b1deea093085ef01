"""The export stage's graph passes, each ``run(model, context) -> PassResult``.

``reproducibility`` (strip build-environment details), ``fusion`` (onnxscript's transformer
fusions, ``attention_mask``, then ``optimize``), ``optimize`` (ONNX Runtime's portable
optimisation), ``fixed_shape`` (fixed input sizes for mobile providers), ``dense_equivalent``
(low-rank MatMul pairs folded by onnxscript rewrite rules). ``build.export_passes`` orders them.
"""
