// Shared helpers of the fused_resnet CUDA kernels (bn_stats.cu, bn_apply.cu;
// bn_backward.cu: bn_backward_reduce, bn_backward_apply). Math and schemas: csrc/ops.cpp.
//
// Layout. Every kernel sees x as a row-major matrix of R rows of L contiguous elements
// (the same for every same-shaped tensor, which is first brought to x's layout):
//   by-column ("row form"): channels_last x, or any x with H*W == 1 (e.g. 2-D [N, C]):
//       R = N*H*W rows of L = C channels; element (r, c) at r*C + c; channel = column.
//   by-row ("plane form"): NCHW-contiguous x: R = N*C planes of L = H*W elements;
//       element (r, j) at r*HW + j; channel = r % C.
// Any other strides are made NCHW-contiguous first. Outputs take the memory format of x
// (channels_last iff x is 4-D, channels_last and not also NCHW-contiguous: the rule of
// fused_resnet.primitives._memory_format).
//
// Vectors. A thread owns V consecutive elements of a row, loaded/stored as one 16-byte
// access (V = 16 / sizeof(T)); this needs L % V == 0 and every pointer 16-byte aligned,
// else the whole launch takes the V = 1 (scalar) instantiation. The vector never
// straddles a row, so in by-column mode its V elements are V consecutive channels and
// in by-row mode they all belong to one channel.
//
// Indexing: every element index is int64 (row * L + column); only block/thread ids and
// block-local counts are 32-bit.
//
// Argument conventions (the same as the CPU backend, csrc/cpu/cpu_utils.h): x is 2-D to
// 4-D and float64/float32/bfloat16/float16; every same-shaped tensor must have x's
// shape and dtype; per-channel vectors are 1-D of size C, any floating dtype (converted
// to acc_t); all tensors on x's CUDA device.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "../checks.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <sstream>
#include <string>

namespace fused_resnet {
namespace cuda {

using at::Tensor;

// ------------------------------------------------------------------------ types

template <typename T>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};
template <typename T>
using acc_t = typename AccType<T>::type;

constexpr int kVecBytes = 16;
template <typename T>
constexpr int vec_width() {
  return kVecBytes / static_cast<int>(sizeof(T));
}

constexpr int kThreads = 256;  // threads per block (upper bound) of every main kernel
constexpr int kMaxTx = 128;    // widest column tile of the column-owning kernels
constexpr int kWarp = 32;

// ------------------------------------------------------------------------ device helpers

__host__ __device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

// V elements of a row, one 16-byte read-only load when V > 1 (p must be 16-byte aligned).
template <typename T, int V>
__device__ __forceinline__ void load_vec(const T* p, T (&v)[V]) {
  static_assert(V == 1 || V * sizeof(T) == kVecBytes, "V must be 1 or a 16-byte vector");
  if constexpr (V == 1) {
    v[0] = p[0];
  } else {
    const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p));
    memcpy(&v[0], &raw, kVecBytes);
  }
}

template <typename T, int V>
__device__ __forceinline__ void store_vec(T* p, const T (&v)[V]) {
  static_assert(V == 1 || V * sizeof(T) == kVecBytes, "V must be 1 or a 16-byte vector");
  if constexpr (V == 1) {
    p[0] = v[0];
  } else {
    uint4 raw;
    memcpy(&raw, &v[0], kVecBytes);
    *reinterpret_cast<uint4*>(p) = raw;
  }
}

template <typename A>
__device__ __forceinline__ A to_acc(c10::BFloat16 v) {
  return static_cast<A>(static_cast<float>(v));
}
template <typename A>
__device__ __forceinline__ A to_acc(c10::Half v) {
  return static_cast<A>(static_cast<float>(v));
}
template <typename A>
__device__ __forceinline__ A to_acc(float v) {
  return static_cast<A>(v);
}
template <typename A>
__device__ __forceinline__ A to_acc(double v) {
  return static_cast<A>(v);
}

template <typename T, typename A>
__device__ __forceinline__ T from_acc(A v) {
  return static_cast<T>(v);  // c10::BFloat16 / c10::Half: round to nearest even
}

