// The one module init of megalite._C: every csrc/*.cpp registers its functions through
// MEGALITE_REGISTER (see megalite.h), and this adds them all to the module.
#include "megalite.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "megalite CPU kernels: fused AdamW, LayerNorm/RMSNorm, gradient bucketing";
  for (auto registrar : megalite::registrars()) registrar(m);
}
