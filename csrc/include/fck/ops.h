// Entry points of the C++ and CUDA kernels; python/ registers them as torch ops (schemas live there).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace fck {

#define FCK_ADAM_ARGS                                                                                          \
  at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,          \
      at::TensorList max_exp_avg_sqs, at::TensorList master_params, at::TensorList state_steps, double lr,   \
      double beta1, double beta2, double eps, double weight_decay, bool amsgrad, bool maximize,              \
      bool decoupled_weight_decay, double inv_grad_scale

#define FCK_BATCH_NORM_FWD_ARGS                                                                              \
  const at::Tensor &input, const std::optional<at::Tensor>&residual_in, const std::optional<at::Tensor>&weight,\
      const std::optional<at::Tensor>&bias, const std::optional<at::Tensor>&running_mean,                     \
      const std::optional<at::Tensor>&running_var, bool training, double momentum, double eps, bool relu

#define FCK_BATCH_NORM_BWD_ARGS                                                                              \
  const at::Tensor &grad_output_in, const at::Tensor &input, const std::optional<at::Tensor>&output_in,       \
      const std::optional<at::Tensor>&weight, const at::Tensor &save_mean, const at::Tensor &save_invstd,     \
      bool training, bool relu, bool residual_grad, const std::optional<at::Tensor>&bias, bool mask_from_input

#define FCK_EMBEDDING_BAG_FWD_ARGS                                                                           \
  const at::Tensor &weight, const at::Tensor &indices, const at::Tensor &offsets, int64_t mode,               \
      const std::optional<at::Tensor>&per_sample_weights, int64_t padding_idx

#define FCK_EMBEDDING_BAG_BWD_ARGS                                                                           \
  const at::Tensor &grad_output, const at::Tensor &indices, const at::Tensor &offsets,                        \
      const at::Tensor &max_indices, int64_t num_weights, int64_t mode,                                      \
      const std::optional<at::Tensor>&per_sample_weights, int64_t padding_idx

#define FCK_EMBEDDING_BAG_UPDATE_ARGS                                                                        \
  at::Tensor &weight, const std::optional<at::Tensor>&state, const at::Tensor &grad_output,                   \
      const at::Tensor &indices, const at::Tensor &offsets, int64_t mode,                                    \
      const std::optional<at::Tensor>&per_sample_weights, int64_t padding_idx, int64_t optimizer, double lr,  \
      double eps

// One layer of an LSTM/GRU in one direction (csrc/include/fck/rnn_host.h).
#define FCK_LSTM_FWD_ARGS                                                                                    \
  const at::Tensor &xg, const at::Tensor &h0, const at::Tensor &c0, const at::Tensor &w_hh,                   \
      const std::optional<at::Tensor>&bias, bool reverse
#define FCK_LSTM_BWD_ARGS                                                                                    \
  const at::Tensor &grad_out, const at::Tensor &grad_hn, const at::Tensor &grad_cn, const at::Tensor &h0,     \
      const at::Tensor &c0, const at::Tensor &w_hh, const at::Tensor &out, const at::Tensor &c_all,           \
      const at::Tensor &gates, bool reverse
#define FCK_LSTM_PROJ_FWD_ARGS                                                                               \
  const at::Tensor &xg, const at::Tensor &h0, const at::Tensor &c0, const at::Tensor &w_hh,                   \
      const at::Tensor &w_hr, const std::optional<at::Tensor>&bias, bool reverse, bool save
#define FCK_LSTM_PROJ_BWD_ARGS                                                                               \
  const at::Tensor &grad_out, const at::Tensor &grad_hn, const at::Tensor &grad_cn, const at::Tensor &h0,     \
      const at::Tensor &c0, const at::Tensor &w_hh, const at::Tensor &w_hr, const at::Tensor &out,            \
      const at::Tensor &u, const at::Tensor &c_all, const at::Tensor &gates, bool reverse
#define FCK_GRU_FWD_ARGS                                                                                     \
  const at::Tensor &xg, const at::Tensor &h0, const at::Tensor &w_hh, const std::optional<at::Tensor>&b_ih,   \
      const std::optional<at::Tensor>&b_hh, bool reverse
