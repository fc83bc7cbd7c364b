// LayerNorm and RMSNorm over the last dimension on the CPU, forward and backward.
//
// Input x (and dy) in fp32, bf16 or fp16; every statistic and every accumulation in fp32. A row
// (hidden <= a few thousand) fits in L1, so each kernel reads a row from memory once and then
// re-reads it from cache: one pass over x for the forward (write y), one pass over x and dy for
// the backward (write dx). Large outputs bypass the cache (streaming stores). Weight and bias
// arrive as fp32 (the Python side converts them; they are tiny) and may be absent.
// dweight/dbias are reduced per thread, in blocks of rows, then across threads in a fixed
// order, so results do not depend on timing.
#include <cmath>
#include <map>
#include <mutex>

#include "megalite.h"

namespace megalite {
namespace {

// Row sums use kLanes independent accumulators: the compiler vectorises them without
// reassociating floats, and every ISA clone adds in the same order. (Plain loops, no lambdas:
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
  for (uintptr_t k = 0; k < uintptr_t(H) * sizeof(T); k += 64) __builtin_prefetch(reinterpret_cast<const void*>(next + k));
}
template <typename T>
MEGALITE_INLINE void prefetch_ahead(const T* row, int64_t ahead, int64_t j) {  // spread (backward)
  __builtin_prefetch(reinterpret_cast<const void*>(reinterpret_cast<uintptr_t>(row + j) + ahead * sizeof(T)), 0, 2);
}

MEGALITE_INLINE float reduce_lanes(const float* acc) {
  float s = 0.f;
  for (int l = 0; l < kLanes; ++l) s += acc[l];
  return s;
}

// ---------------------------------------------------------------------------------------------
// Forward. kRms: y = x * rstd * w, rstd = 1/sqrt(mean(x^2) + eps); otherwise
// y = (x - mean) * rstd * w + b, rstd = 1/sqrt(mean((x - mean)^2) + eps).
template <typename X, bool kRms>
MEGALITE_ISA_CLONES void norm_fwd_rows(const typename X::T* __restrict x, const float* __restrict w,
                                       const float* __restrict b, typename X::T* __restrict y,
                                       float* __restrict mean_out, float* __restrict rstd_out,
                                       typename X::T* __restrict stage, int64_t rows, int64_t H, float eps) {
  const float inv_h = 1.f / float(H);
  const int64_t body = H / kLanes * kLanes;
  for (int64_t r = 0; r < rows; ++r) {
    const typename X::T* xr = x + r * H;
    typename X::T* yr = y + r * H;
    float mean = 0.f;
    if (!kRms) {
      float acc[kLanes] = {};
      for (int64_t j = 0; j < body; j += kLanes)
        for (int l = 0; l < kLanes; ++l) acc[l] += X::load(xr[j + l]);
      for (int64_t j = body; j < H; ++j) acc[j - body] += X::load(xr[j]);
      mean = reduce_lanes(acc) * inv_h;
    }
    // Two-pass variance (sum of squared deviations): no cancellation, and the row is in L1.
    float acc[kLanes] = {};
    for (int64_t j = 0; j < body; j += kLanes)
      for (int l = 0; l < kLanes; ++l) {
        const float d = X::load(xr[j + l]) - mean;
        acc[l] += d * d;
      }
    for (int64_t j = body; j < H; ++j) {
      const float d = X::load(xr[j]) - mean;
      acc[j - body] += d * d;
    }
    const float rstd = 1.f / std::sqrt(reduce_lanes(acc) * inv_h + eps);
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
MEGALITE_INLINE void bwd_tile_element(const typename X::T* __restrict dy, const typename X::T* __restrict x,
                                      const float* __restrict w, float* __restrict dw_part,
                                      float* __restrict db_part, const float* mean, const float* rstd, int64_t H,
                                      int64_t k, float (*sum_g)[kLanes], float (*sum_gx)[kLanes], int l) {
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
      bwd_tile_element<X, kRms, kT>(dy, x, w, dw_part, db_part, mean, rstd, H, j + l, sum_g, sum_gx, l);
  for (int64_t j = body; j < H; ++j)
    bwd_tile_element<X, kRms, kT>(dy, x, w, dw_part, db_part, mean, rstd, H, j, sum_g, sum_gx, int(j - body));
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
MEGALITE_ISA_CLONES void norm_bwd_rows(const typename X::T* __restrict dy, const typename X::T* __restrict x,
                                       const float* __restrict mean_in, const float* __restrict rstd_in,
                                       const float* __restrict w, typename X::T* __restrict dx,
                                       float* __restrict dw_part, float* __restrict db_part,
                                       typename X::T* __restrict stage, int64_t rows, int64_t H) {
  int64_t r = 0;
  for (; r + kTile <= rows; r += kTile)
    bwd_tile<X, kRms, kTile>(dy + r * H, x + r * H, kRms ? nullptr : mean_in + r, rstd_in + r, w, dx + r * H,
                             dw_part, db_part, stage, H, kTile);
  for (; r < rows; ++r)
    bwd_tile<X, kRms, 1>(dy + r * H, x + r * H, kRms ? nullptr : mean_in + r, rstd_in + r, w, dx + r * H,
                         dw_part, db_part, stage, H, 2);
}

MEGALITE_ISA_CLONES void add_into(float* __restrict dst, float* __restrict src, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    dst[j] += src[j];
    src[j] = 0.f;
  }
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
int64_t row_grain(int64_t H) { return std::max<int64_t>(1, 65536 / std::max<int64_t>(H, 1)); }

void check_input(const at::Tensor& x, const char* what) {
  TORCH_CHECK(x.device().is_cpu(), what, ": input must be on the CPU");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), what, ": expects a contiguous [rows, hidden] tensor");
}

// Weight as an fp32 pointer; a missing weight becomes ones (keeps one code path, costs H floats).
at::Tensor weight_or_ones(const c10::optional<at::Tensor>& w, int64_t H, const char* what) {
  if (!w.has_value() || !w->defined()) return at::ones({H}, at::kFloat);
  TORCH_CHECK(w->scalar_type() == at::kFloat && w->is_contiguous() && w->numel() == H && w->device().is_cpu(),
              what, ": weight/bias must be contiguous fp32 CPU tensors of size hidden=", H);
  return *w;
}

template <bool kRms>
std::vector<at::Tensor> norm_fwd(const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                                 const c10::optional<at::Tensor>& bias, double eps) {
  const char* what = kRms ? "rms_norm_fwd" : "layer_norm_fwd";
  check_input(x, what);
  const int64_t rows = x.size(0), H = x.size(1);
  at::Tensor w = weight_or_ones(weight, H, what);
  at::Tensor b = kRms ? w : (bias.has_value() && bias->defined() ? weight_or_ones(bias, H, what)
                                                                 : at::zeros({H}, at::kFloat));
  at::Tensor y = at::empty_like(x);
  at::Tensor mean = at::empty({kRms ? 0 : rows}, x.options().dtype(at::kFloat));
  at::Tensor rstd = at::empty({rows}, x.options().dtype(at::kFloat));
  dispatch_float_type(x.scalar_type(), what, [&](auto xt) {
    using X = decltype(xt);
    using T = typename X::T;
    const T* xp = static_cast<const T*>(x.data_ptr());
    T* yp = static_cast<T*>(y.data_ptr());
    float* mp = mean.data_ptr<float>();
    float* rp = rstd.data_ptr<float>();
    const float *wp = w.data_ptr<float>(), *bp = b.data_ptr<float>();
    const bool streaming = streams(y);
    at::parallel_for(0, rows, row_grain(H), [&](int64_t r0, int64_t r1) {
      std::vector<T> stage(streaming ? H : 0);
      norm_fwd_rows<X, kRms>(xp + r0 * H, wp, bp, yp + r0 * H, kRms ? nullptr : mp + r0, rp + r0,
                             streaming ? stage.data() : nullptr, r1 - r0, H, float(eps));
      if (streaming) stream_fence();
    });
  });
  if (kRms) return {y, rstd};
  return {y, mean, rstd};
}

// Returns {dx, dw, db}; dw/db are fp32 and undefined (None in Python) when not wanted.
template <bool kRms>
std::vector<at::Tensor> norm_bwd(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& mean,
                                 const at::Tensor& rstd, const c10::optional<at::Tensor>& weight,
                                 bool want_db) {
  const char* what = kRms ? "rms_norm_bwd" : "layer_norm_bwd";
  check_input(x, what);
  check_input(dy, what);
  TORCH_CHECK(dy.sizes() == x.sizes() && dy.scalar_type() == x.scalar_type(), what,
              ": dy must match x in shape and dtype");
  const int64_t rows = x.size(0), H = x.size(1);
  TORCH_CHECK(rstd.scalar_type() == at::kFloat && rstd.numel() == rows && rstd.is_contiguous(), what,
              ": rstd must be fp32 with one value per row");
  TORCH_CHECK(kRms || (mean.scalar_type() == at::kFloat && mean.numel() == rows && mean.is_contiguous()),
              what, ": mean must be fp32 with one value per row");
  const bool has_w = weight.has_value() && weight->defined();
  at::Tensor w = weight_or_ones(weight, H, what);
  at::Tensor dx = at::empty_like(x);

  // Each parallel task sums dw/db over its rows into its own [2, H] buffer, a block of
  // kBlockRows rows at a time (fp32 error then grows with kBlockRows + rows / kBlockRows, not
  // rows); the task buffers are added in the order of their first row, so the result does not
  // depend on which thread finished first.
  constexpr int64_t kBlockRows = 64;
  std::map<int64_t, at::Tensor> partials;
  std::mutex partials_mutex;

  dispatch_float_type(x.scalar_type(), what, [&](auto xt) {
    using X = decltype(xt);
    using T = typename X::T;
    const T* xp = static_cast<const T*>(x.data_ptr());
    const T* dyp = static_cast<const T*>(dy.data_ptr());
    T* dxp = static_cast<T*>(dx.data_ptr());
    const float* mp = kRms ? nullptr : mean.data_ptr<float>();
    const float* rp = rstd.data_ptr<float>();
    const float* wp = w.data_ptr<float>();
    const bool streaming = streams(dx);
    at::parallel_for(0, rows, row_grain(H), [&](int64_t r0, int64_t r1) {
      at::Tensor total = at::zeros({2, H}, at::kFloat);
      std::vector<float> blk(2 * H, 0.f);
      std::vector<T> stage(streaming ? H : 0);
      for (int64_t r = r0; r < r1; r += kBlockRows) {
        const int64_t n = std::min(kBlockRows, r1 - r);
        norm_bwd_rows<X, kRms>(dyp + r * H, xp + r * H, kRms ? nullptr : mp + r, rp + r, wp, dxp + r * H,
                               blk.data(), blk.data() + H, streaming ? stage.data() : nullptr, n, H);
        add_into(total.data_ptr<float>(), blk.data(), 2 * H);
      }
      if (streaming) stream_fence();
      std::lock_guard<std::mutex> lock(partials_mutex);
      partials.emplace(r0, total);
    });
  });
  at::Tensor sums = at::zeros({2, H}, at::kFloat);
  for (auto& kv : partials) sums += kv.second;
  at::Tensor dw = has_w ? sums[0].contiguous() : at::Tensor();
  at::Tensor db = (!kRms && want_db) ? sums[1].contiguous() : at::Tensor();
  if (kRms) return {dx, dw};
  return {dx, dw, db};
}

void register_norms(pybind11::module_& m) {
  m.def("layer_norm_fwd", &norm_fwd<false>, "LayerNorm forward over [rows, hidden] -> (y, mean, rstd)",
        py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("eps"));
  m.def("layer_norm_bwd", &norm_bwd<false>, "LayerNorm backward -> (dx, dweight, dbias)", py::arg("dy"),
        py::arg("x"), py::arg("mean"), py::arg("rstd"), py::arg("weight"), py::arg("need_bias_grad"));
  m.def("rms_norm_fwd",
        [](const at::Tensor& x, const c10::optional<at::Tensor>& w, double eps) {
          return norm_fwd<true>(x, w, c10::nullopt, eps);
        },
        "RMSNorm forward over [rows, hidden] -> (y, rstd)", py::arg("x"), py::arg("weight"), py::arg("eps"));
  m.def("rms_norm_bwd",
        [](const at::Tensor& dy, const at::Tensor& x, const at::Tensor& rstd, const c10::optional<at::Tensor>& w) {
          return norm_bwd<true>(dy, x, at::Tensor(), rstd, w, false);
        },
        "RMSNorm backward -> (dx, dweight)", py::arg("dy"), py::arg("x"), py::arg("rstd"), py::arg("weight"));
}

}  // namespace

MEGALITE_REGISTER(register_norms)

}  // namespace megalite
