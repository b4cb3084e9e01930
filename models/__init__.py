"""Vision Transformers for R-Drop fine-tuning: the model, named sizes, and pretrained-weight loading."""

from .presets import (
    ARCHITECTURE_KEYS,
    MODEL_NAMES,
    PRESETS,
    Architecture,
    build_model,
    forward_flops,
    resolve_architecture,
)
from .pretrained import load_pretrained, resize_position_embedding
from .vit import VisionTransformer

__all__ = [
    "ARCHITECTURE_KEYS",
    "MODEL_NAMES",
    "PRESETS",
    "Architecture",
    "VisionTransformer",
    "build_model",
    "forward_flops",
    "load_pretrained",
    "resize_position_embedding",
    "resolve_architecture",
]
