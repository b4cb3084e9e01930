// Float32 CPU kernels for the ViT's layer norm, exact GELU and dropout, forward and backward.
//
// Paddle's CPU kernels for these run on one thread, and its layer-norm and GELU gradients are not
// vectorised; here each is one pass over memory on all of the process's OpenMP threads (the team
// Paddle sizes with set_num_threads, shared with MKL through libiomp5). Built and loaded by
// models/cpu_kernels.py; every result is independent of the number of threads.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "paddle/extension.h"

namespace {

void CheckFloatOnCpu(const paddle::Tensor& tensor) {
  PD_CHECK(tensor.is_cpu(), "rdrop CPU kernels take CPU tensors");
  PD_CHECK(tensor.dtype() == paddle::DataType::FLOAT32, "rdrop CPU kernels take float32 tensors");
}

paddle::Tensor EmptyFloat(const std::vector<int64_t>& shape) {
  return paddle::empty(shape, paddle::DataType::FLOAT32, paddle::CPUPlace());
}

// body(begin, end) on one contiguous part of [0, n) per thread. Bodies are separate functions with
// __restrict pointers: inside an OpenMP region GCC does not vectorise loops over captured pointers.
template <typename Body>
void ParallelRanges(int64_t n, const Body& body) {
#pragma omp parallel
  {
    const int64_t threads = omp_get_num_threads(), thread = omp_get_thread_num();
    body(n * thread / threads, n * (thread + 1) / threads);
  }
}

}  // namespace

// ---- Layer normalisation over the last axis --------------------------------------------------------

namespace {

// The weight and bias gradients are summed per block of rows, then over the blocks in order: a fixed
// summation order whatever the number of threads.
constexpr int64_t kGradientBlocks = 64;

void LayerNormRows(const float* __restrict x, const float* __restrict weight, const float* __restrict bias,
                   float epsilon, int64_t width, int64_t begin, int64_t end, float* __restrict out,
                   double* __restrict mean, float* __restrict inverse_std) {
  for (int64_t row = begin; row < end; ++row) {
    const float* xr = x + row * width;
    // The mean in double (it is also saved so): a row with a large mean keeps its small deviations.
    double sum = 0.0;
#pragma omp simd reduction(+ : sum)
    for (int64_t i = 0; i < width; ++i) sum += xr[i];
    const double mu = sum / width;
    double squares = 0.0;
#pragma omp simd reduction(+ : squares)
    for (int64_t i = 0; i < width; ++i) squares += (xr[i] - mu) * (xr[i] - mu);
    const float inv = static_cast<float>(1.0 / std::sqrt(squares / width + epsilon));
    float* yr = out + row * width;
    for (int64_t i = 0; i < width; ++i) yr[i] = static_cast<float>(xr[i] - mu) * inv * weight[i] + bias[i];
    mean[row] = mu;
    inverse_std[row] = inv;
  }
}

// dx = inv_std * (g - mean(g) - x_hat * mean(g * x_hat)) with g = dy * weight, and this block's sums
// of dy * x_hat and dy.
void LayerNormGradientRows(const float* __restrict x, const float* __restrict weight,
                           const double* __restrict mean, const float* __restrict inverse_std,
                           const float* __restrict out_grad, int64_t width, int64_t begin, int64_t end,
                           float* __restrict x_grad, float* __restrict weight_sum, float* __restrict bias_sum) {
  std::vector<float> normalised(width), scaled(width);
  for (int64_t row = begin; row < end; ++row) {
    const float* xr = x + row * width;
    const float* gr = out_grad + row * width;
    const double mu = mean[row];
    const float inv = inverse_std[row];
    double scaled_sum = 0.0, projection = 0.0;
#pragma omp simd reduction(+ : scaled_sum, projection)
    for (int64_t i = 0; i < width; ++i) {
      normalised[i] = static_cast<float>(xr[i] - mu) * inv;
      scaled[i] = gr[i] * weight[i];
      scaled_sum += scaled[i];
      projection += scaled[i] * normalised[i];
      weight_sum[i] += gr[i] * normalised[i];
      bias_sum[i] += gr[i];
    }
    const float scaled_mean = static_cast<float>(scaled_sum / width);
    const float projection_mean = static_cast<float>(projection / width);
    float* dxr = x_grad + row * width;
    for (int64_t i = 0; i < width; ++i) dxr[i] = inv * (scaled[i] - scaled_mean - normalised[i] * projection_mean);
  }
}

}  // namespace

