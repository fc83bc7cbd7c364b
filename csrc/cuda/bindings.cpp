// megalite._cuda: the thin torch binding of the CUDA kernels in csrc/cuda/*.cu.
//
// It includes only (a few of) torch's CPU headers (the CPU wheel's CUDA headers are incomplete, see
// kernels.h): it checks arguments, allocates outputs with torch (which uses the CUDA caching
// allocator for CUDA tensors), takes the current stream from torch.cuda, and hands raw pointers
// to the launchers. The Python signatures are those of megalite._C, so megalite.ops dispatches
// to either module the same way.
//
// Every function is registered through on_tensors_device, which makes the tensors' device current
// with torch's device guard (c10::DeviceGuard, a CPU header: at run time it is the CUDA guard
// that libc10_cuda registers, the same as c10::cuda::CUDAGuard). The launchers run on the current
// device, and on exit the guard restores the previous one without creating a CUDA context there.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/core/DeviceGuard.h>
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <cmath>

#include <optional>
#include <string>
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
  TORCH_CHECK(t.is_cuda(), what, ": expects CUDA tensors, got one on ", t.device());
  TORCH_CHECK(t.device() == ref.device(), what, ": all tensors must be on ", ref.device(),
              ", got one on ", t.device());
  TORCH_CHECK(t.is_contiguous(), what, ": tensors must be contiguous");
}

// A float32 vector argument of n elements on x's device (contiguous): weight, bias, mean, rstd.
const float* f32_vector(const at::Tensor& t, const at::Tensor& x, int64_t n, const char* what,
                        const char* name) {
  TORCH_CHECK(t.defined(), what, ": ", name, " is missing");
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.dim() == 1 && t.numel() == n, what, ": ", name,
              " must be a float32 vector of ", n, " elements, got ", t.scalar_type(), " ",
              t.sizes());
  check_on(t, x, what);
  return t.data_ptr<float>();
}

const float* opt_f32(const c10::optional<at::Tensor>& t, const at::Tensor& x, int64_t n,
                     const char* what, const char* name) {
  if (!t.has_value() || !t->defined()) return nullptr;
  return f32_vector(*t, x, n, what, name);
}

// ---- device guard ------------------------------------------------------------------------------
// The device of the first CUDA tensor among a binding's arguments, in order (nullopt: none).
std::optional<c10::Device> cuda_device_of();
template <typename... Rest>
std::optional<c10::Device> cuda_device_of(const at::Tensor& t, const Rest&... rest);
template <typename... Rest>
std::optional<c10::Device> cuda_device_of(const std::vector<at::Tensor>& ts, const Rest&... rest);
template <typename T, typename... Rest>
std::optional<c10::Device> cuda_device_of(const T&, const Rest&... rest);

std::optional<c10::Device> cuda_device_of() {
  return std::nullopt;
}
template <typename... Rest>
std::optional<c10::Device> cuda_device_of(const at::Tensor& t, const Rest&... rest) {
  if (t.defined() && t.is_cuda()) return t.device();
  return cuda_device_of(rest...);
}
template <typename... Rest>
std::optional<c10::Device> cuda_device_of(const std::vector<at::Tensor>& ts, const Rest&... rest) {
  for (const at::Tensor& t : ts)
    if (t.defined() && t.is_cuda()) return t.device();
  return cuda_device_of(rest...);
}
template <typename T, typename... Rest>
std::optional<c10::Device> cuda_device_of(const T&, const Rest&... rest) {
  return cuda_device_of(rest...);
}

// fn, run with its tensors' device current (see the top of this file). Arguments that are not
// on a CUDA device are left to fn's own checks.
template <typename R, typename... Args>
auto on_tensors_device(R (*fn)(Args...)) {
  return [fn](Args... args) -> R {
    const c10::OptionalDeviceGuard guard(cuda_device_of(args...));
    return fn(args...);
  };
}