// Chan et al. merge of (nb, meanb, m2b) into (n, mean, m2); counts may be 0.
template <typename A>
__device__ __forceinline__ void welford_merge(A& n, A& mean, A& m2, A nb, A meanb, A m2b) {
  if (nb == A(0)) return;
  if (n == A(0)) {
    n = nb;
    mean = meanb;
    m2 = m2b;
    return;
  }
  const A nn = n + nb;
  const A wb = nb / nn;
  const A delta = meanb - mean;
  mean += delta * wb;
  m2 += m2b + delta * delta * (n * wb);
  n = nn;
}

__device__ __forceinline__ int pow2_ceil(int v) {
  int p = 1;
  while (p < v) p <<= 1;
  return p;
}

// Dynamic shared memory, typed per kernel by reinterpret_cast.
#define FR_DYNAMIC_SMEM(name) extern __shared__ __align__(16) unsigned char name[]

// ------------------------------------------------------------------------ host helpers

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % kVecBytes == 0; }

// The shared checks (csrc/checks.h), for CUDA kernels.
using checks::absent;
using checks::acc_type_of;
using checks::check_like;
using checks::given;
using checks::required;
using checks::shape_str;

inline void check_x(const char* op, const Tensor& x, const char* name = "x",
                    bool four_d = false) {
  checks::check_x(op, x, c10::DeviceType::CUDA, name, four_d);
}

// A per-channel vector of x.size(1) values on x's device, as a contiguous acc tensor.
inline Tensor per_channel(const char* op, const Tensor& v, const char* name, const Tensor& x,
                          at::ScalarType acc) {
  return checks::per_channel(op, v, name, x.device(), x.size(1), acc);
}

struct Layout {
  at::MemoryFormat fmt = at::MemoryFormat::Contiguous;
  bool channels_last = false;  // x is channels_last and not also NCHW-contiguous
  bool by_col = false;         // channel = column (see the top of this file)
  int64_t N = 0, C = 0, HW = 1;
  int64_t R = 0, L = 0;        // rows and row length of the matrix view

  // t in the layout the kernels read (a no-op when it already is).
  Tensor prepare(const Tensor& t) const {
    return channels_last ? t.contiguous(at::MemoryFormat::ChannelsLast) : t.contiguous();
  }
  // A fresh tensor with the shape of x, in the memory format of x.
  Tensor empty_like(const Tensor& x) const { return at::empty(x.sizes(), x.options(), fmt); }
};

inline Layout layout_of(const Tensor& x) {
  Layout g;
  g.N = x.size(0);
  g.C = x.size(1);
  g.HW = 1;
  for (int64_t d = 2; d < x.dim(); ++d) g.HW *= x.size(d);
  g.channels_last =
      x.dim() == 4 && !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
  g.fmt = g.channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  g.by_col = g.channels_last || g.HW == 1;
  if (g.by_col) {
    g.R = g.N * g.HW;
    g.L = g.C;
  } else {
    g.R = g.N * g.C;
    g.L = g.HW;
  }
  return g;
}

// Column tiling of the kernels whose threads own fixed (vector) columns: blocks of
// tx * ty <= kThreads threads, tx <= kMaxTx columns per block, `tiles` blocks across.
struct ColTiling {
  int tx = 1, ty = 1;
  int64_t tiles = 1;
};
inline ColTiling col_tiling(int64_t cols) {
  ColTiling t;
  t.tiles = ceil_div(std::max<int64_t>(cols, 1), kMaxTx);
  t.tx = static_cast<int>(ceil_div(std::max<int64_t>(cols, 1), t.tiles));
  t.ty = std::max(1, kThreads / t.tx);
  TORCH_CHECK(t.tiles <= std::numeric_limits<int32_t>::max(),
              "fused_resnet: tensor rows too long for the CUDA grid");
  return t;
}

// Row tiling of the per-channel reductions over NCHW planes: tx threads along a plane,
// ty planes at a time.
struct PlaneTiling {
  int tx = 1, ty = 1;
};
inline PlaneTiling plane_tiling(int64_t cols) {
  PlaneTiling t;
  t.tx = static_cast<int>(std::min<int64_t>(std::max<int64_t>(cols, 1), kThreads));
  t.ty = std::max(1, kThreads / t.tx);
  return t;
}

inline int num_sms() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

// Resident blocks per SM of `kernel` at this block size (at least 1).
template <typename Kernel>
inline int blocks_per_sm(Kernel kernel, int threads, size_t smem) {
  int nb = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&nb, kernel, threads, smem));
  return std::max(nb, 1);
}

constexpr int64_t kMaxGridY = 65535;

}  // namespace cuda
}  // namespace fused_resnet
