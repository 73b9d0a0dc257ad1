// CUDA kernel of the elementwise primitive bn_apply (math: csrc/ops.cpp; layout, vectors
// and argument conventions: cuda_utils.cuh).
//
// One read of each input, one write; a thread owns a 16-byte column of the matrix view and
// strides over rows (persistent grid); by-column threads keep their channels' scale/shift
// in registers, by-row threads track the channel incrementally (no division in the loop).
#include "cuda_utils.cuh"

#include <torch/library.h>

namespace fused_resnet {
namespace cuda {
namespace {

constexpr int kApplyUnroll = 2;  // rows per thread per iteration of bn_apply

// =====================================================================================
// bn_apply

template <typename T>
struct ApplyArgs {
  const T* x;
  const T* res;  // nullptr when absent
  const T* x2;   // nullptr when absent
  T* out;
  const acc_t<T>* scale;
  const acc_t<T>* shift;
  const acc_t<T>* scale2;  // nullptr when x2 is absent
  const acc_t<T>* shift2;
  int64_t R, L, C;
  int64_t cstep;  // by-row: (rows one step of the row loop advances) % C
  bool relu;
};

// Grid (column tiles, row blocks), block (tx, ty). Thread: vector column `col`, rows
// r0, r0 + rstep, ... with rstep = gridDim.y * ty, kApplyUnroll rows per iteration.
template <typename T, int V, bool BY_COL>
__global__ void __launch_bounds__(kThreads) bn_apply_kernel(const ApplyArgs<T> p) {
  using A = acc_t<T>;
  constexpr int U = kApplyUnroll;
  const int64_t Lv = p.L / V;
  const int64_t col = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (col >= Lv) return;  // no barriers below
  const int64_t rstep = int64_t(gridDim.y) * blockDim.y;
  int64_t r = int64_t(blockIdx.y) * blockDim.y + threadIdx.y;

  const T* __restrict__ xp = p.x;
  const T* __restrict__ rp = p.res;
  const T* __restrict__ x2p = p.x2;
  T* __restrict__ op = p.out;
  const bool has_res = rp != nullptr;
  const bool has_x2 = x2p != nullptr;
  const bool relu = p.relu;

  // by-column: this thread's V channels, fixed; by-row: channel of row r, tracked.
  A sc[V], sh[V], sc2[V], sh2[V];
  int64_t c = 0;
  if constexpr (BY_COL) {
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const int64_t ch = col * V + k;
      sc[k] = p.scale[ch];
      sh[k] = p.shift[ch];
      sc2[k] = has_x2 ? p.scale2[ch] : A(0);
      sh2[k] = has_x2 ? p.shift2[ch] : A(0);
    }
  } else {
    c = r % p.C;
  }

