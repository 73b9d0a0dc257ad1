// fused_resnet::bn_apply_option_a and fused_resnet::bn_backward_apply_option_a on CUDA
// (schemas and math: csrc/option_a.cpp; CPU twin: csrc/cpu/option_a.cpp).
//
// Both are elementwise grid-stride kernels in acc_t (at::opmath_type: float for
// fp32/bf16/fp16, double for fp64), with int64 indexing, over NCHW-contiguous or
// channels_last tensors (the shortcut, grad_out and out are brought to the memory
// format of x; outputs take it).
//   forward:  one thread per element of out; channels c < C_in add the subsampled
//             shortcut value.
//   backward: one launch over max(numel(x), numel(grad_shortcut)) indices: index i
//             writes grad_x[i] (i < numel(x)) and grad_shortcut[i] (i < its numel):
//             the masked g of the output pixel it subsamples, or zero off the stride
//             grid, so grad_shortcut needs no separate zero fill.
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>

#include "../checks.h"

namespace fused_resnet {
namespace cuda {
namespace {

using at::Tensor;

constexpr int kThreads = 256;

struct Dims {
  int64_t N, C, H, W;     // x
  int64_t Cs, Hs, Ws, s;  // shortcut
};

// (n, c, h, w) of linear index i of a tensor [N, C, H, W] in its memory order.
template <bool CL>
__device__ __forceinline__ void unravel(int64_t i, int64_t C, int64_t H, int64_t W,
                                        int64_t& n, int64_t& c, int64_t& h, int64_t& w) {
  if constexpr (CL) {
    c = i % C;
    i /= C;
    w = i % W;
    i /= W;
    h = i % H;
    n = i / H;
  } else {
    w = i % W;
    i /= W;
    h = i % H;
    i /= H;
    c = i % C;
    n = i / C;
  }
}

template <bool CL>
__device__ __forceinline__ int64_t offset(int64_t n, int64_t c, int64_t h, int64_t w,
                                          int64_t C, int64_t H, int64_t W) {
  return CL ? ((n * H + h) * W + w) * C + c : ((n * C + c) * H + h) * W + w;
}

template <typename scalar_t, typename acc_t, bool CL, bool RELU>
__global__ void option_a_forward_kernel(const scalar_t* __restrict__ x,
                                        const scalar_t* __restrict__ sc_in,
                                        const acc_t* __restrict__ scale,
                                        const acc_t* __restrict__ shift,
                                        scalar_t* __restrict__ out, Dims d, int64_t numel) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < numel;
       i += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    int64_t n, c, h, w;
    unravel<CL>(i, d.C, d.H, d.W, n, c, h, w);
    acc_t y = static_cast<acc_t>(x[i]) * scale[c] + shift[c];
    if (c < d.Cs) {
      y += static_cast<acc_t>(sc_in[offset<CL>(n, c, h * d.s, w * d.s, d.Cs, d.Hs, d.Ws)]);
    }
    if (RELU) y = y < acc_t(0) ? acc_t(0) : y;  // keeps NaN, like clamp_min
    out[i] = static_cast<scalar_t>(y);
  }
}

template <typename acc_t, bool OUT, typename scalar_t>
__device__ __forceinline__ acc_t masked(const scalar_t* go, const scalar_t* out, int64_t i) {
  const acc_t g = static_cast<acc_t>(go[i]);
  if (OUT) return static_cast<acc_t>(out[i]) <= acc_t(0) ? acc_t(0) : g;
  return g;
}

template <typename scalar_t, typename acc_t, bool CL, bool OUT>
__global__ void option_a_backward_kernel(
    const scalar_t* __restrict__ go, const scalar_t* __restrict__ out,
    const scalar_t* __restrict__ x, const acc_t* __restrict__ mean,
    const acc_t* __restrict__ a, const acc_t* __restrict__ b, const acc_t* __restrict__ dd,
    scalar_t* __restrict__ grad_x, scalar_t* __restrict__ grad_s, Dims d, int64_t numel_x,
    int64_t numel_s) {
  const int64_t total = numel_x > numel_s ? numel_x : numel_s;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    if (i < numel_x) {
      const int64_t c = CL ? i % d.C : (i / (d.H * d.W)) % d.C;
      const acc_t g = masked<acc_t, OUT>(go, out, i);
      grad_x[i] = static_cast<scalar_t>(a[c] * g + b[c] * (static_cast<acc_t>(x[i]) - mean[c]) +
                                        dd[c]);
    }
    if (i < numel_s) {
      int64_t n, c, hs, ws;
      unravel<CL>(i, d.Cs, d.Hs, d.Ws, n, c, hs, ws);
      acc_t g = acc_t(0);
      if (hs % d.s == 0 && ws % d.s == 0) {
        g = masked<acc_t, OUT>(go, out, offset<CL>(n, c, hs / d.s, ws / d.s, d.C, d.H, d.W));
      }
      grad_s[i] = static_cast<scalar_t>(g);
    }
  }
}

