// megalite._cuda: the thin torch binding of the CUDA kernels in csrc/cuda/*.cu.
//
// It includes only (a few of) torch's CPU headers (the CPU wheel's CUDA headers are incomplete, see
// kernels.h): it checks arguments, allocates outputs with torch (which uses the CUDA caching
// allocator for CUDA tensors), takes the current stream from torch.cuda, and hands raw pointers
// to the launchers. The Python signatures are those of megalite._C, so megalite.ops dispatches
// to either module the same way.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <torch/csrc/utils/pybind.h>

#include <cmath>

#include <vector>

#include "kernels.h"

namespace {

namespace mc = megalite_cuda;

void check_cuda(int err, const char* what) {
  TORCH_CHECK(err == 0, what, ": CUDA error: ", mc::error_string(err));
}

// torch.cuda.current_stream(device).cuda_stream, through Python: no CUDA header needed here.
void* current_stream(const at::Tensor& t) {
  py::object stream = py::module_::import("torch.cuda").attr("current_stream")(t.device().index());
  return reinterpret_cast<void*>(stream.attr("cuda_stream").cast<intptr_t>());
}

int dtype_code(at::ScalarType t, const char* what) {
  switch (t) {
    case at::kFloat:
      return mc::kF32;
    case at::kBFloat16:
      return mc::kBF16;
    case at::kHalf:
      return mc::kF16;
    default:
      TORCH_CHECK(false, what, ": unsupported dtype ", t, " (float32, bfloat16, float16)");
  }
  return mc::kNoType;
}

void check_on(const at::Tensor& t, const at::Tensor& ref, const char* what) {
  TORCH_CHECK(t.is_cuda() && t.device() == ref.device(), what, ": all tensors must be on ",
              ref.device());
  TORCH_CHECK(t.is_contiguous(), what, ": tensors must be contiguous");
}

const float* opt_f32(const c10::optional<at::Tensor>& t, const at::Tensor& x, int64_t n,
                     const char* what) {
  if (!t.has_value() || !t->defined()) return nullptr;
  check_on(*t, x, what);
  TORCH_CHECK(t->scalar_type() == at::kFloat && t->numel() == n, what,
              ": weight/bias must be fp32 of size ", n);
  return t->data_ptr<float>();
}

// ---- AdamW -------------------------------------------------------------------------------------
bool fused_adamw(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                 const std::vector<at::Tensor>& exp_avgs,
                 const std::vector<at::Tensor>& exp_avg_sqs,
                 const std::vector<c10::optional<at::Tensor>>& model_copies,
                 const std::vector<double>& lr, const std::vector<double>& beta1,
                 const std::vector<double>& beta2, const std::vector<double>& eps,
                 const std::vector<double>& weight_decay, const std::vector<double>& step,
                 double inv_scale, bool check_finite) {
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n && exp_avgs.size() == n && exp_avg_sqs.size() == n &&
                  (model_copies.empty() || model_copies.size() == n) && lr.size() == n &&
                  beta1.size() == n && beta2.size() == n && eps.size() == n &&
                  weight_decay.size() == n && step.size() == n,
              "fused_adamw: lists differ in length");
  if (n == 0) return false;
  const at::Tensor& ref = params[0];
  std::vector<mc::AdamwTensor> ts(n);
  for (size_t i = 0; i < n; ++i) {
    const int64_t numel = params[i].numel();
    for (const at::Tensor* t : {&params[i], &grads[i], &exp_avgs[i], &exp_avg_sqs[i]}) {
      check_on(*t, ref, "fused_adamw");
      TORCH_CHECK(t->numel() == numel, "fused_adamw: tensor ", i, " sizes differ");
    }
    for (const at::Tensor* t : {&params[i], &exp_avgs[i], &exp_avg_sqs[i]})
      TORCH_CHECK(t->scalar_type() == at::kFloat,
                  "fused_adamw: params and moments must be float32");
    TORCH_CHECK(step[i] >= 1, "fused_adamw: step must be >= 1");
    mc::AdamwTensor& a = ts[i];
    a.p = params[i].data_ptr<float>();
    a.m = exp_avgs[i].data_ptr<float>();
    a.v = exp_avg_sqs[i].data_ptr<float>();
    a.g = grads[i].data_ptr();
    a.g_dtype = dtype_code(grads[i].scalar_type(), "fused_adamw grad");
    a.copy = nullptr;
    a.copy_dtype = mc::kNoType;
    if (!model_copies.empty() && model_copies[i].has_value() && model_copies[i]->defined()) {
      const at::Tensor& c = *model_copies[i];
      check_on(c, ref, "fused_adamw");
      TORCH_CHECK(c.numel() == numel, "fused_adamw: model copy ", i, " size differs");
      a.copy = c.data_ptr();
      a.copy_dtype = dtype_code(c.scalar_type(), "fused_adamw model copy");
    }
    a.n = numel;
    // The same derivation as the CPU kernel (csrc/adamw.cpp): double, then fp32.
    const double bc1 = 1.0 - std::pow(beta1[i], step[i]), bc2 = 1.0 - std::pow(beta2[i], step[i]);
    a.lr_wd = float(lr[i] * weight_decay[i]);
    a.one_minus_b1 = float(1.0 - beta1[i]);
    a.beta2 = float(beta2[i]);
    a.one_minus_b2 = float(1.0 - beta2[i]);
    a.step_size = float(lr[i] / bc1);
    a.inv_bc2_sqrt = float(1.0 / std::sqrt(bc2));
    a.eps = float(eps[i]);
  }
  at::Tensor found = at::zeros({1}, ref.options().dtype(at::kInt));
  void* stream = current_stream(ref);
  const int device = ref.device().index();
  // Unchecked (the caller vouches for the grads): no check launch and no host synchronisation.
  if (check_finite)
    check_cuda(mc::adamw_check(ts.data(), int(n), found.data_ptr<int>(), device, stream),
               "fused_adamw");
  check_cuda(
      mc::adamw_update(ts.data(), int(n), float(inv_scale), found.data_ptr<int>(), device, stream),
      "fused_adamw");
  return check_finite && found.item<int>() != 0;
}