  for (; r < p.R; r += U * rstep) {
    T xv[U][V], rv[U][V], x2v[U][V];
    int64_t cu[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      cu[u] = c;
      if constexpr (!BY_COL) {
        c += p.cstep;
        if (c >= p.C) c -= p.C;
      }
      const int64_t rr = r + u * rstep;
      if (rr < p.R) {
        const int64_t base = rr * p.L + col * V;
        load_vec<T, V>(xp + base, xv[u]);
        if (has_res) load_vec<T, V>(rp + base, rv[u]);
        if (has_x2) load_vec<T, V>(x2p + base, x2v[u]);
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t rr = r + u * rstep;
      if (rr < p.R) {
        if constexpr (!BY_COL) {
          const A s = p.scale[cu[u]], h = p.shift[cu[u]];
          const A s2 = has_x2 ? p.scale2[cu[u]] : A(0);
          const A h2 = has_x2 ? p.shift2[cu[u]] : A(0);
#pragma unroll
          for (int k = 0; k < V; ++k) {
            sc[k] = s;
            sh[k] = h;
            sc2[k] = s2;
            sh2[k] = h2;
          }
        }
        T ov[V];
#pragma unroll
        for (int k = 0; k < V; ++k) {
          A y = to_acc<A>(xv[u][k]) * sc[k] + sh[k];
          if (has_res) y += to_acc<A>(rv[u][k]);
          if (has_x2) {
            y += to_acc<A>(x2v[u][k]) * sc2[k];
            y += sh2[k];
          }
          if (relu) y = (y < A(0)) ? A(0) : y;  // NaN stays NaN, like clamp_min
          ov[k] = from_acc<T, A>(y);
        }
        store_vec<T, V>(op + rr * p.L + col * V, ov);
      }
    }
  }
}

template <typename T, int V>
void launch_apply_v(ApplyArgs<T> p, const Layout& g) {
  const auto stream = at::cuda::getCurrentCUDAStream();
  const ColTiling t = col_tiling(g.L / V);
  const int threads = t.tx * t.ty;
  auto kernel = g.by_col ? bn_apply_kernel<T, V, true> : bn_apply_kernel<T, V, false>;
  const int64_t resident = int64_t(blocks_per_sm(kernel, threads, 0)) * num_sms();
  const int64_t gy = std::max<int64_t>(
      1, std::min<int64_t>({ceil_div(g.R, int64_t(t.ty) * kApplyUnroll),
                            ceil_div(resident, t.tiles), kMaxGridY}));
  p.R = g.R;
  p.L = g.L;
  p.C = g.C;
  p.cstep = (gy * t.ty) % g.C;
  kernel<<<dim3(static_cast<unsigned>(t.tiles), static_cast<unsigned>(gy)), dim3(t.tx, t.ty), 0,
           stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void launch_apply(const Layout& g, const Tensor& x, const Tensor& scale, const Tensor& shift,
                  const Tensor& res, const Tensor& x2, const Tensor& scale2,
                  const Tensor& shift2, bool relu, Tensor& out) {
  using A = acc_t<T>;
  ApplyArgs<T> p{};
  p.x = x.const_data_ptr<T>();
  p.res = res.defined() ? res.const_data_ptr<T>() : nullptr;
  p.x2 = x2.defined() ? x2.const_data_ptr<T>() : nullptr;
  p.out = out.mutable_data_ptr<T>();
  p.scale = scale.const_data_ptr<A>();
  p.shift = shift.const_data_ptr<A>();
  p.scale2 = x2.defined() ? scale2.const_data_ptr<A>() : nullptr;
  p.shift2 = x2.defined() ? shift2.const_data_ptr<A>() : nullptr;
  p.relu = relu;
  constexpr int VW = vec_width<T>();
  const bool vec = g.L % VW == 0 && aligned16(p.x) && aligned16(p.out) &&
                   (p.res == nullptr || aligned16(p.res)) && (p.x2 == nullptr || aligned16(p.x2));
  if (vec) {
    launch_apply_v<T, VW>(p, g);
  } else {
    launch_apply_v<T, 1>(p, g);
  }
}

Tensor bn_apply_cuda(const Tensor& x_in, const Tensor& scale_in, const Tensor& shift_in,
                     const std::optional<Tensor>& residual, const std::optional<Tensor>& x2_opt,
                     const std::optional<Tensor>& scale2_opt,
                     const std::optional<Tensor>& shift2_opt, bool relu) {
  constexpr const char* op = "bn_apply";
  check_x(op, x_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const Layout g = layout_of(x_in);
  const auto acc = acc_type_of(x_in.scalar_type());
  const Tensor scale = per_channel(op, scale_in, "scale", x_in, acc);
  const Tensor shift = per_channel(op, shift_in, "shift", x_in, acc);
  const bool has_res = given(residual);
  const bool has_x2 = given(x2_opt);
  Tensor res, x2, scale2, shift2;
  if (has_res) {
    check_like(op, *residual, "residual", x_in);
    res = g.prepare(*residual);
  }
  if (has_x2) {
    check_like(op, *x2_opt, "x2", x_in);
    x2 = g.prepare(*x2_opt);
    scale2 = per_channel(op, required(op, scale2_opt, "scale2", "x2 is given"), "scale2", x_in, acc);
    shift2 = per_channel(op, required(op, shift2_opt, "shift2", "x2 is given"), "shift2", x_in, acc);
  } else {
    absent(op, scale2_opt, "scale2", "x2");
    absent(op, shift2_opt, "shift2", "x2");
  }
  Tensor out = g.empty_like(x_in);
  if (out.numel() == 0) return out;
  const Tensor x = g.prepare(x_in);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(),
                                  "fused_resnet::bn_apply (CUDA)", [&] {
                                    launch_apply<scalar_t>(g, x, scale, shift, res, x2, scale2,
                                                           shift2, relu, out);
                                  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_resnet, CUDA, m) {
  m.impl("bn_apply", TORCH_FN(bn_apply_cuda));
}

}  // namespace cuda
}  // namespace fused_resnet
