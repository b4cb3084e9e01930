"""ViT sizes by name, and building a model from the `model:` section of the config.

Presets are the ViT-Ti/S/B/L variants of the ViT and AugReg papers; `vit` takes its five dimensions
(patch_size, embed_dim, depth, num_heads, mlp_dim) from the config instead. Also counts the analytic
forward FLOPs of a configuration, for the benchmark's throughput figures.
"""

import dataclasses
import difflib

from rdrop.errors import UserError

import paddle

from .vit import VisionTransformer
from .weights import load_weights

ARCHITECTURE_KEYS = ("patch_size", "embed_dim", "depth", "num_heads", "mlp_dim")


@dataclasses.dataclass(frozen=True)
class Architecture:
    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    mlp_dim: int


_TINY = dict(embed_dim=192, depth=12, num_heads=3, mlp_dim=768)
_SMALL = dict(embed_dim=384, depth=12, num_heads=6, mlp_dim=1536)
_BASE = dict(embed_dim=768, depth=12, num_heads=12, mlp_dim=3072)
_LARGE = dict(embed_dim=1024, depth=24, num_heads=16, mlp_dim=4096)

PRESETS = {
    "vit_ti16": Architecture(patch_size=16, **_TINY),
    "vit_s16": Architecture(patch_size=16, **_SMALL),
    "vit_b16": Architecture(patch_size=16, **_BASE),
    "vit_b32": Architecture(patch_size=32, **_BASE),
    "vit_l16": Architecture(patch_size=16, **_LARGE),
    "vit_l32": Architecture(patch_size=32, **_LARGE),
}

CUSTOM_NAME = "vit"
MODEL_NAMES = (*PRESETS, CUSTOM_NAME)


def resolve_architecture(model_cfg):
    """The dimensions for `model_cfg`, with the cross-field checks of the `model:` section."""
    name = model_cfg["name"]
    if name == CUSTOM_NAME:
        unset = [key for key in ARCHITECTURE_KEYS if model_cfg.get(key) is None]
        if unset:
            raise UserError(
                f"model.name is '{CUSTOM_NAME}', so model.{', model.'.join(unset)} must be set in the config "
                f"(all of {', '.join(ARCHITECTURE_KEYS)}); or choose a preset: {', '.join(PRESETS)}."
            )
        architecture = Architecture(**{key: model_cfg[key] for key in ARCHITECTURE_KEYS})
    elif name in PRESETS:
        architecture = PRESETS[name]
        for key in ARCHITECTURE_KEYS:
            value = model_cfg.get(key)
            if value is not None and value != getattr(architecture, key):
                raise UserError(
                    f"model.{key} is {value} but the preset model.name '{name}' has {key} "
                    f"{getattr(architecture, key)}; remove model.{key} (or set it to null), or use "
                    f"model.name '{CUSTOM_NAME}' to choose every dimension yourself."
                )
    else:
        closest = difflib.get_close_matches(str(name), MODEL_NAMES, n=1, cutoff=0.5)
        guess = f"Did you mean '{closest[0]}'? " if closest else ""
        raise UserError(
            f"model.name '{name}' is not a known model. {guess}Choose one of {', '.join(MODEL_NAMES)}: a "
            f"preset, or '{CUSTOM_NAME}' with the five dimensions in the model: section."
        )

    img_size = model_cfg["img_size"]
    if img_size % architecture.patch_size:
        raise UserError(
            f"model.img_size {img_size} is not a multiple of the patch size {architecture.patch_size} "
            f"(model '{name}'); choose an img_size divisible by {architecture.patch_size}."
        )
    if architecture.embed_dim % architecture.num_heads:
        raise UserError(
            f"model.embed_dim {architecture.embed_dim} is not divisible by model.num_heads "
            f"{architecture.num_heads}; choose a head count that divides the width."
        )
    return architecture


def build_model(model_cfg, seed=None):
    """A VisionTransformer for the `model:` config section, with `model.pretrained` loaded (adapted) if set.

    With `seed` (train.seed) the initial weights are drawn from it, so every rank of a job builds the
    same ones; without it they come from Paddle's current generator (weights loaded later replace them)."""
    if seed is not None:
        paddle.seed(seed)
    architecture = resolve_architecture(model_cfg)
    model = VisionTransformer(
        img_size=model_cfg["img_size"],
        num_classes=model_cfg["num_classes"],
        dropout=model_cfg["dropout"],
        attn_dropout=model_cfg["attn_dropout"],
        drop_path=model_cfg["drop_path"],
        cpu_kernels=model_cfg["cpu_kernels"],
        **dataclasses.asdict(architecture),
    )
    if model_cfg.get("pretrained"):
        load_weights(model, model_cfg["pretrained"], "model.pretrained", adapt=True)
    return model


def load_trained(checkpoint, cfg):
    """The model of the config dict `cfg` (as loaded, e.g. a run's config.yaml) with the trained
    weights at `checkpoint` loaded strictly; `model.pretrained` is not loaded, the checkpoint replaces it."""
    model = build_model(dict(cfg["model"], pretrained=None))
    load_weights(model, checkpoint, "--checkpoint")
    return model


def forward_flops(model_cfg):
    """Analytic forward FLOPs for one image: 2 x the multiply-adds of every matmul and convolution.

    Counts the patch embedding, the q/k/v and output projections, the attention scores QK^T and the
    weighted sum AV, both MLP layers and the head; normalisation, softmax, GELU and additions are left
    out (a few percent at most).
    """
    arch = resolve_architecture(model_cfg)
    patches = (model_cfg["img_size"] // arch.patch_size) ** 2
    tokens = patches + 1
    width = arch.embed_dim
    patch_embedding = patches * (3 * arch.patch_size**2) * width
    per_block = (
        tokens * width * 3 * width  # q, k, v
        + 2 * tokens * tokens * width  # QK^T and AV over all heads
        + tokens * width * width  # output projection
        + 2 * tokens * width * arch.mlp_dim  # fc1 and fc2
    )
    head = width * model_cfg["num_classes"]
    return 2 * (patch_embedding + arch.depth * per_block + head)
