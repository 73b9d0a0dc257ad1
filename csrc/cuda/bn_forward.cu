// CUDA kernels of the forward primitives bn_stats and bn_apply (math: csrc/ops.cpp;
// layout, vectors and argument conventions: cuda_utils.cuh).
//
// bn_stats: one read of x. Each thread runs a Welford recurrence in acc_t over the
// elements it owns (V channels, or V elements of one channel, sharing one count, so one
// reciprocal per 16-byte vector), the block merges its threads (Chan) into one partial
// (mean, M2) per channel in a [S, C] workspace, and a second tiny kernel merges the S
// partials of each channel in float64 (one warp per channel) with exact counts.
//   by-column (channels_last): grid (column tiles, S row splits); threads map along C.
//   by-row (NCHW): grid (C, S plane splits); a block reduces planes of one channel.
// bn_apply: one read of each input, one write; a thread owns a 16-byte column of the
// matrix view and strides over rows (persistent grid); by-column threads keep their
// channels' scale/shift in registers, by-row threads track the channel incrementally
// (no division in the loop).
#include "cuda_utils.cuh"
#include "cuda_ops.cuh"

#include <torch/library.h>

#include <tuple>

namespace fused_resnet {
namespace cuda {
namespace {

constexpr int kStatsUnroll = 4;  // independent 16-byte loads in flight per thread
constexpr int kApplyUnroll = 2;  // rows per thread per iteration of bn_apply

// =====================================================================================
// bn_stats

// By-column. Block (bx, s): vector columns [bx*tx, bx*tx + tx), rows
// [s*rows_per_split, min(R, (s+1)*rows_per_split)). Thread (x, y): rows y, y+ty, ...
// Partials: pmean/pm2[s*C + channel]. Dynamic smem: nthreads * (1 + 2V) acc_t.
template <typename T, int V>
__global__ void __launch_bounds__(kThreads)
    stats_bycol_kernel(const T* __restrict__ x, int64_t R, int64_t C, int64_t Lv,
                       int64_t rows_per_split, acc_t<T>* __restrict__ pmean,
                       acc_t<T>* __restrict__ pm2) {
  using A = acc_t<T>;
  constexpr int U = kStatsUnroll;
  FR_DYNAMIC_SMEM(smem_raw);
  const int nthreads = blockDim.x * blockDim.y;
  A* s_n = reinterpret_cast<A*>(smem_raw);
  A* s_mean = s_n + nthreads;
  A* s_m2 = s_mean + nthreads * V;

  const int64_t col = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const bool active = col < Lv;
  const int64_t r_begin = int64_t(blockIdx.y) * rows_per_split;
  const int64_t r_end = min64(R, r_begin + rows_per_split);
  const int64_t ystep = blockDim.y;

  A n = A(0);
  A mean[V], m2[V];
#pragma unroll
  for (int k = 0; k < V; ++k) {
    mean[k] = A(0);
    m2[k] = A(0);
  }
  if (active) {
    const T* xc = x + col * V;
    for (int64_t r = r_begin + threadIdx.y; r < r_end; r += U * ystep) {
      T v[U][V];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int64_t rr = r + u * ystep;
        if (rr < r_end) load_vec<T, V>(xc + rr * C, v[u]);
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (r + u * ystep < r_end) {
          n += A(1);
          const A inv = A(1) / n;
#pragma unroll
          for (int k = 0; k < V; ++k) {
            const A xv = to_acc<A>(v[u][k]);
            const A d = xv - mean[k];
            mean[k] += d * inv;
            m2[k] += d * (xv - mean[k]);
          }
        }
      }
    }
  }

