// fused_resnet::bn_apply on CPU:
//   out = x*scale[c] + shift[c] (+ residual) (+ x2*scale2[c] + shift2[c]), ReLU if relu,
// computed in acc_t and rounded once to the dtype of x; one pass over the inputs.
#include "cpu_utils.h"

#ifndef FUSED_RESNET_KERNELS_ONLY
#include <torch/library.h>
#endif

namespace fused_resnet {
namespace cpu {
namespace FUSED_RESNET_ISA {
namespace {

template <bool RES, bool X2, bool RELU, typename T>
inline T apply_op(T x, T r, T x2, T sc, T sh, T sc2, T sh2) {
  T y = x * sc + sh;
  if constexpr (RES) y = y + r;
  if constexpr (X2) y = y + x2 * sc2 + sh2;
  if constexpr (RELU) y = y < T(0) ? T(0) : y;  // keeps NaN, like clamp_min
  return y;
}

template <bool RES, bool X2, bool RELU, typename acc_t>
inline Vectorized<acc_t> apply_vec(const Vectorized<acc_t>& x, const Vectorized<acc_t>& r,
                                   const Vectorized<acc_t>& x2, const Vectorized<acc_t>& sc,
                                   const Vectorized<acc_t>& sh, const Vectorized<acc_t>& sc2,
                                   const Vectorized<acc_t>& sh2) {
  Vectorized<acc_t> y = at::vec::fmadd(x, sc, sh);
  if constexpr (RES) y = y + r;
  if constexpr (X2) y = y + at::vec::fmadd(x2, sc2, sh2);
  if constexpr (RELU) y = relu_vec<acc_t>(y);  // keeps NaN
  return y;
}

// n contiguous values of one channel (plane form).
template <typename scalar_t, bool RES, bool X2, bool RELU>
void apply_segment(const scalar_t* x, const scalar_t* res, const scalar_t* x2, scalar_t* out,
                   int64_t n, typename VecIO<scalar_t>::acc_t sc,
                   typename VecIO<scalar_t>::acc_t sh, typename VecIO<scalar_t>::acc_t sc2,
                   typename VecIO<scalar_t>::acc_t sh2) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using aVec = typename IO::aVec;
  constexpr int kNum = IO::kNum;
  constexpr int64_t kStep = IO::kStep;
  const aVec vsc(sc), vsh(sh), vsc2(sc2), vsh2(sh2);
  aVec vx[kNum], vr[kNum], vx2[kNum], vy[kNum];
  int64_t i = 0;
  for (; i + kStep <= n; i += kStep) {
    IO::load(x + i, vx);
    if constexpr (RES) IO::load(res + i, vr);
    if constexpr (X2) IO::load(x2 + i, vx2);
    for (int j = 0; j < kNum; ++j) {
      vy[j] = apply_vec<RES, X2, RELU, acc_t>(vx[j], vr[j], vx2[j], vsc, vsh, vsc2, vsh2);
    }
    IO::store(out + i, vy);
  }
  for (; i < n; ++i) {
    const acc_t r = RES ? static_cast<acc_t>(res[i]) : acc_t(0);
    const acc_t z = X2 ? static_cast<acc_t>(x2[i]) : acc_t(0);
    out[i] = static_cast<scalar_t>(
        apply_op<RES, X2, RELU, acc_t>(static_cast<acc_t>(x[i]), r, z, sc, sh, sc2, sh2));
  }
}

// One row of C values (row form).
template <typename scalar_t, bool RES, bool X2, bool RELU>
void apply_row(const scalar_t* x, const scalar_t* res, const scalar_t* x2, scalar_t* out,
               int64_t C, const typename VecIO<scalar_t>::acc_t* sc,
               const typename VecIO<scalar_t>::acc_t* sh,
               const typename VecIO<scalar_t>::acc_t* sc2,
               const typename VecIO<scalar_t>::acc_t* sh2) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using aVec = typename IO::aVec;
  constexpr int kNum = IO::kNum;
  constexpr int64_t kStep = IO::kStep;
  constexpr int64_t W = aVec::size();
  aVec vx[kNum], vr[kNum], vx2[kNum], vy[kNum];
  const aVec zero(acc_t(0));
  int64_t c = 0;
  for (; c + kStep <= C; c += kStep) {
    IO::load(x + c, vx);
    if constexpr (RES) IO::load(res + c, vr);
    if constexpr (X2) IO::load(x2 + c, vx2);
    for (int j = 0; j < kNum; ++j) {
      const int64_t o = c + j * W;
      const aVec s2 = X2 ? aVec::loadu(sc2 + o) : zero;
      const aVec h2 = X2 ? aVec::loadu(sh2 + o) : zero;
      vy[j] = apply_vec<RES, X2, RELU, acc_t>(vx[j], vr[j], vx2[j], aVec::loadu(sc + o),
                                              aVec::loadu(sh + o), s2, h2);
    }
    IO::store(out + c, vy);
  }
  for (; c < C; ++c) {
    const acc_t r = RES ? static_cast<acc_t>(res[c]) : acc_t(0);
    const acc_t z = X2 ? static_cast<acc_t>(x2[c]) : acc_t(0);
    const acc_t s2 = X2 ? sc2[c] : acc_t(0);
    const acc_t h2 = X2 ? sh2[c] : acc_t(0);
    out[c] = static_cast<scalar_t>(
        apply_op<RES, X2, RELU, acc_t>(static_cast<acc_t>(x[c]), r, z, sc[c], sh[c], s2, h2));
  }
}

template <typename scalar_t, bool RES, bool X2, bool RELU>
void apply_kernel(const Geometry& g, const ApplyArgs& a) {
  using acc_t = acc_type_t<scalar_t>;
  const scalar_t* xp = static_cast<const scalar_t*>(a.x);
  const scalar_t* rp = static_cast<const scalar_t*>(a.residual);
  const scalar_t* x2p = static_cast<const scalar_t*>(a.x2);
  scalar_t* op = static_cast<scalar_t*>(a.out);
  const acc_t* sc = static_cast<const acc_t*>(a.scale);
  const acc_t* sh = static_cast<const acc_t*>(a.shift);
  const acc_t* sc2 = static_cast<const acc_t*>(a.scale2);
  const acc_t* sh2 = static_cast<const acc_t*>(a.shift2);
  const int64_t C = g.C;

  if (g.rows) {
    at::parallel_for(0, g.nrows(), grain_for(C), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t o = r * C;
        apply_row<scalar_t, RES, X2, RELU>(xp + o, RES ? rp + o : nullptr,
                                           X2 ? x2p + o : nullptr, op + o, C, sc, sh, sc2,
                                           sh2);
      }
    });
  } else {
    const int64_t HW = g.HW;
    at::parallel_for(0, g.numel(), kApplyGrain, [&](int64_t i0, int64_t i1) {
      int64_t i = i0;
      while (i < i1) {
        const int64_t plane = i / HW;
        const int64_t c = plane % C;
        const int64_t n = std::min(i1 - i, (plane + 1) * HW - i);
        apply_segment<scalar_t, RES, X2, RELU>(
            xp + i, RES ? rp + i : nullptr, X2 ? x2p + i : nullptr, op + i, n, sc[c], sh[c],
            X2 ? sc2[c] : acc_t(0), X2 ? sh2[c] : acc_t(0));
        i += n;
      }
    });
  }
}

