// fused_resnet::bn_stats on CPU: per-channel mean and biased variance over N, H, W.
//
// Numerics: x is cut into chunks of at most kChunkElems values of one channel
// (plane form) or of a block of rows (row form). Each chunk is reduced with an exact
// two-pass scheme in acc_t vector lanes while it is in cache: pass 1 sums x - K
// (K = the chunk's first value, so the float sum's error scales with the spread of
// the data, not its magnitude), pass 2 sums (x - m)^2 and x - m around that chunk
// mean m (the second sum corrects m and M2 for the rounding of m; the squares go to
// double every kFlush steps). The chunk's
// (mean, M2) go to double and are merged per channel with Chan's formula in a fixed
// order, so the result does not depend on the number of threads and stays accurate
// for large N*H*W and for a mean large against the standard deviation.
#include "cpu_utils.h"

#include <limits>
#include <vector>

#ifndef FUSED_RESNET_KERNELS_ONLY
#include <torch/library.h>

#include "cpu_ops.h"
#endif

namespace fused_resnet {
namespace cpu {
namespace FUSED_RESNET_ISA {
namespace {

struct ChunkStats {
  double mean;
  double m2;
};

// Pass 2 adds (x - m)^2 into acc_t lanes for at most kFlush vector steps (plane form)
// or rows (row form), then into double. Long float sums of squares are biased, not
// just noisy, when x is coarse against its mean (x = 1e4 + randn in float32 sits on a
// 2^-10 grid, so every (x - m)^2 has the same few low bits and rounds the same way
// into a large partial sum: 1e-6 relative after 1000 terms; 3e-8 with the flush).
constexpr int64_t kFlush = 16;

// One chunk of n >= 1 contiguous values of one channel.
template <typename scalar_t>
ChunkStats plane_chunk_stats(const scalar_t* p, int64_t n) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using aVec = typename IO::aVec;
  constexpr int kNum = IO::kNum;
  constexpr int64_t kStep = IO::kStep;
  const aVec zero(acc_t(0));

  // pass 1: shifted sum -> chunk mean m (rounded to acc_t)
  const acc_t K = static_cast<acc_t>(p[0]);
  const aVec vK(K);
  aVec s0[kNum], s1[kNum], v0[kNum], v1[kNum];
  for (int j = 0; j < kNum; ++j) s0[j] = s1[j] = zero;
  int64_t i = 0;
  for (; i + 2 * kStep <= n; i += 2 * kStep) {
    IO::load(p + i, v0);
    IO::load(p + i + kStep, v1);
    for (int j = 0; j < kNum; ++j) {
      s0[j] = s0[j] + (v0[j] - vK);
      s1[j] = s1[j] + (v1[j] - vK);
    }
  }
  for (; i + kStep <= n; i += kStep) {
    IO::load(p + i, v0);
    for (int j = 0; j < kNum; ++j) s0[j] = s0[j] + (v0[j] - vK);
  }
  double sum = 0;
  for (int j = 0; j < kNum; ++j) sum += hsum<acc_t>(s0[j] + s1[j]);
  for (; i < n; ++i) sum += static_cast<double>(static_cast<acc_t>(p[i]) - K);
  const double nd = static_cast<double>(n);
  const acc_t m = static_cast<acc_t>(static_cast<double>(K) + sum / nd);

