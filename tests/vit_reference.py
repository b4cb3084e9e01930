"""Test references: the tiny model every test uses, Google-format ViT checkpoints with a NumPy ViT that
runs them directly, and the symmetric KL in NumPy.

`google_vit_arrays` builds random weights with the array names and shapes of Google's
vision_transformer `.npz` checkpoints (as in imagenet21k/ViT-B_16.npz); `write_google_npz` saves
them. `google_vit_forward` computes the logits from those arrays in float64 with einsums written from
the Flax model's definition, sharing no code with `models`, so the loader and the Paddle model are
checked against something independent.
"""

import math

from rdrop import config

import numpy as np

# The `model:` keys of the tiny ViT used throughout the tests.
TINY_MODEL = {
    "name": "vit",
    "img_size": 16,
    "patch_size": 4,
    "embed_dim": 32,
    "depth": 2,
    "num_heads": 4,
    "mlp_dim": 64,
    "num_classes": 10,
    "dropout": 0.1,
}
_ARCHITECTURE = ("img_size", "patch_size", "embed_dim", "depth", "num_heads", "mlp_dim", "num_classes")


def tiny_model_cfg(**overrides):
    """A complete `model:` config section: the defaults, TINY_MODEL, then `overrides`."""
    return {**config.defaults()["model"], **TINY_MODEL, **overrides}


def google_vit_arrays(seed=0, pre_logits=False, **dims):
    """Random float32 weights under Google's checkpoint names for the tiny model, or for other `dims`
    (img_size, patch_size, embed_dim, depth, num_heads, mlp_dim, num_classes); head_dim = embed_dim / num_heads."""
    dims = {**{key: TINY_MODEL[key] for key in _ARCHITECTURE}, **dims}
    img_size, patch_size, embed_dim, depth = dims["img_size"], dims["patch_size"], dims["embed_dim"], dims["depth"]
    num_heads, mlp_dim, num_classes = dims["num_heads"], dims["mlp_dim"], dims["num_classes"]
    rng = np.random.default_rng(seed)
    head_dim = embed_dim // num_heads
    tokens = (img_size // patch_size) ** 2 + 1

    def normal(*shape, scale=0.2):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    arrays = {
        "embedding/kernel": normal(patch_size, patch_size, 3, embed_dim),
        "embedding/bias": normal(embed_dim),
        "cls": normal(1, 1, embed_dim),
        "Transformer/posembed_input/pos_embedding": normal(1, tokens, embed_dim),
        "Transformer/encoder_norm/scale": 1 + normal(embed_dim),
        "Transformer/encoder_norm/bias": normal(embed_dim),
        "head/kernel": normal(embed_dim, num_classes),
        "head/bias": normal(num_classes),
    }
    if pre_logits:
        arrays["pre_logits/kernel"] = normal(embed_dim, embed_dim)
        arrays["pre_logits/bias"] = normal(embed_dim)
    for index in range(depth):
        block = f"Transformer/encoderblock_{index}"
        for norm in ("LayerNorm_0", "LayerNorm_2"):
            arrays[f"{block}/{norm}/scale"] = 1 + normal(embed_dim)
            arrays[f"{block}/{norm}/bias"] = normal(embed_dim)
        attention = f"{block}/MultiHeadDotProductAttention_1"
        for projection in ("query", "key", "value"):
            arrays[f"{attention}/{projection}/kernel"] = normal(embed_dim, num_heads, head_dim)
            arrays[f"{attention}/{projection}/bias"] = normal(num_heads, head_dim)
        arrays[f"{attention}/out/kernel"] = normal(num_heads, head_dim, embed_dim)
        arrays[f"{attention}/out/bias"] = normal(embed_dim)
        arrays[f"{block}/MlpBlock_3/Dense_0/kernel"] = normal(embed_dim, mlp_dim)
        arrays[f"{block}/MlpBlock_3/Dense_0/bias"] = normal(mlp_dim)
        arrays[f"{block}/MlpBlock_3/Dense_1/kernel"] = normal(mlp_dim, embed_dim)
        arrays[f"{block}/MlpBlock_3/Dense_1/bias"] = normal(embed_dim)
    return arrays


def write_google_npz(path, arrays=None, **dims):
    """Save `arrays` (or fresh `google_vit_arrays(**dims)`) as a Google-format .npz; returns them."""
    arrays = google_vit_arrays(**dims) if arrays is None else arrays
    np.savez(path, **arrays)
    return arrays


def _layer_norm(x, scale, bias):
    mean = x.mean(-1, keepdims=True)
    variance = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(variance + 1e-6) * scale + bias


_erf = np.frompyfunc(math.erf, 1, 1)


def _gelu(x):
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)).astype(np.float64))


