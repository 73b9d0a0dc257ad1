// The per-channel finish steps of batch norm, written once for the CPU kernels
// (csrc/cpu/bn_finish.cpp) and the CUDA kernels (csrc/cuda/bn_finish.cu): the math of
// fused_resnet/backends/primitives.py (bn_scale_shift, grad_coefficients,
// bn_update_running_stats), one channel per call, in the accumulation dtype A
// (float64 for float64 activations, float32 otherwise). Each is O(C): what matters is
// that a step runs them inside one operator instead of a handful of tiny PyTorch ops.
#pragma once

#include <math.h>

#include <cstdint>

#if defined(__CUDACC__)
#define FUSED_RESNET_HD __host__ __device__ inline
#else
#define FUSED_RESNET_HD inline
#endif

namespace fused_resnet {
namespace finish {

FUSED_RESNET_HD float sqrt_of(float v) { return sqrtf(v); }
FUSED_RESNET_HD double sqrt_of(double v) { return sqrt(v); }

// 1 / sqrt(var + eps): the composite's torch.rsqrt(var + eps), written as a division so
// that CPU and GPU round alike.
template <typename A>
FUSED_RESNET_HD A inv_std(A var, A eps) {
  return A(1) / sqrt_of(var + eps);
}

// scale, shift with x*scale + shift == gamma*(x - mean)/sqrt(var + eps) + beta
// (gamma, beta: nullptr when BN is not affine).
template <typename A>
FUSED_RESNET_HD void scale_shift(int64_t c, const A* mean, const A* var, const A* gamma,
                                 const A* beta, A eps, A* scale, A* shift) {
  A s = inv_std(var[c], eps);
  if (gamma != nullptr) s = s * gamma[c];
  scale[c] = s;
  shift[c] = (beta != nullptr ? beta[c] : A(0)) - mean[c] * s;
}

// Rows a, b, d, d gamma, d beta of the [5, C] coefficients (stride C):
// grad_x = a*g + b*(x - mean) + d; with batch statistics over `count` values
// a = gamma*invstd, b = -a*invstd^2*sum_g_xmu/count, d = -a*sum_g/count; with running
// statistics b = d = 0. d gamma = sum_g_xmu*invstd, d beta = sum_g.
template <typename A>
FUSED_RESNET_HD void coefficients(int64_t c, int64_t C, const A* sum_g, const A* sum_g_xmu,
                                  const A* var, const A* gamma, A eps, A count,
                                  bool use_batch_stats, A* coef) {
  const A invstd = inv_std(var[c], eps);
  const A a = gamma != nullptr ? invstd * gamma[c] : invstd;
  coef[c] = a;
  coef[C + c] = use_batch_stats ? -a * invstd * invstd * sum_g_xmu[c] / count : A(0);
  coef[2 * C + c] = use_batch_stats ? -a * sum_g[c] / count : A(0);
  coef[3 * C + c] = sum_g_xmu[c] * invstd;
  coef[4 * C + c] = sum_g[c];
}

// One channel of the running-statistics update: running = running*(1 - factor) +
// batch*factor, the variance unbiased by `unbias` (n / (n - 1)); T: the arithmetic
// dtype of the running buffers' dtype R (float for float32 / bfloat16 / float16).
template <typename T, typename R, typename A>
FUSED_RESNET_HD void running_update(int64_t c, R* running_mean, R* running_var, const A* mean,
                                    const A* var, T factor, T unbias) {
  running_mean[c] = static_cast<R>(static_cast<T>(running_mean[c]) * (T(1) - factor) +
                                   static_cast<T>(mean[c]) * factor);
  running_var[c] = static_cast<R>(static_cast<T>(running_var[c]) * (T(1) - factor) +
                                  static_cast<T>(var[c]) * unbias * factor);
}

// One element i of a folded convolution weight: row o = i / per_row scaled by scale[o]
// (T: the arithmetic dtype).
template <typename T, typename W, typename O, typename A>
FUSED_RESNET_HD void fold_weight(int64_t i, int64_t per_row, const W* weight, const A* scale,
                                 O* out) {
  out[i] = static_cast<O>(static_cast<T>(weight[i]) * static_cast<T>(scale[i / per_row]));
}

// n / max(n - 1, 1): the unbiasing factor of a variance over n values.
template <typename T>
FUSED_RESNET_HD T unbias_factor(T n) {
  const T m = n - T(1);
  return n / (m > T(1) ? m : T(1));
}

}  // namespace finish
}  // namespace fused_resnet
