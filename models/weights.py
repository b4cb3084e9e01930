"""Model weights: read from any source, fitted to a `VisionTransformer` strictly or adapted.

Sources:
- Google's ViT checkpoints (`.npz`, the layout of google-research/vision_transformer), from the
  `vit_models` bucket at https://storage.googleapis.com/vit_models/. The paper's ViT-B/16 pretrained
  on ImageNet-21k is `imagenet21k/ViT-B_16.npz` (also ViT-B_32, ViT-L_16, ViT-L_32 there;
  `imagenet21k+imagenet2012/` holds the ImageNet-1k fine-tuned ones). The later AugReg checkpoints
  ("How to train your ViT") use the same layout, e.g.
  `augreg/B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0.npz` (Ti_16, S_16, L_16 likewise;
  `augreg/index.csv` lists them all). Their parameters are renamed to the model's; Google's
  `pre_logits` layer, which the model does not have, is dropped (as Google's fine-tuning does).
- `.pdparams` state dicts with PaddleClas/timm parameter names: PaddleClas ViT weights, converted
  timm weights, or this project's own `best.pdparams`. These are Python pickles: unpickling can run
  arbitrary code, so load only files you trust. `.npz` files are read with `allow_pickle=False`, and
  object arrays in them are refused.
- A folder holding one `.pdparams` file, such as a training checkpoint folder (`checkpoints/step_<N>`:
  its model weights; the optimizer state there is a `.pdopt`).
- An http(s) URL to a `.npz` or `.pdparams`, downloaded once into Paddle's weights cache
  (~/.cache/paddle/hapi/weights) and reused afterwards.

Fitting: strict (evaluation, export, resume) takes the weights as they are, since adapted weights
would not be the weights evaluated or resumed. Adapted (fine-tuning from `model.pretrained`) first
replaces a classifier head for another number of classes by zeros (as the public fine-tuning code
does) and resizes a position embedding for another grid by bilinear interpolation (class token
kept), logging each. Anything else that does not fit the model (missing or unexpected keys, other
shapes) is a UserError listing the offending keys; nothing is ever loaded partially.
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

FORMATS = (
    "a Google ViT .npz, a .pdparams state dict, a training checkpoint folder (checkpoints/step_<N>) "
    "or an http(s) URL to a .npz or .pdparams"
)
KEYS_LISTED = 5  # per kind of problem; longer lists end with a count of the rest

GOOGLE_PRE_LOGITS_PREFIX = "pre_logits/"
GOOGLE_POS_EMBED = "Transformer/posembed_input/pos_embedding"
GOOGLE_HEAD_KEYS = ("head/kernel", "head/bias")


def load_weights(model, source, setting, adapt=False, md5sum=None):
    """Load the weights at `source` (a path or URL, see the module doc) into `model` in place.

    `setting` names where `source` came from (`model.pretrained`, `--checkpoint`, `train.resume`)
    for the error messages. `adapt=True` fits the head and the position embedding to the model
    (fine-tuning); otherwise every parameter must fit as it is. `md5sum`, when given, is checked on a
    download and on the cached copy before reusing it (Google publishes no checksums).
    """
    path = _download(source, setting, md5sum) if _is_url(source) else _weights_file(source, setting)
    name = path.lower()
    if name.endswith(".npz"):
        state = _state_from_google_npz(path, model, setting, adapt)
    elif name.endswith(".pdparams"):
        state = _read_pdparams(path, setting)
    else:
        raise UserError(f"Weights '{path}' ({setting}) have an unknown format; pass {FORMATS}.")
    if adapt:
        _adapt_head(state, model)
        _adapt_position_embedding(state, model)
    expected = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    _check_fit({key: value.shape for key, value in state.items()}, expected, path, setting, adapt)
    # The model is built in float32; mixed precision casts on the fly.
    model.set_state_dict({key: np.asarray(value, dtype=np.float32) for key, value in state.items()})
    logger.info("Loaded the weights in %s", source)


def _check_fit(found, expected, path, setting, adapt):
    """Raise one UserError listing every key of `found` (name -> shape) missing from, unexpected in,
    or shaped differently from `expected`; the fix it suggests depends on strict or adapted use."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    mismatched = [
        f"{key} (checkpoint {list(found[key])}, model {list(expected[key])})"
        for key in sorted(set(found) & set(expected))
        if tuple(found[key]) != tuple(expected[key])
    ]
    problems = [
        f"{kind} {_listed(keys)}"
        for kind, keys in (("missing", missing), ("unexpected", unexpected), ("other shapes:", mismatched))
        if keys
    ]
    if not problems:
        return
    if adapt:
        fix = "Check that model.name and the model dimensions describe the architecture the weights were trained with."
    else:
        fix = (
            "Use a config that describes these weights: for a training run's weights its own config.yaml, "
            "otherwise one with their model.name, model dimensions, model.img_size and model.num_classes."
        )
    raise UserError(f"Weights '{path}' ({setting}) do not fit the model: {'; '.join(problems)}. {fix}")


