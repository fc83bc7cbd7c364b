// LayerNorm and RMSNorm on CUDA, forward and backward: fp32/bf16/fp16 activations, fp32 weight,
// bias and statistics, fp32 arithmetic.
//
// Memory design. Both kernels do a few flops per byte, so what matters is how often each byte
// crosses DRAM and how wide the accesses are.
//
// Access width. When hidden is a multiple of a 16-byte pack (4 x fp32, 8 x bf16/fp16) and every
// pointer is 16-byte aligned, each thread moves one pack per load or store (load_f32/store_f32 in
// common.cuh), and consecutive threads take consecutive packs: a warp moves 512 contiguous bytes
// per instruction. Otherwise the same kernels run with packs of one element.
//
// Forward (norm_fwd_kernel): one block per row, grid-stride over the rows. The row comes from
// DRAM once; the variance and the output passes re-read it from L1/L2 (a row is at most a few
// tens of KB). Two-pass variance (the sum of (x - mean)^2), so no cancellation. mean/rstd are
// written once per row.
//
// Backward (norm_bwd_kernel): grid = (row blocks, column slices). A block walks the rows
// blockIdx.x, blockIdx.x + gridDim.x, ...; for each row
//   pass 1 reads the whole row of dy and x (DRAM) and block-reduces sum(g) and sum(g * xhat),
//          g = dy * weight;
//   pass 2 re-reads this thread's own columns (L1/L2), writes dx, and adds dy * xhat and dy to
//          dweight/dbias partials held in registers.
// A thread owns the same columns in every row, so its partials stay in registers across all the
// block's rows and are written once, at the end, to workspace[row block][2 * hidden]: no shared
// memory and no atomics for them. A thread owns up to kElems columns (8 up to hidden 4096, else
// 32), so a slice covers threads x kElems columns (at most 512 x 32 = 16384); wider rows are cut
// into column slices (grid.y), each of which redoes pass 1 over the full row.
// sum_partials_kernel then adds the row blocks' partials of each column in a fixed order, so
// dweight/dbias are the same bits on every run on a given GPU (the number of row blocks follows
// its SM count).
// DRAM traffic: x and dy read once, dx written once, plus 2 x hidden floats per row block of
// partials written and read once (under 1% at 20000 x 4096).
//
// nvcc contracts a * b + c into FMAs (the CPU kernels are built with -ffp-contract=off), so CUDA
// and CPU results agree to rounding, not bit for bit.
#include <algorithm>
#include <type_traits>

#include "common.cuh"

