"""ChatGLM-6B defined once.

``definition``: the block in the model card's order over an operations interface, and the model's constants.
``weights``: weight names and the MatMulNBits storage format (zero point, nibble order, dequantization).
``numpy_ops``: the operations on numpy arrays (the reference and the INT4 prompt path build on them).

The runtime core: numpy only (no torch, no onnx). The ONNX graph builders in ``model_export`` are backends of the same
definition whose tensors are value names.
"""
