// fused_resnet::bn_backward_reduce and fused_resnet::bn_backward_apply on CPU.
//
//   g = (out <= 0) ? 0 : grad_out when out is given (the ReLU mask; a NaN output
//       passes its gradient, like eager's threshold_backward), else grad_out
//   reduce: sum_g[c] = sum g, sum_g_xmu[c] = sum g*(x - mean[c]), sum_g_xmu2 for x2
//   apply:  grad_x = a[c]*g + b[c]*(x - mean[c]) + d[c];
//           grad_shortcut = a2[c]*g + b2[c]*(x2 - mean2[c]) + d2[c] (x2 given), g
//           (grad_residual), else an empty tensor.
//
// The reduction uses the chunking of bn_stats: acc_t vector lanes within a chunk of
// at most kChunkElems values, chunk sums in double, summed per channel in a fixed
// order (independent of the number of threads), rounded to acc_t at the end.
#include "cpu_utils.h"

#include <vector>

#ifndef FUSED_RESNET_KERNELS_ONLY
#include <torch/library.h>

#include "cpu_ops.h"
#endif

namespace fused_resnet {
namespace cpu {
namespace FUSED_RESNET_ISA {
namespace {

// ---------------------------------------------------------------------------------
// bn_backward_reduce

struct Sums3 {
  double g = 0, gx = 0, gx2 = 0;
};

template <typename scalar_t, bool OUT, bool X2>
Sums3 plane_chunk_sums(const scalar_t* go, const scalar_t* out, const scalar_t* x,
                       const scalar_t* x2, int64_t n, typename VecIO<scalar_t>::acc_t m,
                       typename VecIO<scalar_t>::acc_t m2) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using aVec = typename IO::aVec;
  constexpr int kNum = IO::kNum;
  constexpr int64_t kStep = IO::kStep;
  const aVec vm(m), vm2(m2), zero(acc_t(0));
  aVec sg[kNum], sgx[kNum], sgx2[kNum], vg[kNum], vo[kNum], vx[kNum], vx2[kNum];
  for (int j = 0; j < kNum; ++j) sg[j] = sgx[j] = sgx2[j] = zero;
  int64_t i = 0;
  for (; i + kStep <= n; i += kStep) {
    IO::load(go + i, vg);
    if constexpr (OUT) IO::load(out + i, vo);
    IO::load(x + i, vx);
    if constexpr (X2) IO::load(x2 + i, vx2);
    for (int j = 0; j < kNum; ++j) {
      aVec gj = vg[j];
      if constexpr (OUT) gj = relu_mask<acc_t>(gj, vo[j]);
      sg[j] = sg[j] + gj;
      sgx[j] = at::vec::fmadd(gj, vx[j] - vm, sgx[j]);
      if constexpr (X2) sgx2[j] = at::vec::fmadd(gj, vx2[j] - vm2, sgx2[j]);
    }
  }
  Sums3 s;
  for (int j = 0; j < kNum; ++j) {
    s.g += hsum<acc_t>(sg[j]);
    s.gx += hsum<acc_t>(sgx[j]);
    if constexpr (X2) s.gx2 += hsum<acc_t>(sgx2[j]);
  }
  for (; i < n; ++i) {
    acc_t gi = static_cast<acc_t>(go[i]);
    if constexpr (OUT) gi = static_cast<acc_t>(out[i]) <= acc_t(0) ? acc_t(0) : gi;
    s.g += static_cast<double>(gi);
    s.gx += static_cast<double>(gi * (static_cast<acc_t>(x[i]) - m));
    if constexpr (X2) s.gx2 += static_cast<double>(gi * (static_cast<acc_t>(x2[i]) - m2));
  }
  return s;
}

// R rows of C values; writes the chunk's sums, 3 doubles per channel, to res.
// buf: 3*C acc_t of scratch.
template <typename scalar_t, bool OUT, bool X2>
void row_chunk_sums(const scalar_t* go, const scalar_t* out, const scalar_t* x,
                    const scalar_t* x2, int64_t R, int64_t C,
                    const typename VecIO<scalar_t>::acc_t* mean,
                    const typename VecIO<scalar_t>::acc_t* mean2,
                    typename VecIO<scalar_t>::acc_t* buf, double* res) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using aVec = typename IO::aVec;
  constexpr int kNum = IO::kNum;
  constexpr int64_t kStep = IO::kStep;
  constexpr int64_t W = aVec::size();
  acc_t* sg = buf;
  acc_t* sgx = buf + C;
  acc_t* sgx2 = buf + 2 * C;
  std::fill(buf, buf + 3 * C, acc_t(0));
  aVec vg[kNum], vo[kNum], vx[kNum], vx2[kNum];
  for (int64_t r = 0; r < R; ++r) {
    const int64_t base = r * C;
    int64_t c = 0;
    for (; c + kStep <= C; c += kStep) {
      IO::load(go + base + c, vg);
      if constexpr (OUT) IO::load(out + base + c, vo);
      IO::load(x + base + c, vx);
      if constexpr (X2) IO::load(x2 + base + c, vx2);
      for (int j = 0; j < kNum; ++j) {
        const int64_t o = c + j * W;
        aVec gj = vg[j];
        if constexpr (OUT) gj = relu_mask<acc_t>(gj, vo[j]);
        (aVec::loadu(sg + o) + gj).store(sg + o);
        at::vec::fmadd(gj, vx[j] - aVec::loadu(mean + o), aVec::loadu(sgx + o)).store(sgx + o);
        if constexpr (X2) {
          at::vec::fmadd(gj, vx2[j] - aVec::loadu(mean2 + o), aVec::loadu(sgx2 + o))
              .store(sgx2 + o);
        }
      }
    }
    for (; c < C; ++c) {
      acc_t gi = static_cast<acc_t>(go[base + c]);
      if constexpr (OUT) gi = static_cast<acc_t>(out[base + c]) <= acc_t(0) ? acc_t(0) : gi;
      sg[c] += gi;
      sgx[c] += gi * (static_cast<acc_t>(x[base + c]) - mean[c]);
      if constexpr (X2) sgx2[c] += gi * (static_cast<acc_t>(x2[base + c]) - mean2[c]);
    }
  }
  for (int64_t c = 0; c < C; ++c) {
    res[3 * c + 0] = static_cast<double>(sg[c]);
    res[3 * c + 1] = static_cast<double>(sgx[c]);
    res[3 * c + 2] = X2 ? static_cast<double>(sgx2[c]) : 0.0;
  }
}

template <typename scalar_t, bool OUT, bool X2>
void reduce_kernel(const Geometry& g, const ReduceArgs& args) {
  using acc_t = acc_type_t<scalar_t>;
  const scalar_t* gp = static_cast<const scalar_t*>(args.grad_out);
  const scalar_t* op = static_cast<const scalar_t*>(args.out);
  const scalar_t* xp = static_cast<const scalar_t*>(args.x);
  const scalar_t* x2p = static_cast<const scalar_t*>(args.x2);
  const acc_t* mp = static_cast<const acc_t*>(args.mean);
  const acc_t* m2p = static_cast<const acc_t*>(args.mean2);
  acc_t* s1 = static_cast<acc_t*>(args.sum_g);
  acc_t* s2 = static_cast<acc_t*>(args.sum_g_xmu);
  acc_t* s3 = static_cast<acc_t*>(args.sum_g_xmu2);
  const int64_t C = g.C;

  auto finish = [&](int64_t c, double a, double b, double d) {
    s1[c] = static_cast<acc_t>(a);
    s2[c] = static_cast<acc_t>(b);
    if constexpr (X2) s3[c] = static_cast<acc_t>(d);
  };

  if (g.rows) {
    const int64_t rows = g.nrows();
    const int64_t R = rows_per_chunk(C);
    const int64_t nchunks = divup(rows, R);
    std::vector<double> res(static_cast<size_t>(nchunks * C * 3));
    at::parallel_for(0, nchunks, grain_for(R * C), [&](int64_t b0, int64_t b1) {
      std::vector<acc_t> buf(static_cast<size_t>(3 * C));
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t o = b * R * C;
        const int64_t nr = std::min(R, rows - b * R);
        row_chunk_sums<scalar_t, OUT, X2>(gp + o, OUT ? op + o : nullptr, xp + o,
                                          X2 ? x2p + o : nullptr, nr, C, mp, m2p, buf.data(),
                                          res.data() + b * C * 3);
      }
    });
    at::parallel_for(0, C, 64, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        double a = 0, b = 0, d = 0;
        for (int64_t k = 0; k < nchunks; ++k) {
          const double* r = res.data() + (k * C + c) * 3;
          a += r[0];
          b += r[1];
          d += r[2];
        }
        finish(c, a, b, d);
      }
    });
  } else {
    const int64_t HW = g.HW;
    const PlaneChunks pc = plane_chunks(HW);
    const int64_t nchunks = g.N * C * pc.per_plane;
    std::vector<Sums3> res(static_cast<size_t>(nchunks));
    at::parallel_for(0, nchunks, grain_for(pc.len), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t plane = b / pc.per_plane;
        const int64_t c = plane % C;
        const int64_t off = (b % pc.per_plane) * pc.len;
        const int64_t o = plane * HW + off;
        res[b] = plane_chunk_sums<scalar_t, OUT, X2>(
            gp + o, OUT ? op + o : nullptr, xp + o, X2 ? x2p + o : nullptr,
            std::min(pc.len, HW - off), mp[c], X2 ? m2p[c] : acc_t(0));
      }
    });
    at::parallel_for(0, C, 16, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        double a = 0, b = 0, d = 0;
        for (int64_t n = 0; n < g.N; ++n) {
          for (int64_t k = 0; k < pc.per_plane; ++k) {
            const Sums3& r = res[(n * C + c) * pc.per_plane + k];
            a += r.g;
            b += r.gx;
            d += r.gx2;
          }
        }
        finish(c, a, b, d);
      }
    });
  }
}

