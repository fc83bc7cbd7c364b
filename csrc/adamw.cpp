// Fused AdamW on the CPU, over a list of tensors in one call.
//
// For every element: read param, grad, exp_avg, exp_avg_sq; write param, exp_avg, exp_avg_sq
// (and, in mixed precision, the bf16/fp16 model copy): 28 bytes per fp32 param, the minimum.
// The grad is unscaled (times 1/loss scale) in registers, so no separate unscale pass reads and
// writes the grads. The arithmetic is torch.optim.AdamW's (decoupled weight decay, bias
// correction), in fp32 like torch's own fused CPU kernel.
//
// inf/nan: "nothing is updated on an inf" means every grad must be read before the first write,
// so the call is two sweeps: a read-only check of the grads, then the update. The check only
// reads (4 bytes per param for fp32 grads, 2 for bf16): 32 bytes per param in all, where
// torch's fused AdamW, which checks nothing, moves 28. A caller that has already read every grad
// for another reason (the trainer's global grad norm is inf/nan exactly when some grad is) passes
// check_finite=false and gets the single 28-byte sweep.
//
// The trainer passes its grad scale (loss scale / clip coefficient), its "the norm is not
// finite" flag and its step count (bias correction) as 1-element tensors, so that on CUDA the
// step reads nothing back; here they are CPU tensors, which this kernel simply reads.
#include <atomic>
#include <cmath>

#include "megalite.h"