  // pass 2: sum of (x - m) and of (x - m)^2
  const aVec vm(m);
  aVec q0[kNum], q1[kNum];
  for (int j = 0; j < kNum; ++j) s0[j] = s1[j] = zero;
  double ds = 0, dq = 0;
  const int64_t nv = n - n % (2 * kStep);  // the 2-step vector part
  i = 0;
  while (i < nv) {
    const int64_t end = std::min(nv, i + kFlush * 2 * kStep);
    for (int j = 0; j < kNum; ++j) q0[j] = q1[j] = zero;
    for (; i < end; i += 2 * kStep) {
      IO::load(p + i, v0);
      IO::load(p + i + kStep, v1);
      for (int j = 0; j < kNum; ++j) {
        const aVec d0 = v0[j] - vm, d1 = v1[j] - vm;
        s0[j] = s0[j] + d0;
        s1[j] = s1[j] + d1;
        q0[j] = at::vec::fmadd(d0, d0, q0[j]);
        q1[j] = at::vec::fmadd(d1, d1, q1[j]);
      }
    }
    for (int j = 0; j < kNum; ++j) dq += hsum<acc_t>(q0[j] + q1[j]);
  }
  for (int j = 0; j < kNum; ++j) ds += hsum<acc_t>(s0[j] + s1[j]);
  for (; i < n; ++i) {
    const acc_t d = static_cast<acc_t>(p[i]) - m;
    ds += static_cast<double>(d);
    dq += static_cast<double>(d) * static_cast<double>(d);
  }
  ChunkStats r;
  r.mean = static_cast<double>(m) + ds / nd;
  r.m2 = std::max(0.0, dq - ds * ds / nd);
  return r;
}

// One chunk of R rows of C values (row form); writes C results to out.
// buf: 3*C acc_t and dbuf: C doubles of scratch.
template <typename scalar_t>
void row_chunk_stats(const scalar_t* p, int64_t R, int64_t C, acc_type_t<scalar_t>* buf,
                     double* dbuf, ChunkStats* out) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using aVec = typename IO::aVec;
  constexpr int kNum = IO::kNum;
  constexpr int64_t kStep = IO::kStep;
  constexpr int64_t W = aVec::size();
  const int64_t Cv = C - C % kStep;  // vectorised part of a row

  acc_t* K = buf;          // shift, then chunk mean m
  acc_t* s = buf + C;      // sum of x - K, then sum of x - m
  acc_t* q = buf + 2 * C;  // sum of (x - m)^2 over <= kFlush rows
  double* Q = dbuf;        // sum of (x - m)^2

  for (int64_t c = 0; c < C; ++c) {
    K[c] = static_cast<acc_t>(p[c]);
    s[c] = acc_t(0);
    Q[c] = 0.0;
  }
  aVec v[kNum];
  for (int64_t r = 0; r < R; ++r) {
    const scalar_t* row = p + r * C;
    int64_t c = 0;
    for (; c < Cv; c += kStep) {
      IO::load(row + c, v);
      for (int j = 0; j < kNum; ++j) {
        const int64_t o = c + j * W;
        (aVec::loadu(s + o) + (v[j] - aVec::loadu(K + o))).store(s + o);
      }
    }
    for (; c < C; ++c) s[c] += static_cast<acc_t>(row[c]) - K[c];
  }
  const double Rd = static_cast<double>(R);
  for (int64_t c = 0; c < C; ++c) {
    K[c] = static_cast<acc_t>(static_cast<double>(K[c]) + static_cast<double>(s[c]) / Rd);
    s[c] = acc_t(0);
  }
  for (int64_t r0 = 0; r0 < R; r0 += kFlush) {
    std::fill(q, q + C, acc_t(0));
    for (int64_t r = r0; r < std::min(R, r0 + kFlush); ++r) {
      const scalar_t* row = p + r * C;
      int64_t c = 0;
      for (; c < Cv; c += kStep) {
        IO::load(row + c, v);
        for (int j = 0; j < kNum; ++j) {
          const int64_t o = c + j * W;
          const aVec d = v[j] - aVec::loadu(K + o);
          (aVec::loadu(s + o) + d).store(s + o);
          at::vec::fmadd(d, d, aVec::loadu(q + o)).store(q + o);
        }
      }
      for (; c < C; ++c) {
        const acc_t d = static_cast<acc_t>(row[c]) - K[c];
        s[c] += d;
        q[c] += d * d;
      }
    }
    for (int64_t c = 0; c < C; ++c) Q[c] += static_cast<double>(q[c]);
  }
  for (int64_t c = 0; c < C; ++c) {
    const double ds = static_cast<double>(s[c]);
    out[c].mean = static_cast<double>(K[c]) + ds / Rd;
    out[c].m2 = std::max(0.0, Q[c] - ds * ds / Rd);
  }
}

// Chan et al. merge of (n_b, mean_b, m2_b) into (n_a, mean_a, m2_a).
struct Welford {
  double n = 0, mean = 0, m2 = 0;
  void merge(double nb, const ChunkStats& b) {
    const double n_ab = n + nb;
    const double delta = b.mean - mean;
    mean += delta * (nb / n_ab);
    m2 += b.m2 + delta * delta * (n * nb / n_ab);
    n = n_ab;
  }
};

template <typename scalar_t>
void stats_kernel(const Geometry& g, const StatsArgs& args) {
  using acc_t = acc_type_t<scalar_t>;
  const scalar_t* xp = static_cast<const scalar_t*>(args.x);
  acc_t* mp = static_cast<acc_t*>(args.mean);
  acc_t* vp = static_cast<acc_t*>(args.var);
  const int64_t C = g.C;

  if (g.rows) {
    const int64_t rows = g.nrows();
    const int64_t R = rows_per_chunk(C);
    const int64_t nchunks = divup(rows, R);
    std::vector<ChunkStats> res(static_cast<size_t>(nchunks * C));
    at::parallel_for(0, nchunks, grain_for(R * C), [&](int64_t b0, int64_t b1) {
      std::vector<acc_t> buf(static_cast<size_t>(3 * C));
      std::vector<double> dbuf(static_cast<size_t>(C));
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t r0 = b * R;
        const int64_t nr = std::min(R, rows - r0);
        row_chunk_stats<scalar_t>(xp + r0 * C, nr, C, buf.data(), dbuf.data(),
                                  res.data() + b * C);
      }
    });
    at::parallel_for(0, C, 64, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        Welford w;
        for (int64_t b = 0; b < nchunks; ++b) {
          w.merge(static_cast<double>(std::min(R, rows - b * R)), res[b * C + c]);
        }
        mp[c] = static_cast<acc_t>(w.mean);
        vp[c] = static_cast<acc_t>(w.m2 / w.n);
      }
    });
  } else {
    const int64_t HW = g.HW;
    const PlaneChunks pc = plane_chunks(HW);
    const int64_t nchunks = g.N * C * pc.per_plane;
    std::vector<ChunkStats> res(static_cast<size_t>(nchunks));
    at::parallel_for(0, nchunks, grain_for(pc.len), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t plane = b / pc.per_plane;
        const int64_t off = (b % pc.per_plane) * pc.len;
        const int64_t n = std::min(pc.len, HW - off);
        res[b] = plane_chunk_stats<scalar_t>(xp + plane * HW + off, n);
      }
    });
    at::parallel_for(0, C, 16, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        Welford w;
        for (int64_t n = 0; n < g.N; ++n) {
          for (int64_t k = 0; k < pc.per_plane; ++k) {
            const int64_t off = k * pc.len;
            w.merge(static_cast<double>(std::min(pc.len, HW - off)),
                    res[(n * C + c) * pc.per_plane + k]);
          }
        }
        mp[c] = static_cast<acc_t>(w.mean);
        vp[c] = static_cast<acc_t>(w.m2 / w.n);
      }
    });
  }
}

}  // namespace

