// The op schemas of fastcore_kernels and their CPU kernels. The schema is the contract every backend follows; Python
// adds the fake (meta) kernels and autograd in fastcore_kernels/ops/.
#include <torch/library.h>

#include "fck/ops.h"

TORCH_LIBRARY(fck, m) {
  // Multi-tensor Adam/AdamW step, in place. All tensors of one call share a device and a param dtype. state_steps
  // are torch.optim.Adam's one-element float32 CPU step counters; the op increments them.
  m.def(
      "adam_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
      "Tensor(d!)[] max_exp_avg_sqs, Tensor(e!)[] master_params, Tensor(f!)[] state_steps, float lr, float beta1, "
      "float beta2, float eps, float weight_decay, bool amsgrad, bool maximize, bool decoupled_weight_decay, "
      "float inv_grad_scale) -> ()");
}

TORCH_LIBRARY_IMPL(fck, CPU, m) { m.impl("adam_", &fck::cpu::adam_); }
