// LayerNorm and RMSNorm on CUDA, forward and backward; fp32/bf16/fp16 input, fp32 statistics.
//
// One block per row (grid-stride over rows). The forward reads the row from memory once and
// re-reads it from L1/L2 for the variance and the output. The backward computes dx the same way
// and adds dy * xhat and dy into a per-block partial of dweight/dbias (each thread owns its
// columns, so no atomics); a second small kernel sums the partials in a fixed order, so the
// result is deterministic.
#include "common.cuh"

namespace megalite_cuda {
namespace {

int threads_for(int64_t hidden) {
  if (hidden <= 256) return 64;
  if (hidden <= 1024) return 128;
  if (hidden <= 4096) return 256;
  return 512;
}

template <typename T, bool kRms>
__global__ void norm_fwd_kernel(const T* __restrict__ x, const float* __restrict__ w,
                                const float* __restrict__ b, T* __restrict__ y,
                                float* __restrict__ mean_out, float* __restrict__ rstd_out,
                                int64_t rows, int hidden, float eps) {
  __shared__ float shared[64];
  const float inv_h = 1.f / float(hidden);
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const T* xr = x + r * hidden;
    T* yr = y + r * hidden;
    float mean = 0.f;
    if (!kRms) {
      float s = 0.f;
      for (int j = threadIdx.x; j < hidden; j += blockDim.x) s += Cvt<T>::load(xr[j]);
      mean = block_sum2(s, 0.f, shared).x * inv_h;
    }
    float ss = 0.f;  // two-pass variance: no cancellation
    for (int j = threadIdx.x; j < hidden; j += blockDim.x) {
      const float d = Cvt<T>::load(xr[j]) - mean;
      ss += d * d;
    }
    const float rstd = rsqrtf(block_sum2(ss, 0.f, shared).x * inv_h + eps);
    for (int j = threadIdx.x; j < hidden; j += blockDim.x) {
      float v = (Cvt<T>::load(xr[j]) - mean) * rstd;
      if (w) v *= w[j];
      if (!kRms && b) v += b[j];
      yr[j] = Cvt<T>::store(v);
    }
    if (threadIdx.x == 0) {
      if (!kRms) mean_out[r] = mean;
      rstd_out[r] = rstd;
    }
  }
}

// dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) with g = dy * w (RMSNorm: no mean(g) term).
template <typename T, bool kRms>
__global__ void norm_bwd_kernel(const T* __restrict__ dy, const T* __restrict__ x,
                                const float* __restrict__ mean_in,
                                const float* __restrict__ rstd_in, const float* __restrict__ w,
                                T* __restrict__ dx, float* __restrict__ partial, int64_t rows,
                                int hidden) {
  __shared__ float shared[64];
  const float inv_h = 1.f / float(hidden);
  float* pw = partial + (int64_t)blockIdx.x * 2 * hidden;  // this block's dw, then db
  float* pb = pw + hidden;
  for (int j = threadIdx.x; j < hidden; j += blockDim.x) pw[j] = pb[j] = 0.f;
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const T* xr = x + r * hidden;
    const T* dyr = dy + r * hidden;
    T* dxr = dx + r * hidden;
    const float mean = kRms ? 0.f : mean_in[r];
    const float rstd = rstd_in[r];
    float sg = 0.f, sgx = 0.f;
    for (int j = threadIdx.x; j < hidden; j += blockDim.x) {
      const float d = Cvt<T>::load(dyr[j]);
      const float xh = (Cvt<T>::load(xr[j]) - mean) * rstd;
      const float g = w ? d * w[j] : d;
      sg += g;
      sgx += g * xh;
      pw[j] += d * xh;
      pb[j] += d;
    }
    const float2 sums = block_sum2(sg, sgx, shared);
    const float a = kRms ? 0.f : sums.x * inv_h, c = sums.y * inv_h;
    for (int j = threadIdx.x; j < hidden; j += blockDim.x) {
      const float d = Cvt<T>::load(dyr[j]);
      const float xh = (Cvt<T>::load(xr[j]) - mean) * rstd;
      const float g = w ? d * w[j] : d;
      dxr[j] = Cvt<T>::store(rstd * (g - a - xh * c));
    }
  }
}

