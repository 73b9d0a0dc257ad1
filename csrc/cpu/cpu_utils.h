// Shared helpers of the fused_resnet CPU kernels (bn_stats.cpp, bn_apply.cpp,
// bn_backward.cpp).
//
// Layouts. A 4-D x is processed in one of two forms:
//   plane form: NCHW-contiguous; channel c of sample n is a block of HW contiguous
//               values at offset (n*C + c)*HW.
//   row form:   channels_last (or any x with HW == 1, e.g. a 2-D [N, C] input);
//               N*HW rows of C contiguous values, value (r, c) at offset r*C + c.
// Any other strides are made NCHW-contiguous first. Every other same-shaped input
// (residual, x2, grad_out, out) is brought to the layout of x, and outputs take the
// memory format of x (channels_last iff x is channels_last and not also
// NCHW-contiguous: the rule of primitives._memory_format and the fake kernels).
//
// Instruction sets. An extension build gets no -mavx2 and no CPU_CAPABILITY_* macro,
// so at::vec::Vectorized is its generic, array-based version, which GCC partly
// scalarises (bn_stats ~10x, bn_backward_apply ~5x slower than with AVX2). The kernels
// are therefore compiled twice: as written in the op files (namespace
// fused_resnet::cpu::DEFAULT, generic at::vec) and once more by kernels_avx2.cpp with
// `#pragma GCC target("avx2,fma,f16c")` and CPU_CAPABILITY_AVX2 (namespace
// fused_resnet::cpu::AVX2, at::vec's AVX2 Vectorized). The op entry points pick AVX2
// when the CPU has AVX2+FMA+F16C and torch's own capability (ATEN_CPU_CAPABILITY
// honoured) is AVX2 or AVX512; `ATEN_CPU_CAPABILITY=default` forces the generic path.
// Argument checks and allocation live only in the op files (KERNELS_ONLY excludes
// them from the AVX2 translation unit); kernels see raw pointers and a Geometry.
#pragma once

// The at::vec headers use `#pragma unroll`, unknown to GCC (quiet since GCC 13 with
// the pragma below; GCC 12 still prints -Wunknown-pragmas for the torch headers).
#if defined(__GNUC__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wunknown-pragmas"
#endif
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/core/ScalarType.h>
#if defined(__GNUC__)
#pragma GCC diagnostic pop
#endif

#include <algorithm>
#include <cstdint>
#include <tuple>

#ifndef FUSED_RESNET_ISA
#define FUSED_RESNET_ISA DEFAULT
#endif

// The AVX2 build of the kernels needs GCC's `#pragma GCC target` on x86-64.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && \
    !defined(FUSED_RESNET_NO_AVX2)
#define FUSED_RESNET_HAVE_AVX2 1
#else
#define FUSED_RESNET_HAVE_AVX2 0
#endif

