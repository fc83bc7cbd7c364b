// The MLP's activations on the CPU, forward and backward: GeLU with the tanh approximation
// (GPT-2's) and SwiGLU (Llama's silu(gate) * up).
//
// Memory design. Each op is one streaming pass: the forward reads its input once and writes its
// output once; the backward reads dy and the forward's *input* and writes dx. Nothing else is
// saved: the tanh (GeLU) and the sigmoid (SwiGLU) are recomputed in the backward, a few dozen
// vector instructions per 16 elements, less than writing them out in the forward and reading
// them back (one more tensor of traffic each way, and the activations are the MLP's largest
// tensors). All maths is fp32 whatever the storage format (fp32, bf16, fp16: the load/store of
// megalite.h), rounded once on the store.
//   gelu_tanh  y = 0.5 x (1 + tanh(u)), u = k0 (x + k1 x^3)      (torch's
//   F.gelu(approximate="tanh"))
//              dx = dy (0.5 (1 + t) + 0.5 x (1 - t^2) k0 (1 + 3 k1 x^2)), t = tanh(u)
//              both evaluated through the logistic function, 0.5 (1 + tanh u) = 1 / (1 + e^{-2u})
//              (see gelu_tanh below)
//   swiglu     h = [gate | up] along the last dim (2n), y = gate / (1 + exp(-gate)) * up (n);
//              dgate = dy up s (1 + gate (1 - s)), dup = dy silu(gate), s = 1 / (1 + exp(-gate))
// exp is this file's own (Cephes' expf, <= 1 ulp, tested against torch), branch-free, so the
// loops vectorise in every ISA clone (megalite.h).
//
// Threads: at::parallel_for over contiguous ranges of elements (of output elements for SwiGLU,
// whose rows are cut where a range starts and ends); every element's value depends on that
// element only, so results are the same bits for any thread count. Outputs are written with plain
// stores: unlike the norms' (csrc/norms.cpp), streaming stores through a staging block made these
// kernels slower (measured on a 2-core Zen 4 VM, GeLU [2048, 4096] fp32 forward: ~35% slower with
// them), the loops being compute-bound enough for the destination's reads to overlap.
//
// Layout: vector maths, then the kernels (ISA-cloned, one contiguous range each), then the
// launchers, then the Python faces (raw forward/backward, and each op as one C++ autograd node).
#include <torch/csrc/autograd/custom_function.h>

#include <cmath>
#include <type_traits>

#include "megalite.h"

