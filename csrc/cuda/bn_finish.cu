// The CUDA kernels of the per-channel finish steps (math: csrc/bn_finish.h; schemas:
// csrc/ops.cpp). bn_stats_affine and bn_backward_coefficients are the statistics /
// backward-reduction kernels followed by one small kernel over the C channels;
// bn_update_running_stats launches one kernel per layer; bn_fold one kernel for the
// scale / shift and one for the weight. Nothing is read back to the
// host (the count of sync BN and num_batches_tracked are read on the device), so a step
// stays CUDA-graph capturable.
#include "../bn_finish.h"
#include "cuda_ops.cuh"
#include "cuda_utils.cuh"

#include <ATen/OpMathType.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <tuple>

namespace fused_resnet {
namespace cuda {
namespace {

constexpr int kFinishThreads = 256;

// A per-channel vector of C elements on `like`'s device, as a contiguous acc vector.
Tensor vec_of(const char* op, const Tensor& v, const char* name, const Tensor& like,
              int64_t C, at::ScalarType acc) {
  return checks::per_channel(op, v, name, like.device(), C, acc);
}

Tensor optional_vec(const char* op, const std::optional<Tensor>& v, const char* name,
                    const Tensor& like, int64_t C, at::ScalarType acc) {
  return given(v) ? vec_of(op, *v, name, like, C, acc) : Tensor();
}

template <typename A>
const A* data_or_null(const Tensor& t) {
  return t.defined() ? t.const_data_ptr<A>() : nullptr;
}

unsigned finish_blocks(int64_t C) {
  return static_cast<unsigned>(std::max<int64_t>(1, ceil_div(C, kFinishThreads)));
}

template <typename A>
__global__ void scale_shift_kernel(int64_t C, const A* mean, const A* var, const A* gamma,
                                   const A* beta, A eps, A* scale, A* shift) {
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c < C) finish::scale_shift<A>(c, mean, var, gamma, beta, eps, scale, shift);
}

template <typename A>
__global__ void coefficients_kernel(int64_t C, const A* sum_g, const A* sum_g_xmu,
                                    const A* var, const A* gamma, A eps, A count,
                                    bool use_batch_stats, A* coef) {
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c < C) {
    finish::coefficients<A>(c, C, sum_g, sum_g_xmu, var, gamma, eps, count, use_batch_stats,
                            coef);
  }
}

// One layer, one block: every thread reads num_batches_tracked before thread 0
// increments it; with sync BN the count is var[C].
template <typename R, typename A>
__global__ void running_stats_kernel(int64_t C, R* running_mean, R* running_var,
                                     int64_t* num_batches_tracked, const A* mean, const A* var,
                                     int64_t count, double momentum, bool cumulative,
                                     bool synced) {
  using T = at::opmath_type<R>;
  const int64_t tracked = *num_batches_tracked + 1;
  __syncthreads();
  if (threadIdx.x == 0) *num_batches_tracked = tracked;
  const T n = synced ? static_cast<T>(var[C]) : static_cast<T>(count);
  if (!synced && count == 0) return;  // an empty batch is only counted
  const T factor = cumulative ? T(1) / static_cast<T>(tracked) : static_cast<T>(momentum);
  const T unbias = finish::unbias_factor<T>(n);
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
    finish::running_update<T, R, A>(c, running_mean, running_var, mean, var, factor, unbias);
  }
}

template <typename T, typename W, typename O, typename A>
__global__ void fold_weight_kernel(int64_t n, int64_t per_row, const W* weight, const A* scale,
                                   O* out) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    finish::fold_weight<T, W, O, A>(i, per_row, weight, scale, out);
  }
}

