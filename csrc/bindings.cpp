// The one module init of megalite._C: every csrc/*.cpp registers its functions through
// MEGALITE_REGISTER (see megalite.h), and this adds them all to the module.
#include "megalite.h"

namespace {

// The ISA clone the kernels run (the same test GCC's ifunc resolvers make; see megalite.h).
const char* cpu_isa() {
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("x86-64-v4")) return "x86-64-v4 (AVX-512)";
  if (__builtin_cpu_supports("x86-64-v3")) return "x86-64-v3 (AVX2)";
  return "x86-64 baseline (SSE2)";
#else
  return "portable C++ (no ISA clones on this compiler/architecture)";
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "megalite CPU kernels: fused AdamW, LayerNorm/RMSNorm, gradient bucketing";
  m.def("cpu_isa", &cpu_isa, "the instruction set level whose kernel clones run on this CPU");
  for (auto registrar : megalite::registrars()) registrar(m);
}

// ---- helpers declared in megalite.h -------------------------------------------------------------
#if defined(__x86_64__)
#include <emmintrin.h>
#endif
#include <sys/mman.h>
#include <unistd.h>

namespace megalite {

void stream_copy(void* dst, const void* src, size_t bytes) {
#if defined(__x86_64__)
  auto* d = static_cast<char*>(dst);
  auto* s = static_cast<const char*>(src);
  // Head: plain stores up to a 16-byte boundary of the destination.
  const size_t head = std::min(bytes, (16 - reinterpret_cast<uintptr_t>(d) % 16) % 16);
  std::memcpy(d, s, head);
  d += head;
  s += head;
  bytes -= head;
  const size_t body = bytes & ~size_t(63);
  for (size_t i = 0; i < body; i += 64) {  // a cache line per iteration
    const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i));
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i + 16));
    const __m128i c = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i + 32));
    const __m128i e = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i + 48));
    _mm_stream_si128(reinterpret_cast<__m128i*>(d + i), a);
    _mm_stream_si128(reinterpret_cast<__m128i*>(d + i + 16), b);
    _mm_stream_si128(reinterpret_cast<__m128i*>(d + i + 32), c);
    _mm_stream_si128(reinterpret_cast<__m128i*>(d + i + 48), e);
  }
  std::memcpy(d + body, s + body, bytes - body);
#else
  std::memcpy(dst, src, bytes);
#endif
}

// Is the page holding p already in memory? A fresh allocation (glibc serves big ones with a new
// mmap) is not: its first touch makes the kernel zero the page, which leaves the page's lines in
// the cache, so plain stores then cost no extra read and streaming stores would only push the
// zeros out first. mincore is one cheap system call.
static bool page_resident(const char* p) {
  static const uintptr_t page = uintptr_t(sysconf(_SC_PAGESIZE));
  unsigned char vec = 0;
  void* base = reinterpret_cast<void*>(reinterpret_cast<uintptr_t>(p) & ~(page - 1));
  if (mincore(base, 1, &vec) != 0) return true;  // cannot tell: assume the common case
  return vec & 1;
}

bool worth_streaming(const void* dst, size_t bytes, size_t threshold) {
  if (bytes < threshold) return false;
  const char* d = static_cast<const char*>(dst);
  return page_resident(d) && page_resident(d + bytes / 2) && page_resident(d + bytes - 1);
}

void stream_fence() {
#if defined(__x86_64__)
  _mm_sfence();
#endif
}

}  // namespace megalite