namespace megalite_cuda {
namespace {

constexpr int kMaxThreads = 512;
constexpr int kSumCols = 32;   // sum_partials_kernel: columns per block (one per lane) ...
constexpr int kSumParts = 16;  // ... times this many threads striding over the row blocks

int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

int round_up_warp(int64_t n) {
  return int(ceil_div(n, 32) * 32);
}

// dy * weight (dy alone without a weight).
template <int V>
__device__ __forceinline__ float weighted(const float (&d)[V], const float (&w)[V], bool has_w,
                                          int i) {
  return has_w ? d[i] * w[i] : d[i];
}

template <typename T, bool kRms, int V>
__global__ void __launch_bounds__(kMaxThreads)
    norm_fwd_kernel(const T* __restrict__ x, const float* __restrict__ w,
                    const float* __restrict__ b, T* __restrict__ y, float* __restrict__ mean_out,
                    float* __restrict__ rstd_out, int64_t rows, int hidden, float eps) {
  __shared__ float shared[64];
  const int packs = hidden / V;
  const float inv_h = 1.f / float(hidden);
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const T* xr = x + r * hidden;
    T* yr = y + r * hidden;
    float mean = 0.f;
    if (!kRms) {
      float s = 0.f;
      for (int p = threadIdx.x; p < packs; p += blockDim.x) {
        float v[V];
        load_f32<V>(xr + p * V, v);
#pragma unroll
        for (int i = 0; i < V; ++i) s += v[i];
      }
      mean = block_sum2(s, 0.f, shared).x * inv_h;
    }
    float ss = 0.f;
    for (int p = threadIdx.x; p < packs; p += blockDim.x) {
      float v[V];
      load_f32<V>(xr + p * V, v);
#pragma unroll
      for (int i = 0; i < V; ++i) ss += (v[i] - mean) * (v[i] - mean);
    }
    const float rstd = rsqrtf(block_sum2(ss, 0.f, shared).x * inv_h + eps);
    for (int p = threadIdx.x; p < packs; p += blockDim.x) {
      float v[V], wv[V], bv[V];
      load_f32<V>(xr + p * V, v);
      if (w) load_f32<V>(w + p * V, wv);
      if (!kRms && b) load_f32<V>(b + p * V, bv);
#pragma unroll
      for (int i = 0; i < V; ++i) {
        v[i] = (v[i] - mean) * rstd;
        if (w) v[i] *= wv[i];
        if (!kRms && b) v[i] += bv[i];
      }
      store_f32<V>(yr + p * V, v);
    }
    if (threadIdx.x == 0) {
      if (!kRms) mean_out[r] = mean;
      rstd_out[r] = rstd;
    }
  }
}

// dx = rstd * (g - mean(g) - xhat * mean(g * xhat)), g = dy * w (RMSNorm: no mean(g) term).
// partial (nullptr: dweight/dbias not wanted) receives this block's sums of dy * xhat and dy.
template <typename T, bool kRms, int V, int kElems>
__global__ void __launch_bounds__(kMaxThreads)
    norm_bwd_kernel(const T* __restrict__ dy, const T* __restrict__ x,
                    const float* __restrict__ mean_in, const float* __restrict__ rstd_in,
                    const float* __restrict__ w, T* __restrict__ dx, float* __restrict__ partial,
                    int64_t rows, int hidden) {
  constexpr int kPacks = kElems / V;  // packs this thread owns
  __shared__ float shared[64];
  const int packs = hidden / V;
  const float inv_h = 1.f / float(hidden);
  const bool has_w = w != nullptr;
  // This thread's packs: own + k * blockDim.x, k < kPacks, inside this block's column slice.
  const int own = blockIdx.y * blockDim.x * kPacks + threadIdx.x;
  float dw[kPacks][V], db[kPacks][V];
#pragma unroll
  for (int k = 0; k < kPacks; ++k)
#pragma unroll
    for (int i = 0; i < V; ++i) dw[k][i] = db[k][i] = 0.f;

  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const T* xr = x + r * hidden;
    const T* dyr = dy + r * hidden;
    T* dxr = dx + r * hidden;
    const float mean = kRms ? 0.f : mean_in[r];
    const float rstd = rstd_in[r];
    float sg = 0.f, sgx = 0.f;
    for (int p = threadIdx.x; p < packs; p += blockDim.x) {  // pass 1: the whole row
      float d[V], xv[V], wv[V];
      load_f32<V>(dyr + p * V, d);
      load_f32<V>(xr + p * V, xv);
      if (has_w) load_f32<V>(w + p * V, wv);
#pragma unroll
      for (int i = 0; i < V; ++i) {
        const float g = weighted(d, wv, has_w, i);
        sg += g;
        sgx += g * ((xv[i] - mean) * rstd);
      }
    }
    const float2 sums = block_sum2(sg, sgx, shared);
    const float a = kRms ? 0.f : sums.x * inv_h, c = sums.y * inv_h;
#pragma unroll
    for (int k = 0; k < kPacks; ++k) {  // pass 2: this thread's columns
      const int p = own + k * blockDim.x;
      if (p >= packs) break;
      float d[V], xv[V], wv[V], out[V];
      load_f32<V>(dyr + p * V, d);
      load_f32<V>(xr + p * V, xv);
      if (has_w) load_f32<V>(w + p * V, wv);
#pragma unroll
      for (int i = 0; i < V; ++i) {
        const float xh = (xv[i] - mean) * rstd;
        out[i] = rstd * (weighted(d, wv, has_w, i) - a - xh * c);
        dw[k][i] += d[i] * xh;
        if (!kRms) db[k][i] += d[i];
      }
      store_f32<V>(dxr + p * V, out);
    }
  }
  if (partial == nullptr) return;
  float* pw = partial + int64_t(blockIdx.x) * 2 * hidden;  // this row block's dw, then db
#pragma unroll
  for (int k = 0; k < kPacks; ++k) {
    const int p = own + k * blockDim.x;
    if (p >= packs) break;
    store_f32<V>(pw + p * V, dw[k]);
    if (!kRms) store_f32<V>(pw + hidden + p * V, db[k]);
  }
}

