"""The ViT model and presets: attention, recomputation, initialisation, sizes, FLOPs, config checks."""

import contextlib
import math

from rdrop import config, step
from rdrop.errors import UserError

import numpy as np
import paddle
import pytest
from paddle.amp.auto_cast import amp_global_state
from vit_reference import tiny_model_cfg, write_google_npz

import models
from models.vit import Attention

PRESET_DIMS = {  # patch, width, depth, heads, MLP: the ViT and AugReg papers' tables
    "vit_ti16": (16, 192, 12, 3, 768),
    "vit_s16": (16, 384, 12, 6, 1536),
    "vit_b16": (16, 768, 12, 12, 3072),
    "vit_b32": (32, 768, 12, 12, 3072),
    "vit_l16": (16, 1024, 24, 16, 4096),
    "vit_l32": (32, 1024, 24, 16, 4096),
}


def preset_cfg(name, img_size=224, num_classes=100, **overrides):
    cfg = config.defaults()["model"]
    cfg.update(name=name, img_size=img_size, num_classes=num_classes, **overrides)
    return cfg


def expected_parameter_count(img_size, num_classes, patch, width, depth, heads, mlp, channels=3):
    del heads  # splitting the width into heads changes no parameter count
    tokens = (img_size // patch) ** 2 + 1
    embedding = channels * patch * patch * width + width + width + tokens * width  # conv, cls, positions
    block = (
        2 * 2 * width  # two LayerNorms
        + width * 3 * width
        + 3 * width  # fused q/k/v
        + width * width
        + width  # output projection
        + width * mlp
        + mlp
        + mlp * width
        + width  # MLP
    )
    return embedding + depth * block + 2 * width + width * num_classes + num_classes


def parameter_count(model):
    return sum(int(np.prod(parameter.shape)) for parameter in model.parameters())


def test_vit_b16_has_the_known_parameter_count():
    with paddle.LazyGuard():  # shapes only: no 340 MB of initialised weights
        model = models.build_model(preset_cfg("vit_b16"))
    assert parameter_count(model) == 85_875_556


@pytest.mark.parametrize("name", sorted(PRESET_DIMS))
def test_preset_parameter_counts_match_the_formula(name):
    with paddle.LazyGuard():
        model = models.build_model(preset_cfg(name, img_size=384, num_classes=10))
    assert parameter_count(model) == expected_parameter_count(384, 10, *PRESET_DIMS[name])


def test_presets_are_the_published_sizes():
    for name, (patch, width, depth, heads, mlp) in PRESET_DIMS.items():
        assert models.PRESETS[name] == models.Architecture(patch, width, depth, heads, mlp)
    assert set(models.MODEL_NAMES) == set(PRESET_DIMS) | {"vit"}


def test_parameter_names_follow_paddleclas():
    names = set(models.build_model(tiny_model_cfg(depth=1)).state_dict())
    assert names == {
        "patch_embed.proj.weight",
        "patch_embed.proj.bias",
        "cls_token",
        "pos_embed",
        "blocks.0.norm1.weight",
        "blocks.0.norm1.bias",
        "blocks.0.attn.qkv.weight",
        "blocks.0.attn.qkv.bias",
        "blocks.0.attn.proj.weight",
        "blocks.0.attn.proj.bias",
        "blocks.0.norm2.weight",
        "blocks.0.norm2.bias",
        "blocks.0.mlp.fc1.weight",
        "blocks.0.mlp.fc1.bias",
        "blocks.0.mlp.fc2.weight",
        "blocks.0.mlp.fc2.bias",
        "norm.weight",
        "norm.bias",
        "head.weight",
        "head.bias",
    }


def test_logits_shape():
    model = models.build_model(tiny_model_cfg())
    logits = model(paddle.randn([3, 3, 16, 16]))
    assert logits.shape == [3, 10]


def test_attention_equals_plain_softmax_attention():
    paddle.seed(3)
    width, heads, tokens = 24, 3, 7
    attention = Attention(width, heads, attn_dropout=0.0)
    attention.eval()
    x = np.random.default_rng(0).standard_normal((2, tokens, width)).astype(np.float32)
    got = attention(paddle.to_tensor(x)).numpy()

    qkv_w, qkv_b = attention.qkv.weight.numpy().astype(np.float64), attention.qkv.bias.numpy()
    proj_w, proj_b = attention.proj.weight.numpy().astype(np.float64), attention.proj.bias.numpy()
    head_dim = width // heads
    expected = np.zeros((2, tokens, width))
    for h in range(heads):  # head h reads columns h*head_dim.. of each of the q, k and v thirds
        q, k, v = (
            x @ qkv_w[:, part * width + h * head_dim : part * width + (h + 1) * head_dim]
            + qkv_b[part * width + h * head_dim : part * width + (h + 1) * head_dim]
            for part in range(3)
        )
        scores = q @ k.transpose(0, 2, 1) / math.sqrt(head_dim)
        weights = np.exp(scores - scores.max(-1, keepdims=True))
        weights /= weights.sum(-1, keepdims=True)
        expected[:, :, h * head_dim : (h + 1) * head_dim] = weights @ v
    expected = expected @ proj_w + proj_b
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_attn_dropout_acts_on_probabilities_and_after_the_projection():
    paddle.seed(0)
    width = 8
    attention = Attention(width, 2, attn_dropout=0.5)
    rng = np.random.default_rng(0)
    x = paddle.to_tensor(rng.standard_normal((4, 5, width)).astype(np.float32))

    # Zero q, k and v: the context is zero whatever the probabilities, so the output is the
    # projection bias after the projection dropout, entry by entry 0 or bias / keep = 2 x bias.
    attention.qkv.weight.set_value(np.zeros((width, 3 * width), np.float32))
    attention.qkv.bias.set_value(np.zeros(3 * width, np.float32))
    bias = rng.standard_normal(width).astype(np.float32) + 3.0
    attention.proj.bias.set_value(bias)
    attention.train()
    ratio = attention(x).numpy() / bias
    dropped = np.isclose(ratio, 0.0, atol=1e-6)
    assert (dropped | np.isclose(ratio, 2.0, atol=1e-6)).all()
    assert 0.3 < dropped.mean() < 0.7

    # v = identity and an identity projection: the output is the context after the projection
    # dropout, so kept entries are 2 x context; they differ from eval's context only if the
    # attention probabilities were dropped too.
    qkv = rng.standard_normal((width, 3 * width)).astype(np.float32)
    qkv[:, 2 * width :] = np.eye(width)
    attention.qkv.weight.set_value(qkv)
    attention.proj.weight.set_value(np.eye(width, dtype=np.float32))
    attention.proj.bias.set_value(np.zeros(width, np.float32))
    attention.eval()
    context = attention(x).numpy()
    attention.train()
    output = attention(x).numpy()
    kept = output != 0
    assert not np.allclose(output[kept] / 2, context[kept], atol=1e-3)


def test_train_mode_without_dropout_equals_eval_mode():
    model = models.build_model(tiny_model_cfg(dropout=0.0))
    paddle.nn.initializer.Normal()(model.head.weight)
    x = paddle.randn([2, 3, 16, 16])
    model.train()
    train_logits = model(x).numpy()
    model.eval()
    np.testing.assert_allclose(train_logits, model(x).numpy(), atol=1e-6)


def test_dropout_makes_two_training_passes_differ():
    model = models.build_model(tiny_model_cfg(dropout=0.1))
    paddle.nn.initializer.Normal()(model.head.weight)
    model.train()
    x = paddle.randn([2, 3, 16, 16])
    assert not np.allclose(model(x).numpy(), model(x).numpy())


@contextlib.contextmanager
def gpu_autocast_state():
    """The tracer state `paddle.amp.auto_cast(level="O1", dtype="bfloat16")` sets on a GPU (on a CPU it
    warns and leaves autocast off); the ops themselves still run in float32 on a CPU."""
    tracer = paddle.base.framework._dygraph_tracer()
    saved = tracer._amp_level, tracer._amp_dtype
    tracer._amp_level, tracer._amp_dtype = paddle.base.core.AmpLevel.O1, "bfloat16"
    try:
        yield
    finally:
        tracer._amp_level, tracer._amp_dtype = saved


def test_final_norm_and_head_run_outside_autocast():
    model = models.build_model(tiny_model_cfg())
    autocast_seen = {}
    for name, layer in (("last block", model.blocks[-1]), ("norm", model.norm), ("head", model.head)):
        layer.register_forward_pre_hook(
            lambda layer, inputs, name=name: autocast_seen.__setitem__(name, paddle.amp.is_autocast_enabled())
        )
    with gpu_autocast_state():
        model(paddle.randn([2, 3, 16, 16]))
    assert autocast_seen == {"last block": True, "norm": False, "head": False}


def test_fp16_loss_scaling_stays_on_after_the_float32_head_leaves_autocast():
    """GradScaler.scale() turns dynamic loss scaling off for good unless amp_global_state().amp_dtype is
    float16, and the head's auto_cast(enable=False) writes that dtype: an fp16 step (the only one with
    an enabled scaler, see step.loss_scaler) keeps scaling."""
    model = models.build_model(tiny_model_cfg())
    scaler = step.loss_scaler("fp16")
    scaler._enable, scaler._scale = True, paddle.to_tensor(2.0**15)  # as GradScaler is on a GPU
    amp_global_state().amp_dtype = "float16"  # as step.autocast("fp16") leaves it
    try:
        with gpu_autocast_state():
            logits = model(paddle.randn([2, 3, 16, 16]))
        loss = (logits + 1.0).sum()  # the zero head's logits are 0
        scaled = scaler.scale(loss)
        assert scaler.is_enable() and float(scaled) == float(loss) * 2.0**15
    finally:
        amp_global_state().amp_dtype = "float32"


def test_bf16_activations_give_float32_logits_of_the_upcast_activations():
    model = models.build_model(tiny_model_cfg(dropout=0.0))
    paddle.nn.initializer.Normal(std=2.0)(model.head.weight)  # logits of several units, where bf16 rounds visibly
    model.eval()
    images = paddle.randn([4, 3, 16, 16])

    def logits_with_last_block_output(convert):
        hook = model.blocks[-1].register_forward_post_hook(lambda layer, inputs, output: convert(output))
        try:
            return model(images)
        finally:
            hook.remove()

    # What autocast hands the norm on a GPU: the blocks' output in bf16.
    logits = logits_with_last_block_output(lambda tokens: tokens.astype("bfloat16"))
    expected = logits_with_last_block_output(lambda tokens: tokens.astype("bfloat16").astype("float32"))
    assert logits.dtype == paddle.float32
    np.testing.assert_allclose(logits.numpy(), expected.numpy(), rtol=0, atol=1e-6)
    assert np.abs(expected.numpy()).max() > 4  # large enough that bf16 logits would differ by > 1e-6


def _loss_and_gradients(npz, recompute, seed, frozen_embeddings=False):
    model = models.build_model(tiny_model_cfg(dropout=0.1, attn_dropout=0.1, drop_path=0.1, pretrained=str(npz)))
    model.train()
    model.recompute = recompute
    if frozen_embeddings:
        for parameter in [model.cls_token, model.pos_embed, *model.patch_embed.parameters()]:
            parameter.stop_gradient = True
    images = paddle.to_tensor(np.random.default_rng(1).standard_normal((4, 3, 16, 16)).astype(np.float32))
    paddle.seed(seed)
    loss = paddle.nn.functional.cross_entropy(model(images), paddle.to_tensor([1, 2, 3, 4]))
    loss.backward()
    return float(loss), {name: p.grad.numpy() for name, p in model.named_parameters() if not p.stop_gradient}


def test_recompute_reproduces_loss_and_gradients(tmp_path):
    npz = tmp_path / "tiny.npz"
    write_google_npz(npz)  # random non-zero weights everywhere, head included
    loss, gradients = _loss_and_gradients(npz, recompute=False, seed=11)
    recomputed_loss, recomputed = _loss_and_gradients(npz, recompute=True, seed=11)
    assert recomputed_loss == pytest.approx(loss, abs=1e-6)
    for name, gradient in gradients.items():
        np.testing.assert_allclose(recomputed[name], gradient, atol=1e-6, err_msg=name)
    # The comparison is sensitive to the dropout masks: another seed changes both.
    other_loss, _ = _loss_and_gradients(npz, recompute=True, seed=12)
    assert abs(other_loss - loss) > 1e-3


def test_recompute_keeps_block_gradients_when_embeddings_are_frozen(tmp_path):
    # Then the first block's input needs no gradient; its parameters still do.
    npz = tmp_path / "tiny.npz"
    write_google_npz(npz)
    _, gradients = _loss_and_gradients(npz, recompute=False, seed=5, frozen_embeddings=True)
    _, recomputed = _loss_and_gradients(npz, recompute=True, seed=5, frozen_embeddings=True)
    assert "blocks.0.attn.qkv.weight" in gradients and "pos_embed" not in gradients
    for name, gradient in gradients.items():
        np.testing.assert_allclose(recomputed[name], gradient, atol=1e-6, err_msg=name)


def test_initialisation_follows_google():
    width, mlp = 32, 64
    model = models.build_model(tiny_model_cfg(embed_dim=width, mlp_dim=mlp, depth=1))
    block = model.blocks[0]
    assert not model.head.weight.numpy().any() and not model.head.bias.numpy().any()
    assert not model.cls_token.numpy().any()
    assert 0.01 < model.pos_embed.numpy().std() < 0.03
    # Xavier uniform bounds: q, k, v each as a D x D matrix, the MLP layers as they are.
    assert np.abs(block.attn.qkv.weight.numpy()).max() <= math.sqrt(6 / (width + width))
    assert np.abs(block.attn.qkv.weight.numpy()).max() > 0.9 * math.sqrt(6 / (width + width))
    assert np.abs(block.mlp.fc1.weight.numpy()).max() <= math.sqrt(6 / (width + mlp))
    assert not block.attn.qkv.bias.numpy().any() and not block.attn.proj.bias.numpy().any()
    assert 0 < np.abs(block.mlp.fc1.bias.numpy()).max() < 1e-5
    for norm in (block.norm1, block.norm2, model.norm):
        assert (norm.weight.numpy() == 1).all() and not norm.bias.numpy().any()
    # LeCun normal, truncated at two standard deviations: variance 1 / fan_in.
    patch = model.patch_embed.proj.weight.numpy()
    fan_in = 3 * 4 * 4
    assert patch.std() == pytest.approx(math.sqrt(1 / fan_in), rel=0.1)
    assert np.abs(patch).max() <= 2 * math.sqrt(1 / fan_in) / 0.87962566103423978 + 1e-6


def _counted_flops(model, images):
    """2 x multiply-adds of every Linear and Conv2D, measured with hooks, plus QK^T and AV."""
    total = []

    def linear_hook(layer, inputs, output):
        total.append(2 * int(np.prod(output.shape)) * layer.weight.shape[0])

    def conv_hook(layer, inputs, output):
        total.append(2 * int(np.prod(output.shape)) * int(np.prod(layer.weight.shape[1:])))

    hooks = [
        layer.register_forward_post_hook(conv_hook if isinstance(layer, paddle.nn.Conv2D) else linear_hook)
        for layer in model.sublayers()
        if isinstance(layer, (paddle.nn.Linear, paddle.nn.Conv2D))
    ]
    model.eval()
    model(images)
    for hook in hooks:
        hook.remove()
    tokens = (images.shape[2] // model.patch_size) ** 2 + 1
    attention = len(model.blocks) * 2 * 2 * tokens * tokens * model.embed_dim  # per image
    return sum(total) // images.shape[0] + attention


def test_forward_flops_match_counted_matmuls():
    cfg = tiny_model_cfg(img_size=24, mlp_dim=48, num_classes=7)
    model = models.build_model(cfg)
    assert models.forward_flops(cfg) == _counted_flops(model, paddle.randn([2, 3, 24, 24]))


def test_forward_flops_of_vit_b16_match_the_literature():
    # ViT-B/16 at 224 px is listed with 17.6 G multiply-adds ("FLOPs") in the DeiT paper's Table 1.
    assert models.forward_flops(preset_cfg("vit_b16", num_classes=1000)) / 2e9 == pytest.approx(17.6, rel=0.01)


def test_preset_accepts_equal_dimensions():
    assert models.resolve_architecture(preset_cfg("vit_b16", embed_dim=768, patch_size=16)) == models.PRESETS["vit_b16"]


@pytest.mark.parametrize(
    "key, value", [("embed_dim", 512), ("patch_size", 8), ("depth", 6), ("num_heads", 8), ("mlp_dim", 1024)]
)
def test_conflicting_preset_dimension_is_a_user_error(key, value):
    with pytest.raises(UserError, match=f"model.{key} is {value}.*vit_b16"):
        models.build_model(preset_cfg("vit_b16", **{key: value}))


def test_custom_vit_needs_every_dimension():
    with pytest.raises(UserError, match="model.depth, model.mlp_dim"):
        models.build_model(tiny_model_cfg(depth=None, mlp_dim=None))


def test_img_size_must_be_a_multiple_of_the_patch():
    with pytest.raises(UserError, match="model.img_size 18 is not a multiple of the patch size 4"):
        models.build_model(tiny_model_cfg(img_size=18))
    with pytest.raises(UserError, match="model.img_size 100 .* patch size 16"):
        models.build_model(preset_cfg("vit_ti16", img_size=100))


def test_embed_dim_must_be_divisible_by_heads():
    with pytest.raises(UserError, match="model.embed_dim 32 is not divisible by model.num_heads 5"):
        models.build_model(tiny_model_cfg(num_heads=5))


def test_unknown_model_name_is_a_user_error():
    with pytest.raises(UserError, match="vit_h14"):
        models.build_model(preset_cfg("vit_h14"))


def test_the_model_name_key_documents_every_model_name():
    for name in models.MODEL_NAMES:
        assert f"`{name}`" in config.SCHEMA["model"]["name"].doc, name