int64_t blocks_for(int64_t numel) {
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  return std::max<int64_t>(1, std::min<int64_t>((numel + kThreads - 1) / kThreads, sms * 32));
}

Dims check_dims(const char* op, const Tensor& x, at::IntArrayRef ss, int64_t stride) {
  checks::check_x(op, x, c10::DeviceType::CUDA, "x", /*four_d=*/true);
  TORCH_CHECK(stride >= 1, "fused_resnet::", op, ": expected stride >= 1, got ", stride);
  TORCH_CHECK(ss.size() == 4, "fused_resnet::", op, ": expected a 4-D shortcut "
              "[N, C_in, H_in, W_in], got shape ", ss);
  Dims d{x.size(0), x.size(1), x.size(2), x.size(3), ss[1], ss[2], ss[3], stride};
  TORCH_CHECK(ss[0] == d.N && d.Cs <= d.C && d.H == (d.Hs + stride - 1) / stride &&
                  d.W == (d.Ws + stride - 1) / stride,
              "fused_resnet::", op, ": the option-A shortcut of shape ", ss, " with stride ",
              stride, " does not fit x of shape ", x.sizes(), ": expected [N, C_in <= C, "
              "H_in, W_in] with ceil(H_in / stride) = H and ceil(W_in / stride) = W");
  return d;
}

// Another tensor of the op: x's device and dtype (and shape, when same_shape).
void check_same(const char* op, const Tensor& t, const char* name, const Tensor& x,
                bool same_shape) {
  checks::check_device(op, t, name, x.device());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), "fused_resnet::", op, ": expected ", name,
              " to have the dtype of x (", x.scalar_type(), "), got ", t.scalar_type());
  TORCH_CHECK(!same_shape || t.sizes().equals(x.sizes()), "fused_resnet::", op,
              ": expected ", name, " to have the shape of x ", x.sizes(), ", got ", t.sizes());
}

Tensor vec(const char* op, const Tensor& v, const char* name, const Tensor& x) {
  return checks::per_channel(op, v, name, x.device(), x.size(1),
                             checks::acc_type_of(x.scalar_type()));
}

bool is_channels_last(const Tensor& x) {
  return !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
}