__global__ void sum_partials_kernel(const float* __restrict__ partial, int parts, int hidden,
                                    float* __restrict__ dw, float* __restrict__ db) {
  const int j = blockIdx.x * blockDim.x + threadIdx.x;
  if (j >= hidden) return;
  float sw = 0.f, sb = 0.f;
  for (int k = 0; k < parts; ++k) {
    sw += partial[(int64_t)k * 2 * hidden + j];
    sb += partial[(int64_t)k * 2 * hidden + hidden + j];
  }
  if (dw) dw[j] = sw;
  if (db) db[j] = sb;
}

int64_t bwd_blocks(int64_t rows, int device) {
  return rows < 1 ? 1 : std::min<int64_t>(rows, 2 * sm_count(device));
}

}  // namespace

int norm_fwd(bool rms, int dtype, const void* x, const float* w, const float* b, void* y,
             float* mean, float* rstd, int64_t rows, int64_t hidden, float eps, int device,
             void* stream) {
  if (rows == 0 || hidden == 0) return cudaSuccess;
  if (hidden > INT32_MAX) return cudaErrorInvalidValue;
  DeviceGuard guard(device);
  MEGALITE_CUDA_TRY(guard.status);
  auto s = static_cast<cudaStream_t>(stream);
  const int64_t blocks = std::min<int64_t>(rows, 16 * sm_count(device));
  const int threads = threads_for(hidden);
  const bool known = visit_dtype(dtype, [&](auto t) {
    using T = decltype(t);
    if (rms)
      norm_fwd_kernel<T, true><<<blocks, threads, 0, s>>>(static_cast<const T*>(x), w, nullptr,
                                                          static_cast<T*>(y), nullptr, rstd, rows,
                                                          (int)hidden, eps);
    else
      norm_fwd_kernel<T, false><<<blocks, threads, 0, s>>>(
          static_cast<const T*>(x), w, b, static_cast<T*>(y), mean, rstd, rows, (int)hidden, eps);
  });
  return known ? cudaGetLastError() : cudaErrorInvalidValue;
}

int64_t norm_bwd_workspace(int64_t rows, int64_t hidden, int device) {
  return bwd_blocks(rows, device) * 2 * hidden;
}

int norm_bwd(bool rms, int dtype, const void* dy, const void* x, const float* mean,
             const float* rstd, const float* w, void* dx, float* dw, float* db, float* workspace,
             int64_t rows, int64_t hidden, int device, void* stream) {
  if (hidden == 0) return cudaSuccess;
  if (hidden > INT32_MAX) return cudaErrorInvalidValue;
  DeviceGuard guard(device);
  MEGALITE_CUDA_TRY(guard.status);
  auto s = static_cast<cudaStream_t>(stream);
  const int64_t blocks = bwd_blocks(rows, device);
  const int threads = threads_for(hidden);
  // With no rows the partials are never written: zero them so dw/db come out as zeros.
  if (rows == 0)
    MEGALITE_CUDA_TRY(cudaMemsetAsync(workspace, 0, sizeof(float) * blocks * 2 * hidden, s));
  const bool known = visit_dtype(dtype, [&](auto t) {
    using T = decltype(t);
    if (rows == 0) return;
    if (rms)
      norm_bwd_kernel<T, true>
          <<<blocks, threads, 0, s>>>(static_cast<const T*>(dy), static_cast<const T*>(x), nullptr,
                                      rstd, w, static_cast<T*>(dx), workspace, rows, (int)hidden);
    else
      norm_bwd_kernel<T, false>
          <<<blocks, threads, 0, s>>>(static_cast<const T*>(dy), static_cast<const T*>(x), mean,
                                      rstd, w, static_cast<T*>(dx), workspace, rows, (int)hidden);
  });
  if (!known) return cudaErrorInvalidValue;
  MEGALITE_CUDA_TRY(cudaGetLastError());
  if (dw || db) {
    const int t = 256;
    sum_partials_kernel<<<(hidden + t - 1) / t, t, 0, s>>>(workspace, (int)blocks, (int)hidden, dw,
                                                           db);
    MEGALITE_CUDA_TRY(cudaGetLastError());
  }
  return cudaSuccess;
}

}  // namespace megalite_cuda