// x in the layout of g, N*HW > 0, C > 0.
void run_bn_stats(at::ScalarType st, const Geometry& g, const StatsArgs& args) {
  FUSED_RESNET_DISPATCH_DTYPE(st, stats_kernel, g, args)
}

}  // namespace FUSED_RESNET_ISA

#ifndef FUSED_RESNET_KERNELS_ONLY
std::tuple<Tensor, Tensor> bn_stats_cpu(const Tensor& x_in) {
  constexpr const char* op = "bn_stats";
  check_x(op, x_in);
  const Geometry g = geometry(x_in);
  const auto acc = acc_type_of(x_in.scalar_type());
  Tensor mean = at::empty({g.C}, x_in.options().dtype(acc));
  Tensor var = at::empty({g.C}, x_in.options().dtype(acc));
  if (g.C == 0) return {mean, var};
  if (g.N * g.HW == 0) {  // mean of nothing: NaN, like torch.mean
    mean.fill_(std::numeric_limits<double>::quiet_NaN());
    var.fill_(std::numeric_limits<double>::quiet_NaN());
    return {mean, var};
  }
  const Tensor x = prepare(g, x_in);
  const StatsArgs args{x.const_data_ptr(), mean.mutable_data_ptr(), var.mutable_data_ptr()};
  FUSED_RESNET_RUN(run_bn_stats, x.scalar_type(), g, args);
  return {mean, var};
}

TORCH_LIBRARY_IMPL(fused_resnet, CPU, m) {
  m.impl("bn_stats", &bn_stats_cpu);
}
#endif  // FUSED_RESNET_KERNELS_ONLY

}  // namespace cpu
}  // namespace fused_resnet