template <typename scalar_t>
void reduce_dispatch(const Geometry& g, const ReduceArgs& a) {
  const bool out = a.out != nullptr, x2 = a.x2 != nullptr;
  if (out && x2) return reduce_kernel<scalar_t, true, true>(g, a);
  if (out) return reduce_kernel<scalar_t, true, false>(g, a);
  if (x2) return reduce_kernel<scalar_t, false, true>(g, a);
  return reduce_kernel<scalar_t, false, false>(g, a);
}

// ---------------------------------------------------------------------------------
// bn_backward_apply

template <typename acc_t>
struct Coefs {  // one channel's coefficients (scalars or vectors)
  acc_t m, a, b, d, m2, a2, b2, d2;
};

template <int S, typename T>
inline void bwd_op(const T& g, const T& x, const T& x2, const Coefs<T>& k, T& gx, T& gs) {
  gx = k.a * g + k.b * (x - k.m) + k.d;
  if constexpr (S == kProjection) gs = k.a2 * g + k.b2 * (x2 - k.m2) + k.d2;
  if constexpr (S == kIdentity) gs = g;
}

template <int S, typename acc_t>
inline void bwd_vec(const Vectorized<acc_t>& g, const Vectorized<acc_t>& x,
                    const Vectorized<acc_t>& x2, const Coefs<Vectorized<acc_t>>& k,
                    Vectorized<acc_t>& gx, Vectorized<acc_t>& gs) {
  gx = at::vec::fmadd(k.a, g, k.b * (x - k.m)) + k.d;
  if constexpr (S == kProjection) gs = at::vec::fmadd(k.a2, g, k.b2 * (x2 - k.m2)) + k.d2;
  if constexpr (S == kIdentity) gs = g;
}

