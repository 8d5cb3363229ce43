// The op schemas of fastcore_kernels and their CPU kernels. The schema is the contract every backend follows; Python
// adds the fake (meta) kernels and autograd in fastcore_kernels/ops/.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "fck/cpu_pool.h"
#include "fck/ops.h"

TORCH_LIBRARY(fck, m) {
  // The kernels take the layouts the Python wrappers give them (a gradient laid out like its input, say): torch
  // 2.4's inductor re-strides a custom op's inputs unless the op says so (later releases keep them by default).
  const std::vector<at::Tag> kFixedStrides = {at::Tag::needs_fixed_stride_order};
  // Multi-tensor Adam/AdamW step, in place. All tensors of one call share a device and a param dtype. state_steps
  // are torch.optim.Adam's one-element float32 CPU step counters; the op increments them.
  m.def(
      "adam_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
      "Tensor(d!)[] max_exp_avg_sqs, Tensor(e!)[] master_params, Tensor(f!)[] state_steps, float lr, float beta1, "
      "float beta2, float eps, float weight_decay, bool amsgrad, bool maximize, bool decoupled_weight_decay, "
      "float inv_grad_scale) -> ()", kFixedStrides);
  // Batch norm with an optional residual add and ReLU: relu?(batch_norm(input) + residual?). Returns the output
  // and the per-channel mean and 1/std used (fp32; float64 for float64 input). Training updates the running
  // statistics in place.
  m.def(
      "batch_norm_fwd(Tensor input, Tensor? residual, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, "
      "Tensor(b!)? running_var, bool training, float momentum, float eps, bool relu) -> (Tensor, Tensor, Tensor)",
      kFixedStrides);
  // Its backward: (grad_input, grad_residual (empty unless residual_grad), grad_weight, grad_bias), the last two
  // in the statistics' dtype. `output` (the forward's result) supplies the ReLU mask; with mask_from_input (a
  // training forward without a residual) and its bias, a kernel may instead recompute the pre-activation from the
  // input with the forward's coefficients, the same mask without reading the output (the C++ CPU one does, for
  // fp32 and fp64).
  m.def(
      "batch_norm_bwd(Tensor grad_output, Tensor input, Tensor? output, Tensor? weight, Tensor save_mean, "
      "Tensor save_invstd, bool training, bool relu, bool residual_grad, Tensor? bias=None, "
      "bool mask_from_input=False) -> (Tensor, Tensor, Tensor, Tensor)", kFixedStrides);
  // relu?(batch_norm(input) + residual?) with its autograd in C++ (python/register_autograd.cpp), on the two ops
  // above: the output alone.
  m.def(
      "batch_norm_act(Tensor input, Tensor? residual, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, "
      "Tensor(b!)? running_var, bool training, float momentum, float eps, bool relu) -> Tensor", kFixedStrides);
  // Embedding bags over a 1-D index tensor with offsets ending in the number of indices; mode 0 sum, 1 mean,
  // 2 max; padding_idx -1 for none. Returns the (bags, dim) output and, for max, the row each maximum came from.
  m.def(
      "embedding_bag_fwd(Tensor weight, Tensor indices, Tensor offsets, int mode, Tensor? per_sample_weights, "
      "int padding_idx) -> (Tensor, Tensor)", kFixedStrides);
  // The dense weight gradient, (num_weights, dim), deterministic. per_sample_weights scale each index's share.
  m.def(
      "embedding_bag_bwd(Tensor grad_output, Tensor indices, Tensor offsets, Tensor max_indices, int num_weights, "
      "int mode, Tensor? per_sample_weights, int padding_idx) -> Tensor", kFixedStrides);
  // A plain lookup (torch.nn.functional.embedding): weight rows for an index tensor of any shape, (*indices, dim).
  // Its autograd is in C++ (python/register_autograd.cpp); padding_idx rows get no gradient, -1 for none.
  m.def("embedding(Tensor weight, Tensor indices, int padding_idx) -> Tensor", kFixedStrides);
  // embedding_bag on normalised inputs (1-D indices, offsets ending with their number), without per-sample weights:
  // the kernels with their autograd in C++ (register_autograd.cpp), for the many small tables of a tabular model.
  m.def("embedding_bag(Tensor weight, Tensor indices, Tensor offsets, int mode, int padding_idx) -> Tensor",
        kFixedStrides);
  // The backward of embedding_bag fused with an optimizer step on the rows it touches (optimizer 0: SGD, 1: row-wise
  // Adagrad with one float32 state value per row), for tables too large for a dense gradient. Updates in place.
  m.def(
      "embedding_bag_fused_update_(Tensor(a!) weight, Tensor(b!)? state, Tensor grad_output, Tensor indices, "
      "Tensor offsets, int mode, Tensor? per_sample_weights, int padding_idx, int optimizer, float lr, float eps) "
      "-> ()", kFixedStrides);
  // One LSTM layer in one direction over a whole sequence, after the input projection xg = x W_ih^T (T, B, 4H);
  // bias = b_ih + b_hh. Returns (output (T, B, H), h_n, c_n, and for the backward every cell state and the activated
  // gates, fp32 or float64). `reverse` runs from the last step to the first (a bidirectional RNN's second direction).
  m.def("lstm_layer_fwd(Tensor xg, Tensor h0, Tensor c0, Tensor w_hh, Tensor? bias, bool reverse) -> (Tensor, "
        "Tensor, Tensor, Tensor, Tensor)", kFixedStrides);
  // Its backward: (grad_xg, grad_h0, grad_c0, grad_w_hh, grad_bias).
  m.def("lstm_layer_bwd(Tensor grad_out, Tensor grad_hn, Tensor grad_cn, Tensor h0, Tensor c0, Tensor w_hh, "
        "Tensor out, Tensor c_all, Tensor gates, bool reverse) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
        kFixedStrides);
  // One GRU layer from xg = x W_ih^T (T, B, 3H). Returns (output, h_n, saved r/z/n/b_n (T, B, 4H)).
  m.def("gru_layer_fwd(Tensor xg, Tensor h0, Tensor w_hh, Tensor? b_ih, Tensor? b_hh, bool reverse) -> (Tensor, "
        "Tensor, Tensor)", kFixedStrides);
  // Its backward: (grad_xg, grad_h0, grad_w_hh, grad_b_ih, grad_b_hh).
  m.def("gru_layer_bwd(Tensor grad_out, Tensor grad_hn, Tensor h0, Tensor w_hh, Tensor out, Tensor saved, "
        "bool reverse) -> (Tensor, Tensor, Tensor, Tensor, Tensor)", kFixedStrides);
  // The same layers over a PackedSequence's rows (CPU): xg (N, G*H), batch_sizes[t] rows at step t (a
  // PackedSequence's, int64 on the CPU); outputs and saved tensors packed the same way, h_n/c_n each sequence's
  // state at its last step. Autograd in Python (fastcore_kernels/ops/rnn.py).
  // An LSTM's w_hr: its projection (proj_size), as lstm_proj_layer_fwd's; u is then the cell outputs (N, H), else
  // empty, and the backward's fifth result W_hr's gradient (else empty).
  m.def("lstm_packed_fwd(Tensor xg, Tensor batch_sizes, Tensor h0, Tensor c0, Tensor w_hh, Tensor? w_hr, "
        "Tensor? bias, bool reverse) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)", kFixedStrides);
  m.def("lstm_packed_bwd(Tensor grad_out, Tensor grad_hn, Tensor grad_cn, Tensor batch_sizes, Tensor h0, "
        "Tensor c0, Tensor w_hh, Tensor? w_hr, Tensor out, Tensor u, Tensor c_all, Tensor gates, bool reverse) -> "
        "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)", kFixedStrides);
  m.def("gru_packed_fwd(Tensor xg, Tensor batch_sizes, Tensor h0, Tensor w_hh, Tensor? b_ih, Tensor? b_hh, "
        "bool reverse) -> (Tensor, Tensor, Tensor)", kFixedStrides);
  m.def("gru_packed_bwd(Tensor grad_out, Tensor grad_hn, Tensor batch_sizes, Tensor h0, Tensor w_hh, Tensor out, "
        "Tensor saved, bool reverse) -> (Tensor, Tensor, Tensor, Tensor, Tensor)", kFixedStrides);
  // The CUDA recurrent step's own GEMM (csrc/include/fck/skinny_gemm.h): a (n x K) @ op(w), fp32, 1 <= n <= 32,
  // op(w) = w^T (w N x K) when wt, else w (K x N); splits: K splits (0: chosen for the device). On the CPU the same
  // kernel code runs emulated, for the tests.
  m.def("skinny_mm(Tensor a, Tensor w, bool wt, int splits=0) -> Tensor", kFixedStrides);
  // The two layers with their autograd in C++ (register_autograd.cpp): (output, h_n, c_n) / (output, h_n). A cell
  // is a one-step layer, called many times per batch, where a Python autograd.Function costs more than the step.
  m.def("lstm_layer(Tensor xg, Tensor h0, Tensor c0, Tensor w_hh, Tensor? bias, bool reverse) -> (Tensor, Tensor, "
        "Tensor)", kFixedStrides);
  m.def("gru_layer(Tensor xg, Tensor h0, Tensor w_hh, Tensor? b_ih, Tensor? b_hh, bool reverse) -> (Tensor, Tensor)",
        kFixedStrides);
  // An LSTM layer with a projection (torch's proj_size): w_hh (4H, P), w_hr (P, H), h0 (B, P), c0 (B, H). h_t =
  // W_hr (o_t * tanh(c_t)) is the output (T, B, P) and the next step's input; returns (output, h_n, c_n, c_all,
  // gates, u), u (T, B, H) the unprojected o_t * tanh(c_t) the backward needs; without `save` (inference) the last
  // three are one or two steps' reused slots. The backward returns the gradients of xg, h0, c0, w_hh, w_hr and the
  // bias. Autograd in Python (fastcore_kernels/ops/rnn.py).
  m.def("lstm_proj_layer_fwd(Tensor xg, Tensor h0, Tensor c0, Tensor w_hh, Tensor w_hr, Tensor? bias, bool reverse, "
        "bool save=True) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)", kFixedStrides);
  m.def("lstm_proj_layer_bwd(Tensor grad_out, Tensor grad_hn, Tensor grad_cn, Tensor h0, Tensor c0, Tensor w_hh, "
        "Tensor w_hr, Tensor out, Tensor u, Tensor c_all, Tensor gates, bool reverse) -> (Tensor, Tensor, Tensor, "
        "Tensor, Tensor, Tensor)", kFixedStrides);
  // The cells, x (B, I) and states (B, H): the input GEMM, the one-step layer and all five gradients as one autograd
  // node in C++ (register_autograd.cpp). A cell's GEMMs are ~15 us on a CPU: the composition of a Python GEMM, a bias
  // add and the layer op paid more for its autograd nodes, copies and transposes than for the arithmetic.
  m.def("lstm_cell(Tensor input, Tensor hx, Tensor cx, Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh) -> "
        "(Tensor, Tensor)", kFixedStrides);
  m.def("gru_cell(Tensor input, Tensor hx, Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh) -> Tensor",
        kFixedStrides);
  // A whole multi-layer stack, x (T, B, I), params in torch's flat order, states (layers * directions, B, H) or
  // None for zeros, dropout between layers where `train` (drawn as F.dropout draws it): every layer's projection,
  // pass and gradient as one autograd node in C++ (register_autograd.cpp). Returns (output, h_n, c_n) /
  // (output, h_n).
  m.def("lstm_seq(Tensor x, Tensor[] params, Tensor? h0, Tensor? c0, bool has_biases, int num_layers, "
        "bool bidirectional, float dropout=0., bool train=False) -> (Tensor, Tensor, Tensor)", kFixedStrides);
  m.def("gru_seq(Tensor x, Tensor[] params, Tensor? h0, bool has_biases, int num_layers, bool bidirectional, "
        "float dropout=0., bool train=False) -> (Tensor, Tensor)", kFixedStrides);
  // Frees the cached blocks of the CPU output pool (csrc/include/fck/cpu_pool.h); returns the bytes released.
  m.def("cpu_pool_release() -> int", &fck::cpu::pool_release_cached);
  // A contiguous (row-major) copy of x in a pooled block: a channels_last result turned back into NCHW without
  // page-faulting a fresh output (CPU).
  m.def("contiguous_pooled(Tensor x) -> Tensor", kFixedStrides);
  // a @ b into a pooled block (CPU): an RNN's input projection of every step, without the page faults of a fresh
  // multi-MB output on each call.
  m.def("mm_pooled(Tensor a, Tensor b) -> Tensor", kFixedStrides);
  // conv-BN-ReLU's CPU path: conv2d(x, w, bias, stride=1, padding) for a 3x3 kernel, ReLU optional, by Winograd's
  // F(m x m, 3 x 3). winograd_weight transforms and packs w (K, C, 3, 3) for m = 2 or 4 (transposed: the filters of
  // the input gradient's convolution, flip(w[c][k]), from the same w); the convolution takes that packed weight and
  // returns a tensor of out_channels channels in the input's memory format (NCHW or channels_last).
  m.def("winograd_weight(Tensor w, int m, bool transposed=False) -> Tensor", kFixedStrides);
  m.def("conv3x3_winograd(Tensor x, Tensor u, Tensor? bias, int[2] padding, int out_channels, bool relu) -> Tensor",
        kFixedStrides);
  // Its weight gradient: the (K, C, 3, 3) gradient of that convolution's weight given x and grad_out, by F(m x m).
  m.def("conv3x3_winograd_weight_grad(Tensor x, Tensor grad_out, int[2] padding, int m) -> Tensor", kFixedStrides);
  m.def("winograd_available() -> bool", &fck::cpu::winograd_available);
  // 2-D max pooling of a contiguous (N, C, H, W) input with torch's semantics (max_pool2d): the output and, when
  // save_indices, each maximum's position in its input plane as int32 (ih * W + iw; else empty). The backward adds
  // grad_output at those positions of a zero (N, C, H, W) = input_size gradient.
  m.def("max_pool2d_fwd(Tensor input, int[2] kernel_size, int[2] stride, int[2] padding, int[2] dilation, "
        "bool ceil_mode, bool save_indices) -> (Tensor, Tensor)", kFixedStrides);
  m.def("max_pool2d_bwd(Tensor grad_output, Tensor indices, int[4] input_size) -> Tensor", kFixedStrides);
  // A depthwise convolution (groups == channels) of a contiguous (N, C, H, W) fp32 input with a (C, 1, kH, kW)
  // weight, + bias, + an activation (0 none, 1 ReLU, 2 hardtanh(min, max), 3 leaky ReLU(slope), 4 hardswish). No
  // autograd of its own: training wraps it and the two gradient ops below (ops/conv_bn_relu.py).
  m.def("depthwise_conv2d(Tensor input, Tensor weight, Tensor? bias, int[2] stride, int[2] padding, int act, "
        "float[] scalars) -> Tensor", kFixedStrides);
  // Its input gradient (of an input of input_size) and weight gradient, (C, 1, kH, kW), from the input and the
  // output's gradient (fp32; the weight's summed in double).
  m.def("depthwise_conv2d_input_grad(Tensor grad_output, Tensor weight, int[4] input_size, int[2] stride, "
        "int[2] padding) -> Tensor", kFixedStrides);
  m.def("depthwise_conv2d_weight_grad(Tensor input, Tensor grad_output, int[2] kernel_size, int[2] stride, "
        "int[2] padding) -> Tensor", kFixedStrides);
  // 2-D average pooling of a contiguous (N, C, H, W) input with torch's semantics (avg_pool2d), and its backward:
  // the gradient of an input of input_size.
  m.def("avg_pool2d_fwd(Tensor input, int[2] kernel_size, int[2] stride, int[2] padding, bool ceil_mode, "
        "bool count_include_pad, int? divisor_override) -> Tensor", kFixedStrides);
  m.def("avg_pool2d_bwd(Tensor grad_output, int[4] input_size, int[2] kernel_size, int[2] stride, int[2] padding, "
        "bool ceil_mode, bool count_include_pad, int? divisor_override) -> Tensor", kFixedStrides);
}

