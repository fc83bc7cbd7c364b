// The one primitive of the node-local shared-memory collectives (megalite/parallel/shm.py): a
// barrier over counters in a segment that every rank of a group on one machine has mapped.
//
// Memory design: the segment's header is one 64-byte cache line per rank (so that a rank's
// store never invalidates the line another rank spins on): a monotonic arrival counter and the
// rank's pid. Arriving at barrier number `target` is a release store of `target` into my
// counter; the barrier is passed once every counter is at least `target` (acquire loads), so
// every write a rank made to the data slots before arriving is visible to all after it.
//
// Waiting: a short spin (pause), then sched_yield between polls, so that a waiting rank gives
// its core to any runnable thread (a gloo or heartbeat thread, torchrun's agent) while its
// peer is still computing. Every few thousand polls it checks the clock and whether the
// awaited rank's process still exists: a dead or hung peer is reported, never waited on
// forever. The GIL is released for the wait.
#include <sched.h>
#include <signal.h>

#include <atomic>
#include <cerrno>
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
  int64_t pid;
};
static_assert(sizeof(RankLine) == 64, "one cache line per rank");
static_assert(std::atomic<uint64_t>::is_always_lock_free, "counters shared across processes");

RankLine* lines(const at::Tensor& header, int64_t world) {
  TORCH_CHECK(header.is_contiguous() && header.scalar_type() == at::kByte, "shm header: uint8");
  TORCH_CHECK(header.numel() >= world * int64_t(sizeof(RankLine)), "shm header too small");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(header.data_ptr()) % 64 == 0, "shm header alignment");
  return reinterpret_cast<RankLine*>(header.data_ptr());
}

void shm_register(const at::Tensor& header, int64_t rank, int64_t world) {
  RankLine* l = lines(header, world);
  l[rank].pid = int64_t(getpid());
  l[rank].arrived.store(0, std::memory_order_release);
}

// (0, -1) once every rank has arrived at `target`; (1, r) if rank r's process is gone;
// (2, r) if rank r did not arrive within timeout_s.
std::tuple<int64_t, int64_t> shm_barrier(const at::Tensor& header, int64_t rank, int64_t world,
                                         int64_t target, double timeout_s) {
  RankLine* l = lines(header, world);
  l[rank].arrived.store(uint64_t(target), std::memory_order_release);
  pybind11::gil_scoped_release no_gil;
  using clock = std::chrono::steady_clock;
  const auto start = clock::now();
  for (int64_t r = 0; r < world; ++r) {
    uint64_t polls = 0;
    while (l[r].arrived.load(std::memory_order_acquire) < uint64_t(target)) {
      ++polls;
      if (polls < 4096) {
#if defined(__x86_64__)
        _mm_pause();
#endif
        continue;
      }
      sched_yield();
      if (polls % 4096 == 0) {
        if (kill(pid_t(l[r].pid), 0) != 0 && errno == ESRCH) return {1, r};
        const std::chrono::duration<double> waited = clock::now() - start;
        if (waited.count() > timeout_s) return {2, r};
      }
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
        pybind11::arg("target"), pybind11::arg("timeout_s"));
}

MEGALITE_REGISTER(register_shm_barrier)

}  // namespace
}  // namespace megalite