std::vector<paddle::Tensor> LayerNormForward(const paddle::Tensor& x, const paddle::Tensor& weight,
                                             const paddle::Tensor& bias, float epsilon) {
  CheckFloatOnCpu(x);
  const int64_t width = weight.numel(), rows = x.numel() / width;
  auto out = EmptyFloat(x.shape());
  auto mean = paddle::empty({rows}, paddle::DataType::FLOAT64, paddle::CPUPlace());
  auto inverse_std = EmptyFloat({rows});
  const float *in = x.data<float>(), *w = weight.data<float>(), *b = bias.data<float>();
  float *y = out.data<float>(), *r = inverse_std.data<float>();
  double* m = mean.data<double>();
  ParallelRanges(rows, [=](int64_t begin, int64_t end) { LayerNormRows(in, w, b, epsilon, width, begin, end, y, m, r); });
  return {out, mean, inverse_std};
}

std::vector<paddle::Tensor> LayerNormBackward(const paddle::Tensor& x, const paddle::Tensor& weight,
                                              const paddle::Tensor& mean, const paddle::Tensor& inverse_std,
                                              const paddle::Tensor& out_grad, float epsilon) {
  const int64_t width = weight.numel(), rows = x.numel() / width;
  const int64_t blocks = std::min(kGradientBlocks, rows);
  auto x_grad = EmptyFloat(x.shape());
  auto weight_grad = EmptyFloat(weight.shape());
  auto bias_grad = EmptyFloat(weight.shape());
  std::vector<float> weight_sums(blocks * width, 0.f), bias_sums(blocks * width, 0.f);
  const float *in = x.data<float>(), *w = weight.data<float>(), *r = inverse_std.data<float>();
  const float* dy = out_grad.data<float>();
  const double* m = mean.data<double>();
  float *dx = x_grad.data<float>(), *ws = weight_sums.data(), *bs = bias_sums.data();
  ParallelRanges(blocks, [=](int64_t first, int64_t last) {
    for (int64_t block = first; block < last; ++block) {
      LayerNormGradientRows(in, w, m, r, dy, width, rows * block / blocks, rows * (block + 1) / blocks, dx,
                            ws + block * width, bs + block * width);
    }
  });
  float *dw = weight_grad.data<float>(), *db = bias_grad.data<float>();
  for (int64_t i = 0; i < width; ++i) {
    double weight_total = 0.0, bias_total = 0.0;
    for (int64_t block = 0; block < blocks; ++block) {
      weight_total += weight_sums[block * width + i];
      bias_total += bias_sums[block * width + i];
    }
    dw[i] = static_cast<float>(weight_total);
    db[i] = static_cast<float>(bias_total);
  }
  return {x_grad, weight_grad, bias_grad};
}

PD_BUILD_OP(rdrop_layer_norm)
    .Inputs({"X", "Weight", "Bias"})
    .Outputs({"Out", "Mean", "InverseStd"})
    .Attrs({"epsilon: float"})
    .SetKernelFn(PD_KERNEL(LayerNormForward));

PD_BUILD_GRAD_OP(rdrop_layer_norm)
    .Inputs({"X", "Weight", "Mean", "InverseStd", paddle::Grad("Out")})
    .Outputs({paddle::Grad("X"), paddle::Grad("Weight"), paddle::Grad("Bias")})
    .Attrs({"epsilon: float"})
    .SetKernelFn(PD_KERNEL(LayerNormBackward));

