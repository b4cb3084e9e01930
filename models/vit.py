"""The original Vision Transformer (Dosovitskiy et al.), as used by the public R-Drop ViT code.

Pre-norm encoder blocks with a class token, a learned position embedding and a linear head on the
class token. Parameter names follow PaddleClas/timm (`patch_embed.proj`, `cls_token`, `pos_embed`,
`blocks.{i}.attn.qkv`, ...) so their `.pdparams` load without renaming; models/weights.py maps
Google's `.npz` checkpoints onto the same names.

Dropout follows the public R-Drop ViT code (dropreg/R-Drop vit_src/models/modeling.py) exactly:
`dropout` after adding the position embeddings and twice in every MLP (after GELU and after fc2);
`attn_dropout` on the attention probabilities and after the attention output projection (the public
code's `attention_dropout_rate` serves both). Stochastic depth (`drop_path`, per sample) grows
linearly over the blocks, as in timm, and is off by default.

The initialisation, Google's from-scratch recipe, is written once: `VisionTransformer.init_weights`.
Linear, LayerNorm, GELU and Dropout are models/layers.py's FastCpu* layers: Paddle's, with faster
paths for eager float32 on the CPU (`cpu_kernels`); attention takes flash attention through SDPA on GPUs.
"""

import contextlib
import math

import paddle
import paddle.nn as nn
import paddle.nn.functional as F
from paddle.distributed.fleet.utils import recompute as recompute_activations

from .layers import CpuKernelLayer, FastCpuDropout, FastCpuGELU, FastCpuLayerNorm, FastCpuLinear

LAYER_NORM_EPSILON = 1e-6

# Flax's lecun_normal draws from a normal truncated at two standard deviations and divides the
# standard deviation by this factor so the truncated distribution keeps variance 1 / fan_in.
TRUNCATED_NORMAL_STD_CORRECTION = 0.87962566103423978


@contextlib.contextmanager
def _created_as_zeros():
    """Parameters created inside are zeros, drawing no random numbers: init_weights alone decides the
    initial weights and the draws they take from Paddle's generator."""
    zeros = nn.initializer.Constant(0.0)
    nn.initializer.set_global_initializer(zeros, zeros)
    try:
        yield
    finally:
        nn.initializer.set_global_initializer(None, None)


class PatchEmbed(nn.Layer):
    """Non-overlapping patches -> tokens, by a convolution with kernel = stride = patch size."""

    def __init__(self, patch_size, in_channels, embed_dim):
        super().__init__()
        self.proj = nn.Conv2D(in_channels, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, images):
        return self.proj(images).flatten(2).transpose([0, 2, 1])


class Attention(CpuKernelLayer):
    """Multi-head self-attention with one fused q/k/v projection.

    `qkv` output columns are ordered (q, k, v) x heads x head_dim, as in PaddleClas and timm.
    """

    def __init__(self, embed_dim, num_heads, attn_dropout):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.attn_dropout = attn_dropout
        self.qkv = FastCpuLinear(embed_dim, 3 * embed_dim)
        self.proj = FastCpuLinear(embed_dim, embed_dim)
        self.weights_drop = FastCpuDropout(attn_dropout)
        self.proj_drop = FastCpuDropout(attn_dropout)

    def forward(self, tokens):
        batch, length, width = tokens.shape
        qkv = self.qkv(tokens).reshape([batch, length, 3, self.num_heads, self.head_dim])
        if self.fast_cpu_path(tokens):
            context = self._cpu_attention(qkv)
        else:
            # Flash attention on GPU in fp16/bf16, the memory-efficient kernel in fp32. SDPA takes
            # [batch, length, heads, head_dim]: a reshape of the fused projection.
            query, key, value = qkv.unbind(axis=2)
            context = F.scaled_dot_product_attention(
                query, key, value, dropout_p=self.attn_dropout, training=self.training
            )
        return self.proj_drop(self.proj(context.reshape([batch, length, width])))

    def _cpu_attention(self, qkv):
        """What Paddle's SDPA computes on CPU, with one transpose of the fused projection instead of a
        strided unbind and three transposes (faster: docs/performance.md)."""
        query, key, value = qkv.transpose([2, 0, 3, 1, 4]).unbind(0)  # each [batch, heads, length, head_dim]
        scores = paddle.matmul(query * self.head_dim**-0.5, key, transpose_y=True)
        weights = self.weights_drop(F.softmax(scores, axis=-1))
        return paddle.matmul(weights, value).transpose([0, 2, 1, 3])


class Mlp(nn.Layer):
    def __init__(self, embed_dim, mlp_dim, dropout):
        super().__init__()
        self.fc1 = FastCpuLinear(embed_dim, mlp_dim)
        self.fc2 = FastCpuLinear(mlp_dim, embed_dim)
        self.gelu = FastCpuGELU()
        self.dropout = FastCpuDropout(dropout)

    def forward(self, tokens):
        hidden = self.dropout(self.gelu(self.fc1(tokens)))
        return self.dropout(self.fc2(hidden))


class DropPath(nn.Layer):
    """Stochastic depth: drops a residual branch for whole samples, rescaling the kept ones."""

    def __init__(self, rate):
        super().__init__()
        self.rate = rate

    def forward(self, branch):
        if self.rate == 0.0 or not self.training:
            return branch
        keep = 1.0 - self.rate
        mask = paddle.floor(keep + paddle.rand([branch.shape[0]] + [1] * (branch.ndim - 1), dtype=branch.dtype))
        return branch * (mask / keep)


