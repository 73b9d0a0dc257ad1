// fused_resnet::bn_apply_option_a and fused_resnet::bn_backward_apply_option_a on CPU
// (schemas and math: csrc/option_a.cpp).
//
//   forward:  out = relu?(x*scale[c] + shift[c] + sc(shortcut)),
//             sc(s)[n, c, h, w] = s[n, c, h*stride, w*stride] for c < C_in, else 0
//   backward: grad_x = a[c]*g + b[c]*(x - mean[c]) + d[c]   (g: grad_out, ReLU-masked)
//             grad_shortcut = sc^T(g): g at the subsampled positions, zero elsewhere
//
// One pass each, at::parallel_for over rows, computed in acc_t (at::opmath_type:
// float64 for float64, float32 for float32/bfloat16/float16) and rounded once. The loops
// are plain C++ over __restrict__ pointers, written for the compiler's auto-vectoriser
// (this file depends on no other kernel file: it is its own translation unit).
//
// Layouts. NCHW-contiguous x is walked in rows of W values of one (n, c, h) ("plane
// form": the shortcut row is read with stride `stride`); channels_last x in rows of C
// values of one pixel ("row form": the subsampled shortcut pixel's C_in values are
// contiguous). The shortcut, grad_out and out are brought to the memory format of x,
// and both outputs take it (channels_last iff x is channels_last and not also
// NCHW-contiguous: the rule of primitives.memory_format). In the backward every element
// of grad_shortcut is written exactly once (no separate zero fill): the task of an
// output row writes the stride x stride block of grad_shortcut rows it subsamples.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

#include "../checks.h"

namespace fused_resnet {
namespace cpu {
namespace option_a {
namespace {

using at::Tensor;

// Elements per parallel task.
constexpr int64_t kGrainElems = 32768;

inline int64_t grain(int64_t elems_per_row) {
  return std::max<int64_t>(1, kGrainElems / std::max<int64_t>(elems_per_row, 1));
}

inline int64_t divup(int64_t a, int64_t b) { return (a + b - 1) / b; }

struct Geom {
  int64_t N = 0, C = 0, H = 0, W = 0;  // x, out, grad_x
  int64_t Cs = 0, Hs = 0, Ws = 0;      // shortcut, grad_shortcut
  int64_t s = 1;
  bool channels_last = false;
  at::MemoryFormat fmt = at::MemoryFormat::Contiguous;

  Tensor prepare(const Tensor& t) const { return t.contiguous(fmt); }
};

// The shared checks (csrc/checks.h): x 4-D on the CPU, the rest like x.
void check_x(const char* op, const Tensor& t, const char* name) {
  checks::check_x(op, t, c10::DeviceType::CPU, name, /*four_d=*/true);
}

using checks::check_like;

// A per-channel vector as a contiguous acc_t tensor of C values.
Tensor per_channel(const char* op, const Tensor& v, const char* name, const Tensor& x) {
  return checks::per_channel(op, v, name, x.device(), x.size(1),
                             checks::acc_type_of(x.scalar_type()));
}

Geom geometry(const char* op, const Tensor& x, at::IntArrayRef ss, int64_t stride) {
  TORCH_CHECK(stride >= 1, "fused_resnet::", op, ": expected stride >= 1, got ", stride);
  TORCH_CHECK(ss.size() == 4, "fused_resnet::", op, ": expected a 4-D shortcut "
              "[N, C_in, H_in, W_in], got shape ", ss);
  Geom g;
  g.N = x.size(0);
  g.C = x.size(1);
  g.H = x.size(2);
  g.W = x.size(3);
  g.Cs = ss[1];
  g.Hs = ss[2];
  g.Ws = ss[3];
  g.s = stride;
  TORCH_CHECK(ss[0] == g.N && g.Cs >= 0 && g.Cs <= g.C && g.H == divup(g.Hs, stride) &&
                  g.W == divup(g.Ws, stride),
              "fused_resnet::", op, ": the option-A shortcut of shape ", ss, " with stride ",
              stride, " does not fit x of shape ", x.sizes(), ": expected [N, C_in <= C, "
              "H_in, W_in] with ceil(H_in / stride) = H and ceil(W_in / stride) = W");
  g.channels_last = !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
  g.fmt = g.channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  return g;
}

template <bool RELU, typename acc_t>
inline acc_t act(acc_t y) {
  if constexpr (RELU) return y < acc_t(0) ? acc_t(0) : y;  // keeps NaN, like clamp_min
  return y;
}

// The ReLU mask of the backward: (out <= 0) ? 0 : g, so a NaN output passes its
// gradient (eager's threshold_backward).
template <bool OUT, typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
inline acc_t masked(const scalar_t* __restrict__ go, const scalar_t* __restrict__ out,
                    int64_t i) {
  const acc_t g = static_cast<acc_t>(go[i]);
  if constexpr (OUT) return static_cast<acc_t>(out[i]) <= acc_t(0) ? acc_t(0) : g;
  return g;
}

// ---------------------------------------------------------------------------------
// forward

template <typename scalar_t, bool RELU>
void forward_kernel(const Geom& g, const scalar_t* __restrict__ xp,
                    const scalar_t* __restrict__ sp, const at::opmath_type<scalar_t>* sc,
                    const at::opmath_type<scalar_t>* sh, scalar_t* __restrict__ op) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t N = g.N, C = g.C, H = g.H, W = g.W, Cs = g.Cs, Hs = g.Hs, Ws = g.Ws, s = g.s;
  if (g.channels_last) {  // rows of C channels of one pixel (n, h, w)
    at::parallel_for(0, N * H * W, grain(C), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t w = r % W, h = (r / W) % H, n = r / (H * W);
        const scalar_t* __restrict__ x = xp + r * C;
        const scalar_t* __restrict__ res = sp + ((n * Hs + h * s) * Ws + w * s) * Cs;
        scalar_t* __restrict__ o = op + r * C;
        for (int64_t c = 0; c < Cs; ++c) {
          const acc_t y = static_cast<acc_t>(x[c]) * sc[c] + sh[c] + static_cast<acc_t>(res[c]);
          o[c] = static_cast<scalar_t>(act<RELU>(y));
        }
        for (int64_t c = Cs; c < C; ++c) {
          o[c] = static_cast<scalar_t>(act<RELU>(static_cast<acc_t>(x[c]) * sc[c] + sh[c]));
        }
      }
    });
  } else {  // rows of W values of one (n, c, h)
    at::parallel_for(0, N * C * H, grain(W), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t h = r % H, c = (r / H) % C, n = r / (C * H);
        const scalar_t* __restrict__ x = xp + r * W;
        scalar_t* __restrict__ o = op + r * W;
        const acc_t a = sc[c], b = sh[c];
        if (c < Cs) {
          const scalar_t* __restrict__ res = sp + ((n * Cs + c) * Hs + h * s) * Ws;
          for (int64_t w = 0; w < W; ++w) {
            const acc_t y = static_cast<acc_t>(x[w]) * a + b + static_cast<acc_t>(res[w * s]);
            o[w] = static_cast<scalar_t>(act<RELU>(y));
          }
        } else {
          for (int64_t w = 0; w < W; ++w) {
            o[w] = static_cast<scalar_t>(act<RELU>(static_cast<acc_t>(x[w]) * a + b));
          }
        }
      }
    });
  }
}