namespace fused_resnet {
namespace cpu {

// Elements per reduction chunk: a chunk is reduced in acc_t vector lanes (twice for
// bn_stats, so it should stay in L1/L2), its result merged in double.
constexpr int64_t kChunkElems = 8192;
// Elements per parallel task of the elementwise kernels.
constexpr int64_t kApplyGrain = 32768;

inline int64_t divup(int64_t a, int64_t b) { return (a + b - 1) / b; }

struct Geometry {
  int64_t N = 0, C = 0, HW = 1;
  bool channels_last = false;  // x is channels_last (and not also NCHW-contiguous)
  bool rows = false;           // process in row form (see the top of this file)
  int64_t numel() const { return N * C * HW; }
  int64_t nrows() const { return N * HW; }
};

// Rows per row-form chunk, and the cut of a plane of HW values into nearly equal
// chunks of at most kChunkElems.
inline int64_t rows_per_chunk(int64_t C) {
  return std::max<int64_t>(1, kChunkElems / std::max<int64_t>(C, 1));
}
struct PlaneChunks {
  int64_t per_plane;  // chunks per plane
  int64_t len;        // elements per chunk (the last one of a plane may be shorter)
};
inline PlaneChunks plane_chunks(int64_t HW) {
  PlaneChunks p;
  p.per_plane = std::max<int64_t>(1, divup(HW, kChunkElems));
  p.len = std::max<int64_t>(1, divup(HW, p.per_plane));
  return p;
}
// parallel_for grain (in items) so that one task covers about kApplyGrain elements.
inline int64_t grain_for(int64_t elems_per_item) {
  return std::max<int64_t>(1, kApplyGrain / std::max<int64_t>(elems_per_item, 1));
}

// ---------------------------------------------------------------------------------
// Kernel entry points (raw pointers; per-channel vectors are contiguous acc_t; a
// null pointer is an absent optional input). Defined once per instruction set.
struct StatsArgs {
  const void* x;
  void *mean, *var;
};
struct ApplyArgs {
  const void *x, *scale, *shift, *residual, *x2, *scale2, *shift2;
  bool relu;
  void* out;
};
struct ReduceArgs {
  const void *grad_out, *out, *x, *mean, *x2, *mean2;
  void *sum_g, *sum_g_xmu, *sum_g_xmu2;
};
enum ShortcutMode { kNoShortcut = 0, kIdentity = 1, kProjection = 2 };
struct BwdApplyArgs {
  const void *grad_out, *out, *x, *x2;
  const void *mean, *a, *b, *d, *mean2, *a2, *b2, *d2;
  int mode;  // ShortcutMode
  void *grad_x, *grad_shortcut;
};

#define FUSED_RESNET_DECLARE_KERNELS(ISA)                                       \
  namespace ISA {                                                               \
  void run_bn_stats(at::ScalarType st, const Geometry& g, const StatsArgs& a);  \
  void run_bn_apply(at::ScalarType st, const Geometry& g, const ApplyArgs& a);  \
  void run_bn_backward_reduce(at::ScalarType st, const Geometry& g,             \
                              const ReduceArgs& a);                             \
  void run_bn_backward_apply(at::ScalarType st, const Geometry& g,              \
                             const BwdApplyArgs& a);                            \
  }
FUSED_RESNET_DECLARE_KERNELS(DEFAULT)
#if FUSED_RESNET_HAVE_AVX2
FUSED_RESNET_DECLARE_KERNELS(AVX2)
#endif
#undef FUSED_RESNET_DECLARE_KERNELS

// Calls ISA::fn<scalar_t>(args...) for the dtype st (float64/32, bfloat16, float16).
#define FUSED_RESNET_DISPATCH_DTYPE(st, fn, ...)                 \
  switch (st) {                                                  \
    case at::kDouble: fn<double>(__VA_ARGS__); break;            \
    case at::kFloat: fn<float>(__VA_ARGS__); break;              \
    case at::kBFloat16: fn<at::BFloat16>(__VA_ARGS__); break;    \
    case at::kHalf: fn<at::Half>(__VA_ARGS__); break;            \
    default: TORCH_CHECK(false, "fused_resnet: unsupported dtype ", st); \
  }

// ---------------------------------------------------------------------------------
// Vector helpers; instruction-set specific, so in the ISA namespace.
namespace FUSED_RESNET_ISA {

using at::vec::Vectorized;

// Load kStep scalars of scalar_t as kNum vectors of acc_t, and back.
template <typename scalar_t>
struct VecIO;

template <>
struct VecIO<double> {
  using acc_t = double;
  using aVec = Vectorized<double>;
  static constexpr int kNum = 1;
  static constexpr int64_t kStep = aVec::size();
  static inline void load(const double* p, aVec* out) { out[0] = aVec::loadu(p); }
  static inline void store(double* p, const aVec* v) { v[0].store(p); }
};

template <>
struct VecIO<float> {
  using acc_t = float;
  using aVec = Vectorized<float>;
  static constexpr int kNum = 1;
  static constexpr int64_t kStep = aVec::size();
  static inline void load(const float* p, aVec* out) { out[0] = aVec::loadu(p); }
  static inline void store(float* p, const aVec* v) { v[0].store(p); }
};

template <typename reduced_t>
struct VecIOReduced {  // bfloat16 / float16: math in float
  using acc_t = float;
  using aVec = Vectorized<float>;
  static constexpr int kNum = 2;
  static constexpr int64_t kStep = Vectorized<reduced_t>::size();
  static_assert(kStep == 2 * aVec::size(), "unexpected reduced-precision vector width");
  static inline void load(const reduced_t* p, aVec* out) {
    auto v = Vectorized<reduced_t>::loadu(p);
    std::tie(out[0], out[1]) = at::vec::convert_to_float<reduced_t>(v);
  }
  static inline void store(reduced_t* p, const aVec* v) {
    at::vec::convert_from_float<reduced_t>(v[0], v[1]).store(p);
  }
};

template <>
struct VecIO<at::BFloat16> : VecIOReduced<at::BFloat16> {};
template <>
struct VecIO<at::Half> : VecIOReduced<at::Half> {};

template <typename scalar_t>
using acc_type_t = typename VecIO<scalar_t>::acc_t;

template <typename acc_t>
inline double hsum(const Vectorized<acc_t>& v) {
  alignas(64) acc_t buf[Vectorized<acc_t>::size()];
  v.store(buf);
  double s = 0;
  for (int64_t i = 0; i < Vectorized<acc_t>::size(); ++i) s += static_cast<double>(buf[i]);
  return s;
}

// ReLU and ReLU-mask selects. at::vec's generic clamp_min / blendv / operator> go
// lane by lane through memset and branches (a branch mispredict per element on
// random signs: ~20x slower than the rest of the kernel), so without a native
// Vectorized they are written on 16-byte GCC/clang vector types (SSE2 / NEON: a
// compare and an and-not), with a plain loop for other compilers.
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
#define FUSED_RESNET_NATIVE_VEC 1
#else
#define FUSED_RESNET_NATIVE_VEC 0
#endif

#if !FUSED_RESNET_NATIVE_VEC && defined(__GNUC__)
template <typename acc_t>
struct Lanes16 {
  typedef acc_t v __attribute__((vector_size(16)));
  static constexpr int64_t k = sizeof(acc_t) * Vectorized<acc_t>::size() / 16;
  static_assert(k * 16 == sizeof(acc_t) * Vectorized<acc_t>::size(), "vector width");
};
#endif

// max(y, 0) that keeps NaN, like torch.clamp_min.
template <typename acc_t>
inline Vectorized<acc_t> relu_vec(const Vectorized<acc_t>& y) {
#if FUSED_RESNET_NATIVE_VEC
  return at::vec::clamp_min(y, Vectorized<acc_t>(acc_t(0)));
#elif defined(__GNUC__)
  using L = Lanes16<acc_t>;
  typename L::v a[L::k];
  y.store(a);
  for (int64_t j = 0; j < L::k; ++j) a[j] = a[j] < acc_t(0) ? typename L::v{} : a[j];
  return Vectorized<acc_t>::loadu(a);
#else
  constexpr int64_t n = Vectorized<acc_t>::size();
  alignas(64) acc_t a[n];
  y.store(a);
  for (int64_t i = 0; i < n; ++i) a[i] = a[i] < acc_t(0) ? acc_t(0) : a[i];
  return Vectorized<acc_t>::loadu(a);
#endif
}

// ReLU mask of the backward: (out <= 0) ? 0 : g, so a NaN output passes its gradient,
// as eager's threshold_backward does (csrc/ops.cpp).
template <typename acc_t>
inline Vectorized<acc_t> relu_mask(const Vectorized<acc_t>& g, const Vectorized<acc_t>& out) {
#if FUSED_RESNET_NATIVE_VEC
  const Vectorized<acc_t> zero(acc_t(0));
  return Vectorized<acc_t>::blendv(g, zero, out <= zero);
#elif defined(__GNUC__)
  using L = Lanes16<acc_t>;
  typename L::v a[L::k], o[L::k];
  g.store(a);
  out.store(o);
  for (int64_t j = 0; j < L::k; ++j) a[j] = o[j] <= acc_t(0) ? typename L::v{} : a[j];
  return Vectorized<acc_t>::loadu(a);
#else
  constexpr int64_t n = Vectorized<acc_t>::size();
  alignas(64) acc_t a[n];
  alignas(64) acc_t o[n];
  g.store(a);
  out.store(o);
  for (int64_t i = 0; i < n; ++i) {
    const acc_t gi = a[i];
    a[i] = o[i] <= acc_t(0) ? acc_t(0) : gi;
  }
  return Vectorized<acc_t>::loadu(a);
#endif
}

}  // namespace FUSED_RESNET_ISA
}  // namespace cpu
}  // namespace fused_resnet