// ---- Exact GELU: x * Phi(x) --------------------------------------------------------------------------

namespace {

// exp(x) from exp(r) * 2^n with |r| <= ln(2) / 2, written so that loops over it vectorise (libm's
// expf does not); relative error below 2e-7. Inputs are clamped where 2^n stays a normal float.
inline __attribute__((always_inline)) float Exp(float x) {
  x = x < -87.f ? -87.f : (x > 88.f ? 88.f : x);
  const float n = __builtin_floorf(x * 1.44269504088896341f + 0.5f);
  const float r = (x - n * 0.693145751953125f) - n * 1.428606765330187045e-6f;
  float p = 1.f / 5040.f;
  p = p * r + 1.f / 720.f;
  p = p * r + 1.f / 120.f;
  p = p * r + 1.f / 24.f;
  p = p * r + 1.f / 6.f;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  return p * __builtin_bit_cast(float, (static_cast<int32_t>(n) + 127) << 23);
}

struct NormalAt {
  float cdf;       // Phi(x)
  float gaussian;  // exp(-x^2 / 2): the normal density times sqrt(2 pi)
};

// Phi(x) = erfc(-x / sqrt 2) / 2 with erfc from its Chebyshev fit in Numerical Recipes (relative error
// below 1.2e-7 everywhere, so GELU's stays at float32 rounding, also for large |x|).
inline __attribute__((always_inline)) NormalAt Normal(float x) {
  const float z = std::fabs(x) * float(M_SQRT1_2);
  const float t = 1.f / (1.f + 0.5f * z);
  float p = 0.17087277f;
  p = p * t - 0.82215223f;
  p = p * t + 1.48851587f;
  p = p * t - 1.13520398f;
  p = p * t + 0.27886807f;
  p = p * t - 0.18628806f;
  p = p * t + 0.09678418f;
  p = p * t + 0.37409196f;
  p = p * t + 1.00002368f;
  p = p * t - 1.26551223f;
  const float gaussian = Exp(-z * z);
  const float half_erfc = 0.5f * t * gaussian * Exp(p);
  return {x >= 0.f ? 1.f - half_erfc : half_erfc, gaussian};
}

void GeluRange(const float* __restrict x, int64_t begin, int64_t end, float* __restrict out) {
  for (int64_t i = begin; i < end; ++i) out[i] = x[i] * Normal(x[i]).cdf;
}

void GeluGradientRange(const float* __restrict x, const float* __restrict out_grad, int64_t begin, int64_t end,
                       float* __restrict x_grad) {
  const float inverse_sqrt_2pi = 0.5f * float(M_2_SQRTPI) * float(M_SQRT1_2);
  for (int64_t i = begin; i < end; ++i) {
    const NormalAt normal = Normal(x[i]);
    x_grad[i] = out_grad[i] * (normal.cdf + x[i] * inverse_sqrt_2pi * normal.gaussian);
  }
}

}  // namespace

std::vector<paddle::Tensor> GeluForward(const paddle::Tensor& x) {
  CheckFloatOnCpu(x);
  auto out = EmptyFloat(x.shape());
  const float* in = x.data<float>();
  float* y = out.data<float>();
  ParallelRanges(x.numel(), [=](int64_t begin, int64_t end) { GeluRange(in, begin, end, y); });
  return {out};
}

std::vector<paddle::Tensor> GeluBackward(const paddle::Tensor& x, const paddle::Tensor& out_grad) {
  auto x_grad = EmptyFloat(x.shape());
  const float *in = x.data<float>(), *dy = out_grad.data<float>();
  float* dx = x_grad.data<float>();
  ParallelRanges(x.numel(), [=](int64_t begin, int64_t end) { GeluGradientRange(in, dy, begin, end, dx); });
  return {x_grad};
}

PD_BUILD_OP(rdrop_gelu).Inputs({"X"}).Outputs({"Out"}).SetKernelFn(PD_KERNEL(GeluForward));