template <typename scalar_t, bool OUT, int S>
void bwd_segment(const scalar_t* go, const scalar_t* out, const scalar_t* x, const scalar_t* x2,
                 scalar_t* gx, scalar_t* gs, int64_t n,
                 const Coefs<typename VecIO<scalar_t>::acc_t>& k) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using aVec = typename IO::aVec;
  constexpr int kNum = IO::kNum;
  constexpr int64_t kStep = IO::kStep;
  const Coefs<aVec> kv{aVec(k.m), aVec(k.a), aVec(k.b), aVec(k.d),
                       aVec(k.m2), aVec(k.a2), aVec(k.b2), aVec(k.d2)};
  aVec vg[kNum], vo[kNum], vx[kNum], vx2[kNum], rx[kNum], rs[kNum];
  int64_t i = 0;
  for (; i + kStep <= n; i += kStep) {
    IO::load(go + i, vg);
    if constexpr (OUT) IO::load(out + i, vo);
    IO::load(x + i, vx);
    if constexpr (S == kProjection) IO::load(x2 + i, vx2);
    for (int j = 0; j < kNum; ++j) {
      aVec gj = vg[j];
      if constexpr (OUT) gj = relu_mask<acc_t>(gj, vo[j]);
      bwd_vec<S, acc_t>(gj, vx[j], vx2[j], kv, rx[j], rs[j]);
    }
    IO::store(gx + i, rx);
    if constexpr (S != kNoShortcut) IO::store(gs + i, rs);
  }
  for (; i < n; ++i) {
    acc_t gi = static_cast<acc_t>(go[i]);
    if constexpr (OUT) gi = static_cast<acc_t>(out[i]) <= acc_t(0) ? acc_t(0) : gi;
    const acc_t z = S == kProjection ? static_cast<acc_t>(x2[i]) : acc_t(0);
    acc_t a, b = 0;
    bwd_op<S, acc_t>(gi, static_cast<acc_t>(x[i]), z, k, a, b);
    gx[i] = static_cast<scalar_t>(a);
    if constexpr (S != kNoShortcut) gs[i] = static_cast<scalar_t>(b);
  }
}