  // Merge over threadIdx.y (tree; thread t owns slot t, reads slot t + s*tx).
  const int t = threadIdx.y * blockDim.x + threadIdx.x;
  s_n[t] = n;
#pragma unroll
  for (int k = 0; k < V; ++k) {
    s_mean[t * V + k] = mean[k];
    s_m2[t * V + k] = m2[k];
  }
  __syncthreads();
  for (int s = pow2_ceil(blockDim.y) / 2; s > 0; s >>= 1) {
    if (threadIdx.y < s && threadIdx.y + s < blockDim.y) {
      const int o = t + s * blockDim.x;
      const A nb = s_n[o];
      if (nb != A(0)) {
        if (n == A(0)) {
          n = nb;
#pragma unroll
          for (int k = 0; k < V; ++k) {
            mean[k] = s_mean[o * V + k];
            m2[k] = s_m2[o * V + k];
          }
        } else {
          const A nn = n + nb;
          const A wb = nb / nn;
          const A wab = n * wb;
#pragma unroll
          for (int k = 0; k < V; ++k) {
            const A delta = s_mean[o * V + k] - mean[k];
            mean[k] += delta * wb;
            m2[k] += s_m2[o * V + k] + delta * delta * wab;
          }
          n = nn;
        }
        s_n[t] = n;
#pragma unroll
        for (int k = 0; k < V; ++k) {
          s_mean[t * V + k] = mean[k];
          s_m2[t * V + k] = m2[k];
        }
      }
    }
    __syncthreads();
  }
  if (threadIdx.y == 0 && active) {
    const int64_t base = int64_t(blockIdx.y) * C + col * V;
#pragma unroll
    for (int k = 0; k < V; ++k) {
      pmean[base + k] = mean[k];
      pm2[base + k] = m2[k];
    }
  }
}

// By-row. Block (c, s): channel c, planes n in [s*planes_per_split, ...), each plane
// row (n*C + c) of L elements. Thread (x, y): planes y, y+ty, ...; vectors x, x+tx, ...
// Partials: pmean/pm2[s*C + c]. Dynamic smem: nthreads * 3 acc_t.
template <typename T, int V>
__global__ void __launch_bounds__(kThreads)
    stats_byrow_kernel(const T* __restrict__ x, int64_t N, int64_t C, int64_t L,
                       int64_t planes_per_split, acc_t<T>* __restrict__ pmean,
                       acc_t<T>* __restrict__ pm2) {
  using A = acc_t<T>;
  constexpr int U = kStatsUnroll;
  FR_DYNAMIC_SMEM(smem_raw);
  const int nthreads = blockDim.x * blockDim.y;
  A* s_n = reinterpret_cast<A*>(smem_raw);
  A* s_mean = s_n + nthreads;
  A* s_m2 = s_mean + nthreads;

  const int64_t c = blockIdx.x;
  const int64_t n_begin = int64_t(blockIdx.y) * planes_per_split;
  const int64_t n_end = min64(N, n_begin + planes_per_split);
  const int64_t Lv = L / V;
  const int64_t xstep = blockDim.x;

  A cnt = A(0);
  A mean[V], m2[V];
#pragma unroll
  for (int k = 0; k < V; ++k) {
    mean[k] = A(0);
    m2[k] = A(0);
  }
  for (int64_t n = n_begin + threadIdx.y; n < n_end; n += blockDim.y) {
    const T* row = x + (n * C + c) * L;
    for (int64_t j = threadIdx.x; j < Lv; j += U * xstep) {
      T v[U][V];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int64_t jj = j + u * xstep;
        if (jj < Lv) load_vec<T, V>(row + jj * V, v[u]);
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (j + u * xstep < Lv) {
          cnt += A(1);
          const A inv = A(1) / cnt;
#pragma unroll
          for (int k = 0; k < V; ++k) {
            const A xv = to_acc<A>(v[u][k]);
            const A d = xv - mean[k];
            mean[k] += d * inv;
            m2[k] += d * (xv - mean[k]);
          }
        }
      }
    }
  }
  // Fold the V lanes (cnt elements each, all channel c) into one.
  A tn = cnt, tmean = mean[0], tm2 = m2[0];
#pragma unroll
  for (int k = 1; k < V; ++k) welford_merge<A>(tn, tmean, tm2, cnt, mean[k], m2[k]);

