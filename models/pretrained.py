"""Loading pretrained weights into a `VisionTransformer`: Google `.npz`, `.pdparams`, checkpoints, URLs.

Sources:
- Google's ViT checkpoints (`.npz`, the layout of google-research/vision_transformer), from the
  `vit_models` bucket at https://storage.googleapis.com/vit_models/. The paper's ViT-B/16 pretrained
  on ImageNet-21k is `imagenet21k/ViT-B_16.npz` (also ViT-B_32, ViT-L_16, ViT-L_32 there;
  `imagenet21k+imagenet2012/` holds the ImageNet-1k fine-tuned ones). The later AugReg checkpoints
  ("How to train your ViT") use the same layout, e.g.
  `augreg/B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0.npz` (Ti_16, S_16, L_16 likewise;
  `augreg/index.csv` lists them all). Google publishes no checksums for these files.
- `.pdparams` with PaddleClas/timm parameter names (PaddleClas ViT weights, converted timm weights,
  or this project's own saved models), or a training checkpoint folder holding `model.pdparams`.
  `.pdparams` files are Python pickles: unpickling can run arbitrary code, so load only files from
  sources you trust. `.npz` files are read with `allow_pickle=False`; object arrays are refused.
- An http(s) URL to either format, downloaded once into Paddle's weights cache
  (~/.cache/paddle/hapi/weights) and reused afterwards.

Adaptations, each logged: a classifier head with a different number of classes is replaced by zeros
(as the public fine-tuning code does), a position embedding for another grid is resized by bilinear
interpolation (class token kept), Google's `pre_logits` layer is dropped (Google's fine-tuning drops
it too). Anything else that does not match the model exactly (missing or unexpected keys, other
shapes) is a UserError listing every offending key; nothing is ever loaded partially.
"""

import logging
import math
import os
import urllib.parse
import zipfile
import zlib

from rdrop.errors import UserError

import numpy as np
import paddle
import paddle.nn.functional as F
from paddle.utils import download

logger = logging.getLogger(__name__)

CHECKPOINT_MODEL_FILE = "model.pdparams"
SUPPORTED_FORMATS = ".npz (Google), .pdparams, or a checkpoint folder holding model.pdparams"

GOOGLE_PRE_LOGITS_PREFIX = "pre_logits/"
GOOGLE_POS_EMBED = "Transformer/posembed_input/pos_embedding"
GOOGLE_HEAD_KEYS = ("head/kernel", "head/bias")


def load_pretrained(model, path_or_url, md5sum=None, adapt=True):
    """Load weights into `model` (a VisionTransformer) in place from a file, folder or URL.

    `md5sum`, when given, is checked on a download (and on the cached copy before reusing it).
    `adapt=False` skips the head and position-embedding adaptations (for evaluating weights as
    they are). Raises UserError for anything that does not fit `model` exactly.
    """
    path = _download(path_or_url, md5sum) if _is_url(path_or_url) else path_or_url
    if os.path.isdir(path):
        folder = path
        path = os.path.join(folder, CHECKPOINT_MODEL_FILE)
        if not os.path.isfile(path):
            raise UserError(
                f"Pretrained weights folder '{folder}' holds no {CHECKPOINT_MODEL_FILE}; point "
                f"model.pretrained at a checkpoint folder (e.g. checkpoints/step_N) or a weights file: "
                f"{SUPPORTED_FORMATS}."
            )
    elif not os.path.isfile(path):
        raise UserError(
            f"Pretrained weights '{path}' do not exist; fix model.pretrained (a path or an http(s) URL "
            f"to {SUPPORTED_FORMATS}), or set it to null to train from scratch."
        )

    if path.endswith(".npz"):
        state = _state_from_google_npz(path, model)
    elif path.endswith(".pdparams"):
        state = _state_from_pdparams(path, model)
    else:
        raise UserError(
            f"Pretrained weights '{path}' have an unknown format; model.pretrained must be {SUPPORTED_FORMATS}."
        )
    _fit_to_model(state, model, path, adapt)
    model.set_state_dict(state)
    logger.info("Loaded pretrained weights from %s", path_or_url)


