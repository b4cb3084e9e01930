"""Vision Transformers for R-Drop fine-tuning: the model, named sizes, and its weights."""

from .presets import (
    ARCHITECTURE_KEYS,
    MODEL_NAMES,
    PRESETS,
    Architecture,
    build_model,
    forward_flops,
    load_trained,
    resolve_architecture,
)
from .vit import VisionTransformer
from .weights import load_weights, resize_position_embedding

__all__ = [
    "ARCHITECTURE_KEYS",
    "MODEL_NAMES",
    "PRESETS",
    "Architecture",
    "VisionTransformer",
    "build_model",
    "forward_flops",
    "load_trained",
    "load_weights",
    "resize_position_embedding",
    "resolve_architecture",
]
