// Device helpers shared by the .cu files: dtype conversion, block reductions, the device guard,
// and the multi-tensor launcher (apex's multi_tensor_apply, reduced to what megalite needs).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels.h"

namespace megalite_cuda {

#define MEGALITE_CUDA_TRY(expr)           \
  do {                                    \
    cudaError_t err_ = (expr);            \
    if (err_ != cudaSuccess) return err_; \
  } while (0)

// Run on the tensors' device and give the caller's device back afterwards.
struct DeviceGuard {
  int previous = -1;
  cudaError_t status = cudaSuccess;
  explicit DeviceGuard(int device) {
    status = cudaGetDevice(&previous);
    if (status == cudaSuccess && previous != device) status = cudaSetDevice(device);
  }
  ~DeviceGuard() {
    int now = -1;
    if (previous >= 0 && cudaGetDevice(&now) == cudaSuccess && now != previous)
      cudaSetDevice(previous);
  }
};

inline int sm_count(int device) {
  int sms = 0;
  if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess ||
      sms <= 0)
    sms = 80;
  return sms;
}

// Storage type <-> fp32.
template <typename T>
struct Cvt;
template <>
struct Cvt<float> {
  static __device__ __forceinline__ float load(float x) { return x; }
  static __device__ __forceinline__ float store(float x) { return x; }
};
template <>
struct Cvt<__nv_bfloat16> {
  static __device__ __forceinline__ float load(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __device__ __forceinline__ __nv_bfloat16 store(float x) { return __float2bfloat16_rn(x); }
};
template <>
struct Cvt<__half> {
  static __device__ __forceinline__ float load(__half x) { return __half2float(x); }
  static __device__ __forceinline__ __half store(float x) { return __float2half_rn(x); }
};

// Call fn(T{}) with the storage type of a DType (returns false for an unknown one).
template <typename Fn>
inline bool visit_dtype(int dtype, Fn&& fn) {
  switch (dtype) {
    case kF32:
      fn(float{});
      return true;
    case kBF16:
      fn(__nv_bfloat16{});
      return true;
    case kF16:
      fn(__half{});
      return true;
    default:
      return false;
  }
}

__device__ __forceinline__ float warp_sum(float v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Sum two values over the block (blockDim.x a multiple of 32, at most 1024). `shared` holds 64
// floats. Every thread gets the result.
__device__ __forceinline__ float2 block_sum2(float a, float b, float* shared) {
  a = warp_sum(a);
  b = warp_sum(b);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  if (lane == 0) {
    shared[warp] = a;
    shared[32 + warp] = b;
  }
  __syncthreads();
  if (warp == 0) {
    a = lane < warps ? shared[lane] : 0.f;
    b = lane < warps ? shared[32 + lane] : 0.f;
    a = warp_sum(a);
    b = warp_sum(b);
    if (lane == 0) {
      shared[0] = a;
      shared[32] = b;
    }
  }
  __syncthreads();
  const float2 result = make_float2(shared[0], shared[32]);
  __syncthreads();  // `shared` is reused by the next call
  return result;
}

// ---------------------------------------------------------------------------------------------
// Multi-tensor apply. A launch carries, by value in its kernel arguments (no host-to-device
// copy, nothing to free), up to kMaxTensors tensor descriptors and a table mapping each block to
// (tensor, chunk). Long lists take several launches; a tensor may straddle two.
template <typename Meta, int kMaxTensors, int kMaxBlocks>
struct MultiTensorArgs {
  Meta tensors[kMaxTensors];
  unsigned char block_tensor[kMaxBlocks];
  int block_chunk[kMaxBlocks];
};

// launch(args, blocks) launches one kernel; numel(meta) gives a tensor's size in chunk units'
// elements; chunk is the elements per block.
template <typename Args, int kMaxTensors, int kMaxBlocks, typename Meta, typename NumelFn,
          typename LaunchFn>
cudaError_t multi_tensor_apply(const Meta* metas, int count, int64_t chunk, NumelFn numel,
                               LaunchFn launch) {
  Args args;
  int tensors = 0, blocks = 0;
  for (int i = 0; i < count; ++i) {
    const int64_t n = numel(metas[i]);
    if (n == 0) continue;
    args.tensors[tensors] = metas[i];
    const int64_t chunks = (n + chunk - 1) / chunk;
    for (int64_t c = 0; c < chunks; ++c) {
      args.block_tensor[blocks] = (unsigned char)tensors;
      args.block_chunk[blocks] = (int)c;
      ++blocks;
      const bool blocks_full = blocks == kMaxBlocks;
      const bool tensors_full = tensors + 1 == kMaxTensors && c + 1 == chunks;
      if (blocks_full || tensors_full) {
        MEGALITE_CUDA_TRY(launch(args, blocks));
        blocks = 0;
        if (c + 1 < chunks) {  // the rest of this tensor opens the next launch
          args.tensors[0] = metas[i];
          tensors = 0;
        } else {
          tensors = -1;  // incremented to 0 below
        }
      }
    }
    ++tensors;
  }
  if (blocks > 0) MEGALITE_CUDA_TRY(launch(args, blocks));
  return cudaSuccess;
}

}  // namespace megalite_cuda