  const int t = threadIdx.y * blockDim.x + threadIdx.x;
  s_n[t] = tn;
  s_mean[t] = tmean;
  s_m2[t] = tm2;
  __syncthreads();
  for (int s = pow2_ceil(nthreads) / 2; s > 0; s >>= 1) {
    if (t < s && t + s < nthreads) {
      welford_merge<A>(tn, tmean, tm2, s_n[t + s], s_mean[t + s], s_m2[t + s]);
      s_n[t] = tn;
      s_mean[t] = tmean;
      s_m2[t] = tm2;
    }
    __syncthreads();
  }
  if (t == 0) {
    pmean[int64_t(blockIdx.y) * C + c] = tmean;
    pm2[int64_t(blockIdx.y) * C + c] = tm2;
  }
}

// One warp per channel merges the S partials in float64. Split s holds
// (min(units, (s+1)*ups) - s*ups) * unit_elems elements of every channel.
template <typename A>
__global__ void __launch_bounds__(kThreads)
    stats_finish_kernel(const A* __restrict__ pmean, const A* __restrict__ pm2, int64_t S,
                        int64_t C, int64_t units, int64_t ups, int64_t unit_elems,
                        A* __restrict__ mean_out, A* __restrict__ var_out) {
  const int64_t c = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (c >= C) return;  // whole warps leave together (blockDim.x % 32 == 0)
  double n = 0.0, m = 0.0, m2 = 0.0;
  for (int64_t s = lane; s < S; s += kWarp) {
    const int64_t u0 = s * ups;
    const int64_t u1 = min64(units, u0 + ups);
    welford_merge<double>(n, m, m2, static_cast<double>(u1 - u0) * static_cast<double>(unit_elems),
                          static_cast<double>(pmean[s * C + c]),
                          static_cast<double>(pm2[s * C + c]));
  }
#pragma unroll
  for (int off = kWarp / 2; off > 0; off >>= 1) {
    const double nb = __shfl_down_sync(0xffffffffu, n, off);
    const double mb = __shfl_down_sync(0xffffffffu, m, off);
    const double m2b = __shfl_down_sync(0xffffffffu, m2, off);
    welford_merge<double>(n, m, m2, nb, mb, m2b);
  }
  if (lane == 0) {
    mean_out[c] = static_cast<A>(m);
    var_out[c] = static_cast<A>(m2 / n);  // n > 0: launched only for non-empty x
  }
}

template <typename T, int V>
void launch_stats_v(const Tensor& x, const Layout& g, Tensor& mean, Tensor& var) {
  using A = acc_t<T>;
  const auto stream = at::cuda::getCurrentCUDAStream();
  const int sms = num_sms();
  const T* xp = x.const_data_ptr<T>();
  const int64_t Lv = g.L / V;
  const auto acc_opts = x.options().dtype(c10::CppTypeToScalarType<A>::value);

  Tensor pmean, pm2;
  int64_t S = 0, units = 0, ups = 0, unit_elems = 0;
  if (g.by_col) {
    const ColTiling t = col_tiling(Lv);
    const int threads = t.tx * t.ty;
    const size_t smem = size_t(threads) * (1 + 2 * V) * sizeof(A);
    const int64_t resident =
        int64_t(blocks_per_sm(stats_bycol_kernel<T, V>, threads, smem)) * sms;
    const int64_t s_target = std::max<int64_t>(1, resident / t.tiles);
    units = g.R;
    unit_elems = 1;
    ups = std::max<int64_t>(ceil_div(g.R, s_target), int64_t(t.ty) * kStatsUnroll);
    ups = std::max<int64_t>(ups, ceil_div(g.R, kMaxGridY));
    S = ceil_div(g.R, ups);
    pmean = at::empty({S, g.C}, acc_opts);
    pm2 = at::empty({S, g.C}, acc_opts);
    stats_bycol_kernel<T, V><<<dim3(static_cast<unsigned>(t.tiles), static_cast<unsigned>(S)),
                               dim3(t.tx, t.ty), smem, stream>>>(
        xp, g.R, g.C, Lv, ups, pmean.mutable_data_ptr<A>(), pm2.mutable_data_ptr<A>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else {
    const PlaneTiling t = plane_tiling(Lv);
    const int threads = t.tx * t.ty;
    const size_t smem = size_t(threads) * 3 * sizeof(A);
    const int64_t resident =
        int64_t(blocks_per_sm(stats_byrow_kernel<T, V>, threads, smem)) * sms;
    const int64_t s_target = std::max<int64_t>(1, resident / g.C);
    units = g.N;
    unit_elems = g.L;
    ups = std::max<int64_t>(ceil_div(g.N, s_target), ceil_div(g.N, kMaxGridY));
    S = ceil_div(g.N, ups);
    TORCH_CHECK(g.C <= std::numeric_limits<int32_t>::max(),
                "fused_resnet::bn_stats: too many channels for the CUDA grid: ", g.C);
    pmean = at::empty({S, g.C}, acc_opts);
    pm2 = at::empty({S, g.C}, acc_opts);
    stats_byrow_kernel<T, V><<<dim3(static_cast<unsigned>(g.C), static_cast<unsigned>(S)),
                               dim3(t.tx, t.ty), smem, stream>>>(
        xp, g.N, g.C, g.L, ups, pmean.mutable_data_ptr<A>(), pm2.mutable_data_ptr<A>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  const int64_t fblocks = ceil_div(g.C * kWarp, kThreads);
  stats_finish_kernel<A><<<static_cast<unsigned>(fblocks), kThreads, 0, stream>>>(
      pmean.const_data_ptr<A>(), pm2.const_data_ptr<A>(), S, g.C, units, ups, unit_elems,
      mean.mutable_data_ptr<A>(), var.mutable_data_ptr<A>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void launch_stats(const Tensor& x, const Layout& g, Tensor& mean, Tensor& var) {
  constexpr int VW = vec_width<T>();
  if (g.L % VW == 0 && aligned16(x.const_data_ptr())) {
    launch_stats_v<T, VW>(x, g, mean, var);
  } else {
    launch_stats_v<T, 1>(x, g, mean, var);
  }
}

}  // namespace

// Declared in cuda_ops.cuh: bn_finish.cu builds on it.
std::tuple<Tensor, Tensor> bn_stats_cuda(const Tensor& x_in) {
  constexpr const char* op = "bn_stats";
  check_x(op, x_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const Layout g = layout_of(x_in);
  const auto acc = acc_type_of(x_in.scalar_type());
  Tensor mean = at::empty({g.C}, x_in.options().dtype(acc));
  Tensor var = at::empty({g.C}, x_in.options().dtype(acc));
  if (g.C == 0) return {mean, var};
  if (g.N * g.HW == 0) {  // mean of nothing: NaN, like torch.mean
    mean.fill_(std::numeric_limits<double>::quiet_NaN());
    var.fill_(std::numeric_limits<double>::quiet_NaN());
    return {mean, var};
  }
  const Tensor x = g.prepare(x_in);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(),
                                  "fused_resnet::bn_stats (CUDA)",
                                  [&] { launch_stats<scalar_t>(x, g, mean, var); });
  return {mean, var};
}

namespace {

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
  m.impl("bn_stats", TORCH_FN(bn_stats_cuda));
  m.impl("bn_apply", TORCH_FN(bn_apply_cuda));
}

}  // namespace cuda
}  // namespace fused_resnet