template <typename acc_t>
struct CoefPtrs {
  const acc_t *m, *a, *b, *d, *m2, *a2, *b2, *d2;
  Coefs<acc_t> at(int64_t c, bool proj) const {
    Coefs<acc_t> k{m[c], a[c], b[c], d[c], 0, 0, 0, 0};
    if (proj) {
      k.m2 = m2[c];
      k.a2 = a2[c];
      k.b2 = b2[c];
      k.d2 = d2[c];
    }
    return k;
  }
  Coefs<Vectorized<acc_t>> vec_at(int64_t o, bool proj) const {
    using V = Vectorized<acc_t>;
    const V z(acc_t(0));
    return {V::loadu(m + o), V::loadu(a + o), V::loadu(b + o), V::loadu(d + o),
            proj ? V::loadu(m2 + o) : z, proj ? V::loadu(a2 + o) : z,
            proj ? V::loadu(b2 + o) : z, proj ? V::loadu(d2 + o) : z};
  }
};

template <typename scalar_t, bool OUT, int S>
void bwd_row(const scalar_t* go, const scalar_t* out, const scalar_t* x, const scalar_t* x2,
             scalar_t* gx, scalar_t* gs, int64_t C,
             const CoefPtrs<typename VecIO<scalar_t>::acc_t>& kp) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using aVec = typename IO::aVec;
  constexpr int kNum = IO::kNum;
  constexpr int64_t kStep = IO::kStep;
  constexpr int64_t W = aVec::size();
  constexpr bool proj = S == kProjection;
  aVec vg[kNum], vo[kNum], vx[kNum], vx2[kNum], rx[kNum], rs[kNum];
  int64_t c = 0;
  for (; c + kStep <= C; c += kStep) {
    IO::load(go + c, vg);
    if constexpr (OUT) IO::load(out + c, vo);
    IO::load(x + c, vx);
    if constexpr (proj) IO::load(x2 + c, vx2);
    for (int j = 0; j < kNum; ++j) {
      aVec gj = vg[j];
      if constexpr (OUT) gj = relu_mask<acc_t>(gj, vo[j]);
      bwd_vec<S, acc_t>(gj, vx[j], vx2[j], kp.vec_at(c + j * W, proj), rx[j], rs[j]);
    }
    IO::store(gx + c, rx);
    if constexpr (S != kNoShortcut) IO::store(gs + c, rs);
  }
  for (; c < C; ++c) {
    acc_t gi = static_cast<acc_t>(go[c]);
    if constexpr (OUT) gi = static_cast<acc_t>(out[c]) <= acc_t(0) ? acc_t(0) : gi;
    const acc_t z = proj ? static_cast<acc_t>(x2[c]) : acc_t(0);
    acc_t a, b = 0;
    bwd_op<S, acc_t>(gi, static_cast<acc_t>(x[c]), z, kp.at(c, proj), a, b);
    gx[c] = static_cast<scalar_t>(a);
    if constexpr (S != kNoShortcut) gs[c] = static_cast<scalar_t>(b);
  }
}

