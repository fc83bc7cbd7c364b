// The interface between megalite's CUDA kernels (csrc/cuda/*.cu) and their torch binding
// (csrc/cuda/bindings.cpp).
//
// Plain C++: raw pointers, sizes, a device index and a stream passed as void* (a cudaStream_t).
// The .cu files include only the CUDA toolkit, never torch, so every one of them compiles with
// nvcc on any machine that has the toolkit (torch's CPU wheel ships incomplete CUDA headers);
// the binding includes only torch's CPU headers. Every launcher returns a cudaError_t as int
// (0 = success); error_string turns it into text.
//
// Every launcher runs on the current device: the binding makes the tensors' device current
// (torch's device guard) before calling it. `device` is that same index, used only to query the
// device's attributes (its SM count).
#pragma once

#include <cstdint>

namespace megalite_cuda {

enum DType : int { kNoType = -1, kF32 = 0, kBF16 = 1, kF16 = 2 };

const char* error_string(int err);

// ---- fused AdamW (adamw.cu) ----------------------------------------------------------------
// One tensor of the step, with its group's constants already derived (see csrc/adamw.cpp).
struct AdamwTensor {
  float* p;
  float* m;
  float* v;
  const void* g;  // grad, g_dtype
  void* copy;     // low-precision model copy, copy_dtype (kNoType: none)
  int64_t n;
  float lr_wd, one_minus_b1, beta2, one_minus_b2, step_size, inv_bc2_sqrt, eps;
  int g_dtype, copy_dtype;
  // The group's own lr and betas, from which the update derives step_size and inv_bc2_sqrt on
  // the device when the step count is in device memory (d_step below).
  double lr_d, beta1_d, beta2_d;
};

// Sweep 1 sets *d_found (device int, zeroed by the caller) if any grad holds an inf/nan;
// sweep 2 updates everything unless *d_found is set. Both run on `stream`, in that order, so no
// host synchronisation is needed between them. The grads are multiplied by inv_scale, or, when
// d_grad_scale (one device float) is given, by its reciprocal, read on the device. With d_step
// (one device float, every tensor's step) the bias corrections are derived from it on the
// device, in double as csrc/adamw.cpp does on the host, instead of taken from step_size and
// inv_bc2_sqrt.
int adamw_check(const AdamwTensor* tensors, int count, int* d_found, int device, void* stream);
int adamw_update(const AdamwTensor* tensors, int count, float inv_scale, const float* d_grad_scale,
                 const int* d_found, const float* d_step, int device, void* stream);

// ---- LayerNorm / RMSNorm (norms.cu) --------------------------------------------------------
// x, y, dy, dx: [rows, hidden] in `dtype`; weight/bias fp32 (nullptr: none); mean/rstd fp32
// [rows] (mean unused for RMSNorm). dw/db fp32 [hidden] (nullptr: not wanted).
int norm_fwd(bool rms, int dtype, const void* x, const float* w, const float* b, void* y,
             float* mean, float* rstd, int64_t rows, int64_t hidden, float eps, int device,
             void* stream);
// Floats of scratch the backward needs for its per-row-block dw/db partial sums (16-byte aligned
// for the vectorised kernels: torch's allocator gives that).
int64_t norm_bwd_workspace(int64_t rows, int64_t hidden, int device);
int norm_bwd(bool rms, int dtype, const void* dy, const void* x, const float* mean,
             const float* rstd, const float* w, void* dx, float* dw, float* db, float* workspace,
             int64_t rows, int64_t hidden, int device, void* stream);

// ---- bucketing (bucketing.cu) --------------------------------------------------------------
// Copy count byte ranges src[i] -> dst[i] (nbytes[i]) in one multi-tensor launch.
int multi_copy(const void* const* src, void* const* dst, const int64_t* nbytes, int count,
               int device, void* stream);

}  // namespace megalite_cuda