def _is_url(path_or_url):
    return urllib.parse.urlparse(path_or_url).scheme in ("http", "https")


def _download(url, md5sum):
    # get_weights_path_from_url unpacks every zip archive it downloads, and an .npz is a zip
    # archive; the function beneath it can be told not to.
    try:
        return download.get_path_from_url(url, download.WEIGHTS_HOME, md5sum, decompress=False)
    except RuntimeError as error:
        raise UserError(
            f"Could not download pretrained weights from '{url}' ({error}); check the URL and the "
            f"network, or download the file yourself and set model.pretrained to its local path."
        ) from error


def _read_npz(path):
    try:
        archive = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as error:
        # NumPy reports anything that is neither a zip nor a .npy as pickled data, with advice to
        # unpickle it; this loader never does, so the advice is left out.
        reason = "neither a zip archive nor a .npy array" if "pickle" in str(error) else str(error)
        raise UserError(
            f"Pretrained weights '{path}' are not a readable NumPy .npz archive ({reason}); "
            f"re-download the file or point model.pretrained at a valid checkpoint."
        ) from error
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise UserError(
            f"Pretrained weights '{path}' hold a single array, not a .npz archive of named arrays; "
            f"point model.pretrained at a Google ViT .npz checkpoint."
        )
    try:
        with archive:
            return {name: archive[name] for name in archive.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as error:
        raise UserError(
            f"Pretrained weights '{path}' cannot be read as a .npz archive of numeric arrays ({error}); "
            f"object arrays (pickled Python objects) are refused, never unpickled. Re-download the file "
            f"or point model.pretrained at a valid checkpoint."
        ) from error


def google_npz_shapes(model):
    """Every array a Google checkpoint for `model` holds, with its shape (head and grid as the model)."""
    width, heads, head_dim = model.embed_dim, model.num_heads, model.embed_dim // model.num_heads
    patch, mlp_dim = model.patch_size, model.mlp_dim
    shapes = {
        "embedding/kernel": (patch, patch, model.in_channels, width),
        "embedding/bias": (width,),
        "cls": (1, 1, width),
        GOOGLE_POS_EMBED: (1, model.grid_size**2 + 1, width),
        "Transformer/encoder_norm/scale": (width,),
        "Transformer/encoder_norm/bias": (width,),
        "head/kernel": (width, model.num_classes),
        "head/bias": (model.num_classes,),
    }
    for index in range(model.depth):
        block = f"Transformer/encoderblock_{index}"
        attention = f"{block}/MultiHeadDotProductAttention_1"
        for norm in ("LayerNorm_0", "LayerNorm_2"):
            shapes[f"{block}/{norm}/scale"] = (width,)
            shapes[f"{block}/{norm}/bias"] = (width,)
        for projection in ("query", "key", "value"):
            shapes[f"{attention}/{projection}/kernel"] = (width, heads, head_dim)
            shapes[f"{attention}/{projection}/bias"] = (heads, head_dim)
        shapes[f"{attention}/out/kernel"] = (heads, head_dim, width)
        shapes[f"{attention}/out/bias"] = (width,)
        shapes[f"{block}/MlpBlock_3/Dense_0/kernel"] = (width, mlp_dim)
        shapes[f"{block}/MlpBlock_3/Dense_0/bias"] = (mlp_dim,)
        shapes[f"{block}/MlpBlock_3/Dense_1/kernel"] = (mlp_dim, width)
        shapes[f"{block}/MlpBlock_3/Dense_1/bias"] = (width,)
    return shapes


def _state_from_google_npz(path, model):
    arrays = _read_npz(path)
    pre_logits = sorted(key for key in arrays if key.startswith(GOOGLE_PRE_LOGITS_PREFIX))
    if pre_logits:
        logger.info(
            "Ignoring the pre-logits layer of %s (%s), as Google's fine-tuning does", path, ", ".join(pre_logits)
        )
    arrays = {key: value for key, value in arrays.items() if key not in pre_logits}

    expected = google_npz_shapes(model)
    _check_keys(arrays, expected, path)
    # The head and the position embedding may legitimately differ; they are adapted (or rejected)
    # after conversion, together with those of .pdparams files.
    _check_shapes(
        {key: value for key, value in arrays.items() if key not in (GOOGLE_POS_EMBED, *GOOGLE_HEAD_KEYS)},
        expected,
        path,
    )
    return _google_to_paddle_names(arrays, model.depth)


def _google_to_paddle_names(arrays, depth):
    width = arrays["cls"].shape[-1]
    state = {
        # Flax convolution kernels are HWIO, Paddle's are OIHW.
        "patch_embed.proj.weight": arrays["embedding/kernel"].transpose(3, 2, 0, 1),
        "patch_embed.proj.bias": arrays["embedding/bias"],
        "cls_token": arrays["cls"],
        "pos_embed": arrays[GOOGLE_POS_EMBED],
        "norm.weight": arrays["Transformer/encoder_norm/scale"],
        "norm.bias": arrays["Transformer/encoder_norm/bias"],
        "head.weight": arrays["head/kernel"],
        "head.bias": arrays["head/bias"],
    }
    for index in range(depth):
        block, name = f"Transformer/encoderblock_{index}", f"blocks.{index}"
        attention = f"{block}/MultiHeadDotProductAttention_1"
        projections = ("query", "key", "value")
        # [D, heads, head_dim] kernels flatten head-major, which is the fused qkv column order.
        state[f"{name}.attn.qkv.weight"] = np.concatenate(
            [arrays[f"{attention}/{p}/kernel"].reshape(width, width) for p in projections], axis=1
        )
        state[f"{name}.attn.qkv.bias"] = np.concatenate(
            [arrays[f"{attention}/{p}/bias"].reshape(width) for p in projections]
        )
        state[f"{name}.attn.proj.weight"] = arrays[f"{attention}/out/kernel"].reshape(width, width)
        state[f"{name}.attn.proj.bias"] = arrays[f"{attention}/out/bias"]
        for norm, google_norm in (("norm1", "LayerNorm_0"), ("norm2", "LayerNorm_2")):
            state[f"{name}.{norm}.weight"] = arrays[f"{block}/{google_norm}/scale"]
            state[f"{name}.{norm}.bias"] = arrays[f"{block}/{google_norm}/bias"]
        for layer, dense in (("fc1", "Dense_0"), ("fc2", "Dense_1")):
            state[f"{name}.mlp.{layer}.weight"] = arrays[f"{block}/MlpBlock_3/{dense}/kernel"]
            state[f"{name}.mlp.{layer}.bias"] = arrays[f"{block}/MlpBlock_3/{dense}/bias"]
    return state


def _state_from_pdparams(path, model):
    try:
        loaded = paddle.load(path, return_numpy=True)
    # paddle.load tries several formats in turn and lets whatever the last attempt raised escape
    # (ValueError, UnpicklingError, EOFError, ...): any failure here means "not a checkpoint".
    except Exception as error:
        raise UserError(
            f"Pretrained weights '{path}' cannot be read by paddle.load ({type(error).__name__}: {error}); "
            f"re-download or re-save the file, or point model.pretrained at a valid checkpoint."
        ) from error
    if not isinstance(loaded, dict) or not all(isinstance(value, np.ndarray) for value in loaded.values()):
        raise UserError(
            f"Pretrained weights '{path}' do not hold a state dict (a mapping of parameter names to "
            f"arrays); save one with paddle.save(model.state_dict(), path)."
        )
    expected = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    _check_keys(loaded, expected, path)
    return loaded


def _check_keys(found, expected, path):
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing or unexpected:
        problems = []
        if missing:
            problems.append(f"missing {', '.join(missing)}")
        if unexpected:
            problems.append(f"unexpected {', '.join(unexpected)}")
        raise UserError(
            f"Pretrained weights '{path}' do not match the model's parameters: {'; '.join(problems)}. "
            f"Check that model.name and the model dimensions describe the architecture the checkpoint was "
            f"trained with."
        )


def _check_shapes(found, expected, path):
    mismatched = [
        f"{key} (checkpoint {list(value.shape)}, model {list(expected[key])})"
        for key, value in sorted(found.items())
        if tuple(value.shape) != tuple(expected[key])
    ]
    if mismatched:
        raise UserError(
            f"Pretrained weights '{path}' have parameters whose shapes the model cannot take: "
            f"{', '.join(mismatched)}. Check that model.name and the model dimensions describe the "
            f"architecture the checkpoint was trained with."
        )


def _fit_to_model(state, model, path, adapt):
    """Adapt (if `adapt`) the head and the position embedding of `state` to `model`, check, cast."""
    if adapt:
        _adapt_head(state, model)
        _adapt_position_embedding(state, model)
    _check_shapes(state, {key: tuple(value.shape) for key, value in model.state_dict().items()}, path)
    # The model is built in float32; mixed precision casts on the fly.
    for key, value in state.items():
        state[key] = np.asarray(value, dtype=np.float32)


def _adapt_head(state, model):
    head_weight, head_bias = state["head.weight"], state["head.bias"]
    if (
        head_weight.ndim == 2
        and head_weight.shape[0] == model.embed_dim
        and head_weight.shape[1] != model.num_classes
        and head_bias.shape == (head_weight.shape[1],)
    ):
        logger.info(
            "Pretrained head has %d classes, the model %d: head initialised to zeros",
            head_weight.shape[1],
            model.num_classes,
        )
        state["head.weight"] = np.zeros((model.embed_dim, model.num_classes), dtype=np.float32)
        state["head.bias"] = np.zeros((model.num_classes,), dtype=np.float32)


def _adapt_position_embedding(state, model):
    old_grid = _grid_side(state["pos_embed"], model.embed_dim)
    if old_grid is not None and old_grid != model.grid_size:
        logger.info(
            "Resizing the position embedding grid from %dx%d to %dx%d (bilinear, class token kept)",
            old_grid,
            old_grid,
            model.grid_size,
            model.grid_size,
        )
        state["pos_embed"] = resize_position_embedding(state["pos_embed"], model.grid_size)


def _grid_side(pos_embed, width):
    """g for a [1, 1 + g*g, width] position embedding, else None (left to the shape check)."""
    if pos_embed.ndim != 3 or pos_embed.shape[0] != 1 or pos_embed.shape[2] != width:
        return None
    side = math.isqrt(max(pos_embed.shape[1] - 1, 0))
    return side if side > 0 and side * side + 1 == pos_embed.shape[1] else None


def resize_position_embedding(pos_embed, new_grid):
    """[1, 1 + g*g, D] -> [1, 1 + new_grid^2, D]: the class token as is, the g x g grid resized.

    Bilinear with corners aligned, the same interpolation as scipy.ndimage.zoom(order=1) in the
    public R-Drop ViT code.
    """
    width = pos_embed.shape[2]
    old_grid = _grid_side(pos_embed, width)
    grid = pos_embed[0, 1:].reshape(old_grid, old_grid, width).transpose(2, 0, 1)[None]
    resized = F.interpolate(
        paddle.to_tensor(np.ascontiguousarray(grid), dtype="float32"),
        size=[new_grid, new_grid],
        mode="bilinear",
        align_corners=True,
    )
    resized = resized.numpy()[0].transpose(1, 2, 0).reshape(1, new_grid * new_grid, width)
    return np.concatenate([pos_embed[:, :1], resized.astype(pos_embed.dtype)], axis=1)