def _listed(keys):
    if len(keys) <= KEYS_LISTED:
        return ", ".join(keys)
    return f"{', '.join(keys[:KEYS_LISTED])} and {len(keys) - KEYS_LISTED} more"


def _is_url(source):
    return urllib.parse.urlparse(source).scheme in ("http", "https")


def _download(url, setting, md5sum):
    # get_weights_path_from_url unpacks every zip archive it downloads, and an .npz is a zip
    # archive; the function beneath it can be told not to.
    try:
        return download.get_path_from_url(url, download.WEIGHTS_HOME, md5sum, decompress=False)
    except RuntimeError as error:
        raise UserError(
            f"Could not download the weights for {setting} from '{url}' ({error}); check the URL and the "
            f"network, or download the file yourself and set {setting} to its local path."
        ) from error


def _weights_file(path, setting):
    """The weights file at `path`: the file itself, or the one .pdparams file in a folder."""
    if os.path.isfile(path):
        return path
    if not os.path.isdir(path):
        raise UserError(f"Weights '{path}' ({setting}) do not exist; pass {FORMATS}.")
    found = sorted(name for name in os.listdir(path) if name.lower().endswith(".pdparams"))
    if len(found) != 1:
        held = f"{len(found)} .pdparams files ({', '.join(found)})" if found else "no .pdparams file"
        raise UserError(
            f"Folder '{path}' ({setting}) holds {held}; pass a checkpoints/step_<N> folder of a training "
            f"run or a weights file (.npz or .pdparams)."
        )
    return os.path.join(path, found[0])


def _read_pdparams(path, setting):
    try:
        loaded = paddle.load(path, return_numpy=True)
    # paddle.load tries several formats in turn and lets whatever the last attempt raised escape
    # (ValueError, UnpicklingError, EOFError, ...): any failure here means "not a state dict".
    except Exception as error:
        raise UserError(
            f"Weights '{path}' ({setting}) cannot be read by paddle.load ({type(error).__name__}: {error}); "
            f"the file is corrupt or not weights: re-download or re-save it, or use other weights."
        ) from None
    if not isinstance(loaded, dict) or not all(isinstance(value, np.ndarray) for value in loaded.values()):
        raise UserError(
            f"Weights '{path}' ({setting}) do not hold a state dict (a mapping of parameter names to "
            f"arrays); save one with paddle.save(model.state_dict(), path)."
        )
    return loaded


def _read_npz(path, setting):
    try:
        archive = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as error:
        # NumPy reports anything that is neither a zip nor a .npy as pickled data, with advice to
        # unpickle it; this loader never does, so the advice is left out.
        reason = "neither a zip archive nor a .npy array" if "pickle" in str(error) else str(error)
        raise UserError(
            f"Weights '{path}' ({setting}) are not a readable NumPy .npz archive ({reason}); "
            f"re-download the file or use other weights."
        ) from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise UserError(
            f"Weights '{path}' ({setting}) hold a single array, not a .npz archive of named arrays; "
            f"pass a Google ViT .npz checkpoint."
        )
    try:
        with archive:
            return {name: archive[name] for name in archive.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as error:
        raise UserError(
            f"Weights '{path}' ({setting}) cannot be read as a .npz archive of numeric arrays ({error}); "
            f"object arrays (pickled Python objects) are refused, never unpickled. Re-download the file "
            f"or use other weights."
        ) from None


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


def _state_from_google_npz(path, model, setting, adapt):
    arrays = _read_npz(path, setting)
    pre_logits = sorted(key for key in arrays if key.startswith(GOOGLE_PRE_LOGITS_PREFIX))
    if pre_logits:
        logger.info(
            "Ignoring the pre-logits layer of %s (%s), as Google's fine-tuning does", path, ", ".join(pre_logits)
        )
    arrays = {key: value for key, value in arrays.items() if key not in pre_logits}
    # Checked under Google's names, which are the ones the file holds. The head and the position
    # embedding are checked after renaming, together with those of .pdparams files, since fine-tuning
    # adapts them.
    expected = google_npz_shapes(model)
    adaptable = (GOOGLE_POS_EMBED, *GOOGLE_HEAD_KEYS)
    found = {key: expected[key] if key in adaptable else value.shape for key, value in arrays.items()}
    _check_fit(found, expected, path, setting, adapt)
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


def _adapt_head(state, model):
    head_weight, head_bias = state.get("head.weight"), state.get("head.bias")
    if (
        head_weight is not None
        and head_bias is not None
        and head_weight.ndim == 2
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
    old_grid = _grid_side(state["pos_embed"], model.embed_dim) if "pos_embed" in state else None
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