namespace megalite {
namespace {

// ---------------------------------------------------------------------------------------------
// Vector maths (inlined into each clone; no libm calls, which would not vectorise).

// Visit the kernels' storage type for a tensor dtype.
template <typename Fn>
void dispatch_storage(at::ScalarType t, const char* what, Fn&& fn) {
  dispatch_float_type(t, what, [&](auto xt) {
    using S = decltype(xt);
    if constexpr (std::is_same_v<S, F16>)
      fn(F16{});
    else
      fn(xt);
  });
}

// e^a for |a| <= 87, Cephes' expf: a = n ln2 + r, |r| <= ln2 / 2, e^r by a degree-7 polynomial,
// times 2^n built in the exponent bits. Within 1 ulp (tested). The callers clamp the argument
// (and handle what lies beyond), so there is no overflow, no subnormal and no nan to take care of.
MEGALITE_INLINE float exp_f32(float a) {
  const float n = (a * 1.44269504088896341f + 0x1.8p23f) - 0x1.8p23f;
  const float r = (a - n * 0.693359375f) - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.f;
  return p * bits_to_float(uint32_t(int32_t(n) + 127) << 23);
}

// GeLU (tanh approximation) through the logistic function. With u = k0 (x + k1 x^3) and
// s = 1 / (1 + e^{-2u}):  0.5 (1 + tanh u) = s  and  0.5 (1 - tanh^2 u) = 2 s (1 - s), so
//   y = x s,   dy/dx = s + 2 x s (1 - s) u',   u' = k0 (1 + 3 k1 x^2)
// (torch: 0.5 x (1 + t) and 0.5 (1 + t) + 0.5 x (1 - t^2) u', t = tanh u). One exp and one
// division per element instead of a tanh (an exp, a division, a small-argument polynomial and the
// selects between them): about 40% fewer instructions. It is also more accurate: s and 1 - s =
// 1 / (1 + e^{2u}) carry no cancellation, while 1 + t and 1 - t^2 lose most of their bits as t
// nears -1 or 1 (for x in [-5, -3] torch's fp32 backward is off by up to ~5e-7 |dy|, and where
// its tanh has rounded to -1, x < -5.05, y and dx are exactly 0 instead of ~-1e-7 and ~-1e-6).
// Infinities and nan give torch's results: gelu(inf) = inf, gelu(-inf) = nan (-inf * 0), a nan
// gradient at +-inf.
constexpr float kBeta = 0.7978845608028654f;  // sqrt(2 / pi)
constexpr float kKappa = 0.044715f;
constexpr float kThreeKappa = 3.f * kKappa;  // folded as torch's kThreeVec * kKappaVec is
constexpr float kTwoBeta = 2.f * kBeta;      // 2u = (2 k0) (x + k1 x^3): scaling by 2 is exact
// Beyond |2u| = 87 (|x| > 11.2) s is 1 or 0 to within 1e-38 and the gradient 1 or 0 to within
// 1e-30: both are taken as exact there, which also keeps e^{2u} finite and x^2, x^3 from
// overflowing into the result (torch's fp32 backward gives nan from |x| = 1.8e19 on).
constexpr float kMaxExp = 87.f;

// e^{2u}, 2u clamped to [-kMaxExp, kMaxExp] (a nan becomes -kMaxExp: x itself carries the nan).
MEGALITE_INLINE float exp_2u(float two_u) {
  return exp_f32(select(two_u > -kMaxExp, select(two_u < kMaxExp, two_u, kMaxExp), -kMaxExp));
}

MEGALITE_INLINE float gelu_tanh(float x) {
  const float two_u = kTwoBeta * (x + kKappa * (x * x * x));
  const float e = exp_2u(two_u);
  return select(two_u < -kMaxExp, x * 0.f, x * (e / (e + 1.f)));  // x = -inf: nan, as torch
}

MEGALITE_INLINE float gelu_tanh_grad(float dy, float x) {
  const float x_sq = x * x;
  const float two_u = kTwoBeta * (x + kKappa * (x_sq * x));
  const float e = exp_2u(two_u);
  const float q = 1.f / (e + 1.f);  // 1 - s
  const float s = e * q;
  const float g = s + x * s * q * (kTwoBeta * (1.f + kThreeKappa * x_sq));  // s + 2 x s (1 - s) u'
  // (x * 0: nan for x = +-inf, as torch's 0.5 x (1 - t^2) u' = inf * 0)
  return dy * select(two_u > kMaxExp, 1.f + x * 0.f, select(two_u < -kMaxExp, x * 0.f, g));
}

// SwiGLU's sigmoid, 1 / (1 + e^{-g}), and silu, g / (1 + e^{-g}), torch's expressions. e^{-g} with
// -g clamped to [-kMaxExp, kMaxExp]: past g = 87 the sigmoid is 1 (to 1e-38), below g = -87 it is
// taken as 0 and silu as g * 0 (torch: e^{-g} overflows to inf, so both are 0, and silu(-inf) =
// -inf / inf = nan, as g * 0 is). A nan gate clamps to -kMaxExp; g itself carries the nan.
MEGALITE_INLINE float exp_neg(float g) {
  return exp_f32(select(g < kMaxExp, select(g > -kMaxExp, -g, kMaxExp), -kMaxExp));
}

// ---------------------------------------------------------------------------------------------
// Kernels: one contiguous range each.
template <typename X>
MEGALITE_ISA_CLONES void gelu_fwd_kernel(const typename X::T* __restrict x,
                                         typename X::T* __restrict y, int64_t n) {
  for (int64_t j = 0; j < n; ++j) y[j] = X::store(gelu_tanh(X::load(x[j])));
}

template <typename X>
MEGALITE_ISA_CLONES void gelu_bwd_kernel(const typename X::T* __restrict dy,
                                         const typename X::T* __restrict x,
                                         typename X::T* __restrict dx, int64_t n) {
  for (int64_t j = 0; j < n; ++j) dx[j] = X::store(gelu_tanh_grad(X::load(dy[j]), X::load(x[j])));
}

template <typename X>
MEGALITE_ISA_CLONES void swiglu_fwd_kernel(const typename X::T* __restrict g,
                                           const typename X::T* __restrict u,
                                           typename X::T* __restrict y, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    const float gj = X::load(g[j]);
    const float silu = select(gj < -kMaxExp, gj * 0.f, gj / (1.f + exp_neg(gj)));
    y[j] = X::store(silu * X::load(u[j]));
  }
}

template <typename X>
MEGALITE_ISA_CLONES void swiglu_bwd_kernel(const typename X::T* __restrict dy,
                                           const typename X::T* __restrict g,
                                           const typename X::T* __restrict u,
                                           typename X::T* __restrict dg,
                                           typename X::T* __restrict du, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    const float gj = X::load(g[j]), d = X::load(dy[j]);
    const float s = select(gj < -kMaxExp, 0.f, 1.f / (1.f + exp_neg(gj)));  // sigmoid(gate)
    dg[j] = X::store(d * X::load(u[j]) * s * (1.f + gj * (1.f - s)));
    du[j] = X::store(d * (gj * s));
  }
}