Tensor bn_apply_option_a_cpu(const Tensor& x_in, const Tensor& scale_in, const Tensor& shift_in,
                             const Tensor& shortcut_in, int64_t stride, bool relu) {
  constexpr const char* op = "bn_apply_option_a";
  check_x(op, x_in, "x");
  check_x(op, shortcut_in, "shortcut");
  TORCH_CHECK(shortcut_in.scalar_type() == x_in.scalar_type(), "fused_resnet::", op,
              ": expected shortcut to have the dtype of x (", x_in.scalar_type(), "), got ",
              shortcut_in.scalar_type());
  const Geom g = geometry(op, x_in, shortcut_in.sizes(), stride);
  const Tensor scale = per_channel(op, scale_in, "scale", x_in);
  const Tensor shift = per_channel(op, shift_in, "shift", x_in);
  Tensor out = at::empty(x_in.sizes(), x_in.options(), g.fmt);
  if (out.numel() == 0) return out;
  const Tensor x = g.prepare(x_in);
  const Tensor sc = g.prepare(shortcut_in);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(),
                                  "fused_resnet::bn_apply_option_a", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto run = [&](auto kernel) {
      kernel(g, x.const_data_ptr<scalar_t>(), sc.const_data_ptr<scalar_t>(),
             scale.const_data_ptr<acc_t>(), shift.const_data_ptr<acc_t>(),
             out.mutable_data_ptr<scalar_t>());
    };
    if (relu)
      run(forward_kernel<scalar_t, true>);
    else
      run(forward_kernel<scalar_t, false>);
  });
  return out;
}

// ---------------------------------------------------------------------------------
// backward

template <typename acc_t>
struct Coefs {
  const acc_t *m, *a, *b, *d;
};

