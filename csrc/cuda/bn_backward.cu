// CUDA kernels of the backward primitives bn_backward_reduce and bn_backward_apply
// (math: csrc/ops.cpp; layout, vectors and argument conventions: cuda_utils.cuh).
//
// bn_backward_reduce: one read of grad_out, out (ReLU mask, optional), x and x2
// (optional). Per-thread acc_t sums of g, g*(x - mean[c]), g*(x2 - mean2[c]); the block
// sums its threads into a [S, C] workspace of partials; a tiny second kernel sums the S
// partials per channel in float64 (one warp per channel). Deterministic (fixed order).
//   by-column (channels_last): grid (column tiles, S row splits); threads map along C.
//   by-row (NCHW): grid (C, S plane splits); a block reduces planes of one channel.
// bn_backward_apply: one read of each input, one write of grad_x (and grad_shortcut);
// same persistent row-striding grid as bn_apply (bn_apply.cu).
#include "cuda_utils.cuh"
#include "cuda_ops.cuh"

#include <torch/library.h>

#include <tuple>

namespace fused_resnet {
namespace cuda {
namespace {

constexpr int kReduceUnroll = 2;  // rows (vectors) per thread per iteration
constexpr int kBwdApplyUnroll = 2;

template <typename A>
__device__ __forceinline__ A relu_masked(A g, A o) {
  return (o <= A(0)) ? A(0) : g;  // NaN out passes g, as eager threshold_backward does
}

// =====================================================================================
// bn_backward_reduce

template <typename T>
struct ReduceArgs {
  const T* go;
  const T* out;  // nullptr: no ReLU mask
  const T* x;
  const T* x2;   // nullptr when absent
  const acc_t<T>* mean;
  const acc_t<T>* mean2;  // nullptr when x2 is absent
  acc_t<T>* p_g;          // partials [S, C]
  acc_t<T>* p_gx;
  acc_t<T>* p_gx2;        // nullptr when x2 is absent
  int64_t N, C, R, L;
  int64_t units_per_split;  // rows (by-column) or planes (by-row) per split
};

// By-column. Block (bx, s): vector columns [bx*tx, bx*tx + tx), rows
// [s*ups, min(R, (s+1)*ups)). Dynamic smem: nthreads * 3V acc_t.
template <typename T, int V>
__global__ void __launch_bounds__(kThreads) reduce_bycol_kernel(const ReduceArgs<T> p) {
  using A = acc_t<T>;
  constexpr int U = kReduceUnroll;
  FR_DYNAMIC_SMEM(smem_raw);
  const int nthreads = blockDim.x * blockDim.y;
  A* s_g = reinterpret_cast<A*>(smem_raw);
  A* s_gx = s_g + nthreads * V;
  A* s_gx2 = s_gx + nthreads * V;

  const T* __restrict__ gop = p.go;
  const T* __restrict__ outp = p.out;
  const T* __restrict__ xp = p.x;
  const T* __restrict__ x2p = p.x2;
  const bool has_out = outp != nullptr;
  const bool has_x2 = x2p != nullptr;

  const int64_t C = p.C;  // == L in by-column mode
  const int64_t Lv = p.L / V;
  const int64_t col = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const bool active = col < Lv;
  const int64_t r_begin = int64_t(blockIdx.y) * p.units_per_split;
  const int64_t r_end = min64(p.R, r_begin + p.units_per_split);
  const int64_t ystep = blockDim.y;

  A sg[V], sgx[V], sgx2[V];
#pragma unroll
  for (int k = 0; k < V; ++k) {
    sg[k] = A(0);
    sgx[k] = A(0);
    sgx2[k] = A(0);
  }
  if (active) {
    A mu[V], mu2[V];
#pragma unroll
    for (int k = 0; k < V; ++k) {
      mu[k] = p.mean[col * V + k];
      mu2[k] = has_x2 ? p.mean2[col * V + k] : A(0);
    }
    for (int64_t r = r_begin + threadIdx.y; r < r_end; r += U * ystep) {
      T gv[U][V], ov[U][V], xv[U][V], x2v[U][V];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int64_t rr = r + u * ystep;
        if (rr < r_end) {
          const int64_t base = rr * p.L + col * V;
          load_vec<T, V>(gop + base, gv[u]);
          if (has_out) load_vec<T, V>(outp + base, ov[u]);
          load_vec<T, V>(xp + base, xv[u]);
          if (has_x2) load_vec<T, V>(x2p + base, x2v[u]);
        }
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (r + u * ystep < r_end) {
#pragma unroll
          for (int k = 0; k < V; ++k) {
            A g = to_acc<A>(gv[u][k]);
            if (has_out) g = relu_masked<A>(g, to_acc<A>(ov[u][k]));
            sg[k] += g;
            sgx[k] += g * (to_acc<A>(xv[u][k]) - mu[k]);
            if (has_x2) sgx2[k] += g * (to_acc<A>(x2v[u][k]) - mu2[k]);
          }
        }
      }
    }
  }