template <typename scalar_t, bool OUT, int S>
void bwd_apply_kernel(const Geometry& g, const BwdApplyArgs& args) {
  using acc_t = acc_type_t<scalar_t>;
  const scalar_t* gp = static_cast<const scalar_t*>(args.grad_out);
  const scalar_t* op = static_cast<const scalar_t*>(args.out);
  const scalar_t* xp = static_cast<const scalar_t*>(args.x);
  const scalar_t* x2p = static_cast<const scalar_t*>(args.x2);
  scalar_t* gxp = static_cast<scalar_t*>(args.grad_x);
  scalar_t* gsp = static_cast<scalar_t*>(args.grad_shortcut);
  auto v = [](const void* p) { return static_cast<const acc_t*>(p); };
  const CoefPtrs<acc_t> kp{v(args.mean), v(args.a),  v(args.b),  v(args.d),
                           v(args.mean2), v(args.a2), v(args.b2), v(args.d2)};
  const int64_t C = g.C;
  constexpr bool proj = S == kProjection;

  if (g.rows) {
    at::parallel_for(0, g.nrows(), grain_for(C), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t o = r * C;
        bwd_row<scalar_t, OUT, S>(gp + o, OUT ? op + o : nullptr, xp + o,
                                  proj ? x2p + o : nullptr, gxp + o,
                                  S != kNoShortcut ? gsp + o : nullptr, C, kp);
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
        bwd_segment<scalar_t, OUT, S>(gp + i, OUT ? op + i : nullptr, xp + i,
                                      proj ? x2p + i : nullptr, gxp + i,
                                      S != kNoShortcut ? gsp + i : nullptr, n, kp.at(c, proj));
        i += n;
      }
    });
  }
}

template <typename scalar_t>
void bwd_apply_dispatch(const Geometry& g, const BwdApplyArgs& a) {
  const bool out = a.out != nullptr;
#define FR_BWD_CASE(O, M) \
  if (out == O && a.mode == M) return bwd_apply_kernel<scalar_t, O, M>(g, a);
  FR_BWD_CASE(false, kNoShortcut)
  FR_BWD_CASE(false, kIdentity)
  FR_BWD_CASE(false, kProjection)
  FR_BWD_CASE(true, kNoShortcut)
  FR_BWD_CASE(true, kIdentity)
  FR_BWD_CASE(true, kProjection)
#undef FR_BWD_CASE
}

}  // namespace

// Inputs in the layout of g; N*HW > 0 and C > 0 (reduce), numel > 0 (apply).
void run_bn_backward_reduce(at::ScalarType st, const Geometry& g, const ReduceArgs& a) {
  FUSED_RESNET_DISPATCH_DTYPE(st, reduce_dispatch, g, a)
}

void run_bn_backward_apply(at::ScalarType st, const Geometry& g, const BwdApplyArgs& a) {
  FUSED_RESNET_DISPATCH_DTYPE(st, bwd_apply_dispatch, g, a)
}

}  // namespace FUSED_RESNET_ISA

#ifndef FUSED_RESNET_KERNELS_ONLY
std::tuple<Tensor, Tensor, Tensor> bn_backward_reduce_cpu(
    const Tensor& grad_out_in, const std::optional<Tensor>& out_opt, const Tensor& x_in,
    const Tensor& mean_in, const std::optional<Tensor>& x2_opt,
    const std::optional<Tensor>& mean2_opt) {
  constexpr const char* op = "bn_backward_reduce";
  check_x(op, x_in);
  const Geometry g = geometry(x_in);
  const auto acc = acc_type_of(x_in.scalar_type());
  check_like(op, grad_out_in, "grad_out", x_in);
  const Tensor mean = per_channel(op, mean_in, "mean", g.C, acc);
  const bool has_x2 = given(x2_opt);
  Tensor out, x2, mean2;
  if (given(out_opt)) {
    check_like(op, *out_opt, "out", x_in);
    out = prepare(g, *out_opt);
  }
  if (has_x2) {
    check_like(op, *x2_opt, "x2", x_in);
    x2 = prepare(g, *x2_opt);
    mean2 = per_channel(op, required(op, mean2_opt, "mean2", "x2 is given"), "mean2", g.C, acc);
  } else {
    absent(op, mean2_opt, "mean2", "x2");
  }
  const auto opts = x_in.options().dtype(acc);
  Tensor sum_g = at::empty({g.C}, opts);
  Tensor sum_gx = at::empty({g.C}, opts);
  Tensor sum_gx2 = at::empty({has_x2 ? g.C : 0}, opts);
  if (g.C == 0) return {sum_g, sum_gx, sum_gx2};
  if (g.N * g.HW == 0) {
    sum_g.zero_();
    sum_gx.zero_();
    sum_gx2.zero_();
    return {sum_g, sum_gx, sum_gx2};
  }
  const Tensor x = prepare(g, x_in);
  const Tensor go = prepare(g, grad_out_in);
  const ReduceArgs args{go.const_data_ptr(), ptr_or_null(out), x.const_data_ptr(),
                        mean.const_data_ptr(), ptr_or_null(x2), ptr_or_null(mean2),
                        sum_g.mutable_data_ptr(), sum_gx.mutable_data_ptr(),
                        has_x2 ? sum_gx2.mutable_data_ptr() : nullptr};
  FUSED_RESNET_RUN(run_bn_backward_reduce, x.scalar_type(), g, args);
  return {sum_g, sum_gx, sum_gx2};
}

