// Makes the library importable as the Python module fastcore_kernels._C; importing it runs the static op
// registrations of register_ops*.cpp. Nothing is bound through pybind11: the ops are reached as torch.ops.fck.*.
#include <torch/extension.h>

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastcore_kernels C++/CUDA kernels, registered as torch.ops.fck.*";
#ifdef FCK_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