  // Sum over threadIdx.y (tree; thread t owns slot t, reads slot t + s*tx).
  const int t = threadIdx.y * blockDim.x + threadIdx.x;
#pragma unroll
  for (int k = 0; k < V; ++k) {
    s_g[t * V + k] = sg[k];
    s_gx[t * V + k] = sgx[k];
    s_gx2[t * V + k] = sgx2[k];
  }
  __syncthreads();
  for (int s = pow2_ceil(blockDim.y) / 2; s > 0; s >>= 1) {
    if (threadIdx.y < s && threadIdx.y + s < blockDim.y) {
      const int o = t + s * blockDim.x;
#pragma unroll
      for (int k = 0; k < V; ++k) {
        sg[k] += s_g[o * V + k];
        sgx[k] += s_gx[o * V + k];
        sgx2[k] += s_gx2[o * V + k];
        s_g[t * V + k] = sg[k];
        s_gx[t * V + k] = sgx[k];
        s_gx2[t * V + k] = sgx2[k];
      }
    }
    __syncthreads();
  }
  if (threadIdx.y == 0 && active) {
    const int64_t base = int64_t(blockIdx.y) * C + col * V;
#pragma unroll
    for (int k = 0; k < V; ++k) {
      p.p_g[base + k] = sg[k];
      p.p_gx[base + k] = sgx[k];
      if (has_x2) p.p_gx2[base + k] = sgx2[k];
    }
  }
}

// By-row. Block (c, s): channel c, planes n in [s*ups, min(N, (s+1)*ups)), plane row
// (n*C + c) of L elements. Dynamic smem: nthreads * 3 acc_t.
template <typename T, int V>
__global__ void __launch_bounds__(kThreads) reduce_byrow_kernel(const ReduceArgs<T> p) {
  using A = acc_t<T>;
  constexpr int U = kReduceUnroll;
  FR_DYNAMIC_SMEM(smem_raw);
  const int nthreads = blockDim.x * blockDim.y;
  A* s_g = reinterpret_cast<A*>(smem_raw);
  A* s_gx = s_g + nthreads;
  A* s_gx2 = s_gx + nthreads;

  const T* __restrict__ gop = p.go;
  const T* __restrict__ outp = p.out;
  const T* __restrict__ xp = p.x;
  const T* __restrict__ x2p = p.x2;
  const bool has_out = outp != nullptr;
  const bool has_x2 = x2p != nullptr;

  const int64_t C = p.C;
  const int64_t c = blockIdx.x;
  const int64_t n_begin = int64_t(blockIdx.y) * p.units_per_split;
  const int64_t n_end = min64(p.N, n_begin + p.units_per_split);
  const int64_t Lv = p.L / V;
  const int64_t xstep = blockDim.x;
  const A mu = p.mean[c];
  const A mu2 = has_x2 ? p.mean2[c] : A(0);

  A sg = A(0), sgx = A(0), sgx2 = A(0);
  for (int64_t n = n_begin + threadIdx.y; n < n_end; n += blockDim.y) {
    const int64_t row = (n * C + c) * p.L;
    for (int64_t j = threadIdx.x; j < Lv; j += U * xstep) {
      T gv[U][V], ov[U][V], xv[U][V], x2v[U][V];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int64_t jj = j + u * xstep;
        if (jj < Lv) {
          const int64_t base = row + jj * V;
          load_vec<T, V>(gop + base, gv[u]);
          if (has_out) load_vec<T, V>(outp + base, ov[u]);
          load_vec<T, V>(xp + base, xv[u]);
          if (has_x2) load_vec<T, V>(x2p + base, x2v[u]);
        }
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (j + u * xstep < Lv) {
#pragma unroll
          for (int k = 0; k < V; ++k) {
            A g = to_acc<A>(gv[u][k]);
            if (has_out) g = relu_masked<A>(g, to_acc<A>(ov[u][k]));
            sg += g;
            sgx += g * (to_acc<A>(xv[u][k]) - mu);
            if (has_x2) sgx2 += g * (to_acc<A>(x2v[u][k]) - mu2);
          }
        }
      }
    }
  }