// dw[j] = sum over row blocks k of partial[k][j] (db: partial[k][hidden + j]), in a fixed order:
// thread y adds blocks y, y + kSumParts, ...; then the kSumParts sums are added in order of y.
__global__ void __launch_bounds__(kSumCols* kSumParts)
    sum_partials_kernel(const float* __restrict__ partial, int parts, int hidden,
                        float* __restrict__ dw, float* __restrict__ db) {
  __shared__ float sw[kSumParts][kSumCols], sb[kSumParts][kSumCols];
  const int j = blockIdx.x * kSumCols + threadIdx.x;
  float a = 0.f, b = 0.f;
  if (j < hidden) {
    for (int k = threadIdx.y; k < parts; k += kSumParts) {
      const float* row = partial + int64_t(k) * 2 * hidden;
      if (dw) a += row[j];
      if (db) b += row[hidden + j];
    }
  }
  sw[threadIdx.y][threadIdx.x] = a;
  sb[threadIdx.y][threadIdx.x] = b;
  __syncthreads();
  if (threadIdx.y != 0 || j >= hidden) return;
  for (int y = 1; y < kSumParts; ++y) {
    a += sw[y][threadIdx.x];
    b += sb[y][threadIdx.x];
  }
  if (dw) dw[j] = a;
  if (db) db[j] = b;
}

// Calls fn(T{}, kRms, V) with the storage type, RMS flag and pack width as compile-time values
// (V = 16 bytes of T when vectorised, else 1). False for an unknown dtype.
template <typename Fn>
bool visit_norm(int dtype, bool rms, bool vectorised, Fn&& fn) {
  return visit_dtype(dtype, [&](auto t) {
    using T = decltype(t);
    constexpr int kPack = 16 / int(sizeof(T));
    auto with_rms = [&](auto v) {
      if (rms)
        fn(t, std::true_type{}, v);
      else
        fn(t, std::false_type{}, v);
    };
    if (vectorised)
      with_rms(std::integral_constant<int, kPack>{});
    else
      with_rms(std::integral_constant<int, 1>{});
  });
}

int pack_elems(int dtype) {
  return dtype == kF32 ? 4 : 8;
}

// The backward's launch shape; it depends only on rows, hidden and the GPU, so the binding can
// size the workspace before the launch (norm_bwd_workspace).
struct BwdShape {
  int elems;       // columns (and partials) per thread: 8 or 32
  int threads;     // per block
  int slices;      // column slices (grid.y)
  int64_t blocks;  // row blocks (grid.x)
};

BwdShape bwd_shape(int64_t rows, int64_t hidden, int device) {
  BwdShape s;
  s.elems = hidden <= kMaxThreads * 8 ? 8 : 32;
  s.threads = int(std::min<int64_t>(kMaxThreads, round_up_warp(ceil_div(hidden, s.elems))));
  s.slices = int(ceil_div(hidden, int64_t(s.threads) * s.elems));
  // About 1024 resident threads per SM (fewer leave DRAM idle), and no block without a row.
  const int64_t per_sm = std::max(1, 1024 / s.threads);
  s.blocks = std::max<int64_t>(1, std::min<int64_t>(rows, sm_count(device) * per_sm));
  return s;
}

}  // namespace

