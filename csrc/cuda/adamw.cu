// Fused AdamW on CUDA: multi-tensor apply over chunked tensor lists.
//
// Same arithmetic as the CPU kernel (csrc/adamw.cpp) and torch.optim.AdamW. Two launches per
// group of tensors, on one stream: a check of every grad that sets a device flag on inf/nan, then
// the update, whose blocks return at once when the flag is set. The host reads the flag only
// after both (one synchronisation, which the bool result needs anyway), so "nothing is updated
// on an inf" costs one extra read of the grads and no round trip. Unchecked calls
// (check_finite=False: the caller already knows the grads are finite, or hands over its own
// flag, found_inf, already in device memory) launch only the update and do not synchronise at
// all; the grad scale and the step count (bias correction) may also come from device memory,
// so the trainer's step, whose scale depends on the global grad norm and whose count depends on
// which steps were skipped, never waits for the host.
#include <type_traits>
#include <vector>

#include "common.cuh"

namespace megalite_cuda {
namespace {

constexpr int kThreads = 512;
constexpr int kIlp = 4;                          // elements in flight per thread
constexpr int64_t kChunk = kThreads * kIlp * 8;  // elements per block
constexpr int kMaxTensors = 20;
constexpr int kMaxBlocks = 320;
using AdamwArgs = MultiTensorArgs<AdamwTensor, kMaxTensors, kMaxBlocks>;
// Kernel arguments are limited to 4 KiB (before CUDA 12.1): the args and four scalars.
static_assert(sizeof(AdamwArgs) + 4 * sizeof(void*) <= 4096, "AdamwArgs exceeds 4 KiB");

template <typename G>
__global__ void __launch_bounds__(kThreads) check_kernel(AdamwArgs args, int* found) {
  const AdamwTensor& t = args.tensors[args.block_tensor[blockIdx.x]];
  const int64_t start = (int64_t)args.block_chunk[blockIdx.x] * kChunk;
  const int64_t end = min(start + kChunk, t.n);
  const G* g = static_cast<const G*>(t.g);
  bool bad = false;
  for (int64_t i = start + threadIdx.x; i < end; i += kThreads)
    bad |= !isfinite(Cvt<G>::load(g[i]));
  if (__syncthreads_or(bad) && threadIdx.x == 0) atomicExch(found, 1);
}

template <typename G, typename C, bool kCopy>
__global__ void __launch_bounds__(kThreads)
    update_kernel(AdamwArgs args, float inv_scale, const float* grad_scale, const int* found,
                  const float* step) {
  // found: the check (earlier on this stream) or the caller saw an inf/nan: update nothing
  if (*found) return;
  // A scale in device memory (the trainer's loss scale / clip coefficient, computed there):
  // its correctly rounded reciprocal, the float the CPU kernel gets from 1.0 / double(scale).
  if (grad_scale != nullptr) inv_scale = __frcp_rn(*grad_scale);
  const AdamwTensor& t = args.tensors[args.block_tensor[blockIdx.x]];
  // A step count in device memory (the trainer's, advanced there only by the steps taken): the
  // bias corrections in double, as the host derives them (csrc/adamw.cpp), once per block
  // (double math is slow on many GPUs) and shared.
  __shared__ float bias_correction[2];  // step_size, inv_bc2_sqrt
  if (step != nullptr) {
    if (threadIdx.x == 0) {
      const double s = double(*step);
      bias_correction[0] = float(t.lr_d / (1.0 - pow(t.beta1_d, s)));
      bias_correction[1] = float(1.0 / sqrt(1.0 - pow(t.beta2_d, s)));
    }
    __syncthreads();
  }
  const float step_size = step != nullptr ? bias_correction[0] : t.step_size;
  const float inv_bc2_sqrt = step != nullptr ? bias_correction[1] : t.inv_bc2_sqrt;
  const int64_t start = (int64_t)args.block_chunk[blockIdx.x] * kChunk;
  const int64_t end = min(start + kChunk, t.n);
  const G* g = static_cast<const G*>(t.g);
  C* copy = static_cast<C*>(t.copy);
  for (int64_t base = start; base < end; base += kThreads * kIlp) {
    // Load kIlp elements per thread first (coalesced: consecutive threads, consecutive
    // elements), then compute and store: more bytes in flight per thread.
    float p[kIlp], gr[kIlp], m[kIlp], v[kIlp];
#pragma unroll
    for (int k = 0; k < kIlp; ++k) {
      const int64_t i = base + threadIdx.x + (int64_t)k * kThreads;
      if (i < end) {
        p[k] = t.p[i];
        gr[k] = Cvt<G>::load(g[i]);
        m[k] = t.m[i];
        v[k] = t.v[i];
      }
    }
#pragma unroll
    for (int k = 0; k < kIlp; ++k) {
      const int64_t i = base + threadIdx.x + (int64_t)k * kThreads;
      if (i < end) {
        const float gi = gr[k] * inv_scale;
        float pi = p[k];
        pi = pi - pi * t.lr_wd;
        const float mi = m[k] + t.one_minus_b1 * (gi - m[k]);
        const float vi = v[k] * t.beta2 + gi * gi * t.one_minus_b2;
        const float denom = sqrtf(vi) * inv_bc2_sqrt + t.eps;
        pi = pi - step_size * mi / denom;
        t.p[i] = pi;
        t.m[i] = mi;
        t.v[i] = vi;
        if (kCopy) copy[i] = Cvt<C>::store(pi);
      }
    }
  }
}

int64_t numel_of(const AdamwTensor& t) {
  return t.n;
}

// Tensors of one dtype combination (the kernels are specialised on it).
std::vector<AdamwTensor> select(const AdamwTensor* tensors, int count, int g_dtype, int c_dtype,
                                bool any_copy) {
  std::vector<AdamwTensor> out;
  for (int i = 0; i < count; ++i)
    if (tensors[i].g_dtype == g_dtype && (any_copy || tensors[i].copy_dtype == c_dtype))
      out.push_back(tensors[i]);
  return out;
}
}  // namespace

int adamw_check(const AdamwTensor* tensors, int count, int* d_found, int device, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  for (int g_dtype : {kF32, kBF16, kF16}) {
    const std::vector<AdamwTensor> group = select(tensors, count, g_dtype, kNoType, true);
    if (group.empty()) continue;
    cudaError_t err = cudaSuccess;
    visit_dtype(g_dtype, [&](auto g) {
      using G = decltype(g);
      err = multi_tensor_apply<AdamwArgs, kMaxTensors, kMaxBlocks>(
          group.data(), (int)group.size(), kChunk, numel_of,
          [&](const AdamwArgs& args, int blocks) {
            check_kernel<G><<<blocks, kThreads, 0, s>>>(args, d_found);
            return cudaGetLastError();
          });
    });
    MEGALITE_CUDA_TRY(err);
  }
  return cudaSuccess;
}

int adamw_update(const AdamwTensor* tensors, int count, float inv_scale, const float* d_grad_scale,
                 const int* d_found, const float* d_step, int device, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  for (int g_dtype : {kF32, kBF16, kF16}) {
    for (int c_dtype : {kNoType, kF32, kBF16, kF16}) {
      const std::vector<AdamwTensor> group = select(tensors, count, g_dtype, c_dtype, false);
      if (group.empty()) continue;
      cudaError_t err = cudaSuccess;
      auto run = [&](auto g, auto c, auto copy_flag) {
        using G = decltype(g);
        using C = decltype(c);
        constexpr bool kCopy = decltype(copy_flag)::value;
        err = multi_tensor_apply<AdamwArgs, kMaxTensors, kMaxBlocks>(
            group.data(), (int)group.size(), kChunk, numel_of,
            [&](const AdamwArgs& args, int blocks) {
              update_kernel<G, C, kCopy>
                  <<<blocks, kThreads, 0, s>>>(args, inv_scale, d_grad_scale, d_found, d_step);
              return cudaGetLastError();
            });
      };
      visit_dtype(g_dtype, [&](auto g) {
        if (c_dtype == kNoType)
          run(g, float{}, std::false_type{});
        else
          visit_dtype(c_dtype, [&](auto c) { run(g, c, std::true_type{}); });
      });
      MEGALITE_CUDA_TRY(err);
    }
  }
  return cudaSuccess;
}

const char* error_string(int err) {
  return cudaGetErrorString(static_cast<cudaError_t>(err));
}

}  // namespace megalite_cuda