std::tuple<Tensor, Tensor> scale_shift_of(const char* op, const Tensor& mean, const Tensor& var,
                                          const std::optional<Tensor>& gamma_opt,
                                          const std::optional<Tensor>& beta_opt, double eps) {
  const int64_t C = mean.numel();
  const auto acc = mean.scalar_type();
  const Tensor gamma = optional_vec(op, gamma_opt, "gamma", mean, C, acc);
  const Tensor beta = optional_vec(op, beta_opt, "beta", mean, C, acc);
  Tensor scale = at::empty({C}, mean.options());
  Tensor shift = at::empty({C}, mean.options());
  if (C == 0) return {scale, shift};
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(acc, "fused_resnet::bn_scale_shift (CUDA)", [&] {
    scale_shift_kernel<scalar_t><<<finish_blocks(C), kFinishThreads, 0, stream>>>(
        C, mean.const_data_ptr<scalar_t>(), var.const_data_ptr<scalar_t>(),
        data_or_null<scalar_t>(gamma), data_or_null<scalar_t>(beta),
        static_cast<scalar_t>(eps), scale.mutable_data_ptr<scalar_t>(),
        shift.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {scale, shift};
}

std::tuple<Tensor, Tensor> bn_scale_shift_cuda(const Tensor& mean_in, const Tensor& var_in,
                                               const std::optional<Tensor>& gamma,
                                               const std::optional<Tensor>& beta, double eps) {
  constexpr const char* op = "bn_scale_shift";
  TORCH_CHECK(mean_in.dim() == 1 && mean_in.is_cuda(), "fused_resnet::", op,
              ": expected mean to be a per-channel CUDA vector [C], got shape ",
              shape_str(mean_in.sizes()), " on ", mean_in.device());
  const auto acc = mean_in.scalar_type();
  TORCH_CHECK(acc == at::kFloat || acc == at::kDouble, "fused_resnet::", op,
              ": expected mean in an accumulation dtype (float32 or float64), got ", acc);
  const c10::cuda::CUDAGuard guard(mean_in.device());
  const int64_t C = mean_in.size(0);
  const Tensor mean = mean_in.contiguous();
  const Tensor var = vec_of(op, var_in, "var", mean, C, acc);
  return scale_shift_of(op, mean, var, gamma, beta, eps);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> bn_stats_affine_cuda(
    const Tensor& x, const std::optional<Tensor>& gamma, const std::optional<Tensor>& beta,
    double eps) {
  const c10::cuda::CUDAGuard guard(x.device());
  auto [mean, var] = bn_stats_cuda(x);
  auto [scale, shift] = scale_shift_of("bn_stats_affine", mean, var, gamma, beta, eps);
  return {mean, var, scale, shift};
}

Tensor coefficients_of(const char* op, const Tensor& sum_g, const Tensor& sum_g_xmu,
                       const Tensor& var_in, const std::optional<Tensor>& gamma_opt, double eps,
                       int64_t count, bool use_batch_stats, const char* var_name,
                       const char* gamma_name) {
  const int64_t C = sum_g.numel();
  const auto acc = sum_g.scalar_type();
  const Tensor var = vec_of(op, var_in, var_name, sum_g, C, acc);
  const Tensor gamma = optional_vec(op, gamma_opt, gamma_name, sum_g, C, acc);
  Tensor coef = at::empty({5, C}, sum_g.options());
  if (C == 0) return coef;
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(acc, "fused_resnet::bn_backward_coefficients (CUDA)", [&] {
    coefficients_kernel<scalar_t><<<finish_blocks(C), kFinishThreads, 0, stream>>>(
        C, sum_g.const_data_ptr<scalar_t>(), sum_g_xmu.const_data_ptr<scalar_t>(),
        var.const_data_ptr<scalar_t>(), data_or_null<scalar_t>(gamma),
        static_cast<scalar_t>(eps), static_cast<scalar_t>(count), use_batch_stats,
        coef.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return coef;
}

std::tuple<Tensor, Tensor> bn_backward_coefficients_cuda(
    const Tensor& grad_out, const std::optional<Tensor>& out, const Tensor& x,
    const Tensor& mean, const Tensor& var, const std::optional<Tensor>& gamma, double eps,
    bool use_batch_stats, const std::optional<Tensor>& x2, const std::optional<Tensor>& mean2,
    const std::optional<Tensor>& var2, const std::optional<Tensor>& gamma2, double eps2) {
  constexpr const char* op = "bn_backward_coefficients";
  const c10::cuda::CUDAGuard guard(x.device());
  auto [sum_g, sum_g_xmu, sum_g_xmu2] =
      bn_backward_reduce_cuda(grad_out, out, x, mean, x2, mean2);
  const int64_t C = x.size(1);
  const int64_t count = C > 0 ? x.numel() / C : 0;
  Tensor coef = coefficients_of(op, sum_g, sum_g_xmu, var, gamma, eps, count, use_batch_stats,
                                "var", "gamma");
  if (!given(x2)) {
    absent(op, var2, "var2", "x2");
    return {coef, at::empty({0}, coef.options())};
  }
  Tensor coef2 = coefficients_of(op, sum_g, sum_g_xmu2,
                                 required(op, var2, "var2", "x2 is given"), gamma2, eps2, count,
                                 use_batch_stats, "var2", "gamma2");
  return {coef, coef2};
}

void bn_update_running_stats_cuda(at::TensorList running_means, at::TensorList running_vars,
                                  at::TensorList num_batches_tracked, at::TensorList means,
                                  at::TensorList variances, at::IntArrayRef counts,
                                  at::ArrayRef<double> momenta, const c10::List<bool>& cumulative) {
  constexpr const char* op = "bn_update_running_stats";
  const size_t L = running_means.size();
  TORCH_CHECK(running_vars.size() == L && num_batches_tracked.size() == L && means.size() == L &&
                  variances.size() == L && counts.size() == L && momenta.size() == L &&
                  cumulative.size() == L,
              "fused_resnet::", op, ": the lists must have one entry per layer");
  for (size_t i = 0; i < L; ++i) {
    const Tensor& rm = running_means[i];
    const Tensor& rv = running_vars[i];
    const Tensor& nbt = num_batches_tracked[i];
    const int64_t C = rm.numel();
    TORCH_CHECK(rm.is_cuda() && rm.is_contiguous() && rv.is_contiguous() && rv.numel() == C &&
                    rv.scalar_type() == rm.scalar_type() && rv.device() == rm.device(),
                "fused_resnet::", op, ": layer ", i, ": expected contiguous CUDA running_mean "
                "and running_var of one dtype and C elements");
    TORCH_CHECK(nbt.scalar_type() == at::kLong && nbt.numel() == 1 &&
                    nbt.device() == rm.device(),
                "fused_resnet::", op, ": layer ", i, ": expected num_batches_tracked to be a "
                "one-element int64 tensor on ", rm.device());
    const auto acc = means[i].scalar_type();
    TORCH_CHECK(acc == at::kFloat || acc == at::kDouble, "fused_resnet::", op, ": layer ", i,
                ": expected the batch mean in float32 or float64, got ", acc);
    const bool synced = variances[i].numel() == C + 1;  // sync BN: the count at the end
    TORCH_CHECK(variances[i].dim() == 1 && (synced || variances[i].numel() == C),
                "fused_resnet::", op, ": layer ", i,
                ": expected the batch variance to have C or C + 1 elements");
    const c10::cuda::CUDAGuard guard(rm.device());
    const Tensor mean = vec_of(op, means[i], "mean", rm, C, acc);
    const Tensor var = variances[i].to(acc).contiguous();
    const auto stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, rm.scalar_type(), op, [&] {
      using R = scalar_t;
      auto launch = [&](auto acc_zero) {
        using A = decltype(acc_zero);
        running_stats_kernel<R, A><<<1, kFinishThreads, 0, stream>>>(
            C, rm.mutable_data_ptr<R>(), rv.mutable_data_ptr<R>(),
            nbt.mutable_data_ptr<int64_t>(), mean.const_data_ptr<A>(), var.const_data_ptr<A>(),
            counts[i], momenta[i], cumulative.get(i), synced);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      if (acc == at::kDouble) {
        launch(double(0));
      } else {
        launch(float(0));
      }
    });
  }
}

bool rows_dense(const Tensor& w) {
  return w.dim() >= 1 && w.is_non_overlapping_and_dense() && w.size(0) > 0 &&
         w.stride(0) == w.numel() / w.size(0);
}

std::tuple<Tensor, Tensor> bn_fold_cuda(const Tensor& weight_in,
                                        const std::optional<Tensor>& gamma,
                                        const std::optional<Tensor>& beta,
                                        const Tensor& running_mean, const Tensor& running_var,
                                        double eps, std::optional<at::ScalarType> dtype) {
  constexpr const char* op = "bn_fold";
  TORCH_CHECK(weight_in.is_cuda() && weight_in.dim() >= 2 && weight_in.is_floating_point(),
              "fused_resnet::", op, ": expected a floating-point CUDA convolution weight "
              "[C_out, ...], got shape ", shape_str(weight_in.sizes()), " of ",
              weight_in.scalar_type(), " on ", weight_in.device());
  const c10::cuda::CUDAGuard guard(weight_in.device());
  const int64_t C = weight_in.size(0);
  const auto acc = running_mean.scalar_type();
  TORCH_CHECK(at::isFloatingType(acc), "fused_resnet::", op,
              ": expected floating-point running statistics, got ", acc);
  const auto math = acc == at::kDouble ? at::kDouble : at::kFloat;
  const Tensor mean = vec_of(op, running_mean, "running_mean", weight_in, C, math);
  const Tensor var = vec_of(op, running_var, "running_var", weight_in, C, math);
  const Tensor weight = rows_dense(weight_in) ? weight_in : weight_in.contiguous();
  const auto out_type = dtype.value_or(weight.scalar_type());
  TORCH_CHECK(at::isFloatingType(out_type), "fused_resnet::", op,
              ": expected a floating-point dtype, got ", out_type);
  auto [scale, shift] = scale_shift_of(op, mean, var, gamma, beta, eps);
  Tensor folded = at::empty_like(weight, weight.options().dtype(out_type));
  const int64_t n = weight.numel();
  if (n == 0) return {folded, shift.to(acc)};
  const int64_t per_row = n / C;
  const auto stream = at::cuda::getCurrentCUDAStream();
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(ceil_div(n, kFinishThreads),
                                                                  4096));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, weight.scalar_type(), op, [&] {
    using W = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out_type, op, [&] {
      using O = scalar_t;
      AT_DISPATCH_FLOATING_TYPES(math, op, [&] {
        using A = scalar_t;
        fold_weight_kernel<A, W, O, A><<<blocks, kFinishThreads, 0, stream>>>(
            n, per_row, weight.const_data_ptr<W>(), scale.const_data_ptr<A>(),
            folded.mutable_data_ptr<O>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
  return {folded, shift.to(acc)};
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_resnet, CUDA, m) {
  m.impl("bn_scale_shift", TORCH_FN(bn_scale_shift_cuda));
  m.impl("bn_stats_affine", TORCH_FN(bn_stats_affine_cuda));
  m.impl("bn_backward_coefficients", TORCH_FN(bn_backward_coefficients_cuda));
  m.impl("bn_update_running_stats", TORCH_FN(bn_update_running_stats_cuda));
  m.impl("bn_fold", TORCH_FN(bn_fold_cuda));
}

}  // namespace cuda
}  // namespace fused_resnet