def _softmax(x):
    shifted = np.exp(x - x.max(-1, keepdims=True))
    return shifted / shifted.sum(-1, keepdims=True)


def google_vit_forward(arrays, images):
    """Logits [batch, classes] for NCHW `images`, straight from Google-named arrays, in float64."""
    a = {key: value.astype(np.float64) for key, value in arrays.items()}
    kernel = a["embedding/kernel"]
    patch = kernel.shape[0]
    batch, channels, height, width = images.shape
    grid_h, grid_w = height // patch, width // patch
    # NCHW -> [batch, grid_h, grid_w, patch_y, patch_x, channel]: one patch per (grid_h, grid_w) cell.
    patches = images.astype(np.float64).reshape(batch, channels, grid_h, patch, grid_w, patch)
    patches = patches.transpose(0, 2, 4, 3, 5, 1)
    x = np.einsum("bghyxc,yxcd->bghd", patches, kernel) + a["embedding/bias"]
    x = x.reshape(batch, grid_h * grid_w, -1)
    x = np.concatenate([np.broadcast_to(a["cls"], (batch, 1, x.shape[-1])), x], axis=1)
    x = x + a["Transformer/posembed_input/pos_embedding"]

    index = 0
    while f"Transformer/encoderblock_{index}/LayerNorm_0/scale" in a:
        block = f"Transformer/encoderblock_{index}"
        attention = f"{block}/MultiHeadDotProductAttention_1"
        y = _layer_norm(x, a[f"{block}/LayerNorm_0/scale"], a[f"{block}/LayerNorm_0/bias"])
        q, k, v = (
            np.einsum("bnd,dhk->bnhk", y, a[f"{attention}/{p}/kernel"]) + a[f"{attention}/{p}/bias"]
            for p in ("query", "key", "value")
        )
        scores = np.einsum("bqhk,bshk->bhqs", q, k) / math.sqrt(q.shape[-1])
        context = np.einsum("bhqs,bshk->bqhk", _softmax(scores), v)
        x = x + np.einsum("bqhk,hkd->bqd", context, a[f"{attention}/out/kernel"]) + a[f"{attention}/out/bias"]

        y = _layer_norm(x, a[f"{block}/LayerNorm_2/scale"], a[f"{block}/LayerNorm_2/bias"])
        y = _gelu(y @ a[f"{block}/MlpBlock_3/Dense_0/kernel"] + a[f"{block}/MlpBlock_3/Dense_0/bias"])
        x = x + y @ a[f"{block}/MlpBlock_3/Dense_1/kernel"] + a[f"{block}/MlpBlock_3/Dense_1/bias"]
        index += 1

    x = _layer_norm(x, a["Transformer/encoder_norm/scale"], a["Transformer/encoder_norm/bias"])
    return x[:, 0] @ a["head/kernel"] + a["head/bias"]


def symmetric_kl_rows(logits_a, logits_b):
    """Per row, KL(P_a || P_b) + KL(P_b || P_a) of the softmax distributions, in float64, from the definition."""

    def log_softmax(logits):
        shifted = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
        return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))

    log_p, log_q = log_softmax(logits_a), log_softmax(logits_b)
    p, q = np.exp(log_p), np.exp(log_q)
    return (p * (log_p - log_q)).sum(-1) + (q * (log_q - log_p)).sum(-1)