namespace {

// The ops that write into their arguments bump those tensors' version counters, as torch's in-place ops do: the
// eval-mode fold caches (fastcore_kernels/ops/conv_bn_relu.py) watch the versions of the weights FusedAdam steps
// and of the running statistics the batch-norm forward updates, and autograd's check for a saved tensor modified in
// place needs them too. One boxed kernel at the ADInplaceOrView key serves every such op: it runs the op, then
// bumps each argument its schema marks as written (a tensor, a list of tensors or an optional tensor).
void bump_written_arguments(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
  const auto& args = op.schema().arguments();
  std::vector<c10::IValue> written;
  for (size_t i = 0; i < args.size(); ++i) {
    if (args[i].alias_info() && args[i].alias_info()->isWrite()) {
      written.push_back((*stack)[stack->size() - args.size() + i]);
    }
  }
  op.redispatchBoxed(keys & c10::after_ADInplaceOrView_keyset, stack);
  const auto bump = [](const at::Tensor& t) {
    if (t.defined() && !t.is_inference()) t.unsafeGetTensorImpl()->bump_version();
  };
  for (const c10::IValue& v : written) {
    if (v.isTensor()) {
      bump(v.toTensor());
    } else if (v.isTensorList()) {
      for (const at::Tensor& t : v.toTensorVector()) bump(t);
    }
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(fck, ADInplaceOrView, m) {
  for (const char* name : {"adam_", "batch_norm_fwd", "embedding_bag_fused_update_"}) {
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&bump_written_arguments>());
  }
}

TORCH_LIBRARY_IMPL(fck, CPU, m) {
  m.impl("contiguous_pooled", &fck::cpu::contiguous_pooled);
  m.impl("mm_pooled", &fck::cpu::mm_pooled);
  m.impl("max_pool2d_fwd", &fck::cpu::max_pool2d_fwd);
  m.impl("max_pool2d_bwd", &fck::cpu::max_pool2d_bwd);
  m.impl("avg_pool2d_fwd", &fck::cpu::avg_pool2d_fwd);
  m.impl("depthwise_conv2d", &fck::cpu::depthwise_conv2d);
  m.impl("depthwise_conv2d_weight_grad", &fck::cpu::depthwise_conv2d_weight_grad);
  m.impl("depthwise_conv2d_input_grad", &fck::cpu::depthwise_conv2d_input_grad);
  m.impl("avg_pool2d_bwd", &fck::cpu::avg_pool2d_bwd);
  m.impl("winograd_weight", &fck::cpu::winograd_weight);
  m.impl("conv3x3_winograd", &fck::cpu::conv3x3_winograd);
  m.impl("conv3x3_winograd_weight_grad", &fck::cpu::conv3x3_winograd_weight_grad);
  m.impl("adam_", &fck::cpu::adam_);
  m.impl("batch_norm_fwd", &fck::cpu::batch_norm_fwd);
  m.impl("batch_norm_bwd", &fck::cpu::batch_norm_bwd);
  m.impl("embedding_bag_fwd", &fck::cpu::embedding_bag_fwd);
  m.impl("embedding_bag_bwd", &fck::cpu::embedding_bag_bwd);
  m.impl("embedding_bag_fused_update_", &fck::cpu::embedding_bag_fused_update_);
  m.impl("lstm_layer_fwd", &fck::cpu::lstm_layer_fwd);
  m.impl("skinny_mm", &fck::cpu::skinny_mm);
  m.impl("lstm_layer_bwd", &fck::cpu::lstm_layer_bwd);
  m.impl("lstm_proj_layer_fwd", &fck::cpu::lstm_proj_layer_fwd);
  m.impl("lstm_proj_layer_bwd", &fck::cpu::lstm_proj_layer_bwd);
  m.impl("gru_layer_fwd", &fck::cpu::gru_layer_fwd);
  m.impl("gru_layer_bwd", &fck::cpu::gru_layer_bwd);
  m.impl("lstm_packed_fwd", &fck::cpu::lstm_packed_fwd);
  m.impl("lstm_packed_bwd", &fck::cpu::lstm_packed_bwd);
  m.impl("gru_packed_fwd", &fck::cpu::gru_packed_fwd);
  m.impl("gru_packed_bwd", &fck::cpu::gru_packed_bwd);
}
