// The CPU kernels of the per-channel finish steps (math: csrc/bn_finish.h; schemas:
// csrc/ops.cpp): bn_scale_shift, bn_stats_affine (bn_stats + its finish step),
// bn_backward_coefficients (bn_backward_reduce + its finish step) and
// bn_update_running_stats (every layer of a block in one call), and bn_fold (eval-mode BN
// into the convolution's weight and bias). Each replaces a handful
// of tiny PyTorch ops per BN layer and step with one operator call.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <vector>

#include "../bn_finish.h"
#include "cpu_ops.h"
#include "cpu_utils.h"

namespace fused_resnet {
namespace cpu {
namespace {

// gamma / beta as contiguous acc vectors, or undefined when absent.
Tensor optional_vec(const char* op, const std::optional<Tensor>& v, const char* name,
                    int64_t C, at::ScalarType acc) {
  return given(v) ? per_channel(op, *v, name, C, acc) : Tensor();
}

template <typename A>
const A* data_or_null(const Tensor& t) {
  return t.defined() ? t.const_data_ptr<A>() : nullptr;
}

// scale / shift of (mean, var), both contiguous acc vectors of C elements.
std::tuple<Tensor, Tensor> scale_shift_of(const char* op, const Tensor& mean, const Tensor& var,
                                          const std::optional<Tensor>& gamma_opt,
                                          const std::optional<Tensor>& beta_opt, double eps) {
  const int64_t C = mean.numel();
  const auto acc = mean.scalar_type();
  const Tensor gamma = optional_vec(op, gamma_opt, "gamma", C, acc);
  const Tensor beta = optional_vec(op, beta_opt, "beta", C, acc);
  Tensor scale = at::empty({C}, mean.options());
  Tensor shift = at::empty({C}, mean.options());
  AT_DISPATCH_FLOATING_TYPES(acc, "fused_resnet::bn_scale_shift", [&] {
    const scalar_t* m = mean.const_data_ptr<scalar_t>();
    const scalar_t* v = var.const_data_ptr<scalar_t>();
    const scalar_t* g = data_or_null<scalar_t>(gamma);
    const scalar_t* b = data_or_null<scalar_t>(beta);
    scalar_t* sc = scale.mutable_data_ptr<scalar_t>();
    scalar_t* sh = shift.mutable_data_ptr<scalar_t>();
    for (int64_t c = 0; c < C; ++c) {
      finish::scale_shift<scalar_t>(c, m, v, g, b, static_cast<scalar_t>(eps), sc, sh);
    }
  });
  return {scale, shift};
}

std::tuple<Tensor, Tensor> bn_scale_shift_cpu(const Tensor& mean_in, const Tensor& var_in,
                                              const std::optional<Tensor>& gamma,
                                              const std::optional<Tensor>& beta, double eps) {
  constexpr const char* op = "bn_scale_shift";
  TORCH_CHECK(mean_in.dim() == 1, "fused_resnet::", op, ": expected mean to be a per-channel "
              "vector [C], got shape ", shape_str(mean_in.sizes()));
  const int64_t C = mean_in.size(0);
  const auto acc = mean_in.scalar_type();
  TORCH_CHECK(acc == at::kFloat || acc == at::kDouble, "fused_resnet::", op,
              ": expected mean in an accumulation dtype (float32 or float64), got ", acc);
  const Tensor mean = per_channel(op, mean_in, "mean", C, acc);
  const Tensor var = per_channel(op, var_in, "var", C, acc);
  return scale_shift_of(op, mean, var, gamma, beta, eps);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> bn_stats_affine_cpu(
    const Tensor& x, const std::optional<Tensor>& gamma, const std::optional<Tensor>& beta,
    double eps) {
  auto [mean, var] = bn_stats_cpu(x);
  auto [scale, shift] = scale_shift_of("bn_stats_affine", mean, var, gamma, beta, eps);
  return {mean, var, scale, shift};
}

// The [5, C] coefficients of one BN from its gradient sums.
Tensor coefficients_of(const char* op, const Tensor& sum_g, const Tensor& sum_g_xmu,
                       const Tensor& var_in, const std::optional<Tensor>& gamma_opt, double eps,
                       int64_t count, bool use_batch_stats, const char* var_name,
                       const char* gamma_name) {
  const int64_t C = sum_g.numel();
  const auto acc = sum_g.scalar_type();
  const Tensor var = per_channel(op, var_in, var_name, C, acc);
  const Tensor gamma = optional_vec(op, gamma_opt, gamma_name, C, acc);
  Tensor coef = at::empty({5, C}, sum_g.options());
  AT_DISPATCH_FLOATING_TYPES(acc, "fused_resnet::bn_backward_coefficients", [&] {
    const scalar_t* sg = sum_g.const_data_ptr<scalar_t>();
    const scalar_t* sgx = sum_g_xmu.const_data_ptr<scalar_t>();
    const scalar_t* v = var.const_data_ptr<scalar_t>();
    const scalar_t* g = data_or_null<scalar_t>(gamma);
    scalar_t* out = coef.mutable_data_ptr<scalar_t>();
    for (int64_t c = 0; c < C; ++c) {
      finish::coefficients<scalar_t>(c, C, sg, sgx, v, g, static_cast<scalar_t>(eps),
                                     static_cast<scalar_t>(count), use_batch_stats, out);
    }
  });
  return coef;
}

std::tuple<Tensor, Tensor> bn_backward_coefficients_cpu(
    const Tensor& grad_out, const std::optional<Tensor>& out, const Tensor& x,
    const Tensor& mean, const Tensor& var, const std::optional<Tensor>& gamma, double eps,
    bool use_batch_stats, const std::optional<Tensor>& x2, const std::optional<Tensor>& mean2,
    const std::optional<Tensor>& var2, const std::optional<Tensor>& gamma2, double eps2) {
  constexpr const char* op = "bn_backward_coefficients";
  auto [sum_g, sum_g_xmu, sum_g_xmu2] = bn_backward_reduce_cpu(grad_out, out, x, mean, x2, mean2);
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

template <typename R, typename A>
void update_layer(Tensor& running_mean, Tensor& running_var, const Tensor& mean,
                  const Tensor& var, int64_t C, double factor, double unbias) {
  using T = at::opmath_type<R>;
  R* rm = running_mean.mutable_data_ptr<R>();
  R* rv = running_var.mutable_data_ptr<R>();
  const A* m = mean.const_data_ptr<A>();
  const A* v = var.const_data_ptr<A>();
  for (int64_t c = 0; c < C; ++c) {
    finish::running_update<T, R, A>(c, rm, rv, m, v, static_cast<T>(factor),
                                    static_cast<T>(unbias));
  }
}

void bn_update_running_stats_cpu(at::TensorList running_means, at::TensorList running_vars,
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
    Tensor rm = running_means[i], rv = running_vars[i], nbt = num_batches_tracked[i];
    const int64_t C = rm.numel();
    TORCH_CHECK(rm.is_contiguous() && rv.is_contiguous() && rv.numel() == C &&
                    rv.scalar_type() == rm.scalar_type(),
                "fused_resnet::", op, ": layer ", i, ": expected contiguous running_mean and "
                "running_var of one dtype and C elements");
    TORCH_CHECK(nbt.scalar_type() == at::kLong && nbt.numel() == 1, "fused_resnet::", op,
                ": layer ", i, ": expected num_batches_tracked to be a one-element int64 "
                "tensor");
    const auto acc = means[i].scalar_type();
    TORCH_CHECK(acc == at::kFloat || acc == at::kDouble, "fused_resnet::", op, ": layer ", i,
                ": expected the batch mean in float32 or float64, got ", acc);
    const bool synced = variances[i].numel() == C + 1;  // sync BN: the count at the end
    const Tensor mean = per_channel(op, means[i], "mean", C, acc);
    const Tensor var_all = variances[i].to(acc).contiguous();
    TORCH_CHECK(var_all.dim() == 1 && (synced || var_all.numel() == C), "fused_resnet::", op,
                ": layer ", i, ": expected the batch variance to have C or C + 1 elements");
    int64_t* tracked = nbt.mutable_data_ptr<int64_t>();
    *tracked += 1;
    double n = static_cast<double>(counts[i]);
    if (synced) {
      n = acc == at::kDouble ? var_all.const_data_ptr<double>()[C]
                             : static_cast<double>(var_all.const_data_ptr<float>()[C]);
    } else if (counts[i] == 0) {
      continue;  // an empty batch is only counted
    }
    const double factor = cumulative.get(i) ? 1.0 / static_cast<double>(*tracked) : momenta[i];
    const double unbias = finish::unbias_factor<double>(n);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, rm.scalar_type(), op, [&] {
      if (acc == at::kDouble) {
        update_layer<scalar_t, double>(rm, rv, mean, var_all, C, factor, unbias);
      } else {
        update_layer<scalar_t, float>(rm, rv, mean, var_all, C, factor, unbias);
      }
    });
  }
}

// weight with dim 0 outermost and dense (NCHW- or channels_last-contiguous): row o is
// one block of numel / C contiguous values.
bool rows_dense(const Tensor& w) {
  return w.dim() >= 1 && w.is_non_overlapping_and_dense() && w.size(0) > 0 &&
         w.stride(0) == w.numel() / w.size(0);
}

std::tuple<Tensor, Tensor> bn_fold_cpu(const Tensor& weight_in,
                                       const std::optional<Tensor>& gamma,
                                       const std::optional<Tensor>& beta,
                                       const Tensor& running_mean, const Tensor& running_var,
                                       double eps, std::optional<at::ScalarType> dtype) {
  constexpr const char* op = "bn_fold";
  TORCH_CHECK(weight_in.dim() >= 2 && weight_in.is_floating_point(), "fused_resnet::", op,
              ": expected a floating-point convolution weight [C_out, ...], got shape ",
              shape_str(weight_in.sizes()), " of ", weight_in.scalar_type());
  const int64_t C = weight_in.size(0);
  const auto acc = running_mean.scalar_type();
  TORCH_CHECK(at::isFloatingType(acc), "fused_resnet::", op,
              ": expected floating-point running statistics, got ", acc);
  const Tensor mean = per_channel(op, running_mean, "running_mean", C, acc);
  const Tensor var = per_channel(op, running_var, "running_var", C, acc);
  const Tensor weight = rows_dense(weight_in) ? weight_in : weight_in.contiguous();
  const auto out_type = dtype.value_or(weight.scalar_type());
  TORCH_CHECK(at::isFloatingType(out_type), "fused_resnet::", op,
              ": expected a floating-point dtype, got ", out_type);
  // per-channel math in float or double (bfloat16 / float16 statistics in float)
  const auto math = acc == at::kDouble ? at::kDouble : at::kFloat;
  auto [scale, shift] = scale_shift_of(op, mean.to(math), var.to(math), gamma, beta, eps);
  Tensor folded = at::empty_like(weight, weight.options().dtype(out_type));
  const int64_t per_row = C > 0 ? weight.numel() / C : 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, weight.scalar_type(), op, [&] {
    using W = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out_type, op, [&] {
      using O = scalar_t;
      AT_DISPATCH_FLOATING_TYPES(math, op, [&] {
        using A = scalar_t;
        const W* w = weight.const_data_ptr<W>();
        const A* sc = scale.const_data_ptr<A>();
        O* out = folded.mutable_data_ptr<O>();
        at::parallel_for(0, weight.numel(), 32768, [&](int64_t i0, int64_t i1) {
          for (int64_t i = i0; i < i1; ++i) {
            finish::fold_weight<A, W, O, A>(i, per_row, w, sc, out);
          }
        });
      });
    });
  });
  return {folded, shift.to(acc)};
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_resnet, CPU, m) {
  m.impl("bn_scale_shift", &bn_scale_shift_cpu);
  m.impl("bn_stats_affine", &bn_stats_affine_cpu);
  m.impl("bn_backward_coefficients", &bn_backward_coefficients_cpu);
  m.impl("bn_update_running_stats", &bn_update_running_stats_cpu);
  m.impl("bn_fold", &bn_fold_cpu);
}

}  // namespace cpu
}  // namespace fused_resnet