template <typename scalar_t, bool OUT>
void backward_kernel(const Geom& g, const scalar_t* __restrict__ gop,
                     const scalar_t* __restrict__ outp, const scalar_t* __restrict__ xp,
                     const Coefs<at::opmath_type<scalar_t>>& k, scalar_t* __restrict__ gxp,
                     scalar_t* __restrict__ gsp) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t N = g.N, C = g.C, H = g.H, W = g.W, Cs = g.Cs, Hs = g.Hs, Ws = g.Ws, s = g.s;
  const scalar_t zero = static_cast<scalar_t>(0);
  if (g.channels_last) {  // rows of C channels of one pixel (n, h, w)
    at::parallel_for(0, N * H * W, grain(C + s * s * Cs), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t w = r % W, h = (r / W) % H, n = r / (H * W);
        const int64_t o = r * C;
        const scalar_t* __restrict__ go = gop + o;
        const scalar_t* __restrict__ out = OUT ? outp + o : nullptr;
        const scalar_t* __restrict__ x = xp + o;
        scalar_t* __restrict__ gx = gxp + o;
        for (int64_t c = 0; c < C; ++c) {
          const acc_t gi = masked<OUT>(go, out, c);
          gx[c] = static_cast<scalar_t>(k.a[c] * gi + k.b[c] * (static_cast<acc_t>(x[c]) - k.m[c]) +
                                        k.d[c]);
        }
        if (Cs == 0) continue;
        // this pixel's stride x stride block of grad_shortcut: g at its corner, else zero
        for (int64_t hs = h * s; hs < std::min(h * s + s, Hs); ++hs) {
          for (int64_t ws = w * s; ws < std::min(w * s + s, Ws); ++ws) {
            scalar_t* __restrict__ gs = gsp + ((n * Hs + hs) * Ws + ws) * Cs;
            if (hs == h * s && ws == w * s) {
              for (int64_t c = 0; c < Cs; ++c) gs[c] = static_cast<scalar_t>(masked<OUT>(go, out, c));
            } else {
              std::fill(gs, gs + Cs, zero);
            }
          }
        }
      }
    });
  } else {  // rows of W values of one (n, c, h)
    at::parallel_for(0, N * C * H, grain(W * (1 + s)), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t h = r % H, c = (r / H) % C, n = r / (C * H);
        const int64_t o = r * W;
        const scalar_t* __restrict__ go = gop + o;
        const scalar_t* __restrict__ out = OUT ? outp + o : nullptr;
        const scalar_t* __restrict__ x = xp + o;
        scalar_t* __restrict__ gx = gxp + o;
        const acc_t m = k.m[c], a = k.a[c], b = k.b[c], d = k.d[c];
        for (int64_t w = 0; w < W; ++w) {
          const acc_t gi = masked<OUT>(go, out, w);
          gx[w] = static_cast<scalar_t>(a * gi + b * (static_cast<acc_t>(x[w]) - m) + d);
        }
        if (c >= Cs) continue;
        // rows h*s .. h*s+s-1 of grad_shortcut: g at the subsampled columns, else zero
        const int64_t hs0 = h * s, hs1 = std::min(hs0 + s, Hs);
        scalar_t* __restrict__ gs = gsp + ((n * Cs + c) * Hs + hs0) * Ws;
        if (s != 1) std::fill(gs, gs + (hs1 - hs0) * Ws, zero);
        for (int64_t w = 0; w < W; ++w) gs[w * s] = static_cast<scalar_t>(masked<OUT>(go, out, w));
      }
    });
  }
}

std::tuple<Tensor, Tensor> bn_backward_apply_option_a_cpu(
    const Tensor& grad_out_in, const std::optional<Tensor>& out_opt, const Tensor& x_in,
    const Tensor& mean_in, const Tensor& a_in, const Tensor& b_in, const Tensor& d_in,
    at::IntArrayRef shortcut_size, int64_t stride) {
  constexpr const char* op = "bn_backward_apply_option_a";
  check_x(op, x_in, "x");
  const Geom g = geometry(op, x_in, shortcut_size, stride);
  check_like(op, grad_out_in, "grad_out", x_in);
  const bool has_out = out_opt.has_value() && out_opt->defined();
  if (has_out) check_like(op, *out_opt, "out", x_in);
  const Tensor mean = per_channel(op, mean_in, "mean", x_in);
  const Tensor a = per_channel(op, a_in, "a", x_in);
  const Tensor b = per_channel(op, b_in, "b", x_in);
  const Tensor d = per_channel(op, d_in, "d", x_in);
  Tensor grad_x = at::empty(x_in.sizes(), x_in.options(), g.fmt);
  Tensor grad_s = at::empty(shortcut_size, x_in.options(), g.fmt);
  if (grad_x.numel() == 0) {
    grad_s.zero_();
    return {grad_x, grad_s};
  }
  const Tensor x = g.prepare(x_in);
  const Tensor go = g.prepare(grad_out_in);
  const Tensor out = has_out ? g.prepare(*out_opt) : Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(),
                                  "fused_resnet::bn_backward_apply_option_a", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Coefs<acc_t> k{mean.const_data_ptr<acc_t>(), a.const_data_ptr<acc_t>(),
                         b.const_data_ptr<acc_t>(), d.const_data_ptr<acc_t>()};
    auto run = [&](auto kernel) {
      kernel(g, go.const_data_ptr<scalar_t>(),
             has_out ? out.const_data_ptr<scalar_t>() : nullptr, x.const_data_ptr<scalar_t>(),
             k, grad_x.mutable_data_ptr<scalar_t>(),
             grad_s.numel() ? grad_s.mutable_data_ptr<scalar_t>() : nullptr);
    };
    if (has_out)
      run(backward_kernel<scalar_t, true>);
    else
      run(backward_kernel<scalar_t, false>);
  });
  return {grad_x, grad_s};
}

}  // namespace
}  // namespace option_a

TORCH_LIBRARY_IMPL(fused_resnet, CPU, m) {
  m.impl("bn_apply_option_a", &option_a::bn_apply_option_a_cpu);
  m.impl("bn_backward_apply_option_a", &option_a::bn_backward_apply_option_a_cpu);
}

}  // namespace cpu
}  // namespace fused_resnet