namespace megalite {
namespace {

// Per-tensor constants, derived in double (as torch does) from the group's hyperparameters.
struct AdamwScalars {
  float lr_wd;         // lr * weight_decay: p -= p * lr_wd (decoupled weight decay)
  float one_minus_b1;  // exp_avg = lerp(exp_avg, g, 1 - beta1)
  float beta2, one_minus_b2;
  float step_size;     // lr / (1 - beta1^step)
  float inv_bc2_sqrt;  // 1 / sqrt(1 - beta2^step)
  float eps;
  float inv_scale;  // 1 / loss scale
};

struct NoCopy {  // stands in for the model-copy type when there is none
  using T = float;
  static MEGALITE_INLINE float store(float f) { return f; }
};

// The hot loop. Plain scalar code that GCC vectorises for each ISA clone.
template <typename G, typename C, bool kCopy>
MEGALITE_ISA_CLONES void adamw_update(float* __restrict p, const typename G::T* __restrict g,
                                      float* __restrict m, float* __restrict v,
                                      typename C::T* __restrict copy, int64_t n, AdamwScalars s) {
  for (int64_t i = 0; i < n; ++i) {
    const float gi = G::load(g[i]) * s.inv_scale;
    float pi = p[i];
    pi = pi - pi * s.lr_wd;
    const float mi = m[i] + s.one_minus_b1 * (gi - m[i]);
    const float vi = v[i] * s.beta2 + gi * gi * s.one_minus_b2;
    const float denom = __builtin_sqrtf(vi) * s.inv_bc2_sqrt + s.eps;
    pi = pi - s.step_size * mi / denom;
    p[i] = pi;
    m[i] = mi;
    v[i] = vi;
    if (kCopy) copy[i] = C::store(pi);
  }
}

// The largest |g| as raw bits (sign masked off): an inf or nan is exactly a value at or above
// the all-ones exponent. max is an integer reduction, so it vectorises. The update sweep has
// four read streams and gains nothing from software prefetch (measured), so only this has it.
template <typename G>
MEGALITE_ISA_CLONES uint32_t max_abs_bits(const typename G::T* __restrict g, int64_t n) {
  constexpr uint32_t kMask = sizeof(typename G::T) == 4 ? 0x7fffffffu : 0x7fffu;
  uint32_t mx = 0;
  for (int64_t b = 0; b < n; b += kSweepBlock) {
    prefetch_sweep(g + b);
    const int64_t e = std::min(n, b + kSweepBlock);
    for (int64_t i = b; i < e; ++i) mx = std::max(mx, G::bits(g[i]) & kMask);
  }
  return mx;
}

struct TensorArgs {
  float *p, *m, *v;
  void *g, *copy;
  at::ScalarType g_type, copy_type;  // copy_type is Undefined without a copy
  AdamwScalars s;
};

// Elements per block when the model copy is streamed: the block's copy values are staged in a
// small buffer (L1) and then written with streaming stores, so the copy's destination lines are
// never read (2 bytes per bf16 param instead of 4).
constexpr int64_t kStreamBlock = 2048;

template <typename G, typename C, bool kCopy>
void update_range(const TensorArgs& t, int64_t lo, int64_t hi, bool streaming) {
  auto* g = static_cast<const typename G::T*>(t.g);
  auto* c = static_cast<typename C::T*>(t.copy);
  if (!kCopy || !streaming) {
    adamw_update<G, C, kCopy>(t.p + lo, g + lo, t.m + lo, t.v + lo, kCopy ? c + lo : nullptr,
                              hi - lo, t.s);
    return;
  }
  alignas(64) typename C::T staged[kStreamBlock];
  for (int64_t b = lo; b < hi; b += kStreamBlock) {
    const int64_t n = std::min(kStreamBlock, hi - b);
    adamw_update<G, C, true>(t.p + b, g + b, t.m + b, t.v + b, staged, n, t.s);
    stream_copy(c + b, staged, n * sizeof(typename C::T));
  }
}

void update_segment(const TensorArgs& t, int64_t lo, int64_t hi, bool streaming) {
  dispatch_float_type(t.g_type, "fused_adamw grad", [&](auto g) {
    using G = decltype(g);
    if (t.copy_type == at::ScalarType::Undefined) {
      update_range<G, NoCopy, false>(t, lo, hi, streaming);
    } else {
      dispatch_float_type(t.copy_type, "fused_adamw model copy", [&](auto c) {
        update_range<G, decltype(c), true>(t, lo, hi, streaming);
      });
    }
  });
}

uint32_t check_segment(const TensorArgs& t, int64_t lo, int64_t hi) {
  uint32_t bad = 0;
  dispatch_float_type(t.g_type, "fused_adamw grad", [&](auto g) {
    using G = decltype(g);
    bad = max_abs_bits<G>(static_cast<const typename G::T*>(t.g) + lo, hi - lo) >= G::kInfBits;
  });
  return bad;
}

AdamwScalars scalars_for(double lr, double beta1, double beta2, double eps, double wd, double step,
                         double inv_scale) {
  TORCH_CHECK(step >= 1, "fused_adamw: step must be >= 1 (got ", step, ")");
  const double bc1 = 1.0 - std::pow(beta1, step);
  const double bc2 = 1.0 - std::pow(beta2, step);
  AdamwScalars s;
  s.lr_wd = float(lr * wd);
  s.one_minus_b1 = float(1.0 - beta1);
  s.beta2 = float(beta2);
  s.one_minus_b2 = float(1.0 - beta2);
  s.step_size = float(lr / bc1);
  s.inv_bc2_sqrt = float(1.0 / std::sqrt(bc2));
  s.eps = float(eps);
  s.inv_scale = float(inv_scale);
  return s;
}

void check_tensor(const at::Tensor& t, const char* what, size_t i, int64_t numel) {
  TORCH_CHECK(t.device().is_cpu(), "fused_adamw: ", what, "[", i, "] is not on the CPU");
  TORCH_CHECK(t.is_contiguous(), "fused_adamw: ", what, "[", i, "] is not contiguous");
  TORCH_CHECK(t.numel() == numel, "fused_adamw: ", what, "[", i, "] has ", t.numel(),
              " elements, the param ", numel);
}

// A 1-element CPU tensor argument (grad_scale, found_inf, step) of the given dtype: its one value.
// A CPU tensor is host memory, so reading it costs nothing (the CUDA kernel reads its twin on the
// device instead).
template <typename T>
T host_scalar(const at::Tensor& t, at::ScalarType dtype, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.numel() == 1 && t.scalar_type() == dtype,
              "fused_adamw: ", what, " must be a 1-element ", dtype, " tensor on the CPU");
  return *t.data_ptr<T>();
}

// Returns true (and writes nothing) if any grad holds an inf or a nan, or found_inf is set. With
// check_finite=false the grads are not checked (the caller vouches for them, or passes found_inf)
// and the result is always false. grad_scale (optional, 1-element fp32) replaces inv_scale by
// 1 / grad_scale; found_inf (optional, 1-element int32): nonzero updates nothing; step_tensor
// (optional, 1-element fp32) is the step of every tensor, in place of the (then empty) list.
bool fused_adamw(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                 const std::vector<at::Tensor>& exp_avgs,
                 const std::vector<at::Tensor>& exp_avg_sqs,
                 const std::vector<c10::optional<at::Tensor>>& model_copies,
                 const std::vector<double>& lr, const std::vector<double>& beta1,
                 const std::vector<double>& beta2, const std::vector<double>& eps,
                 const std::vector<double>& weight_decay, const std::vector<double>& step,
                 double inv_scale, bool check_finite, const c10::optional<at::Tensor>& grad_scale,
                 const c10::optional<at::Tensor>& found_inf,
                 const c10::optional<at::Tensor>& step_tensor) {
  if (grad_scale.has_value() && grad_scale->defined())
    inv_scale = 1.0 / double(host_scalar<float>(*grad_scale, at::kFloat, "grad_scale"));
  // A step count in a tensor (the trainer's, advanced on the device only by the steps taken)
  // is one step for every tensor; its value in double is what the list would have held.
  const bool one_step = step_tensor.has_value() && step_tensor->defined();
  const double shared_step =
      one_step ? double(host_scalar<float>(*step_tensor, at::kFloat, "step")) : 0.0;
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n && exp_avgs.size() == n && exp_avg_sqs.size() == n,
              "fused_adamw: tensor lists differ in length");
  TORCH_CHECK(model_copies.empty() || model_copies.size() == n,
              "fused_adamw: model_copies must be empty or one (or None) per param");
  TORCH_CHECK(lr.size() == n && beta1.size() == n && beta2.size() == n && eps.size() == n &&
                  weight_decay.size() == n && step.size() == (one_step ? 0 : n),
              "fused_adamw: one hyperparameter value per tensor expected (and no step list "
              "with a step tensor)");

