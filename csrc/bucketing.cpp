// Gradient bucketing on the CPU: multi-tensor flatten/unflatten (which params share a bucket is
// bookkeeping over sizes, done in Python: megalite/parallel/ddp.py, assign_buckets).
//
// flatten_into copies a list of tensors back to back into one flat buffer (unflatten_from the
// other way). It is a memcpy of the concatenation, split evenly by *bytes* between the threads,
// so a list of 100 small tensors and a list of 2 big ones both keep every thread busy, and there
// is one parallel region instead of one torch copy (with its dispatch and thread wake-up) per
// tensor. Large copies use streaming stores, which skip reading the destination first.
#include "megalite.h"

namespace megalite {
namespace {

enum class Direction { kIntoBuffer, kOutOfBuffer };

constexpr size_t kStreamingBytes = size_t(16) << 20;  // 16 MB

void flat_copy(const std::vector<at::Tensor>& tensors, const at::Tensor& buffer, Direction dir) {
  const char* what = dir == Direction::kIntoBuffer ? "flatten_into" : "unflatten_from";
  TORCH_CHECK(buffer.device().is_cpu(), what, ": buffer must be on the CPU");
  TORCH_CHECK(buffer.dim() == 1 && buffer.is_contiguous(), what,
              ": buffer must be a contiguous 1-D tensor");
  const int64_t item = buffer.element_size();
  auto* base = static_cast<char*>(buffer.data_ptr());

  std::vector<int64_t> bytes;  // contiguous tensors: one memcpy range each
  std::vector<char*> tensor_ptrs;
  std::vector<int64_t> buffer_offsets;
  int64_t offset = 0;  // in elements
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    TORCH_CHECK(t.scalar_type() == buffer.scalar_type(), what, ": tensor ", i, " has dtype ",
                t.scalar_type(), ", the buffer ", buffer.scalar_type());
    TORCH_CHECK(t.device().is_cpu(), what, ": tensor ", i, " is not on the CPU");
    const int64_t n = t.numel();
    TORCH_CHECK(offset + n <= buffer.numel(), what, ": tensors need more than the buffer's ",
                buffer.numel(), " elements");
    if (t.is_contiguous()) {
      bytes.push_back(n * item);
      tensor_ptrs.push_back(static_cast<char*>(t.data_ptr()));
      buffer_offsets.push_back(offset * item);
    } else {  // rare (grads are contiguous): let torch's strided copy handle it
      at::Tensor slot = buffer.narrow(0, offset, n).view(t.sizes());
      if (dir == Direction::kIntoBuffer)
        slot.copy_(t);
      else
        const_cast<at::Tensor&>(t).copy_(slot);
    }
    offset += n;
  }
  const auto offsets = prefix_offsets(bytes);
  constexpr int64_t kGrainBytes = 1 << 18;  // 256 KB: below that one thread is faster
  // Copies larger than the caches into memory already in use stream past the caches (see
  // stream_copy, worth_streaming); small ones stay cached, where the all-reduce that follows a
  // flatten will find them.
  const bool streaming = worth_streaming(
      dir == Direction::kIntoBuffer ? base : (tensor_ptrs.empty() ? base : tensor_ptrs[0]),
      size_t(offsets.back()), kStreamingBytes);
  at::parallel_for(0, offsets.back(), kGrainBytes, [&](int64_t begin, int64_t end) {
    for_each_segment(offsets, begin, end, [&](size_t i, int64_t lo, int64_t hi) {
      char* flat = base + buffer_offsets[i] + lo;
      char* tensor = tensor_ptrs[i] + lo;
      char* dst = dir == Direction::kIntoBuffer ? flat : tensor;
      const char* src = dir == Direction::kIntoBuffer ? tensor : flat;
      if (streaming)
        stream_copy(dst, src, hi - lo);
      else
        std::memcpy(dst, src, hi - lo);
    });
    if (streaming) stream_fence();
  });
}

void register_bucketing(pybind11::module_& m) {
  m.def(
      "flatten_into",
      [](const std::vector<at::Tensor>& tensors, const at::Tensor& buffer) {
        flat_copy(tensors, buffer, Direction::kIntoBuffer);
      },
      "Copy tensors back to back into a flat buffer", py::arg("tensors"), py::arg("buffer"));
  m.def(
      "unflatten_from",
      [](const at::Tensor& buffer, const std::vector<at::Tensor>& tensors) {
        flat_copy(tensors, buffer, Direction::kOutOfBuffer);
      },
      "Copy a flat buffer back out into tensors", py::arg("buffer"), py::arg("tensors"));
}

}  // namespace

MEGALITE_REGISTER(register_bucketing)

}  // namespace megalite