PD_BUILD_GRAD_OP(rdrop_gelu)
    .Inputs({"X", paddle::Grad("Out")})
    .Outputs({paddle::Grad("X")})
    .SetKernelFn(PD_KERNEL(GeluBackward));

// ---- Dropout ----------------------------------------------------------------------------------------
// Elements 2j and 2j + 1 take the low and high 32 bits of the j-th output of SplitMix64 (Steele et
// al., 2014) started from a 64-bit seed that Python draws from Paddle's generator. The stream is
// counter-based, so the backward pass regenerates the mask from the seed instead of storing it.
// Each element is kept when 24 of its bits are >= round(rate * 2^24): the keep probability is
// 1 - rate to within 2^-25, the resolution of the float draw Paddle's kernel compares with the rate.

namespace {

constexpr int kMaskBits = 24;

inline uint64_t SplitMix64(uint64_t seed, uint64_t index) {
  uint64_t z = seed + (index + 1) * 0x9E3779B97F4A7C15ULL;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

uint64_t SeedOf(const paddle::Tensor& seed) {
  PD_CHECK(seed.is_cpu() && seed.dtype() == paddle::DataType::INT64 && seed.numel() == 2,
           "the dropout seed is two int64 words on the CPU");
  const int64_t* words = seed.data<int64_t>();
  return (static_cast<uint64_t>(words[0]) << 32) ^ static_cast<uint64_t>(words[1]);
}

// out = in * mask / (1 - rate), for the mask of `seed`.
void MaskRange(const float* __restrict in, uint64_t seed, float rate, int64_t n, int64_t begin_pair,
               int64_t end_pair, float* __restrict out) {
  const uint32_t threshold = static_cast<uint32_t>(std::lround(double(rate) * double(1u << kMaskBits)));
  const uint32_t low_bits = (1u << kMaskBits) - 1;
  const float scale = 1.f / (1.f - rate);
  for (int64_t pair = begin_pair; pair < end_pair; ++pair) {
    const uint64_t bits = SplitMix64(seed, pair);
    const int64_t first = 2 * pair;
    out[first] = (static_cast<uint32_t>(bits) & low_bits) >= threshold ? in[first] * scale : 0.f;
    if (first + 1 < n) {
      out[first + 1] = (static_cast<uint32_t>(bits >> 32) & low_bits) >= threshold ? in[first + 1] * scale : 0.f;
    }
  }
}

paddle::Tensor Masked(const paddle::Tensor& values, const paddle::Tensor& seed, float rate) {
  CheckFloatOnCpu(values);
  PD_CHECK(rate >= 0.f && rate < 1.f, "the dropout rate lies in [0, 1)");
  auto out = EmptyFloat(values.shape());
  const float* in = values.data<float>();
  float* y = out.data<float>();
  const uint64_t key = SeedOf(seed);
  const int64_t n = values.numel();
  ParallelRanges((n + 1) / 2, [=](int64_t begin, int64_t end) { MaskRange(in, key, rate, n, begin, end, y); });
  return out;
}

}  // namespace

std::vector<paddle::Tensor> DropoutForward(const paddle::Tensor& x, const paddle::Tensor& seed, float rate) {
  return {Masked(x, seed, rate)};
}

std::vector<paddle::Tensor> DropoutBackward(const paddle::Tensor& seed, const paddle::Tensor& out_grad,
                                            float rate) {
  return {Masked(out_grad, seed, rate)};
}

PD_BUILD_OP(rdrop_dropout)
    .Inputs({"X", "Seed"})
    .Outputs({"Out"})
    .Attrs({"rate: float"})
    .SetKernelFn(PD_KERNEL(DropoutForward));

PD_BUILD_GRAD_OP(rdrop_dropout)
    .Inputs({"Seed", paddle::Grad("Out")})
    .Outputs({paddle::Grad("X")})
    .Attrs({"rate: float"})
    .SetKernelFn(PD_KERNEL(DropoutBackward));
