// Blending index for megalite.data.BlendedDataset (the chairman-assignment rule).
//
// Global sample i goes to the dataset that, among those at least delta = 1/(2D-2) samples
// behind weight_d * (i+1), would fall a whole sample behind soonest. Every prefix of the blend
// stays within 1 - delta samples of each dataset's share (Tijdeman, 1980).
//
// The rule is sequential, hence C++; megalite/data/blended.py holds a Python twin that must
// round identically, so the arithmetic below is written operation for operation like it and
// floating-point contraction (FMA) is switched off.
//
// Plain C ABI, no torch headers: Python reaches it with ctypes from the megalite._C library,
// whatever the rest of that library binds, and it compiles in a second on its own for tests.

#include <cstdint>
#include <vector>

extern "C" __attribute__((visibility("default"), optimize("fp-contract=off"))) int64_t
megalite_build_blending_indices(const double* weights, int64_t num_datasets, int64_t size,
                                int16_t* dataset_index, int64_t* dataset_sample_index) {
  if (num_datasets < 1 || num_datasets > 32767 || size < 0) return 1;
  const double delta = num_datasets > 1 ? 1.0 / static_cast<double>(2 * num_datasets - 2) : 0.5;
  std::vector<int64_t> counts(num_datasets, 0);
  for (int64_t i = 0; i < size; ++i) {
    const double n = static_cast<double>(i + 1);
    int64_t best = -1;
    double best_deadline = 0.0;
    for (int64_t d = 0; d < num_datasets; ++d) {
      const double w = weights[d];
      const double deficit = w * n - static_cast<double>(counts[d]);
      if (w > 0.0 && deficit >= delta) {
        const double deadline = (static_cast<double>(counts[d]) + 1.0 - delta) / w;
        if (best < 0 || deadline < best_deadline) {
          best = d;
          best_deadline = deadline;
        }
      }
    }
    if (best < 0) {  // only reachable through rounding: the largest deficit, lowest index on ties
      double best_deficit = 0.0;
      for (int64_t d = 0; d < num_datasets; ++d) {
        const double deficit = weights[d] * n - static_cast<double>(counts[d]);
        if (best < 0 || deficit > best_deficit) {
          best = d;
          best_deficit = deficit;
        }
      }
    }
    dataset_index[i] = static_cast<int16_t>(best);
    dataset_sample_index[i] = counts[best]++;
  }
  return 0;
}