Tensor bn_apply_option_a_cuda(const Tensor& x_in, const Tensor& scale_in,
                              const Tensor& shift_in, const Tensor& shortcut_in,
                              int64_t stride, bool relu) {
  constexpr const char* op = "bn_apply_option_a";
  Dims d = check_dims(op, x_in, shortcut_in.sizes(), stride);
  check_same(op, shortcut_in, "shortcut", x_in, false);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const Tensor scale = vec(op, scale_in, "scale", x_in);
  const Tensor shift = vec(op, shift_in, "shift", x_in);
  const bool cl = is_channels_last(x_in);
  const auto fmt = cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  Tensor out = at::empty(x_in.sizes(), x_in.options(), fmt);
  const int64_t numel = out.numel();
  if (numel == 0) return out;
  const Tensor x = x_in.contiguous(fmt);
  const Tensor sc = shortcut_in.contiguous(fmt);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(),
                                  "fused_resnet::bn_apply_option_a", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto launch = [&](auto kernel) {
      kernel<<<blocks_for(numel), kThreads, 0, stream>>>(
          x.const_data_ptr<scalar_t>(), sc.const_data_ptr<scalar_t>(),
          scale.const_data_ptr<acc_t>(), shift.const_data_ptr<acc_t>(),
          out.mutable_data_ptr<scalar_t>(), d, numel);
    };
    if (cl && relu) launch(option_a_forward_kernel<scalar_t, acc_t, true, true>);
    else if (cl) launch(option_a_forward_kernel<scalar_t, acc_t, true, false>);
    else if (relu) launch(option_a_forward_kernel<scalar_t, acc_t, false, true>);
    else launch(option_a_forward_kernel<scalar_t, acc_t, false, false>);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<Tensor, Tensor> bn_backward_apply_option_a_cuda(
    const Tensor& grad_out_in, const std::optional<Tensor>& out_opt, const Tensor& x_in,
    const Tensor& mean_in, const Tensor& a_in, const Tensor& b_in, const Tensor& d_in,
    at::IntArrayRef shortcut_size, int64_t stride) {
  constexpr const char* op = "bn_backward_apply_option_a";
  Dims d = check_dims(op, x_in, shortcut_size, stride);
  check_same(op, grad_out_in, "grad_out", x_in, true);
  const bool has_out = out_opt.has_value() && out_opt->defined();
  if (has_out) check_same(op, *out_opt, "out", x_in, true);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const Tensor mean = vec(op, mean_in, "mean", x_in);
  const Tensor a = vec(op, a_in, "a", x_in);
  const Tensor b = vec(op, b_in, "b", x_in);
  const Tensor dd = vec(op, d_in, "d", x_in);
  const bool cl = is_channels_last(x_in);
  const auto fmt = cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  Tensor grad_x = at::empty(x_in.sizes(), x_in.options(), fmt);
  Tensor grad_s = at::empty(shortcut_size, x_in.options(), fmt);
  const int64_t numel_x = grad_x.numel(), numel_s = grad_s.numel();
  if (numel_x == 0) {
    grad_s.zero_();
    return {grad_x, grad_s};
  }
  const Tensor x = x_in.contiguous(fmt);
  const Tensor go = grad_out_in.contiguous(fmt);
  const Tensor out = has_out ? out_opt->contiguous(fmt) : Tensor();
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(),
                                  "fused_resnet::bn_backward_apply_option_a", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto launch = [&](auto kernel) {
      kernel<<<blocks_for(std::max(numel_x, numel_s)), kThreads, 0, stream>>>(
          go.const_data_ptr<scalar_t>(), has_out ? out.const_data_ptr<scalar_t>() : nullptr,
          x.const_data_ptr<scalar_t>(), mean.const_data_ptr<acc_t>(),
          a.const_data_ptr<acc_t>(), b.const_data_ptr<acc_t>(), dd.const_data_ptr<acc_t>(),
          grad_x.mutable_data_ptr<scalar_t>(),
          numel_s ? grad_s.mutable_data_ptr<scalar_t>() : nullptr, d, numel_x, numel_s);
    };
    if (cl && has_out) launch(option_a_backward_kernel<scalar_t, acc_t, true, true>);
    else if (cl) launch(option_a_backward_kernel<scalar_t, acc_t, true, false>);
    else if (has_out) launch(option_a_backward_kernel<scalar_t, acc_t, false, true>);
    else launch(option_a_backward_kernel<scalar_t, acc_t, false, false>);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_x, grad_s};
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_resnet, CUDA, m) {
  m.impl("bn_apply_option_a", &bn_apply_option_a_cuda);
  m.impl("bn_backward_apply_option_a", &bn_backward_apply_option_a_cuda);
}

}  // namespace cuda
}  // namespace fused_resnet