int norm_fwd(bool rms, int dtype, const void* x, const float* w, const float* b, void* y,
             float* mean, float* rstd, int64_t rows, int64_t hidden, float eps, int device,
             void* stream) {
  if (rows == 0 || hidden == 0) return cudaSuccess;
  if (hidden > INT32_MAX) return cudaErrorInvalidValue;
  auto s = static_cast<cudaStream_t>(stream);
  const bool vectorised = hidden % pack_elems(dtype) == 0 && aligned16(x) && aligned16(y) &&
                          (!w || aligned16(w)) && (!b || aligned16(b));
  const int packs = int(vectorised ? hidden / pack_elems(dtype) : hidden);
  const int threads = std::min(kMaxThreads, std::max(32, round_up_warp(ceil_div(packs, 4))));
  const int64_t blocks = std::min<int64_t>(rows, 16 * sm_count(device));
  const bool known = visit_norm(dtype, rms, vectorised, [&](auto t, auto is_rms, auto v) {
    using T = decltype(t);
    norm_fwd_kernel<T, decltype(is_rms)::value, decltype(v)::value><<<blocks, threads, 0, s>>>(
        static_cast<const T*>(x), w, b, static_cast<T*>(y), mean, rstd, rows, int(hidden), eps);
  });
  return known ? cudaGetLastError() : cudaErrorInvalidValue;
}

int64_t norm_bwd_workspace(int64_t rows, int64_t hidden, int device) {
  return bwd_shape(rows, hidden, device).blocks * 2 * hidden;
}

int norm_bwd(bool rms, int dtype, const void* dy, const void* x, const float* mean,
             const float* rstd, const float* w, void* dx, float* dw, float* db, float* workspace,
             int64_t rows, int64_t hidden, int device, void* stream) {
  if (hidden == 0) return cudaSuccess;
  if (hidden > INT32_MAX) return cudaErrorInvalidValue;
  auto s = static_cast<cudaStream_t>(stream);
  if (rows == 0) {  // no rows: no dx, and dweight/dbias are sums over nothing
    if (dw) MEGALITE_CUDA_TRY(cudaMemsetAsync(dw, 0, sizeof(float) * hidden, s));
    if (db) MEGALITE_CUDA_TRY(cudaMemsetAsync(db, 0, sizeof(float) * hidden, s));
    return cudaSuccess;
  }
  const BwdShape shape = bwd_shape(rows, hidden, device);
  const bool want_partials = dw || db;
  float* partial = want_partials ? workspace : nullptr;
  const bool vectorised = hidden % pack_elems(dtype) == 0 && aligned16(dy) && aligned16(x) &&
                          aligned16(dx) && (!w || aligned16(w)) && aligned16(workspace);
  const dim3 grid(unsigned(shape.blocks), unsigned(shape.slices));
  const bool known = visit_norm(dtype, rms, vectorised, [&](auto t, auto is_rms, auto v) {
    using T = decltype(t);
    constexpr bool kRms = decltype(is_rms)::value;
    constexpr int V = decltype(v)::value;
    const auto launch = [&](auto kernel) {
      kernel<<<grid, shape.threads, 0, s>>>(static_cast<const T*>(dy), static_cast<const T*>(x),
                                            mean, rstd, w, static_cast<T*>(dx), partial, rows,
                                            int(hidden));
    };
    if (shape.elems == 8)
      launch(norm_bwd_kernel<T, kRms, V, 8>);
    else
      launch(norm_bwd_kernel<T, kRms, V, 32>);
  });
  if (!known) return cudaErrorInvalidValue;
  MEGALITE_CUDA_TRY(cudaGetLastError());
  if (want_partials) {
    const dim3 threads(kSumCols, kSumParts);
    sum_partials_kernel<<<unsigned(ceil_div(hidden, kSumCols)), threads, 0, s>>>(
        workspace, int(shape.blocks), int(hidden), dw, db);
    MEGALITE_CUDA_TRY(cudaGetLastError());
  }
  return cudaSuccess;
}

}  // namespace megalite_cuda