MEGALITE_ISA_CLONES void exp_kernel(const float* __restrict x, float* __restrict y, int64_t n) {
  for (int64_t j = 0; j < n; ++j)
    y[j] = exp_f32(select(x[j] < kMaxExp, select(x[j] > -kMaxExp, x[j], -kMaxExp), kMaxExp));
}

// ---------------------------------------------------------------------------------------------
// Launchers.

constexpr int64_t kGrain =
    32768;  // elements per parallel task at least: small tensors stay on one thread

void check_cpu(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.device().is_cpu(), what, ": tensors must be on the CPU");
  TORCH_CHECK(t.is_contiguous(), what, ": tensors must be contiguous");
}

void check_like(const at::Tensor& t, const at::Tensor& ref, const char* what) {
  check_cpu(t, what);
  TORCH_CHECK(t.sizes() == ref.sizes() && t.scalar_type() == ref.scalar_type(), what,
              ": dy must match the input in shape and dtype");
}

at::Tensor gelu_tanh_fwd(const at::Tensor& x) {
  const char* what = "gelu_tanh_fwd";
  check_cpu(x, what);
  at::Tensor y = at::empty_like(x);
  const int64_t n = x.numel();
  dispatch_storage(x.scalar_type(), what, [&](auto xt) {
    using X = decltype(xt);
    using T = typename X::T;
    const T* xp = static_cast<const T*>(x.data_ptr());
    T* yp = static_cast<T*>(y.data_ptr());
    at::parallel_for(0, n, kGrain, [&](int64_t lo, int64_t hi) {
      gelu_fwd_kernel<X>(xp + lo, yp + lo, hi - lo);
    });
  });
  return y;
}

at::Tensor gelu_tanh_bwd(const at::Tensor& dy, const at::Tensor& x) {
  const char* what = "gelu_tanh_bwd";
  check_cpu(x, what);
  check_like(dy, x, what);
  at::Tensor dx = at::empty_like(x);
  const int64_t n = x.numel();
  dispatch_storage(x.scalar_type(), what, [&](auto xt) {
    using X = decltype(xt);
    using T = typename X::T;
    const T* xp = static_cast<const T*>(x.data_ptr());
    const T* dyp = static_cast<const T*>(dy.data_ptr());
    T* dxp = static_cast<T*>(dx.data_ptr());
    at::parallel_for(0, n, kGrain, [&](int64_t lo, int64_t hi) {
      gelu_bwd_kernel<X>(dyp + lo, xp + lo, dxp + lo, hi - lo);
    });
  });
  return dx;
}

// SwiGLU's rows: h is [rows, 2n] (gate = h[:, :n], up = h[:, n:]), y and dy [rows, n]. A parallel
// range [lo, hi) of the rows * n outputs is cut into its pieces of single rows: fn(row, c0, c1)
// for columns [c0, c1) of that row.
template <typename Fn>
void for_each_row_piece(int64_t lo, int64_t hi, int64_t n, Fn&& fn) {
  for (int64_t i = lo; i < hi;) {
    const int64_t row = i / n, c0 = i - row * n, c1 = std::min(n, c0 + (hi - i));
    fn(row, c0, c1);
    i += c1 - c0;
  }
}

int64_t swiglu_half(const at::Tensor& h, const char* what) {
  check_cpu(h, what);
  TORCH_CHECK(h.dim() >= 1 && h.size(-1) % 2 == 0, what,
              ": the last dim of h must be even ([gate | up]), got ", h.sizes());
  return h.size(-1) / 2;
}

at::Tensor swiglu_fwd(const at::Tensor& h) {
  const char* what = "swiglu_fwd";
  const int64_t n = swiglu_half(h, what);
  std::vector<int64_t> sizes = h.sizes().vec();
  sizes.back() = n;
  at::Tensor y = at::empty(sizes, h.options());
  const int64_t total = y.numel();
  dispatch_storage(h.scalar_type(), what, [&](auto xt) {
    using X = decltype(xt);
    using T = typename X::T;
    const T* hp = static_cast<const T*>(h.data_ptr());
    T* yp = static_cast<T*>(y.data_ptr());
    at::parallel_for(0, total, kGrain, [&](int64_t lo, int64_t hi) {
      for_each_row_piece(lo, hi, n, [&](int64_t row, int64_t c0, int64_t c1) {
        const T* g = hp + row * 2 * n;
        swiglu_fwd_kernel<X>(g + c0, g + n + c0, yp + row * n + c0, c1 - c0);
      });
    });
  });
  return y;
}