#define FCK_GRU_BWD_ARGS                                                                                     \
  const at::Tensor &grad_out, const at::Tensor &grad_hn, const at::Tensor &h0, const at::Tensor &w_hh,        \
      const at::Tensor &out, const at::Tensor &saved, bool reverse
#define FCK_RNN_DECLS                                                                                        \
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_layer_fwd(FCK_LSTM_FWD_ARGS);   \
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_layer_bwd(FCK_LSTM_BWD_ARGS);   \
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_proj_layer_fwd(        \
      FCK_LSTM_PROJ_FWD_ARGS);                                                                                \
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_proj_layer_bwd(        \
      FCK_LSTM_PROJ_BWD_ARGS);                                                                                \
  std::tuple<at::Tensor, at::Tensor, at::Tensor> gru_layer_fwd(FCK_GRU_FWD_ARGS);                             \
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> gru_layer_bwd(FCK_GRU_BWD_ARGS);   \
  at::Tensor skinny_mm(const at::Tensor &a, const at::Tensor &w, bool wt, int64_t splits);

#define FCK_LSTM_PACKED_FWD_ARGS                                                                             \
  const at::Tensor &xg, const at::Tensor &batch_sizes, const at::Tensor &h0, const at::Tensor &c0,              \
      const at::Tensor &w_hh, const std::optional<at::Tensor>&w_hr, const std::optional<at::Tensor>&bias,       \
      bool reverse
#define FCK_LSTM_PACKED_BWD_ARGS                                                                             \
  const at::Tensor &grad_out, const at::Tensor &grad_hn, const at::Tensor &grad_cn,                             \
      const at::Tensor &batch_sizes, const at::Tensor &h0, const at::Tensor &c0, const at::Tensor &w_hh,        \
      const std::optional<at::Tensor>&w_hr, const at::Tensor &out, const at::Tensor &u,                        \
      const at::Tensor &c_all, const at::Tensor &gates, bool reverse
#define FCK_GRU_PACKED_FWD_ARGS                                                                              \
  const at::Tensor &xg, const at::Tensor &batch_sizes, const at::Tensor &h0, const at::Tensor &w_hh,            \
      const std::optional<at::Tensor>&b_ih, const std::optional<at::Tensor>&b_hh, bool reverse
#define FCK_GRU_PACKED_BWD_ARGS                                                                              \
  const at::Tensor &grad_out, const at::Tensor &grad_hn, const at::Tensor &batch_sizes, const at::Tensor &h0,   \
      const at::Tensor &w_hh, const at::Tensor &out, const at::Tensor &saved, bool reverse

namespace cpu {
FCK_RNN_DECLS
// A layer over a PackedSequence's rows (csrc/include/fck/rnn_packed.h).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_packed_fwd(
    FCK_LSTM_PACKED_FWD_ARGS);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_packed_bwd(
    FCK_LSTM_PACKED_BWD_ARGS);
std::tuple<at::Tensor, at::Tensor, at::Tensor> gru_packed_fwd(FCK_GRU_PACKED_FWD_ARGS);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> gru_packed_bwd(FCK_GRU_PACKED_BWD_ARGS);
// The forward passes without the saved tensors (no backward will run): (out, h_n, c_n) and (out, h_n).
std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_layer_infer(FCK_LSTM_FWD_ARGS);
std::tuple<at::Tensor, at::Tensor> gru_layer_infer(FCK_GRU_FWD_ARGS);
void adam_(FCK_ADAM_ARGS);
void embedding_bag_fused_update_(FCK_EMBEDDING_BAG_UPDATE_ARGS);
std::tuple<at::Tensor, at::Tensor> embedding_bag_fwd(FCK_EMBEDDING_BAG_FWD_ARGS);
at::Tensor embedding_bag_bwd(FCK_EMBEDDING_BAG_BWD_ARGS);
// A plain lookup, flat (1-D contiguous indices) -> (n, dim) rows, and its dense weight gradient: called directly by
// fck::embedding's C++ autograd for plain CPU tensors (no offsets to build, no dispatch of the bag ops).
at::Tensor embedding_lookup(const at::Tensor &weight, const at::Tensor &flat);
at::Tensor embedding_lookup_bwd(const at::Tensor &grad, const at::Tensor &flat, int64_t num_weights,
                                int64_t padding_idx);