// ---- norms -------------------------------------------------------------------------------------
std::vector<at::Tensor> norm_fwd(bool rms, const at::Tensor& x,
                                 const c10::optional<at::Tensor>& weight,
                                 const c10::optional<at::Tensor>& bias, double eps) {
  const char* what = rms ? "rms_norm_fwd" : "layer_norm_fwd";
  TORCH_CHECK(x.dim() == 2, what, ": expects [rows, hidden]");
  check_on(x, x, what);
  const int64_t rows = x.size(0), hidden = x.size(1);
  const float* w = opt_f32(weight, x, hidden, what);
  const float* b = rms ? nullptr : opt_f32(bias, x, hidden, what);
  at::Tensor y = at::empty_like(x);
  at::Tensor mean = at::empty({rms ? 0 : rows}, x.options().dtype(at::kFloat));
  at::Tensor rstd = at::empty({rows}, x.options().dtype(at::kFloat));
  check_cuda(mc::norm_fwd(rms, dtype_code(x.scalar_type(), what), x.data_ptr(), w, b, y.data_ptr(),
                          rms ? nullptr : mean.data_ptr<float>(), rstd.data_ptr<float>(), rows,
                          hidden, float(eps), x.device().index(), current_stream(x)),
             what);
  if (rms) return {y, rstd};
  return {y, mean, rstd};
}

std::vector<at::Tensor> norm_bwd(bool rms, const at::Tensor& dy, const at::Tensor& x,
                                 const at::Tensor& mean, const at::Tensor& rstd,
                                 const c10::optional<at::Tensor>& weight, bool want_db) {
  const char* what = rms ? "rms_norm_bwd" : "layer_norm_bwd";
  TORCH_CHECK(x.dim() == 2 && dy.sizes() == x.sizes() && dy.scalar_type() == x.scalar_type(), what,
              ": dy and x must be [rows, hidden] of one dtype");
  check_on(x, x, what);
  check_on(dy, x, what);
  check_on(rstd, x, what);
  if (!rms) check_on(mean, x, what);
  const int64_t rows = x.size(0), hidden = x.size(1);
  const float* w = opt_f32(weight, x, hidden, what);
  at::Tensor dx = at::empty_like(x);
  at::Tensor dw = w ? at::empty({hidden}, x.options().dtype(at::kFloat)) : at::Tensor();
  at::Tensor db =
      (!rms && want_db) ? at::empty({hidden}, x.options().dtype(at::kFloat)) : at::Tensor();
  const int device = x.device().index();
  at::Tensor workspace =
      at::empty({mc::norm_bwd_workspace(rows, hidden, device)}, x.options().dtype(at::kFloat));
  check_cuda(mc::norm_bwd(rms, dtype_code(x.scalar_type(), what), dy.data_ptr(), x.data_ptr(),
                          rms ? nullptr : mean.data_ptr<float>(), rstd.data_ptr<float>(), w,
                          dx.data_ptr(), dw.defined() ? dw.data_ptr<float>() : nullptr,
                          db.defined() ? db.data_ptr<float>() : nullptr,
                          workspace.data_ptr<float>(), rows, hidden, device, current_stream(x)),
             what);
  if (rms) return {dx, dw};
  return {dx, dw, db};
}