class Block(nn.Layer):
    def __init__(self, embed_dim, num_heads, mlp_dim, dropout, attn_dropout, drop_path):
        super().__init__()
        self.norm1 = FastCpuLayerNorm(embed_dim, epsilon=LAYER_NORM_EPSILON)
        self.attn = Attention(embed_dim, num_heads, attn_dropout)
        self.norm2 = FastCpuLayerNorm(embed_dim, epsilon=LAYER_NORM_EPSILON)
        self.mlp = Mlp(embed_dim, mlp_dim, dropout)
        self.drop_path = DropPath(drop_path)

    def forward(self, tokens):
        tokens = tokens + self.drop_path(self.attn(self.norm1(tokens)))
        return tokens + self.drop_path(self.mlp(self.norm2(tokens)))


class VisionTransformer(nn.Layer):
    """ViT classifier: float32 NCHW images (normalised) -> float32 logits [batch, num_classes], also
    under bf16/fp16 autocast.

    Set `recompute = True` to recompute each block's activations in the backward pass instead of
    storing them (training only); the random state is replayed, so dropout masks are identical.
    `cpu_kernels` turns the fast CPU paths of models/layers.py on or off for every layer.
    """

    def __init__(
        self,
        img_size,
        patch_size,
        embed_dim,
        depth,
        num_heads,
        mlp_dim,
        num_classes,
        dropout=0.1,
        attn_dropout=0.0,
        drop_path=0.0,
        in_channels=3,
        cpu_kernels=True,
    ):
        super().__init__()
        self.img_size = img_size
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.depth = depth
        self.num_heads = num_heads
        self.mlp_dim = mlp_dim
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.grid_size = img_size // patch_size
        self.recompute = False

        with _created_as_zeros():
            self.patch_embed = PatchEmbed(patch_size, in_channels, embed_dim)
            self.cls_token = self.create_parameter([1, 1, embed_dim])
            self.pos_embed = self.create_parameter([1, self.grid_size**2 + 1, embed_dim])
            self.pos_drop = FastCpuDropout(dropout)
            drop_path_rates = [drop_path * i / max(depth - 1, 1) for i in range(depth)]
            self.blocks = nn.LayerList(
                [Block(embed_dim, num_heads, mlp_dim, dropout, attn_dropout, rate) for rate in drop_path_rates]
            )
            self.norm = FastCpuLayerNorm(embed_dim, epsilon=LAYER_NORM_EPSILON)
            self.head = FastCpuLinear(embed_dim, num_classes)
        self.init_weights()
        for layer in self.sublayers():
            if isinstance(layer, CpuKernelLayer):
                layer.use_cpu_kernels = cpu_kernels

    def init_weights(self):
        """Google's from-scratch initialisation (vision_transformer models_vit.py), drawn from Paddle's
        generator in the order the layers are built: the patch embedding, the position embedding,
        then each block's Linear weights and MLP biases.

        Xavier-uniform Linear weights; MLP biases normal(std=1e-6), other biases zero; LeCun-normal
        patch embedding; zero class token; normal(std=0.02) position embedding; LayerNorms 1 and 0;
        a zero head, which is also what Google pre-trains with from scratch: the first loss is exactly
        ln(classes), and on a small from-scratch run (sklearn digits) it trained as well as a
        Xavier-initialised head.
        """
        zeros, ones = nn.initializer.Constant(0.0), nn.initializer.Constant(1.0)
        xavier_uniform = nn.initializer.XavierUniform()
        mlp_bias = nn.initializer.Normal(std=1e-6)
        fan_in = self.in_channels * self.patch_size**2
        std = math.sqrt(1.0 / fan_in) / TRUNCATED_NORMAL_STD_CORRECTION
        nn.initializer.TruncatedNormal(std=std, a=-2 * std, b=2 * std)(self.patch_embed.proj.weight)
        zeros(self.patch_embed.proj.bias)
        zeros(self.cls_token)
        nn.initializer.Normal(std=0.02)(self.pos_embed)
        for block in self.blocks:
            # Google initialises q, k and v as three D x D matrices; the fused D x 3D matrix must keep
            # their fan-out, not triple it.
            nn.initializer.XavierUniform(fan_in=self.embed_dim, fan_out=self.embed_dim)(block.attn.qkv.weight)
            xavier_uniform(block.attn.proj.weight)
            for linear in (block.attn.qkv, block.attn.proj):
                zeros(linear.bias)
            for linear in (block.mlp.fc1, block.mlp.fc2):
                xavier_uniform(linear.weight)
                mlp_bias(linear.bias)
        for norm in [self.norm] + [norm for block in self.blocks for norm in (block.norm1, block.norm2)]:
            ones(norm.weight)
            zeros(norm.bias)
        zeros(self.head.weight)
        zeros(self.head.bias)

    def forward(self, images):
        patches = self.patch_embed(images)
        cls_tokens = self.cls_token.expand([patches.shape[0], 1, self.embed_dim])
        tokens = self.pos_drop(paddle.concat([cls_tokens, patches], axis=1) + self.pos_embed)
        for block in self.blocks:
            if self.recompute and self.training:
                # The re-entrant variant silently skips the block's parameter gradients when its
                # input needs none (frozen embeddings); the hook-based one does not.
                tokens = recompute_activations(block, tokens, preserve_rng_state=True, use_reentrant=False)
            else:
                tokens = block(tokens)
        return self.float32_head(tokens)

    def float32_head(self, tokens):
        """Logits from the class token, with the final norm and the head in float32 outside autocast:
        under O1 the head is a white-listed matmul, and bf16 logits (off by up to 0.06 at 16) would
        feed the CE and the KL. The norm acts on each token alone, so normalising only the class
        token is the same."""
        with paddle.amp.auto_cast(enable=False):
            return self.head(self.norm(tokens[:, 0].astype("float32")))
