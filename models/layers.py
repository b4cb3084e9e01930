"""FastCpuLinear, FastCpuLayerNorm, FastCpuGELU and FastCpuDropout: Paddle's Linear, LayerNorm, GELU
and Dropout with faster paths for eager float32 training and evaluation on the CPU.

Each layer computes the same function with the same parameters (names and shapes) as Paddle's. When
the input is an eager float32 CPU tensor and `use_cpu_kernels` is on (`model.cpu_kernels`), the
work goes to the compiled kernels of models/cpu_kernels.cc, or for Linear to a matrix-vector bias
gradient; anywhere else (GPU, other dtypes, static programs such as export) Paddle's kernels run.

What the compiled kernels do differently is said in models/cpu_kernels.cc; what they gain is
measured in docs/performance.md.
"""

import paddle
import paddle.nn as nn
import paddle.nn.functional as F
from paddle.autograd import PyLayer

from . import cpu_kernels

# Dropout seeds: two draws from Paddle's generator (so paddle.seed and recompute's saved random state
# govern the masks), each below this bound.
_SEED_WORD_BOUND = 2**31 - 1


class CpuKernelLayer(nn.Layer):
    """Mixin: `use_cpu_kernels` (set by VisionTransformer from `model.cpu_kernels`) and the test of
    whether the fast CPU path applies to a tensor."""

    use_cpu_kernels = True

    def fast_cpu_path(self, tensor):
        return (
            self.use_cpu_kernels
            and paddle.in_dynamic_mode()
            and tensor.place.is_cpu_place()
            and tensor.dtype == paddle.float32
        )

    def compiled_kernels(self, tensor):
        """cpu_kernels.kernels() when the fast path applies and they built, else None."""
        return cpu_kernels.kernels() if self.fast_cpu_path(tensor) else None


def _rows(tensor):
    return tensor.reshape([-1, tensor.shape[-1]])


class _AffineWithMatvecBiasGradient(PyLayer):
    """inputs @ weight + bias as one GEMM that starts from the bias (addmm); the bias gradient is
    ones @ output gradient, a matrix-vector product, where Paddle's CPU kernel sums rows in a slow
    strided loop."""

    @staticmethod
    def forward(ctx, inputs, weight, bias):
        ctx.save_for_backward(inputs, weight)
        ctx.needs_gradient = [not tensor.stop_gradient for tensor in (inputs, weight, bias)]
        outputs = paddle.addmm(bias, _rows(inputs), weight)
        return outputs.reshape([*inputs.shape[:-1], weight.shape[1]])

    @staticmethod
    def backward(ctx, output_gradient):
        inputs, weight = ctx.saved_tensor()
        needs_inputs, needs_weight, needs_bias = ctx.needs_gradient
        rows = _rows(output_gradient)
        ones = paddle.ones([1, rows.shape[0]], dtype=rows.dtype)
        # A PyLayer returns None for every input that takes no gradient.
        return (
            paddle.matmul(output_gradient, weight, transpose_y=True) if needs_inputs else None,
            paddle.matmul(_rows(inputs), rows, transpose_x=True) if needs_weight else None,
            paddle.matmul(ones, rows).reshape([rows.shape[1]]) if needs_bias else None,
        )


class FastCpuLinear(nn.Linear, CpuKernelLayer):
    def forward(self, inputs):
        if self.bias is None or not self.fast_cpu_path(inputs):
            return super().forward(inputs)
        return _AffineWithMatvecBiasGradient.apply(inputs, self.weight, self.bias)


class FastCpuLayerNorm(nn.LayerNorm, CpuKernelLayer):
    """Over the last axis, with weight and bias (as every LayerNorm of the ViT)."""

    def forward(self, inputs):
        kernels = self.compiled_kernels(inputs)
        if kernels is None or self.weight is None or self.bias is None:
            return super().forward(inputs)
        out, _, _ = kernels.rdrop_layer_norm(inputs, self.weight, self.bias, self._epsilon)
        return out


class FastCpuGELU(CpuKernelLayer):
    """The exact (erf) GELU."""

    def forward(self, inputs):
        kernels = self.compiled_kernels(inputs)
        if kernels is None:
            return F.gelu(inputs, approximate=False)
        return kernels.rdrop_gelu(inputs)


class FastCpuDropout(CpuKernelLayer):
    """Element-wise dropout, scaled by 1 / (1 - rate) in training (nn.Dropout's default mode)."""

    def __init__(self, rate):
        super().__init__()
        self.rate = rate

    def forward(self, inputs):
        if not self.training or self.rate == 0.0:
            return inputs
        kernels = self.compiled_kernels(inputs)
        if kernels is None:
            return F.dropout(inputs, self.rate, training=True)
        seed = paddle.randint(0, _SEED_WORD_BOUND, [2], dtype="int64")
        return kernels.rdrop_dropout(inputs, seed, self.rate)