// ---------------------------------------------------------------------------------
// Op-side helpers: argument checks, layout, allocation, ISA choice (not in the AVX2
// kernel translation unit).
#ifndef FUSED_RESNET_KERNELS_ONLY
#include <ATen/ATen.h>
#include <ATen/Version.h>

#include <optional>
#include <string>

#include "../checks.h"

namespace fused_resnet {
namespace cpu {

using at::Tensor;

// The shared checks (csrc/checks.h), for CPU kernels.
using checks::absent;
using checks::acc_type_of;
using checks::check_like;
using checks::given;
using checks::required;
using checks::shape_str;

inline void check_x(const char* op, const Tensor& x, const char* name = "x") {
  checks::check_x(op, x, c10::DeviceType::CPU, name);
}

// A per-channel vector of C values on the CPU, as a contiguous acc tensor.
inline Tensor per_channel(const char* op, const Tensor& v, const char* name, int64_t C,
                          at::ScalarType acc) {
  return checks::per_channel(op, v, name, c10::Device(c10::DeviceType::CPU), C, acc);
}

inline Geometry geometry(const Tensor& x) {
  Geometry g;
  g.N = x.size(0);
  g.C = x.size(1);
  g.HW = 1;
  for (int64_t d = 2; d < x.dim(); ++d) g.HW *= x.size(d);
  g.channels_last = x.dim() == 4 && !x.is_contiguous() &&
                    x.is_contiguous(at::MemoryFormat::ChannelsLast);
  g.rows = g.channels_last || g.HW == 1;
  return g;
}

// t in the layout the kernels read (a no-op when it already is).
inline Tensor prepare(const Geometry& g, const Tensor& t) {
  return g.channels_last ? t.contiguous(at::MemoryFormat::ChannelsLast) : t.contiguous();
}

// A fresh tensor with the shape, dtype and memory format of x.
inline Tensor empty_like_x(const Geometry& g, const Tensor& x) {
  return at::empty(x.sizes(), x.options(),
                   g.channels_last ? at::MemoryFormat::ChannelsLast
                                   : at::MemoryFormat::Contiguous);
}

inline const void* ptr_or_null(const Tensor& t) { return t.defined() ? t.const_data_ptr() : nullptr; }

// Whether the AVX2 kernels run: the CPU has AVX2, FMA and F16C, and torch's own CPU
// capability (which honours ATEN_CPU_CAPABILITY) is AVX2 or better.
inline bool use_avx2() {
#if FUSED_RESNET_HAVE_AVX2
  static const bool on = [] {
    if (!(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
          __builtin_cpu_supports("f16c"))) {
      return false;
    }
    const std::string cap = at::get_cpu_capability();
    return cap == "AVX2" || cap == "AVX512";
  }();
  return on;
#else
  return false;
#endif
}

#if FUSED_RESNET_HAVE_AVX2
#define FUSED_RESNET_RUN(fn, ...) \
  (::fused_resnet::cpu::use_avx2() ? AVX2::fn(__VA_ARGS__) : DEFAULT::fn(__VA_ARGS__))
#else
#define FUSED_RESNET_RUN(fn, ...) DEFAULT::fn(__VA_ARGS__)
#endif

}  // namespace cpu
}  // namespace fused_resnet
#endif  // FUSED_RESNET_KERNELS_ONLY
