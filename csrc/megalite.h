// Shared by the CPU kernel families in csrc/*.cpp: module registration, runtime ISA choice and
// the scalar conversions between fp32 and the 16-bit float formats.
#pragma once

// Only the headers the kernels need (not <torch/extension.h>, which triples the compile time).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/zeros.h>
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace megalite {

// ---------------------------------------------------------------------------------------------
// Registration. megalite._C is built from every csrc/*.cpp (setup.py globs them), but a Python
// extension has exactly one PyInit function: csrc/bindings.cpp owns it. Every other file adds
// its functions with
//     static void register_foo(pybind11::module_& m) { m.def("foo", &foo, "..."); }
//     MEGALITE_REGISTER(register_foo)
// instead of defining its own PYBIND11_MODULE (two would not link).
using Registrar = void (*)(pybind11::module_&);

inline std::vector<Registrar>& registrars() {
  static std::vector<Registrar> all;  // function-local: safe whatever the static init order
  return all;
}

inline int add_registrar(Registrar r) {
  registrars().push_back(r);
  return 0;
}

#define MEGALITE_CONCAT_(a, b) a##b
#define MEGALITE_CONCAT(a, b) MEGALITE_CONCAT_(a, b)
#define MEGALITE_REGISTER(fn) \
  static const int MEGALITE_CONCAT(megalite_registered_, fn) = ::megalite::add_registrar(fn);

// ---------------------------------------------------------------------------------------------
// Runtime ISA choice. A wheel must run on any x86-64, so nothing is compiled with -march=native;
// the hot loops are instead compiled three times and the dynamic loader picks the best clone for
// the CPU it runs on (GCC function multi-versioning, resolved once through an ifunc). The clones
// are the x86-64 micro-architecture levels, which GCC dispatches on CPU *features*
// (__builtin_cpu_supports("x86-64-v4")): v4 = AVX-512 F/BW/DQ/VL, v3 = AVX2/FMA/F16C. (Not
// arch=skylake-avx512 and the like: those are dispatched on the CPU *model*, so every newer or
// virtualised CPU silently gets the baseline clone.) The loops are written so the compiler
// vectorises them (no cross-lane float reductions: those use explicit per-lane accumulators,
// which also makes results identical across clones).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define MEGALITE_ISA_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define MEGALITE_ISA_CLONES
#endif

// Helpers called from the cloned loops must be inlined into each clone (an out-of-line helper is
// compiled once, for the baseline ISA). GCC inlines before it clones, so always_inline works.
#define MEGALITE_INLINE inline __attribute__((always_inline))

// Lanes of the explicit accumulators: one AVX-512 register of fp32, two AVX2 ones.
constexpr int kLanes = 16;

// ---------------------------------------------------------------------------------------------
// Element types (storage formats). Kernels are templates over a storage type with load (to fp32)
// and store (from fp32); bf16 and fp16 are carried as raw uint16 bits so that the code is plain
// integer and float arithmetic the vectoriser understands.
MEGALITE_INLINE float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
MEGALITE_INLINE uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

struct F32 {
  using T = float;
  static MEGALITE_INLINE float load(float x) { return x; }
  static MEGALITE_INLINE float store(float f) { return f; }
  static MEGALITE_INLINE uint32_t bits(float x) { return float_to_bits(x); }
  static constexpr uint32_t kInfBits = 0x7f800000u;  // |x| bits >= this: inf or nan
};

struct BF16 {
  using T = uint16_t;
  static MEGALITE_INLINE float load(uint16_t x) { return bits_to_float(uint32_t(x) << 16); }
  // Round to nearest even; a nan stays a (quiet) nan instead of rounding into an inf.
  static MEGALITE_INLINE uint16_t store(float f) {
    uint32_t u = float_to_bits(f);
    uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    return (u & 0x7fffffffu) > 0x7f800000u ? uint16_t((u >> 16) | 0x40u) : uint16_t(rounded);
  }
  static MEGALITE_INLINE uint32_t bits(uint16_t x) { return x; }
  static constexpr uint32_t kInfBits = 0x7f80u;
};

// cond ? a : b on the bits. The float selects are written this way because with GCC's default
// -ftrapping-math a plain ?: over floats is not if-converted for AVX2 and SSE (it might raise an
// FP exception that the branch would not), which leaves those clones' loops unvectorised.
MEGALITE_INLINE float select(bool cond, float a, float b) {
  const uint32_t m = 0u - uint32_t(cond);
  return bits_to_float((float_to_bits(a) & m) | (float_to_bits(b) & ~m));
}

// IEEE half <-> float without F16C, branch-free so it vectorises (the FP16 library's algorithm,
// the one c10::Half uses when F16C is not available at compile time), its selects written as
// select() and masks.
struct F16 {
  using T = uint16_t;
  static MEGALITE_INLINE float load(uint16_t h) {
    const uint32_t w = uint32_t(h) << 16;
    const uint32_t sign = w & 0x80000000u;
    const uint32_t two_w = w + w;
    const float normalized = bits_to_float((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
    const float denormalized = bits_to_float((two_w >> 17) | (126u << 23)) - 0.5f;
    return bits_to_float(sign |
                         float_to_bits(select(two_w < (1u << 27), denormalized, normalized)));
  }
  static MEGALITE_INLINE uint16_t store(float f) {
    float base = (__builtin_fabsf(f) * 0x1.0p+112f) * 0x1.0p-110f;
    const uint32_t w = float_to_bits(f);
    const uint32_t shl1_w = w + w;
    const uint32_t sign = w & 0x80000000u;
    uint32_t bias = shl1_w & 0xFF000000u;
    bias = bias < 0x71000000u ? 0x71000000u : bias;
    base = bits_to_float((bias >> 1) + 0x07800000u) + base;
    const uint32_t bits = float_to_bits(base);
    const uint32_t nonsign = ((bits >> 13) & 0x00007C00u) + (bits & 0x00000FFFu);
    const uint32_t is_nan = 0u - uint32_t(shl1_w > 0xFF000000u);
    return uint16_t((sign >> 16) | (0x7E00u & is_nan) | (nonsign & ~is_nan));
  }
  static MEGALITE_INLINE uint32_t bits(uint16_t x) { return x; }
  static constexpr uint32_t kInfBits = 0x7c00u;
};

// Visit the storage type of a float32/bfloat16/float16 tensor dtype.
template <typename Fn>
inline void dispatch_float_type(at::ScalarType t, const char* what, Fn&& fn) {
  switch (t) {
    case at::kFloat:
      fn(F32{});
      break;
    case at::kBFloat16:
      fn(BF16{});
      break;
    case at::kHalf:
      fn(F16{});
      break;
    default:
      TORCH_CHECK(false, what, ": unsupported dtype ", t, " (float32, bfloat16, float16)");
  }
}

// ---------------------------------------------------------------------------------------------
// Streaming (non-temporal) stores, for outputs nobody reads soon and that are larger than the
// caches: a normal store first reads the destination line into the cache (read-for-ownership),
// a streaming store does not, so a copy moves 2 bytes per byte instead of 3. SSE2 is in every
// x86-64, so this needs no ISA clone; it is a separate function because GCC will not inline
// intrinsics into a target_clones function. Call stream_fence() before other threads (or the
// caller) may read what was streamed.
// worth_streaming: the destination is at least `threshold` bytes and already resident (a freshly
// mapped destination is better written with plain stores: see page_resident in bindings.cpp).
void stream_copy(void* dst, const void* src, size_t bytes);
void stream_fence();
bool worth_streaming(const void* dst, size_t bytes, size_t threshold);

// ---------------------------------------------------------------------------------------------
// Software prefetch for read-only sweeps (AdamW's inf check, the sum of squares). A single read
// stream per core is latency-bound (one core keeps only so many misses in flight, and the
// hardware prefetcher is cautious with one stream); asking for the lines a few KB ahead made
// such a sweep ~1.3x faster here. A sweep loop calls prefetch_sweep(p + b) once per kSweepBlock
// elements. __builtin_prefetch is a plain builtin, fine inside the ISA clones; prefetching past
// the end of an array is harmless.
constexpr int64_t kSweepBlock = 256;
constexpr int64_t kSweepPrefetchBytes = 8192;
template <typename T>
MEGALITE_INLINE void prefetch_sweep(const T* p) {
  const uintptr_t ahead =
      reinterpret_cast<uintptr_t>(p) + uintptr_t(kSweepPrefetchBytes);  // may be past the end
  for (int64_t k = 0; k < kSweepBlock * int64_t(sizeof(T)); k += 64)
    __builtin_prefetch(reinterpret_cast<const void*>(ahead + uintptr_t(k)), 0, 3);
}

// ---------------------------------------------------------------------------------------------
// Multi-tensor loops. A list of tensors is treated as one long index space (tensor i owns
// [offsets[i], offsets[i+1])) so that at::parallel_for splits the *elements* evenly between the
// threads, whatever the tensor sizes: 50 tensors of 1M and 1 tensor of 50M both give each
// thread one contiguous half. fn(i, lo, hi) is called for the part of tensor i in [begin, end).
inline std::vector<int64_t> prefix_offsets(const std::vector<int64_t>& numels) {
  std::vector<int64_t> offsets(numels.size() + 1, 0);
  for (size_t i = 0; i < numels.size(); ++i) offsets[i + 1] = offsets[i] + numels[i];
  return offsets;
}

template <typename Fn>
inline void for_each_segment(const std::vector<int64_t>& offsets, int64_t begin, int64_t end,
                             Fn&& fn) {
  // First tensor whose range ends after `begin` (empty tensors are skipped naturally).
  size_t i = std::upper_bound(offsets.begin(), offsets.end(), begin) - offsets.begin();
  i = i == 0 ? 0 : i - 1;
  for (; i + 1 < offsets.size() && offsets[i] < end; ++i) {
    const int64_t lo = std::max(begin, offsets[i]), hi = std::min(end, offsets[i + 1]);
    if (lo < hi) fn(i, lo - offsets[i], hi - offsets[i]);
  }
}

}  // namespace megalite