// ---- AdamW -------------------------------------------------------------------------------------
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
  const size_t n = params.size();
  // A step count in device memory is every tensor's step, and the step list is then empty.
  const bool one_step = step_tensor.has_value() && step_tensor->defined();
  TORCH_CHECK(grads.size() == n && exp_avgs.size() == n && exp_avg_sqs.size() == n &&
                  (model_copies.empty() || model_copies.size() == n) && lr.size() == n &&
                  beta1.size() == n && beta2.size() == n && eps.size() == n &&
                  weight_decay.size() == n && step.size() == (one_step ? 0 : n),
              "fused_adamw: lists differ in length (and a step tensor takes no step list)");
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
    TORCH_CHECK(one_step || step[i] >= 1, "fused_adamw: step must be >= 1");
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
    // The same derivation as the CPU kernel (csrc/adamw.cpp): double, then fp32. With a step
    // tensor the kernel derives the bias corrections from lr_d, beta1_d and beta2_d.
    a.lr_wd = float(lr[i] * weight_decay[i]);
    a.one_minus_b1 = float(1.0 - beta1[i]);
    a.beta2 = float(beta2[i]);
    a.one_minus_b2 = float(1.0 - beta2[i]);
    a.step_size = a.inv_bc2_sqrt = 0.0f;
    if (!one_step) {
      const double bc1 = 1.0 - std::pow(beta1[i], step[i]);
      const double bc2 = 1.0 - std::pow(beta2[i], step[i]);
      a.step_size = float(lr[i] / bc1);
      a.inv_bc2_sqrt = float(1.0 / std::sqrt(bc2));
    }
    a.eps = float(eps[i]);
    a.lr_d = lr[i];
    a.beta1_d = beta1[i];
    a.beta2_d = beta2[i];
  }
  // The caller's grad scale and inf flag stay in device memory: the kernels read them there.
  auto device_scalar = [&](const c10::optional<at::Tensor>& t, at::ScalarType dtype,
                           const char* what) -> const at::Tensor* {
    if (!t.has_value() || !t->defined()) return nullptr;
    check_on(*t, ref, "fused_adamw");
    TORCH_CHECK(t->numel() == 1 && t->scalar_type() == dtype, "fused_adamw: ", what,
                " must be a 1-element ", dtype, " tensor");
    return &*t;
  };
  const at::Tensor* scale = device_scalar(grad_scale, at::kFloat, "grad_scale");
  const at::Tensor* flag = device_scalar(found_inf, at::kInt, "found_inf");
  const at::Tensor* step_count = device_scalar(step_tensor, at::kFloat, "step");
  // The check writes the flag, so it gets a copy of the caller's (which it must not change).
  at::Tensor found = flag == nullptr ? at::zeros({1}, ref.options().dtype(at::kInt))
                     : check_finite  ? flag->clone()
                                     : *flag;
  void* stream = current_stream(ref);
  const int device = ref.device().index();
  // Unchecked (the caller vouches for the grads): no check launch and no host synchronisation.
  if (check_finite)
    check_cuda(mc::adamw_check(ts.data(), int(n), found.data_ptr<int>(), device, stream),
               "fused_adamw");
  check_cuda(mc::adamw_update(
                 ts.data(), int(n), float(inv_scale),
                 scale != nullptr ? scale->data_ptr<float>() : nullptr, found.data_ptr<int>(),
                 step_count != nullptr ? step_count->data_ptr<float>() : nullptr, device, stream),
             "fused_adamw");
  return check_finite && found.item<int>() != 0;
}