std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_fwd(FCK_BATCH_NORM_FWD_ARGS);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_bwd(FCK_BATCH_NORM_BWD_ARGS);
// conv_winograd.cpp: a 3x3 convolution (+ bias, + ReLU) by Winograd's F(m x m, 3 x 3) (AVX2 + FMA CPUs).
// max_pool.cpp: 2-D max pooling of contiguous NCHW input; the indices are int32 positions in each input plane.
std::tuple<at::Tensor, at::Tensor> max_pool2d_fwd(const at::Tensor &x, at::IntArrayRef kernel_size,
                                                  at::IntArrayRef stride, at::IntArrayRef padding,
                                                  at::IntArrayRef dilation, bool ceil_mode, bool save_indices);
at::Tensor max_pool2d_bwd(const at::Tensor &grad_output, const at::Tensor &indices, at::IntArrayRef input_size);
// depthwise_conv.cpp: a depthwise convolution (one filter a channel) of contiguous NCHW fp32 input, + bias, + act
// (0 none, 1 ReLU, 2 hardtanh(scalars[0], scalars[1]), 3 leaky ReLU(scalars[0]), 4 hardswish).
at::Tensor depthwise_conv2d(const at::Tensor &x, const at::Tensor &weight, const c10::optional<at::Tensor> &bias,
                            at::IntArrayRef stride, at::IntArrayRef padding, int64_t act,
                            at::ArrayRef<double> scalars);
// Its input gradient (of an input of input_size) and weight gradient, (C, 1, kH, kW), given the input and the
// output's gradient.
at::Tensor depthwise_conv2d_input_grad(const at::Tensor &grad_output, const at::Tensor &weight,
                                      at::IntArrayRef input_size, at::IntArrayRef stride, at::IntArrayRef padding);
at::Tensor depthwise_conv2d_weight_grad(const at::Tensor &x, const at::Tensor &grad_output,
                                       at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding);
// avg_pool.cpp: 2-D average pooling of contiguous NCHW input, and its backward (the gradient of an input of
// input_size).
at::Tensor avg_pool2d_fwd(const at::Tensor &x, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                          at::IntArrayRef padding, bool ceil_mode, bool count_include_pad,
                          c10::optional<int64_t> divisor_override);
at::Tensor avg_pool2d_bwd(const at::Tensor &grad_output, at::IntArrayRef input_size, at::IntArrayRef kernel_size,
                          at::IntArrayRef stride, at::IntArrayRef padding, bool ceil_mode, bool count_include_pad,
                          c10::optional<int64_t> divisor_override);
bool winograd_available();
at::Tensor winograd_weight(const at::Tensor &w, int64_t m, bool transposed);
at::Tensor conv3x3_winograd(const at::Tensor &x, const at::Tensor &u, const c10::optional<at::Tensor> &bias,
                            at::IntArrayRef padding, int64_t out_channels, bool relu);
at::Tensor conv3x3_winograd_weight_grad(const at::Tensor &x, const at::Tensor &grad_out, at::IntArrayRef padding,
                                        int64_t m);
}  // namespace cpu
namespace cuda {
FCK_RNN_DECLS
void adam_(FCK_ADAM_ARGS);
void embedding_bag_fused_update_(FCK_EMBEDDING_BAG_UPDATE_ARGS);
std::tuple<at::Tensor, at::Tensor> embedding_bag_fwd(FCK_EMBEDDING_BAG_FWD_ARGS);
at::Tensor embedding_bag_bwd(FCK_EMBEDDING_BAG_BWD_ARGS);
std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_fwd(FCK_BATCH_NORM_FWD_ARGS);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_bwd(FCK_BATCH_NORM_BWD_ARGS);
}  // namespace cuda

}  // namespace fck
