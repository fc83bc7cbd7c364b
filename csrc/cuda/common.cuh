// Device helpers shared by the .cu files: dtype conversion, 16-byte packed loads and stores,
// block reductions, and the multi-tensor launcher (apex's multi_tensor_apply, reduced to what
// megalite needs).
//
// There is no device guard here: every launcher runs on the current device, which the binding
// (bindings.cpp) sets to the tensors' device with torch's own guard. That guard restores the
// previous device only where a context already exists, whereas a plain cudaSetDevice(previous)
// would create a context (hundreds of MB) on that device, typically GPU 0, in every
// process.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>

#include "kernels.h"

namespace megalite_cuda {

#define MEGALITE_CUDA_TRY(expr)           \
  do {                                    \
    cudaError_t err_ = (expr);            \
    if (err_ != cudaSuccess) return err_; \
  } while (0)

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

// ---- packed access ----------------------------------------------------------------------------
// N consecutive elements of T moved with the widest access they allow: 16 bytes per instruction
// (float4, 8 x bf16, 8 x fp16), or the whole pack when it is smaller. p must be aligned to that
// width; callers check it on the host (aligned16) and otherwise use N = 1.
template <int Bytes>
struct Word;
template <>
struct Word<16> {
  using type = uint4;
};
template <>
struct Word<8> {
  using type = uint2;
};
template <>
struct Word<4> {
  using type = unsigned int;
};
template <>
struct Word<2> {
  using type = unsigned short;
};

template <typename T, int N>
struct PackShape {
  static constexpr int kBytes = int(sizeof(T)) * N;
  static constexpr int kWordBytes = kBytes < 16 ? kBytes : 16;
  static constexpr int kWords = kBytes / kWordBytes;
  static constexpr int kPerWord = kWordBytes / int(sizeof(T));
  using W = typename Word<kWordBytes>::type;
};

template <int N, typename T>
__device__ __forceinline__ void load_f32(const T* __restrict__ p, float (&out)[N]) {
  using S = PackShape<T, N>;
#pragma unroll
  for (int w = 0; w < S::kWords; ++w) {
    const typename S::W word = reinterpret_cast<const typename S::W*>(p)[w];
    T vals[S::kPerWord];
    memcpy(vals, &word, S::kWordBytes);
#pragma unroll
    for (int i = 0; i < S::kPerWord; ++i) out[w * S::kPerWord + i] = Cvt<T>::load(vals[i]);
  }
}

template <int N, typename T>
__device__ __forceinline__ void store_f32(T* __restrict__ p, const float (&in)[N]) {
  using S = PackShape<T, N>;
#pragma unroll
  for (int w = 0; w < S::kWords; ++w) {
    T vals[S::kPerWord];
#pragma unroll
    for (int i = 0; i < S::kPerWord; ++i) vals[i] = Cvt<T>::store(in[w * S::kPerWord + i]);
    typename S::W word;
    memcpy(&word, vals, S::kWordBytes);
    reinterpret_cast<typename S::W*>(p)[w] = word;
  }
}

inline bool aligned16(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0;
}

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
