// CUDA kernels of the ops defined in register_ops.cpp; compiled only when the CUDA toolchain is present.
#include <torch/library.h>

#include "fck/ops.h"

TORCH_LIBRARY_IMPL(fck, CUDA, m) {
  m.impl("adam_", &fck::cuda::adam_);
  m.impl("batch_norm_fwd", &fck::cuda::batch_norm_fwd);
  m.impl("batch_norm_bwd", &fck::cuda::batch_norm_bwd);
  m.impl("embedding_bag_fwd", &fck::cuda::embedding_bag_fwd);
  m.impl("embedding_bag_bwd", &fck::cuda::embedding_bag_bwd);
  m.impl("embedding_bag_fused_update_", &fck::cuda::embedding_bag_fused_update_);
  m.impl("lstm_layer_fwd", &fck::cuda::lstm_layer_fwd);
  m.impl("skinny_mm", &fck::cuda::skinny_mm);
  m.impl("lstm_layer_bwd", &fck::cuda::lstm_layer_bwd);
  m.impl("lstm_proj_layer_fwd", &fck::cuda::lstm_proj_layer_fwd);
  m.impl("lstm_proj_layer_bwd", &fck::cuda::lstm_proj_layer_bwd);
  m.impl("gru_layer_fwd", &fck::cuda::gru_layer_fwd);
  m.impl("gru_layer_bwd", &fck::cuda::gru_layer_bwd);
}
