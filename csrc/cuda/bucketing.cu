// Multi-tensor copy on CUDA: flatten a list of tensors into a flat buffer (or back) in one
// launch instead of one cudaMemcpyAsync per tensor, which matters for the hundreds of small
// params (norm weights, biases) of a model. Each block copies one chunk of one tensor with the
// widest access both addresses allow (16, 8, 4, 2 or 1 bytes).
#include <vector>

#include "common.cuh"

namespace megalite_cuda {
namespace {

struct CopyRange {
  const char* src;
  char* dst;
  int64_t n;  // bytes
};

constexpr int kThreads = 256;
constexpr int64_t kChunk = 64 * 1024;  // bytes per block: a multiple of 16, so chunks stay aligned
constexpr int kMaxTensors = 48;
constexpr int kMaxBlocks = 320;
using CopyArgs = MultiTensorArgs<CopyRange, kMaxTensors, kMaxBlocks>;

template <typename W>
__device__ __forceinline__ void copy_as(const char* src, char* dst, int64_t bytes) {
  const int64_t words = bytes / int64_t(sizeof(W));
  const W* s = reinterpret_cast<const W*>(src);
  W* d = reinterpret_cast<W*>(dst);
  for (int64_t i = threadIdx.x; i < words; i += kThreads) d[i] = s[i];
  for (int64_t i = words * int64_t(sizeof(W)) + threadIdx.x; i < bytes; i += kThreads)
    dst[i] = src[i];
}

__global__ void __launch_bounds__(kThreads) copy_kernel(CopyArgs args) {
  const CopyRange& t = args.tensors[args.block_tensor[blockIdx.x]];
  const int64_t start = (int64_t)args.block_chunk[blockIdx.x] * kChunk;
  const int64_t bytes = min(kChunk, t.n - start);
  const char* src = t.src + start;
  char* dst = t.dst + start;
  const uintptr_t both = reinterpret_cast<uintptr_t>(src) | reinterpret_cast<uintptr_t>(dst);
  if (both % 16 == 0)
    copy_as<uint4>(src, dst, bytes);
  else if (both % 8 == 0)
    copy_as<uint2>(src, dst, bytes);
  else if (both % 4 == 0)
    copy_as<unsigned int>(src, dst, bytes);
  else if (both % 2 == 0)
    copy_as<unsigned short>(src, dst, bytes);
  else
    copy_as<unsigned char>(src, dst, bytes);
}

int64_t bytes_of(const CopyRange& r) {
  return r.n;
}

}  // namespace

int multi_copy(const void* const* src, void* const* dst, const int64_t* nbytes, int count,
               int device, void* stream) {
  std::vector<CopyRange> ranges(count);
  for (int i = 0; i < count; ++i)
    ranges[i] = CopyRange{static_cast<const char*>(src[i]), static_cast<char*>(dst[i]), nbytes[i]};
  auto s = static_cast<cudaStream_t>(stream);
  return multi_tensor_apply<CopyArgs, kMaxTensors, kMaxBlocks>(
      ranges.data(), count, kChunk, bytes_of, [&](const CopyArgs& args, int blocks) {
        copy_kernel<<<blocks, kThreads, 0, s>>>(args);
        return cudaGetLastError();
      });
}

}  // namespace megalite_cuda
