"""Data: the embedded shapes world, tokenizers and grain input pipelines."""
from vljax.data.shapes import ShapesWorld
from vljax.data.tokenizer import Tokenizer, shapes_tokenizer

__all__ = ["ShapesWorld", "Tokenizer", "shapes_tokenizer"]