namespace {

std::tuple<Tensor, Tensor> bn_backward_apply_cpu(
    const Tensor& grad_out_in, const std::optional<Tensor>& out_opt, const Tensor& x_in,
    const Tensor& mean_in, const Tensor& a_in, const Tensor& b_in, const Tensor& d_in,
    const std::optional<Tensor>& x2_opt, const std::optional<Tensor>& mean2_opt,
    const std::optional<Tensor>& a2_opt, const std::optional<Tensor>& b2_opt,
    const std::optional<Tensor>& d2_opt, bool grad_residual) {
  constexpr const char* op = "bn_backward_apply";
  check_x(op, x_in);
  const Geometry g = geometry(x_in);
  const auto acc = acc_type_of(x_in.scalar_type());
  check_like(op, grad_out_in, "grad_out", x_in);
  const Tensor mean = per_channel(op, mean_in, "mean", g.C, acc);
  const Tensor a = per_channel(op, a_in, "a", g.C, acc);
  const Tensor b = per_channel(op, b_in, "b", g.C, acc);
  const Tensor d = per_channel(op, d_in, "d", g.C, acc);
  const bool has_x2 = given(x2_opt);
  Tensor out, x2, mean2, a2, b2, d2;
  if (given(out_opt)) {
    check_like(op, *out_opt, "out", x_in);
    out = prepare(g, *out_opt);
  }
  if (has_x2) {
    check_like(op, *x2_opt, "x2", x_in);
    x2 = prepare(g, *x2_opt);
    mean2 = per_channel(op, required(op, mean2_opt, "mean2", "x2 is given"), "mean2", g.C, acc);
    a2 = per_channel(op, required(op, a2_opt, "a2", "x2 is given"), "a2", g.C, acc);
    b2 = per_channel(op, required(op, b2_opt, "b2", "x2 is given"), "b2", g.C, acc);
    d2 = per_channel(op, required(op, d2_opt, "d2", "x2 is given"), "d2", g.C, acc);
  } else {
    absent(op, mean2_opt, "mean2", "x2");
    absent(op, a2_opt, "a2", "x2");
    absent(op, b2_opt, "b2", "x2");
    absent(op, d2_opt, "d2", "x2");
  }
  const int mode = has_x2 ? kProjection : (grad_residual ? kIdentity : kNoShortcut);
  Tensor grad_x = empty_like_x(g, x_in);
  Tensor grad_s = mode == kNoShortcut ? at::empty({0}, x_in.options()) : empty_like_x(g, x_in);
  if (grad_x.numel() == 0) return {grad_x, grad_s};
  const Tensor x = prepare(g, x_in);
  const Tensor go = prepare(g, grad_out_in);
  BwdApplyArgs args{go.const_data_ptr(), ptr_or_null(out), x.const_data_ptr(),
                    ptr_or_null(x2), mean.const_data_ptr(), a.const_data_ptr(),
                    b.const_data_ptr(), d.const_data_ptr(), ptr_or_null(mean2),
                    ptr_or_null(a2), ptr_or_null(b2), ptr_or_null(d2), mode,
                    grad_x.mutable_data_ptr(),
                    mode == kNoShortcut ? nullptr : grad_s.mutable_data_ptr()};
  FUSED_RESNET_RUN(run_bn_backward_apply, x.scalar_type(), g, args);
  return {grad_x, grad_s};
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_resnet, CPU, m) {
  m.impl("bn_backward_reduce", &bn_backward_reduce_cpu);
  m.impl("bn_backward_apply", &bn_backward_apply_cpu);
}
#endif  // FUSED_RESNET_KERNELS_ONLY

}  // namespace cpu
}  // namespace fused_resnet
