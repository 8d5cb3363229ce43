// Entry points of the C++ and CUDA kernels; python/ registers them as torch ops (schemas live there).
#pragma once

#include <ATen/ATen.h>

namespace fck {

#define FCK_ADAM_ARGS                                                                                          \
  at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,          \
      at::TensorList max_exp_avg_sqs, at::TensorList master_params, at::TensorList state_steps, double lr,   \
      double beta1, double beta2, double eps, double weight_decay, bool amsgrad, bool maximize,              \
      bool decoupled_weight_decay, double inv_grad_scale

namespace cpu {
void adam_(FCK_ADAM_ARGS);
}
namespace cuda {
void adam_(FCK_ADAM_ARGS);
}

}  // namespace fck