template <typename scalar_t>
void apply_dispatch(const Geometry& g, const ApplyArgs& a) {
  const bool res = a.residual != nullptr, x2 = a.x2 != nullptr, relu = a.relu;
#define FR_APPLY_CASE(R, X, U) \
  if (res == R && x2 == X && relu == U) return apply_kernel<scalar_t, R, X, U>(g, a);
  FR_APPLY_CASE(false, false, false)
  FR_APPLY_CASE(false, false, true)
  FR_APPLY_CASE(false, true, false)
  FR_APPLY_CASE(false, true, true)
  FR_APPLY_CASE(true, false, false)
  FR_APPLY_CASE(true, false, true)
  FR_APPLY_CASE(true, true, false)
  FR_APPLY_CASE(true, true, true)
#undef FR_APPLY_CASE
}

}  // namespace

// Inputs in the layout of g, numel > 0.
void run_bn_apply(at::ScalarType st, const Geometry& g, const ApplyArgs& a) {
  FUSED_RESNET_DISPATCH_DTYPE(st, apply_dispatch, g, a)
}

}  // namespace FUSED_RESNET_ISA

#ifndef FUSED_RESNET_KERNELS_ONLY
namespace {

Tensor bn_apply_cpu(const Tensor& x_in, const Tensor& scale_in, const Tensor& shift_in,
                    const std::optional<Tensor>& residual, const std::optional<Tensor>& x2_opt,
                    const std::optional<Tensor>& scale2_opt,
                    const std::optional<Tensor>& shift2_opt, bool relu) {
  constexpr const char* op = "bn_apply";
  check_x(op, x_in);
  const Geometry g = geometry(x_in);
  const auto acc = acc_type_of(x_in.scalar_type());
  const Tensor scale = per_channel(op, scale_in, "scale", g.C, acc);
  const Tensor shift = per_channel(op, shift_in, "shift", g.C, acc);
  Tensor res, x2, scale2, shift2;
  if (given(residual)) {
    check_like(op, *residual, "residual", x_in);
    res = prepare(g, *residual);
  }
  if (given(x2_opt)) {
    check_like(op, *x2_opt, "x2", x_in);
    x2 = prepare(g, *x2_opt);
    scale2 = per_channel(op, required(op, scale2_opt, "scale2", "x2 is given"), "scale2", g.C, acc);
    shift2 = per_channel(op, required(op, shift2_opt, "shift2", "x2 is given"), "shift2", g.C, acc);
  } else {
    absent(op, scale2_opt, "scale2", "x2");
    absent(op, shift2_opt, "shift2", "x2");
  }
  Tensor out = empty_like_x(g, x_in);
  if (out.numel() == 0) return out;
  const Tensor x = prepare(g, x_in);
  const ApplyArgs args{x.const_data_ptr(), scale.const_data_ptr(), shift.const_data_ptr(),
                       ptr_or_null(res), ptr_or_null(x2), ptr_or_null(scale2),
                       ptr_or_null(shift2), relu, out.mutable_data_ptr()};
  FUSED_RESNET_RUN(run_bn_apply, x.scalar_type(), g, args);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_resnet, CPU, m) {
  m.impl("bn_apply", &bn_apply_cpu);
}
#endif  // FUSED_RESNET_KERNELS_ONLY

}  // namespace cpu
}  // namespace fused_resnet
