"""StreamChat runtime core: tokenizer, prompt, generation, bundles and engines (no Qt, torch or onnx)."""

__version__ = "0.1.0"