// ---- bucketing ---------------------------------------------------------------------------------
void flat_copy(const std::vector<at::Tensor>& tensors, const at::Tensor& buffer, bool into_buffer) {
  const char* what = into_buffer ? "flatten_into" : "unflatten_from";
  TORCH_CHECK(buffer.is_cuda() && buffer.dim() == 1 && buffer.is_contiguous(), what,
              ": buffer must be a contiguous 1-D CUDA tensor");
  const int64_t item = buffer.element_size();
  std::vector<const void*> src;
  std::vector<void*> dst;
  std::vector<int64_t> bytes;
  int64_t offset = 0;
  for (const at::Tensor& t : tensors) {
    TORCH_CHECK(t.scalar_type() == buffer.scalar_type() && t.device() == buffer.device(), what,
                ": tensors must match the buffer's dtype and device");
    const int64_t n = t.numel();
    TORCH_CHECK(offset + n <= buffer.numel(), what, ": tensors need more than the buffer's ",
                buffer.numel(), " elements");
    char* flat = static_cast<char*>(buffer.data_ptr()) + offset * item;
    if (n > 0 && t.is_contiguous()) {
      src.push_back(into_buffer ? t.data_ptr() : flat);
      dst.push_back(into_buffer ? flat : t.data_ptr());
      bytes.push_back(n * item);
    } else if (n > 0) {  // strided: torch's copy kernel
      at::Tensor slot = buffer.narrow(0, offset, n).view(t.sizes());
      if (into_buffer)
        slot.copy_(t);
      else
        const_cast<at::Tensor&>(t).copy_(slot);
    }
    offset += n;
  }
  if (src.empty()) return;
  check_cuda(mc::multi_copy(src.data(), dst.data(), bytes.data(), int(src.size()),
                            buffer.device().index(), current_stream(buffer)),
             what);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "megalite CUDA kernels: fused AdamW, LayerNorm/RMSNorm, multi-tensor flatten";
  m.def("fused_adamw", &fused_adamw, py::arg("params"), py::arg("grads"), py::arg("exp_avgs"),
        py::arg("exp_avg_sqs"), py::arg("model_copies"), py::arg("lr"), py::arg("beta1"),
        py::arg("beta2"), py::arg("eps"), py::arg("weight_decay"), py::arg("step"),
        py::arg("inv_scale"), py::arg("check_finite") = true);
  m.def(
      "layer_norm_fwd",
      [](const at::Tensor& x, const c10::optional<at::Tensor>& w,
         const c10::optional<at::Tensor>& b, double eps) { return norm_fwd(false, x, w, b, eps); },
      py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("eps"));
  m.def(
      "layer_norm_bwd",
      [](const at::Tensor& dy, const at::Tensor& x, const at::Tensor& mean, const at::Tensor& rstd,
         const c10::optional<at::Tensor>& w,
         bool want_db) { return norm_bwd(false, dy, x, mean, rstd, w, want_db); },
      py::arg("dy"), py::arg("x"), py::arg("mean"), py::arg("rstd"), py::arg("weight"),
      py::arg("need_bias_grad"));
  m.def(
      "rms_norm_fwd",
      [](const at::Tensor& x, const c10::optional<at::Tensor>& w, double eps) {
        return norm_fwd(true, x, w, c10::nullopt, eps);
      },
      py::arg("x"), py::arg("weight"), py::arg("eps"));
  m.def(
      "rms_norm_bwd",
      [](const at::Tensor& dy, const at::Tensor& x, const at::Tensor& rstd,
         const c10::optional<at::Tensor>& w) {
        return norm_bwd(true, dy, x, at::Tensor(), rstd, w, false);
      },
      py::arg("dy"), py::arg("x"), py::arg("rstd"), py::arg("weight"));
  m.def(
      "flatten_into",
      [](const std::vector<at::Tensor>& tensors, const at::Tensor& buffer) {
        flat_copy(tensors, buffer, true);
      },
      py::arg("tensors"), py::arg("buffer"));
  m.def(
      "unflatten_from",
      [](const at::Tensor& buffer, const std::vector<at::Tensor>& tensors) {
        flat_copy(tensors, buffer, false);
      },
      py::arg("buffer"), py::arg("tensors"));
}