  std::vector<TensorArgs> args(n);
  std::vector<int64_t> numels(n);
  for (size_t i = 0; i < n; ++i) {
    const int64_t numel = params[i].numel();
    numels[i] = numel;
    check_tensor(params[i], "params", i, numel);
    check_tensor(grads[i], "grads", i, numel);
    check_tensor(exp_avgs[i], "exp_avgs", i, numel);
    check_tensor(exp_avg_sqs[i], "exp_avg_sqs", i, numel);
    for (const auto* t : {&params[i], &exp_avgs[i], &exp_avg_sqs[i]})
      TORCH_CHECK(t->scalar_type() == at::kFloat,
                  "fused_adamw: params and moments must be float32");
    TensorArgs& a = args[i];
    a.p = params[i].data_ptr<float>();
    a.m = exp_avgs[i].data_ptr<float>();
    a.v = exp_avg_sqs[i].data_ptr<float>();
    a.g = grads[i].data_ptr();
    a.g_type = grads[i].scalar_type();
    dispatch_float_type(a.g_type, "fused_adamw grad", [](auto) {});
    a.copy = nullptr;
    a.copy_type = at::ScalarType::Undefined;
    if (!model_copies.empty() && model_copies[i].has_value() && model_copies[i]->defined()) {
      const at::Tensor& c = *model_copies[i];
      check_tensor(c, "model_copies", i, numel);
      a.copy = c.data_ptr();
      a.copy_type = c.scalar_type();
      dispatch_float_type(a.copy_type, "fused_adamw model copy", [](auto) {});
    }
    a.s = scalars_for(lr[i], beta1[i], beta2[i], eps[i], weight_decay[i],
                      one_step ? shared_step : step[i], inv_scale);
  }
  const auto offsets = prefix_offsets(numels);
  const int64_t total = offsets.back();
  constexpr int64_t kGrain = 32768;  // below this, threads cost more than they save

  if (found_inf.has_value() && found_inf->defined() &&
      host_scalar<int32_t>(*found_inf, at::kInt, "found_inf") != 0)
    return check_finite;
  if (check_finite) {
    std::atomic<uint32_t> found{0};
    at::parallel_for(0, total, kGrain, [&](int64_t begin, int64_t end) {
      uint32_t bad = 0;
      for_each_segment(offsets, begin, end, [&](size_t i, int64_t lo, int64_t hi) {
        bad |= check_segment(args[i], lo, hi);
      });
      if (bad) found.fetch_or(1, std::memory_order_relaxed);
    });
    if (found.load()) return true;
  }

  // Model copies bigger than the caches are streamed (see kStreamBlock) unless they are freshly
  // mapped (see worth_streaming); small ones stay cached.
  bool streaming = false;
  if (!model_copies.empty() && total >= (int64_t(4) << 20)) {
    const size_t largest = std::max_element(numels.begin(), numels.end()) - numels.begin();
    streaming = args[largest].copy != nullptr && worth_streaming(args[largest].copy, 1, 1);
  }
  at::parallel_for(0, total, kGrain, [&](int64_t begin, int64_t end) {
    for_each_segment(offsets, begin, end, [&](size_t i, int64_t lo, int64_t hi) {
      update_segment(args[i], lo, hi, streaming);
    });
    if (streaming) stream_fence();
  });
  return false;
}

void register_adamw(pybind11::module_& m) {
  m.def("fused_adamw", &fused_adamw,
        "AdamW step over lists of tensors with per-tensor hyperparameters; returns True (and "
        "updates nothing) if a grad holds an inf or nan; check_finite=False skips that check. "
        "grad_scale (1-element fp32 tensor) replaces inv_scale by its reciprocal; found_inf "
        "(1-element int32 tensor) nonzero updates nothing; step_tensor (1-element fp32 tensor) "
        "is every tensor's step, with an empty step list",
        py::arg("params"), py::arg("grads"), py::arg("exp_avgs"), py::arg("exp_avg_sqs"),
        py::arg("model_copies"), py::arg("lr"), py::arg("beta1"), py::arg("beta2"), py::arg("eps"),
        py::arg("weight_decay"), py::arg("step"), py::arg("inv_scale"),
        py::arg("check_finite") = true, py::arg("grad_scale") = py::none(),
        py::arg("found_inf") = py::none(), py::arg("step_tensor") = py::none());
}

}  // namespace

MEGALITE_REGISTER(register_adamw)

}  // namespace megalite