  const int t = threadIdx.y * blockDim.x + threadIdx.x;
  s_g[t] = sg;
  s_gx[t] = sgx;
  s_gx2[t] = sgx2;
  __syncthreads();
  for (int s = pow2_ceil(nthreads) / 2; s > 0; s >>= 1) {
    if (t < s && t + s < nthreads) {
      sg += s_g[t + s];
      sgx += s_gx[t + s];
      sgx2 += s_gx2[t + s];
      s_g[t] = sg;
      s_gx[t] = sgx;
      s_gx2[t] = sgx2;
    }
    __syncthreads();
  }
  if (t == 0) {
    const int64_t i = int64_t(blockIdx.y) * C + c;
    p.p_g[i] = sg;
    p.p_gx[i] = sgx;
    if (has_x2) p.p_gx2[i] = sgx2;
  }
}

// One warp per channel sums the S partials in float64. p2/o2 may be nullptr.
template <typename A>
__global__ void __launch_bounds__(kThreads)
    sum_finish_kernel(const A* __restrict__ p0, const A* __restrict__ p1,
                      const A* __restrict__ p2, int64_t S, int64_t C, A* __restrict__ o0,
                      A* __restrict__ o1, A* __restrict__ o2) {
  const int64_t c = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (c >= C) return;  // whole warps leave together (blockDim.x % 32 == 0)
  const bool has2 = p2 != nullptr;
  double s0 = 0.0, s1 = 0.0, s2 = 0.0;
  for (int64_t s = lane; s < S; s += kWarp) {
    s0 += static_cast<double>(p0[s * C + c]);
    s1 += static_cast<double>(p1[s * C + c]);
    if (has2) s2 += static_cast<double>(p2[s * C + c]);
  }
#pragma unroll
  for (int off = kWarp / 2; off > 0; off >>= 1) {
    s0 += __shfl_down_sync(0xffffffffu, s0, off);
    s1 += __shfl_down_sync(0xffffffffu, s1, off);
    s2 += __shfl_down_sync(0xffffffffu, s2, off);
  }
  if (lane == 0) {
    o0[c] = static_cast<A>(s0);
    o1[c] = static_cast<A>(s1);
    if (has2) o2[c] = static_cast<A>(s2);
  }
}

template <typename T, int V>
void launch_reduce_v(ReduceArgs<T> p, const Layout& g, const at::TensorOptions& acc_opts,
                     Tensor& sum_g, Tensor& sum_gx, Tensor& sum_gx2) {
  using A = acc_t<T>;
  const auto stream = at::cuda::getCurrentCUDAStream();
  const int sms = num_sms();
  const int64_t Lv = g.L / V;
  const bool has_x2 = p.x2 != nullptr;
  p.N = g.N;
  p.C = g.C;
  p.R = g.R;
  p.L = g.L;

  dim3 grid, block;
  size_t smem = 0;
  int64_t S = 0;
  if (g.by_col) {
    const ColTiling t = col_tiling(Lv);
    const int threads = t.tx * t.ty;
    smem = size_t(threads) * 3 * V * sizeof(A);
    const int64_t resident =
        int64_t(blocks_per_sm(reduce_bycol_kernel<T, V>, threads, smem)) * sms;
    const int64_t s_target = std::max<int64_t>(1, resident / t.tiles);
    int64_t ups = std::max<int64_t>(ceil_div(g.R, s_target), int64_t(t.ty) * kReduceUnroll);
    ups = std::max<int64_t>(ups, ceil_div(g.R, kMaxGridY));
    S = ceil_div(g.R, ups);
    p.units_per_split = ups;
    grid = dim3(static_cast<unsigned>(t.tiles), static_cast<unsigned>(S));
    block = dim3(t.tx, t.ty);
  } else {
    const PlaneTiling t = plane_tiling(Lv);
    const int threads = t.tx * t.ty;
    smem = size_t(threads) * 3 * sizeof(A);
    const int64_t resident =
        int64_t(blocks_per_sm(reduce_byrow_kernel<T, V>, threads, smem)) * sms;
    const int64_t s_target = std::max<int64_t>(1, resident / g.C);
    const int64_t ups = std::max<int64_t>(ceil_div(g.N, s_target), ceil_div(g.N, kMaxGridY));
    S = ceil_div(g.N, ups);
    p.units_per_split = ups;
    TORCH_CHECK(g.C <= std::numeric_limits<int32_t>::max(),
                "fused_resnet::bn_backward_reduce: too many channels for the CUDA grid: ", g.C);
    grid = dim3(static_cast<unsigned>(g.C), static_cast<unsigned>(S));
    block = dim3(t.tx, t.ty);
  }
  Tensor pg = at::empty({S, g.C}, acc_opts);
  Tensor pgx = at::empty({S, g.C}, acc_opts);
  Tensor pgx2 = has_x2 ? at::empty({S, g.C}, acc_opts) : Tensor();
  p.p_g = pg.mutable_data_ptr<A>();
  p.p_gx = pgx.mutable_data_ptr<A>();
  p.p_gx2 = has_x2 ? pgx2.mutable_data_ptr<A>() : nullptr;
  if (g.by_col) {
    reduce_bycol_kernel<T, V><<<grid, block, smem, stream>>>(p);
  } else {
    reduce_byrow_kernel<T, V><<<grid, block, smem, stream>>>(p);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const int64_t fblocks = ceil_div(g.C * kWarp, kThreads);
  sum_finish_kernel<A><<<static_cast<unsigned>(fblocks), kThreads, 0, stream>>>(
      p.p_g, p.p_gx, p.p_gx2, S, g.C, sum_g.mutable_data_ptr<A>(), sum_gx.mutable_data_ptr<A>(),
      has_x2 ? sum_gx2.mutable_data_ptr<A>() : nullptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void launch_reduce(const Layout& g, const Tensor& go, const Tensor& out, const Tensor& x,
                   const Tensor& mean, const Tensor& x2, const Tensor& mean2, Tensor& sum_g,
                   Tensor& sum_gx, Tensor& sum_gx2) {
  using A = acc_t<T>;
  ReduceArgs<T> p{};
  p.go = go.const_data_ptr<T>();
  p.out = out.defined() ? out.const_data_ptr<T>() : nullptr;
  p.x = x.const_data_ptr<T>();
  p.x2 = x2.defined() ? x2.const_data_ptr<T>() : nullptr;
  p.mean = mean.const_data_ptr<A>();
  p.mean2 = x2.defined() ? mean2.const_data_ptr<A>() : nullptr;
  const auto acc_opts = x.options().dtype(c10::CppTypeToScalarType<A>::value);
  constexpr int VW = vec_width<T>();
  const bool vec = g.L % VW == 0 && aligned16(p.go) && aligned16(p.x) &&
                   (p.out == nullptr || aligned16(p.out)) && (p.x2 == nullptr || aligned16(p.x2));
  if (vec) {
    launch_reduce_v<T, VW>(p, g, acc_opts, sum_g, sum_gx, sum_gx2);
  } else {
    launch_reduce_v<T, 1>(p, g, acc_opts, sum_g, sum_gx, sum_gx2);
  }
}

}  // namespace

// Declared in cuda_ops.cuh: bn_finish.cu builds on it.
std::tuple<Tensor, Tensor, Tensor> bn_backward_reduce_cuda(
    const Tensor& grad_out_in, const std::optional<Tensor>& out_opt, const Tensor& x_in,
    const Tensor& mean_in, const std::optional<Tensor>& x2_opt,
    const std::optional<Tensor>& mean2_opt) {
  constexpr const char* op = "bn_backward_reduce";
  check_x(op, x_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const Layout g = layout_of(x_in);
  const auto acc = acc_type_of(x_in.scalar_type());
  check_like(op, grad_out_in, "grad_out", x_in);
  const Tensor mean = per_channel(op, mean_in, "mean", x_in, acc);
  const bool has_out = given(out_opt);
  const bool has_x2 = given(x2_opt);
  if (has_out) check_like(op, *out_opt, "out", x_in);
  Tensor mean2;
  if (has_x2) {
    check_like(op, *x2_opt, "x2", x_in);
    mean2 = per_channel(op, required(op, mean2_opt, "mean2", "x2 is given"), "mean2", x_in, acc);
  } else {
    absent(op, mean2_opt, "mean2", "x2");
  }
  const auto acc_opts = x_in.options().dtype(acc);
  Tensor sum_g = at::empty({g.C}, acc_opts);
  Tensor sum_gx = at::empty({g.C}, acc_opts);
  Tensor sum_gx2 = at::empty({has_x2 ? g.C : 0}, acc_opts);
  if (g.C == 0) return {sum_g, sum_gx, sum_gx2};
  if (g.N * g.HW == 0) {  // sums over nothing
    sum_g.zero_();
    sum_gx.zero_();
    sum_gx2.zero_();
    return {sum_g, sum_gx, sum_gx2};
  }
  const Tensor x = g.prepare(x_in);
  const Tensor go = g.prepare(grad_out_in);
  const Tensor out = has_out ? g.prepare(*out_opt) : Tensor();
  const Tensor x2 = has_x2 ? g.prepare(*x2_opt) : Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(),
                                  "fused_resnet::bn_backward_reduce (CUDA)", [&] {
                                    launch_reduce<scalar_t>(g, go, out, x, mean, x2, mean2, sum_g,
                                                            sum_gx, sum_gx2);
                                  });
  return {sum_g, sum_gx, sum_gx2};
}

namespace {

// =====================================================================================
// bn_backward_apply

template <typename T>
struct BwdApplyArgs {
  const T* go;
  const T* out;  // nullptr: no ReLU mask
  const T* x;
  const T* x2;   // nullptr unless gs_mode == 2
  T* gx;
  T* gs;         // nullptr when gs_mode == 0
  const acc_t<T>* mean;
  const acc_t<T>* a;
  const acc_t<T>* b;
  const acc_t<T>* d;
  const acc_t<T>* mean2;  // gs_mode == 2 only
  const acc_t<T>* a2;
  const acc_t<T>* b2;
  const acc_t<T>* d2;
  int64_t R, L, C;
  int64_t cstep;  // by-row: (rows one step of the row loop advances) % C
  int gs_mode;    // 0: no grad_shortcut, 1: grad_shortcut = g, 2: from x2
};

// Same grid as bn_apply_kernel (bn_apply.cu).
template <typename T, int V, bool BY_COL>
__global__ void __launch_bounds__(kThreads) bn_backward_apply_kernel(const BwdApplyArgs<T> p) {
  using A = acc_t<T>;
  constexpr int U = kBwdApplyUnroll;
  const int64_t Lv = p.L / V;
  const int64_t col = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (col >= Lv) return;  // no barriers below
  const int64_t rstep = int64_t(gridDim.y) * blockDim.y;
  int64_t r = int64_t(blockIdx.y) * blockDim.y + threadIdx.y;

  const T* __restrict__ gop = p.go;
  const T* __restrict__ outp = p.out;
  const T* __restrict__ xp = p.x;
  const T* __restrict__ x2p = p.x2;
  T* __restrict__ gxp = p.gx;
  T* __restrict__ gsp = p.gs;
  const bool has_out = outp != nullptr;
  const int mode = p.gs_mode;

  // Per-channel coefficients: fixed (by-column) or reloaded per row (by-row).
  A mu[V], ca[V], cb[V], cd[V], mu2[V], ca2[V], cb2[V], cd2[V];
  int64_t c = 0;
  if constexpr (BY_COL) {
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const int64_t ch = col * V + k;
      mu[k] = p.mean[ch];
      ca[k] = p.a[ch];
      cb[k] = p.b[ch];
      cd[k] = p.d[ch];
      mu2[k] = mode == 2 ? p.mean2[ch] : A(0);
      ca2[k] = mode == 2 ? p.a2[ch] : A(0);
      cb2[k] = mode == 2 ? p.b2[ch] : A(0);
      cd2[k] = mode == 2 ? p.d2[ch] : A(0);
    }
  } else {
    c = r % p.C;
  }

  for (; r < p.R; r += U * rstep) {
    T gv[U][V], ov[U][V], xv[U][V], x2v[U][V];
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
        load_vec<T, V>(gop + base, gv[u]);
        if (has_out) load_vec<T, V>(outp + base, ov[u]);
        load_vec<T, V>(xp + base, xv[u]);
        if (mode == 2) load_vec<T, V>(x2p + base, x2v[u]);
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t rr = r + u * rstep;
      if (rr < p.R) {
        if constexpr (!BY_COL) {
          const int64_t ch = cu[u];
          const A m_ = p.mean[ch], a_ = p.a[ch], b_ = p.b[ch], d_ = p.d[ch];
          const A m2_ = mode == 2 ? p.mean2[ch] : A(0);
          const A a2_ = mode == 2 ? p.a2[ch] : A(0);
          const A b2_ = mode == 2 ? p.b2[ch] : A(0);
          const A d2_ = mode == 2 ? p.d2[ch] : A(0);
#pragma unroll
          for (int k = 0; k < V; ++k) {
            mu[k] = m_;
            ca[k] = a_;
            cb[k] = b_;
            cd[k] = d_;
            mu2[k] = m2_;
            ca2[k] = a2_;
            cb2[k] = b2_;
            cd2[k] = d2_;
          }
        }
        const int64_t base = rr * p.L + col * V;
        T gxv[V], gsv[V];
#pragma unroll
        for (int k = 0; k < V; ++k) {
          A g = to_acc<A>(gv[u][k]);
          if (has_out) g = relu_masked<A>(g, to_acc<A>(ov[u][k]));
          const A gx = ca[k] * g + cb[k] * (to_acc<A>(xv[u][k]) - mu[k]) + cd[k];
          gxv[k] = from_acc<T, A>(gx);
          if (mode == 2) {
            const A gs = ca2[k] * g + cb2[k] * (to_acc<A>(x2v[u][k]) - mu2[k]) + cd2[k];
            gsv[k] = from_acc<T, A>(gs);
          } else {
            gsv[k] = from_acc<T, A>(g);
          }
        }
        store_vec<T, V>(gxp + base, gxv);
        if (mode != 0) store_vec<T, V>(gsp + base, gsv);
      }
    }
  }
}

template <typename T, int V>
void launch_bwd_apply_v(BwdApplyArgs<T> p, const Layout& g) {
  const auto stream = at::cuda::getCurrentCUDAStream();
  const ColTiling t = col_tiling(g.L / V);
  const int threads = t.tx * t.ty;
  auto kernel =
      g.by_col ? bn_backward_apply_kernel<T, V, true> : bn_backward_apply_kernel<T, V, false>;
  const int64_t resident = int64_t(blocks_per_sm(kernel, threads, 0)) * num_sms();
  const int64_t gy = std::max<int64_t>(
      1, std::min<int64_t>({ceil_div(g.R, int64_t(t.ty) * kBwdApplyUnroll),
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
void launch_bwd_apply(const Layout& g, const Tensor& go, const Tensor& out, const Tensor& x,
                      const Tensor& mean, const Tensor& a, const Tensor& b, const Tensor& d,
                      const Tensor& x2, const Tensor& mean2, const Tensor& a2, const Tensor& b2,
                      const Tensor& d2, int gs_mode, Tensor& grad_x, Tensor& grad_s) {
  using A = acc_t<T>;
  BwdApplyArgs<T> p{};
  p.go = go.const_data_ptr<T>();
  p.out = out.defined() ? out.const_data_ptr<T>() : nullptr;
  p.x = x.const_data_ptr<T>();
  p.x2 = gs_mode == 2 ? x2.const_data_ptr<T>() : nullptr;
  p.gx = grad_x.mutable_data_ptr<T>();
  p.gs = gs_mode != 0 ? grad_s.mutable_data_ptr<T>() : nullptr;
  p.mean = mean.const_data_ptr<A>();
  p.a = a.const_data_ptr<A>();
  p.b = b.const_data_ptr<A>();
  p.d = d.const_data_ptr<A>();
  if (gs_mode == 2) {
    p.mean2 = mean2.const_data_ptr<A>();
    p.a2 = a2.const_data_ptr<A>();
    p.b2 = b2.const_data_ptr<A>();
    p.d2 = d2.const_data_ptr<A>();
  }
  p.gs_mode = gs_mode;
  constexpr int VW = vec_width<T>();
  const bool vec = g.L % VW == 0 && aligned16(p.go) && aligned16(p.x) && aligned16(p.gx) &&
                   (p.out == nullptr || aligned16(p.out)) &&
                   (p.x2 == nullptr || aligned16(p.x2)) && (p.gs == nullptr || aligned16(p.gs));
  if (vec) {
    launch_bwd_apply_v<T, VW>(p, g);
  } else {
    launch_bwd_apply_v<T, 1>(p, g);
  }
}

std::tuple<Tensor, Tensor> bn_backward_apply_cuda(
    const Tensor& grad_out_in, const std::optional<Tensor>& out_opt, const Tensor& x_in,
    const Tensor& mean_in, const Tensor& a_in, const Tensor& b_in, const Tensor& d_in,
    const std::optional<Tensor>& x2_opt, const std::optional<Tensor>& mean2_opt,
    const std::optional<Tensor>& a2_opt, const std::optional<Tensor>& b2_opt,
    const std::optional<Tensor>& d2_opt, bool grad_residual) {
  constexpr const char* op = "bn_backward_apply";
  check_x(op, x_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const Layout g = layout_of(x_in);
  const auto acc = acc_type_of(x_in.scalar_type());
  check_like(op, grad_out_in, "grad_out", x_in);
  const Tensor mean = per_channel(op, mean_in, "mean", x_in, acc);
  const Tensor a = per_channel(op, a_in, "a", x_in, acc);
  const Tensor b = per_channel(op, b_in, "b", x_in, acc);
  const Tensor d = per_channel(op, d_in, "d", x_in, acc);
  const bool has_out = given(out_opt);
  const bool has_x2 = given(x2_opt);
  if (has_out) check_like(op, *out_opt, "out", x_in);
  Tensor mean2, a2, b2, d2;
  if (has_x2) {
    check_like(op, *x2_opt, "x2", x_in);
    mean2 = per_channel(op, required(op, mean2_opt, "mean2", "x2 is given"), "mean2", x_in, acc);
    a2 = per_channel(op, required(op, a2_opt, "a2", "x2 is given"), "a2", x_in, acc);
    b2 = per_channel(op, required(op, b2_opt, "b2", "x2 is given"), "b2", x_in, acc);
    d2 = per_channel(op, required(op, d2_opt, "d2", "x2 is given"), "d2", x_in, acc);
  } else {
    absent(op, mean2_opt, "mean2", "x2");
    absent(op, a2_opt, "a2", "x2");
    absent(op, b2_opt, "b2", "x2");
    absent(op, d2_opt, "d2", "x2");
  }
  const int gs_mode = has_x2 ? 2 : (grad_residual ? 1 : 0);
  Tensor grad_x = g.empty_like(x_in);
  Tensor grad_s = gs_mode != 0 ? g.empty_like(x_in) : at::empty({0}, x_in.options());
  if (grad_x.numel() == 0) return {grad_x, grad_s};
  const Tensor x = g.prepare(x_in);
  const Tensor go = g.prepare(grad_out_in);
  const Tensor out = has_out ? g.prepare(*out_opt) : Tensor();
  const Tensor x2 = has_x2 ? g.prepare(*x2_opt) : Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(),
                                  "fused_resnet::bn_backward_apply (CUDA)", [&] {
                                    launch_bwd_apply<scalar_t>(g, go, out, x, mean, a, b, d, x2,
                                                               mean2, a2, b2, d2, gs_mode, grad_x,
                                                               grad_s);
                                  });
  return {grad_x, grad_s};
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_resnet, CUDA, m) {
  m.impl("bn_backward_reduce", TORCH_FN(bn_backward_reduce_cuda));
  m.impl("bn_backward_apply", TORCH_FN(bn_backward_apply_cuda));
}

}  // namespace cuda
}  // namespace fused_resnet
