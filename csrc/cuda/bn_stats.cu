// CUDA kernels of the statistics primitive bn_stats (math: csrc/ops.cpp; layout, vectors
// and argument conventions: cuda_utils.cuh).
//
// One read of x. Each thread runs a Welford recurrence in acc_t over the elements it owns
// (V channels, or V elements of one channel, sharing one count, so one reciprocal per
// 16-byte vector), the block merges its threads (Chan) into one partial (mean, M2) per
// channel in a [S, C] workspace, and a second tiny kernel merges the S partials of each
// channel in float64 (one warp per channel) with exact counts.
//   by-column (channels_last): grid (column tiles, S row splits); threads map along C.
//   by-row (NCHW): grid (C, S plane splits); a block reduces planes of one channel.
#include "cuda_utils.cuh"
#include "cuda_ops.cuh"

#include <torch/library.h>

#include <tuple>

namespace fused_resnet {
namespace cuda {
namespace {

constexpr int kStatsUnroll = 4;  // independent 16-byte loads in flight per thread

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

TORCH_LIBRARY_IMPL(fused_resnet, CUDA, m) {
  m.impl("bn_stats", TORCH_FN(bn_stats_cuda));
}

}  // namespace cuda
}  // namespace fused_resnet
