// The one primitive of the node-local shared-memory collectives (megalite/parallel/shm.py): a
// barrier over counters in a segment that every rank of a group on one machine has mapped.
//
// Memory design: the segment's header is one 64-byte cache line per rank (so that a rank's
// store never invalidates the line another rank spins on): a monotonic arrival counter, a
// 32-bit wake word (a futex) and the rank's pid. Arriving at barrier number `target` is a
// release store of `target` into my counter, then a bump of my wake word and a futex wake;
// the barrier is passed once every counter is at least `target` (acquire loads), so every
// write a rank made to the data slots before arriving is visible to all after it.
//
// Waiting: a short spin (pause: a peer that is a few microseconds behind costs no syscall),
// then a futex wait on the awaited rank's wake word, so that a waiting rank sleeps and gives
// its core away. That matters when ranks outnumber cores (the tests run 8 ranks on 2): a
// spinning or sched_yield-ing rank would take the time its peer needs to arrive. Every wait
// is bounded (50 ms), after which it checks the clock and whether the awaited rank's process
// has ended (gone, or a zombie not yet reaped): a dead or hung peer is reported, never waited
// on forever. The GIL is released for the wait.
#include <linux/futex.h>
#include <signal.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <chrono>
#include <tuple>

#include "megalite.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace megalite {
namespace {

struct alignas(64) RankLine {
  std::atomic<uint64_t> arrived;
  std::atomic<uint32_t> wake;  // bumped after every arrival: the futex word
  int32_t unused;
  int64_t pid;
};
static_assert(sizeof(RankLine) == 64, "one cache line per rank");
static_assert(std::atomic<uint64_t>::is_always_lock_free, "counters shared across processes");
static_assert(sizeof(std::atomic<uint32_t>) == 4, "a futex word is 32 bits");

// Shared (not FUTEX_PRIVATE): the word lives in a mapping of several processes.
long futex(std::atomic<uint32_t>* word, int op, uint32_t value, const timespec* timeout) {
  return syscall(SYS_futex, reinterpret_cast<uint32_t*>(word), op, value, timeout, nullptr, 0);
}

RankLine* lines(const at::Tensor& header, int64_t world) {
  TORCH_CHECK(header.is_contiguous() && header.scalar_type() == at::kByte, "shm header: uint8");
  TORCH_CHECK(header.numel() >= world * int64_t(sizeof(RankLine)), "shm header too small");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(header.data_ptr()) % 64 == 0, "shm header alignment");
  return reinterpret_cast<RankLine*>(header.data_ptr());
}

// Whether a process has ended: gone (reaped), or a zombie its parent has not reaped yet (a
// torchrun agent polls its workers only now and then; kill(pid, 0) still succeeds on those).
bool process_ended(int64_t pid) {
  if (kill(pid_t(pid), 0) != 0) return errno == ESRCH;
  char path[64];
  std::snprintf(path, sizeof(path), "/proc/%lld/stat", static_cast<long long>(pid));
  std::FILE* f = std::fopen(path, "r");
  if (f == nullptr) return false;  // no procfs: only the kill() test
  char buf[512];
  const size_t n = std::fread(buf, 1, sizeof(buf) - 1, f);
  std::fclose(f);
  buf[n] = 0;
  const char* close = std::strrchr(buf, ')');  // "pid (comm) state ...": comm may hold spaces
  return close != nullptr && close[1] == ' ' && (close[2] == 'Z' || close[2] == 'X');
}

void shm_register(const at::Tensor& header, int64_t rank, int64_t world) {
  RankLine* l = lines(header, world);
  l[rank].pid = int64_t(getpid());
  l[rank].wake.store(0, std::memory_order_relaxed);
  l[rank].arrived.store(0, std::memory_order_release);
}

// (0, -1) once every rank has arrived at `target`; (1, r) if rank r's process is gone;
// (2, r) if rank r did not arrive within timeout_s.
std::tuple<int64_t, int64_t> shm_barrier(const at::Tensor& header, int64_t rank, int64_t world,
                                         int64_t target, double timeout_s, int64_t spin_polls) {
  RankLine* l = lines(header, world);
  l[rank].arrived.store(uint64_t(target), std::memory_order_release);
  l[rank].wake.fetch_add(1, std::memory_order_release);
  pybind11::gil_scoped_release no_gil;
  futex(&l[rank].wake, FUTEX_WAKE, INT32_MAX, nullptr);
  using clock = std::chrono::steady_clock;
  const auto start = clock::now();
  const timespec slice = {0, 50 * 1000 * 1000};
  for (int64_t r = 0; r < world; ++r) {
    for (int64_t polls = 0;; ++polls) {
      const uint32_t seen = l[r].wake.load(std::memory_order_acquire);
      if (l[r].arrived.load(std::memory_order_acquire) >= uint64_t(target)) break;
      if (polls < spin_polls) {
#if defined(__x86_64__)
        _mm_pause();
#endif
        continue;
      }
      // Returns at a wake, at once if the word moved since `seen`, or after the slice.
      futex(&l[r].wake, FUTEX_WAIT, seen, &slice);
      if (process_ended(l[r].pid)) return {1, r};
      const std::chrono::duration<double> waited = clock::now() - start;
      if (waited.count() > timeout_s) return {2, r};
    }
  }
  return {0, -1};
}

void register_shm_barrier(pybind11::module_& m) {
  m.def("shm_register", &shm_register, "write my pid into the header, zero my counter",
        pybind11::arg("header"), pybind11::arg("rank"), pybind11::arg("world"));
  m.def("shm_barrier", &shm_barrier,
        "arrive at barrier `target`, wait for every rank: (0, -1), or (1, rank) gone, or "
        "(2, rank) timed out",
        pybind11::arg("header"), pybind11::arg("rank"), pybind11::arg("world"),
        pybind11::arg("target"), pybind11::arg("timeout_s"), pybind11::arg("spin_polls"));
}

MEGALITE_REGISTER(register_shm_barrier)

}  // namespace
}  // namespace megalite
