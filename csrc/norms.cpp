// LayerNorm and RMSNorm over the last dimension on the CPU, forward and backward.
//
// Input x (and dy) in fp32, bf16 or fp16; every statistic and every accumulation in fp32. A row
// (hidden <= a few thousand) fits in L1, so each kernel reads a row from memory once and then
// re-reads it from cache: one pass over x for the forward (write y), one pass over x and dy for
// the backward (write dx). Large outputs bypass the cache (streaming stores). Weight and bias
// are read as fp32 (an fp32 parameter in place, a bf16/fp16 one converted into a buffer of
// `hidden` floats) and may be absent. dweight/dbias are summed per block of 64 rows, then the
// blocks in order, so results are the same bits whatever the thread count and timing.
//
// Layout: the row kernels (ISA-cloned), then the drivers (parallel over rows / blocks), then
// the Python faces: the raw forward/backward pair, and the whole op as one C++ autograd node
// (what megalite.ops uses on the CPU: no Python runs per call, which at a small model's sizes
// costs more than the kernels).
#include <cmath>

#include <torch/csrc/autograd/custom_function.h>

#include "megalite.h"

namespace megalite {
namespace {

// Row sums use kWide = 4 x kLanes independent accumulators (four AVX-512 registers, eight AVX2
// ones), so the adds of consecutive vectors do not wait on each other (one accumulator made the
// forward latency-bound: a vector add every 4 cycles), and are folded by a fixed pairwise tree
// (6 adds deep; a row of adds over the lanes was 16). The compiler vectorises both without
// reassociating floats, so every ISA clone adds in the same order. (Plain loops, no lambdas:
// anything not inlined into a clone runs at the baseline ISA.)
// Ask for rows ahead while this one is worked on in L1: the first pass over a row otherwise waits
// on memory (one core keeps only so many misses in flight). Measured: the forward does best
// asking for the whole next row at once just before its last pass (asked for earlier, the burst
// of prefetches stalls on the fill buffers while the current row is still arriving: ~10% slower
// in bf16), the backward (two input streams) asking for the next tile's rows into L2, one line
// per kLanes elements of its last pass. Past the end is harmless.
template <typename T>
MEGALITE_INLINE void prefetch_row(const T* row, int64_t H) {  // the next row, at once (forward)
  const uintptr_t next = reinterpret_cast<uintptr_t>(row) + uintptr_t(H) * sizeof(T);
  for (uintptr_t k = 0; k < uintptr_t(H) * sizeof(T); k += 64)
    __builtin_prefetch(reinterpret_cast<const void*>(next + k));
}
template <typename T>
MEGALITE_INLINE void prefetch_ahead(const T* row, int64_t ahead, int64_t j) {  // spread (backward)
  __builtin_prefetch(
      reinterpret_cast<const void*>(reinterpret_cast<uintptr_t>(row + j) + ahead * sizeof(T)), 0,
      2);
}

// The backward also asks for the next tile's dx lines, for writing (fetched for ownership while
// this tile is computed, instead of each store waiting on its line): measured 1.07-1.18x on the
// whole fwd+bwd at [2048, 256] and [512, 1024] fp32, neutral in bf16. (The same for the
// forward's y made no difference.)
template <typename T>
MEGALITE_INLINE void prefetch_ahead_w(T* row, int64_t ahead, int64_t j) {
  __builtin_prefetch(
      reinterpret_cast<void*>(reinterpret_cast<uintptr_t>(row + j) + ahead * sizeof(T)), 1, 2);
}

constexpr int kWide = 4 * kLanes;

// The reductions in GCC's vector types (lowered to whatever each clone has: one AVX-512 register
// for 16 floats, two AVX2 ones, four SSE ones), so that the tree stays in registers; written on
// float arrays the compiler spilled it to the stack (measured: ~30% of a [512, 256] forward).
// Elementwise vector adds: the same sums, in the same order, in every clone.
typedef float v16sf __attribute__((vector_size(64)));
typedef float v8sf __attribute__((vector_size(32)));
typedef float v4sf __attribute__((vector_size(16)));
typedef int v4si __attribute__((vector_size(16)));
static_assert(kLanes == 16, "the reduction trees are written for 16 lanes");

// sum of a vector's 16 lanes as a pairwise tree: (l, l + 8), then (l, l + 4), (l, l + 2), (0, 1).
// (Vectors by reference only: by value they would change the baseline clone's ABI.)
MEGALITE_INLINE float reduce16(const v16sf& v) {
  v8sf lo8, hi8;
  std::memcpy(&lo8, &v, 32);
  std::memcpy(&hi8, reinterpret_cast<const char*>(&v) + 32, 32);
  const v8sf s8 = lo8 + hi8;
  v4sf lo4, hi4;
  std::memcpy(&lo4, &s8, 16);
  std::memcpy(&hi4, reinterpret_cast<const char*>(&s8) + 16, 16);
  const v4sf s4 = lo4 + hi4;
  const v4sf s2 = s4 + __builtin_shuffle(s4, v4si{2, 3, 0, 1});
  return s2[0] + s2[1];
}

// sum(acc[0..kLanes)).
MEGALITE_INLINE float reduce_lanes(const float* acc) {
  v16sf v;
  std::memcpy(&v, acc, sizeof(v));
  return reduce16(v);
}

// sum(acc[0..kWide)): the four vectors pairwise ((0, 2), (1, 3), then the two), then across lanes.
MEGALITE_INLINE float reduce_wide(const float* acc) {
  v16sf a, b, c, d;
  std::memcpy(&a, acc, sizeof(a));
  std::memcpy(&b, acc + kLanes, sizeof(b));
  std::memcpy(&c, acc + 2 * kLanes, sizeof(c));
  std::memcpy(&d, acc + 3 * kLanes, sizeof(d));
  const v16sf s = (a + c) + (b + d);
  return reduce16(s);
}

// sum(x - shift) (kSquare: sum((x - shift)^2)) over a row: kWide accumulators, then one of kLanes
// for the rest, then the tail (< kLanes) into the first lanes.
template <typename X, bool kSquare>
MEGALITE_INLINE float row_sum(const typename X::T* __restrict xr, int64_t H, float shift) {
  float acc[kWide] = {};
  const int64_t wide = H / kWide * kWide, body = H / kLanes * kLanes;
  for (int64_t j = 0; j < wide; j += kWide)
    for (int l = 0; l < kWide; ++l) {
      const float d = X::load(xr[j + l]) - shift;
      acc[l] += kSquare ? d * d : d;
    }
  for (int64_t j = wide; j < body; j += kLanes)
    for (int l = 0; l < kLanes; ++l) {
      const float d = X::load(xr[j + l]) - shift;
      acc[l] += kSquare ? d * d : d;
    }
  for (int64_t j = body; j < H; ++j) {
    const float d = X::load(xr[j]) - shift;
    acc[j - body] += kSquare ? d * d : d;
  }
  return reduce_wide(acc);
}

// ---------------------------------------------------------------------------------------------
// Forward. kRms: y = x * rstd * w, rstd = 1/sqrt(mean(x^2) + eps); otherwise
// y = (x - mean) * rstd * w + b, rstd = 1/sqrt(mean((x - mean)^2) + eps).
template <typename X, bool kRms>
MEGALITE_ISA_CLONES void norm_fwd_rows(const typename X::T* __restrict x, const float* __restrict w,
                                       const float* __restrict b, typename X::T* __restrict y,
                                       float* __restrict mean_out, float* __restrict rstd_out,
                                       typename X::T* __restrict stage, int64_t rows, int64_t H,
                                       float eps) {
  const float inv_h = 1.f / float(H);
  for (int64_t r = 0; r < rows; ++r) {
    const typename X::T* xr = x + r * H;
    typename X::T* yr = y + r * H;
    const float mean = kRms ? 0.f : row_sum<X, false>(xr, H, 0.f) * inv_h;
    // Two-pass variance (sum of squared deviations): no cancellation, and the row is in L1.
    const float rstd = 1.f / std::sqrt(row_sum<X, true>(xr, H, mean) * inv_h + eps);
    typename X::T* __restrict out = stage ? stage : yr;
    prefetch_row(xr, H);
    for (int64_t j = 0; j < H; ++j) {
      float v = (X::load(xr[j]) - mean) * rstd * w[j];
      if (!kRms) v += b[j];
      out[j] = X::store(v);
    }
    if (stage) stream_copy(yr, stage, H * sizeof(typename X::T));
    if (!kRms) mean_out[r] = mean;
    rstd_out[r] = rstd;
  }
}

// ---------------------------------------------------------------------------------------------
// Backward for a block of rows. With xhat = (x - mean) * rstd and g = dy * w:
//   LayerNorm: dx = rstd * (g - mean(g) - xhat * mean(g * xhat))
//   RMSNorm:   dx = rstd * (g - xhat * mean(g * xhat))          (mean = 0)
// and dw += dy * xhat, db += dy, accumulated into this block's partial sums.
//
// Rows go kTile at a time: the first pass reads and writes the dw/db partials once per tile
// instead of once per row (they were most of its L1 traffic), adding the tile's rows in row
// order, so the sums are the same as one row at a time.
constexpr int kTile = 4;

// One column k of a tile's first pass: every row's contribution to the row sums (lane l), and
// the column's dw/db partials read and written once.
template <typename X, bool kRms, int kT>
MEGALITE_INLINE void bwd_tile_element(const typename X::T* __restrict dy,
                                      const typename X::T* __restrict x, const float* __restrict w,
                                      float* __restrict dw_part, float* __restrict db_part,
                                      const float* mean, const float* rstd, int64_t H, int64_t k,
                                      float (*sum_g)[kLanes], float (*sum_gx)[kLanes], int l) {
  float dwk = dw_part[k], dbk = kRms ? 0.f : db_part[k];
  const float wk = w[k];
  for (int t = 0; t < kT; ++t) {
    const float d = X::load(dy[t * H + k]);
    const float xh = (X::load(x[t * H + k]) - mean[t]) * rstd[t];
    const float g = d * wk;
    sum_g[t][l] += g;
    sum_gx[t][l] += g * xh;
    dwk += d * xh;
    if (!kRms) dbk += d;
  }
  dw_part[k] = dwk;
  if (!kRms) db_part[k] = dbk;
}

template <typename X, bool kRms, int kT>
MEGALITE_INLINE void bwd_tile(const typename X::T* __restrict dy, const typename X::T* __restrict x,
                              const float* __restrict mean_in, const float* __restrict rstd_in,
                              const float* __restrict w, typename X::T* __restrict dx,
                              float* __restrict dw_part, float* __restrict db_part,
                              typename X::T* __restrict stage, int64_t H, int64_t prefetch_rows) {
  const float inv_h = 1.f / float(H);
  const int64_t body = H / kLanes * kLanes;
  float mean[kT], rstd[kT];
  for (int t = 0; t < kT; ++t) {
    mean[t] = kRms ? 0.f : mean_in[t];
    rstd[t] = rstd_in[t];
  }
  // Pass 1 (from memory): the row sums of every row of the tile, and the dw/db partials.
  float sum_g[kT][kLanes] = {}, sum_gx[kT][kLanes] = {};
  for (int64_t j = 0; j < body; j += kLanes)
    for (int l = 0; l < kLanes; ++l)
      bwd_tile_element<X, kRms, kT>(dy, x, w, dw_part, db_part, mean, rstd, H, j + l, sum_g, sum_gx,
                                    l);
  for (int64_t j = body; j < H; ++j)
    bwd_tile_element<X, kRms, kT>(dy, x, w, dw_part, db_part, mean, rstd, H, j, sum_g, sum_gx,
                                  int(j - body));
  // Pass 2 (from L1/L2): dx, row by row; the next tile's rows are asked for meanwhile.
  for (int t = 0; t < kT; ++t) {
    const typename X::T* xr = x + t * H;
    const typename X::T* dyr = dy + t * H;
    const float a = kRms ? 0.f : reduce_lanes(sum_g[t]) * inv_h;
    const float c = reduce_lanes(sum_gx[t]) * inv_h;
    const float m = mean[t], rs = rstd[t];
    typename X::T* __restrict out = stage ? stage : dx + t * H;
    for (int64_t j = 0; j < body; j += kLanes) {
      prefetch_ahead(xr, prefetch_rows * H, j);
      prefetch_ahead(dyr, prefetch_rows * H, j);
      if (!stage) prefetch_ahead_w(dx + t * H, prefetch_rows * H, j);
      for (int l = 0; l < kLanes; ++l) {
        const int64_t k = j + l;
        const float xh = (X::load(xr[k]) - m) * rs;
        out[k] = X::store(rs * (X::load(dyr[k]) * w[k] - a - xh * c));
      }
    }
    for (int64_t k = body; k < H; ++k) {
      const float xh = (X::load(xr[k]) - m) * rs;
      out[k] = X::store(rs * (X::load(dyr[k]) * w[k] - a - xh * c));
    }
    if (stage) stream_copy(dx + t * H, stage, H * sizeof(typename X::T));
  }
}

template <typename X, bool kRms>
MEGALITE_ISA_CLONES void norm_bwd_rows(const typename X::T* __restrict dy,
                                       const typename X::T* __restrict x,
                                       const float* __restrict mean_in,
                                       const float* __restrict rstd_in, const float* __restrict w,
                                       typename X::T* __restrict dx, float* __restrict dw_part,
                                       float* __restrict db_part, typename X::T* __restrict stage,
                                       int64_t rows, int64_t H) {
  int64_t r = 0;
  for (; r + kTile <= rows; r += kTile)
    bwd_tile<X, kRms, kTile>(dy + r * H, x + r * H, kRms ? nullptr : mean_in + r, rstd_in + r, w,
                             dx + r * H, dw_part, db_part, stage, H, kTile);
  for (; r < rows; ++r)
    bwd_tile<X, kRms, 1>(dy + r * H, x + r * H, kRms ? nullptr : mean_in + r, rstd_in + r, w,
                         dx + r * H, dw_part, db_part, stage, H, 2);
}

// dweight/dbias: the per-block partial sums added in block order, columns [lo, hi) of each.
MEGALITE_ISA_CLONES void sum_blocks(const float* __restrict part, int64_t nblocks, int64_t stride,
                                    int64_t lo, int64_t hi, float* __restrict out) {
  for (int64_t j = lo; j < hi; ++j) out[j] = part[j];
  for (int64_t blk = 1; blk < nblocks; ++blk) {
    const float* __restrict p = part + blk * stride;
    for (int64_t j = lo; j < hi; ++j) out[j] += p[j];
  }
}

MEGALITE_ISA_CLONES void to_f32(const uint16_t* __restrict src, float* __restrict dst, int64_t n,
                                bool bf16) {
  if (bf16)
    for (int64_t j = 0; j < n; ++j) dst[j] = BF16::load(src[j]);
  else
    for (int64_t j = 0; j < n; ++j) dst[j] = F16::load(src[j]);
}

// Outputs larger than the caches (y, dx of a training-size batch), when their memory is being
// reused, are written with streaming stores, one staged row at a time: a normal store reads each
// destination line first, a third more memory traffic for an output the size of the input.
// Smaller outputs stay in the cache, where the next op finds them; fresh pages are written with
// plain stores (see worth_streaming).
constexpr size_t kStreamingBytes = size_t(8) << 20;
bool streams(const at::Tensor& out) {
  return worth_streaming(out.data_ptr(), size_t(out.numel()) * out.element_size(), kStreamingBytes);
}

// Rows per parallel task: about 64K elements, so small inputs stay on one thread.
int64_t row_grain(int64_t H) {
  return std::max<int64_t>(1, 65536 / std::max<int64_t>(H, 1));
}

// The kernels see [rows, hidden]: any contiguous tensor of at least one dimension, hidden its last.
struct Rows {
  int64_t rows, H;
};
Rows check_input(const at::Tensor& x, const char* what) {
  TORCH_CHECK(x.device().is_cpu(), what, ": input must be on the CPU");
  TORCH_CHECK(x.dim() >= 1 && x.is_contiguous(), what,
              ": expects a contiguous [..., hidden] tensor");
  const int64_t H = x.size(-1);
  int64_t rows = 1;
  for (int64_t d = 0; d + 1 < x.dim(); ++d) rows *= x.size(d);
  return {rows, H};
}

// Weight or bias as H fp32 values: the tensor's own memory when it is contiguous fp32, else
// converted into `buf` (bf16/fp16 parameters of a low-precision model: H values, next to
// nothing); `fill` everywhere when absent.
const float* param_f32(const c10::optional<at::Tensor>& t, int64_t H, float fill,
                       std::vector<float>& buf, const char* what) {
  if (!t.has_value() || !t->defined()) {
    buf.assign(size_t(H), fill);
    return buf.data();
  }
  TORCH_CHECK(t->device().is_cpu() && t->numel() == H, what,
              ": weight/bias must be CPU tensors of size hidden=", H);
  const at::ScalarType st = t->scalar_type();
  if (st == at::kFloat && t->is_contiguous()) return t->data_ptr<float>();
  TORCH_CHECK(st == at::kFloat || st == at::kBFloat16 || st == at::kHalf, what,
              ": weight/bias must be float32, bfloat16 or float16, got ", st);
  const at::Tensor c = t->contiguous();
  buf.resize(size_t(H));
  if (st == at::kFloat)
    std::memcpy(buf.data(), c.data_ptr(), size_t(H) * sizeof(float));
  else
    to_f32(static_cast<const uint16_t*>(c.data_ptr()), buf.data(), H, st == at::kBFloat16);
  return buf.data();
}

struct NormStats {
  at::Tensor y, mean, rstd;  // mean undefined for RMSNorm
};

template <bool kRms>
NormStats norm_forward(const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                       const c10::optional<at::Tensor>& bias, double eps) {
  const char* what = kRms ? "rms_norm_fwd" : "layer_norm_fwd";
  const Rows s = check_input(x, what);
  const int64_t rows = s.rows, H = s.H;
  std::vector<float> wbuf, bbuf;
  const float* wp = param_f32(weight, H, 1.f, wbuf, what);
  const float* bp = kRms ? wp : param_f32(bias, H, 0.f, bbuf, what);
  NormStats out;
  out.y = at::empty_like(x);
  if (!kRms) out.mean = at::empty({rows}, x.options().dtype(at::kFloat));
  out.rstd = at::empty({rows}, x.options().dtype(at::kFloat));
  dispatch_float_type(x.scalar_type(), what, [&](auto xt) {
    using X = decltype(xt);
    using T = typename X::T;
    const T* xp = static_cast<const T*>(x.data_ptr());
    T* yp = static_cast<T*>(out.y.data_ptr());
    float* mp = kRms ? nullptr : out.mean.data_ptr<float>();
    float* rp = out.rstd.data_ptr<float>();
    const bool streaming = streams(out.y);
    at::parallel_for(0, rows, row_grain(H), [&](int64_t r0, int64_t r1) {
      std::vector<T> stage(streaming ? H : 0);
      norm_fwd_rows<X, kRms>(xp + r0 * H, wp, bp, yp + r0 * H, kRms ? nullptr : mp + r0, rp + r0,
                             streaming ? stage.data() : nullptr, r1 - r0, H, float(eps));
      if (streaming) stream_fence();
    });
  });
  return out;
}

// dx, and dw/db (fp32, undefined when not wanted).
struct NormGrads {
  at::Tensor dx, dw, db;
};

// Each block of kBlockRows rows sums its dw/db contributions into a partial of its own (fp32
// error then grows with kBlockRows + rows / kBlockRows, not rows), and the partials are added in
// block order. Blocks start at fixed rows, whichever thread runs them, so dw/db (like dx) are the
// same bits for any thread count and any timing.
constexpr int64_t kBlockRows = 64;

template <bool kRms>
NormGrads norm_backward(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& mean,
                        const at::Tensor& rstd, const c10::optional<at::Tensor>& weight,
                        bool want_dw, bool want_db) {
  const char* what = kRms ? "rms_norm_bwd" : "layer_norm_bwd";
  const Rows s = check_input(x, what);
  check_input(dy, what);
  TORCH_CHECK(dy.sizes() == x.sizes() && dy.scalar_type() == x.scalar_type(), what,
              ": dy must match x in shape and dtype");
  const int64_t rows = s.rows, H = s.H;
  TORCH_CHECK(rstd.scalar_type() == at::kFloat && rstd.numel() == rows && rstd.is_contiguous(),
              what, ": rstd must be fp32 with one value per row");
  TORCH_CHECK(
      kRms || (mean.scalar_type() == at::kFloat && mean.numel() == rows && mean.is_contiguous()),
      what, ": mean must be fp32 with one value per row");
  std::vector<float> wbuf;
  const float* wp = param_f32(weight, H, 1.f, wbuf, what);
  want_db = want_db && !kRms;
  NormGrads g;
  g.dx = at::empty_like(x);
  const int64_t nblocks = (rows + kBlockRows - 1) / kBlockRows;
  const int64_t nsum = kRms ? 1 : 2;  // partial rows per block: dw (and db)
  const bool sums = want_dw || want_db;
  // Uninitialised: every block zeroes its own partial (in cache) before summing into it.
  at::Tensor part = at::empty({sums ? nblocks * nsum * H : 0}, x.options().dtype(at::kFloat));
  dispatch_float_type(x.scalar_type(), what, [&](auto xt) {
    using X = decltype(xt);
    using T = typename X::T;
    const T* xp = static_cast<const T*>(x.data_ptr());
    const T* dyp = static_cast<const T*>(dy.data_ptr());
    T* dxp = static_cast<T*>(g.dx.data_ptr());
    const float* mp = kRms ? nullptr : mean.data_ptr<float>();
    const float* rp = rstd.data_ptr<float>();
    float* pp = sums ? part.data_ptr<float>() : nullptr;
    const bool streaming = streams(g.dx);
    const int64_t grain = std::max<int64_t>(1, row_grain(H) / kBlockRows);
    at::parallel_for(0, nblocks, grain, [&](int64_t b0, int64_t b1) {
      std::vector<T> stage(streaming ? H : 0);
      std::vector<float> own(sums ? 0 : nsum * H);  // partials nobody wants (no weight, no bias)
      for (int64_t blk = b0; blk < b1; ++blk) {
        const int64_t r = blk * kBlockRows, n = std::min(kBlockRows, rows - r);
        float* p = sums ? pp + blk * nsum * H : own.data();
        std::fill(p, p + nsum * H, 0.f);
        norm_bwd_rows<X, kRms>(dyp + r * H, xp + r * H, kRms ? nullptr : mp + r, rp + r, wp,
                               dxp + r * H, p, kRms ? nullptr : p + H,
                               streaming ? stage.data() : nullptr, n, H);
      }
      if (streaming) stream_fence();
    });
  });
  if (sums && nblocks > 0) {
    const float* pp = part.data_ptr<float>();
    if (want_dw) g.dw = at::empty({H}, x.options().dtype(at::kFloat));
    if (want_db) g.db = at::empty({H}, x.options().dtype(at::kFloat));
    float* dwp = want_dw ? g.dw.data_ptr<float>() : nullptr;
    float* dbp = want_db ? g.db.data_ptr<float>() : nullptr;
    // Columns are independent, so splitting them between threads changes no sum.
    at::parallel_for(0, H, std::max<int64_t>(256, 65536 / nblocks), [&](int64_t lo, int64_t hi) {
      if (dwp) sum_blocks(pp, nblocks, nsum * H, lo, hi, dwp);
      if (dbp) sum_blocks(pp + H, nblocks, nsum * H, lo, hi, dbp);
    });
  } else {  // no rows: zero grads
    if (want_dw) g.dw = at::zeros({H}, x.options().dtype(at::kFloat));
    if (want_db) g.db = at::zeros({H}, x.options().dtype(at::kFloat));
  }
  return g;
}

bool defined(const c10::optional<at::Tensor>& t) {
  return t.has_value() && t->defined();
}

// ---- the raw kernels, for any caller (and megalite._cuda's signatures)
// ----------------------------
template <bool kRms>
std::vector<at::Tensor> norm_fwd(const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                                 const c10::optional<at::Tensor>& bias, double eps) {
  NormStats s = norm_forward<kRms>(x, weight, bias, eps);
  if (kRms) return {s.y, s.rstd};
  return {s.y, s.mean, s.rstd};
}

// Returns {dx, dw, db}; dw/db are fp32 and undefined (None in Python) when not wanted.
template <bool kRms>
std::vector<at::Tensor> norm_bwd(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& mean,
                                 const at::Tensor& rstd, const c10::optional<at::Tensor>& weight,
                                 bool want_db) {
  NormGrads g = norm_backward<kRms>(dy, x, mean, rstd, weight, defined(weight), want_db);
  if (kRms) return {g.dx, g.dw};
  return {g.dx, g.dw, g.db};
}

// ---- autograd: the whole op as one C++ autograd node
// ---------------------------------------------- megalite.ops.layer_norm / rms_norm call these for
// CPU tensors. A Python autograd.Function costs tens of microseconds per call around the kernels
// (the Python forward and backward, ctx bookkeeping, casts and reshapes of weight, bias and dy); at
// a small model's sizes ([512, 256]) that was more than the kernels themselves, which made
// megalite's LayerNorm slower than torch's. Here the forward and the backward run without Python,
// as torch's own LayerNorm does.
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

at::Tensor grad_as(const at::Tensor& g, const at::Tensor& param) {
  return (g.defined() && g.scalar_type() != param.scalar_type()) ? g.to(param.scalar_type()) : g;
}

template <bool kRms>
struct NormFunction : public torch::autograd::Function<NormFunction<kRms>> {
  // RMSNorm passes no bias.
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x,
                            const c10::optional<at::Tensor>& weight,
                            const c10::optional<at::Tensor>& bias, double eps) {
    const at::Tensor xc = x.contiguous();
    NormStats s = norm_forward<kRms>(xc, weight, bias, eps);
    const at::Tensor w = defined(weight) ? *weight : at::Tensor();
    const at::Tensor b = defined(bias) ? *bias : at::Tensor();
    ctx->save_for_backward({xc, w, b, s.mean, s.rstd});
    return s.y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &w = saved[1], &b = saved[2], &mean = saved[3],
                     &rstd = saved[4];
    // needs_input_grad counts the tensor inputs actually given: x, then weight, then bias.
    const bool want_dw = w.defined() && ctx->needs_input_grad(1);
    const bool want_db = b.defined() && ctx->needs_input_grad(w.defined() ? 2 : 1);
    at::Tensor dy = grads[0];
    if (dy.scalar_type() != x.scalar_type()) dy = dy.to(x.scalar_type());
    dy = dy.contiguous();
    NormGrads g = norm_backward<kRms>(dy, x, mean, rstd,
                                      w.defined() ? c10::optional<at::Tensor>(w) : c10::nullopt,
                                      want_dw, want_db);
    return {g.dx, grad_as(g.dw, w), grad_as(g.db, b), at::Tensor()};
  }
};

void register_norms(pybind11::module_& m) {
  m.def("layer_norm_fwd", &norm_fwd<false>,
        "LayerNorm forward over [rows, hidden] -> (y, mean, rstd)", py::arg("x"), py::arg("weight"),
        py::arg("bias"), py::arg("eps"));
  m.def("layer_norm_bwd", &norm_bwd<false>, "LayerNorm backward -> (dx, dweight, dbias)",
        py::arg("dy"), py::arg("x"), py::arg("mean"), py::arg("rstd"), py::arg("weight"),
        py::arg("need_bias_grad"));
  m.def(
      "rms_norm_fwd",
      [](const at::Tensor& x, const c10::optional<at::Tensor>& w, double eps) {
        return norm_fwd<true>(x, w, c10::nullopt, eps);
      },
      "RMSNorm forward over [rows, hidden] -> (y, rstd)", py::arg("x"), py::arg("weight"),
      py::arg("eps"));
  m.def(
      "rms_norm_bwd",
      [](const at::Tensor& dy, const at::Tensor& x, const at::Tensor& rstd,
         const c10::optional<at::Tensor>& w) {
        return norm_bwd<true>(dy, x, at::Tensor(), rstd, w, false);
      },
      "RMSNorm backward -> (dx, dweight)", py::arg("dy"), py::arg("x"), py::arg("rstd"),
      py::arg("weight"));
  m.def(
      "layer_norm",
      [](const at::Tensor& x, const c10::optional<at::Tensor>& w,
         const c10::optional<at::Tensor>& b,
         double eps) { return NormFunction<false>::apply(x, w, b, eps); },
      "differentiable LayerNorm over the last dim of a CPU tensor (one C++ autograd node)",
      py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("eps"));
  m.def(
      "rms_norm",
      [](const at::Tensor& x, const c10::optional<at::Tensor>& w, double eps) {
        return NormFunction<true>::apply(x, w, c10::optional<at::Tensor>(), eps);
      },
      "differentiable RMSNorm over the last dim of a CPU tensor (one C++ autograd node)",
      py::arg("x"), py::arg("weight"), py::arg("eps"));
}

}  // namespace

MEGALITE_REGISTER(register_norms)

}  // namespace megalite