at::Tensor swiglu_bwd(const at::Tensor& dy, const at::Tensor& h) {
  const char* what = "swiglu_bwd";
  const int64_t n = swiglu_half(h, what);
  check_cpu(dy, what);
  std::vector<int64_t> sizes = h.sizes().vec();
  sizes.back() = n;
  TORCH_CHECK(dy.sizes() == at::IntArrayRef(sizes) && dy.scalar_type() == h.scalar_type(), what,
              ": dy must be h's shape with half its last dim, in h's dtype");
  at::Tensor dh = at::empty_like(h);
  const int64_t total = dy.numel();
  dispatch_storage(h.scalar_type(), what, [&](auto xt) {
    using X = decltype(xt);
    using T = typename X::T;
    const T* hp = static_cast<const T*>(h.data_ptr());
    const T* dyp = static_cast<const T*>(dy.data_ptr());
    T* dhp = static_cast<T*>(dh.data_ptr());
    at::parallel_for(0, total, kGrain, [&](int64_t lo, int64_t hi) {
      for_each_row_piece(lo, hi, n, [&](int64_t row, int64_t c0, int64_t c1) {
        const T* g = hp + row * 2 * n;
        T* dg = dhp + row * 2 * n;
        swiglu_bwd_kernel<X>(dyp + row * n + c0, g + c0, g + n + c0, dg + c0, dg + n + c0, c1 - c0);
      });
    });
  });
  return dh;
}

// exp alone, fp32, for the tests (its accuracy against torch's).
at::Tensor elementwise_f32(const at::Tensor& x, void (*kernel)(const float*, float*, int64_t),
                           const char* what) {
  check_cpu(x, what);
  TORCH_CHECK(x.scalar_type() == at::kFloat, what, ": float32 only");
  at::Tensor y = at::empty_like(x);
  kernel(x.data_ptr<float>(), y.data_ptr<float>(), x.numel());
  return y;
}

// ---------------------------------------------------------------------------------------------
// Autograd: each op as one C++ autograd node (what megalite.ops uses on the CPU; see norms.cpp).
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

at::Tensor grad_like(const at::Tensor& g, const at::Tensor& x) {
  at::Tensor d = g.scalar_type() == x.scalar_type() ? g : g.to(x.scalar_type());
  return d.contiguous();
}

struct GeluTanhFunction : public torch::autograd::Function<GeluTanhFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x) {
    const at::Tensor xc = x.contiguous();
    ctx->save_for_backward({xc});
    return gelu_tanh_fwd(xc);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor x = ctx->get_saved_variables()[0];
    return {gelu_tanh_bwd(grad_like(grads[0], x), x)};
  }
};

struct SwigluFunction : public torch::autograd::Function<SwigluFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& h) {
    const at::Tensor hc = h.contiguous();
    ctx->save_for_backward({hc});
    return swiglu_fwd(hc);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor h = ctx->get_saved_variables()[0];
    return {swiglu_bwd(grad_like(grads[0], h), h)};
  }
};

void register_activations(pybind11::module_& m) {
  m.def("gelu_tanh_fwd", &gelu_tanh_fwd, "GeLU (tanh approximation) forward of a contiguous tensor",
        py::arg("x"));
  m.def("gelu_tanh_bwd", &gelu_tanh_bwd, "GeLU (tanh approximation) backward -> dx", py::arg("dy"),
        py::arg("x"));
  m.def("swiglu_fwd", &swiglu_fwd,
        "SwiGLU forward: h = [gate | up] (last dim 2n) -> silu(gate) * up (n)", py::arg("h"));
  m.def("swiglu_bwd", &swiglu_bwd, "SwiGLU backward -> dh = [dgate | dup]", py::arg("dy"),
        py::arg("h"));
  m.def(
      "gelu_tanh", [](const at::Tensor& x) { return GeluTanhFunction::apply(x); },
      "differentiable GeLU (tanh approximation) of a CPU tensor (one C++ autograd node)",
      py::arg("x"));
  m.def(
      "swiglu", [](const at::Tensor& h) { return SwigluFunction::apply(h); },
      "differentiable SwiGLU of a CPU tensor h = [gate | up] (one C++ autograd node)",
      py::arg("h"));
  m.def(
      "exp_f32", [](const at::Tensor& x) { return elementwise_f32(x, &exp_kernel, "exp_f32"); },
      "the activation kernels' own exp, elementwise over a contiguous fp32 tensor, its argument "
      "clamped to "
      "[-87, 87] as theirs is (for tests)",
      py::arg("x"));
}

}  // namespace

MEGALITE_REGISTER(register_activations)

}  // namespace megalite