// ---- norms -------------------------------------------------------------------------------------
std::vector<at::Tensor> norm_fwd(bool rms, const at::Tensor& x,
                                 const c10::optional<at::Tensor>& weight,
                                 const c10::optional<at::Tensor>& bias, double eps) {
  const char* what = rms ? "rms_norm_fwd" : "layer_norm_fwd";
  TORCH_CHECK(x.dim() == 2, what, ": x must be [rows, hidden], got ", x.sizes());
  check_on(x, x, what);
  const int dtype = dtype_code(x.scalar_type(), what);
  const int64_t rows = x.size(0), hidden = x.size(1);
  const float* w = opt_f32(weight, x, hidden, what, "weight");
  const float* b = rms ? nullptr : opt_f32(bias, x, hidden, what, "bias");
  at::Tensor y = at::empty_like(x);
  at::Tensor mean = at::empty({rms ? 0 : rows}, x.options().dtype(at::kFloat));
  at::Tensor rstd = at::empty({rows}, x.options().dtype(at::kFloat));
  check_cuda(mc::norm_fwd(rms, dtype, x.data_ptr(), w, b, y.data_ptr(),
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
  TORCH_CHECK(x.dim() == 2, what, ": x must be [rows, hidden], got ", x.sizes());
  TORCH_CHECK(dy.sizes() == x.sizes() && dy.scalar_type() == x.scalar_type(), what,
              ": dy must have x's shape and dtype, got ", dy.scalar_type(), " ", dy.sizes(),
              " for x ", x.scalar_type(), " ", x.sizes());
  check_on(x, x, what);
  check_on(dy, x, what);
  const int dtype = dtype_code(x.scalar_type(), what);
  const int64_t rows = x.size(0), hidden = x.size(1);
  // The statistics are read once per row: a short or wrong-typed one would be read out of bounds.
  const float* rstd_p = f32_vector(rstd, x, rows, what, "rstd");
  const float* mean_p = rms ? nullptr : f32_vector(mean, x, rows, what, "mean");
  const float* w = opt_f32(weight, x, hidden, what, "weight");
  at::Tensor dx = at::empty_like(x);
  at::Tensor dw = w ? at::empty({hidden}, x.options().dtype(at::kFloat)) : at::Tensor();
  at::Tensor db =
      (!rms && want_db) ? at::empty({hidden}, x.options().dtype(at::kFloat)) : at::Tensor();
  const int device = x.device().index();
  at::Tensor workspace =
      at::empty({mc::norm_bwd_workspace(rows, hidden, device)}, x.options().dtype(at::kFloat));
  check_cuda(mc::norm_bwd(rms, dtype, dy.data_ptr(), x.data_ptr(), mean_p, rstd_p, w, dx.data_ptr(),
                          dw.defined() ? dw.data_ptr<float>() : nullptr,
                          db.defined() ? db.data_ptr<float>() : nullptr,
                          workspace.data_ptr<float>(), rows, hidden, device, current_stream(x)),
             what);
  if (rms) return {dx, dw};
  return {dx, dw, db};
}

std::vector<at::Tensor> layer_norm_fwd(const at::Tensor& x, const c10::optional<at::Tensor>& w,
                                       const c10::optional<at::Tensor>& b, double eps) {
  return norm_fwd(false, x, w, b, eps);
}

std::vector<at::Tensor> layer_norm_bwd(const at::Tensor& dy, const at::Tensor& x,
                                       const at::Tensor& mean, const at::Tensor& rstd,
                                       const c10::optional<at::Tensor>& w, bool want_db) {
  return norm_bwd(false, dy, x, mean, rstd, w, want_db);
}

std::vector<at::Tensor> rms_norm_fwd(const at::Tensor& x, const c10::optional<at::Tensor>& w,
                                     double eps) {
  return norm_fwd(true, x, w, c10::nullopt, eps);
}

std::vector<at::Tensor> rms_norm_bwd(const at::Tensor& dy, const at::Tensor& x,
                                     const at::Tensor& rstd, const c10::optional<at::Tensor>& w) {
  return norm_bwd(true, dy, x, at::Tensor(), rstd, w, false);
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

void flatten_into(const std::vector<at::Tensor>& tensors, const at::Tensor& buffer) {
  flat_copy(tensors, buffer, true);
}

void unflatten_from(const at::Tensor& buffer, const std::vector<at::Tensor>& tensors) {
  flat_copy(tensors, buffer, false);
}

// ---- what was compiled -------------------------------------------------------------------------
// The GPU code in this module, as setup.py had nvcc compile it, '+'-separated: sm_XY is machine
// code (SASS), which runs on capability X.Z for Z >= Y; compute_XY is PTX, which the driver
// compiles at load time for any capability >= X.Y. megalite/ops/dispatch.py sends a GPU that has
// neither to the reference path instead of failing at the first launch.
#ifndef MEGALITE_CUDA_ARCHS
#error "build through setup.py, which sets MEGALITE_CUDA_ARCHS to the archs nvcc compiles for"
#endif
#define MEGALITE_STRINGIFY_(x) #x
#define MEGALITE_STRINGIFY(x) MEGALITE_STRINGIFY_(x)

std::vector<std::string> compiled_archs() {
  const std::string all = MEGALITE_STRINGIFY(MEGALITE_CUDA_ARCHS);
  std::vector<std::string> archs;
  size_t start = 0;
  while (start <= all.size()) {
    const size_t end = std::min(all.find('+', start), all.size());
    if (end > start) archs.push_back(all.substr(start, end - start));
    start = end + 1;
  }
  return archs;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "megalite CUDA kernels: fused AdamW, LayerNorm/RMSNorm, multi-tensor flatten";
  m.def("fused_adamw", on_tensors_device(&fused_adamw), py::arg("params"), py::arg("grads"),
        py::arg("exp_avgs"), py::arg("exp_avg_sqs"), py::arg("model_copies"), py::arg("lr"),
        py::arg("beta1"), py::arg("beta2"), py::arg("eps"), py::arg("weight_decay"),
        py::arg("step"), py::arg("inv_scale"), py::arg("check_finite") = true,
        py::arg("grad_scale") = py::none(), py::arg("found_inf") = py::none(),
        py::arg("step_tensor") = py::none());
  m.def("layer_norm_fwd", on_tensors_device(&layer_norm_fwd), py::arg("x"), py::arg("weight"),
        py::arg("bias"), py::arg("eps"));
  m.def("layer_norm_bwd", on_tensors_device(&layer_norm_bwd), py::arg("dy"), py::arg("x"),
        py::arg("mean"), py::arg("rstd"), py::arg("weight"), py::arg("need_bias_grad"));
  m.def("rms_norm_fwd", on_tensors_device(&rms_norm_fwd), py::arg("x"), py::arg("weight"),
        py::arg("eps"));
  m.def("rms_norm_bwd", on_tensors_device(&rms_norm_bwd), py::arg("dy"), py::arg("x"),
        py::arg("rstd"), py::arg("weight"));
  m.def("flatten_into", on_tensors_device(&flatten_into), py::arg("tensors"), py::arg("buffer"));
  m.def("unflatten_from", on_tensors_device(&unflatten_from), py::arg("buffer"),
        py::arg("tensors"));
  m.def("compiled_archs", &compiled_archs,
        "the GPU code compiled into this module: sm_XY (SASS) and compute_XY (PTX) entries");
}
