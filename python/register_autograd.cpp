// Autograd kernels written in C++ for the ops a model calls many times per step on small tensors. A Python
// torch.autograd.Function costs ~100-150 us of interpreter time per forward+backward on this project's CPU: more
// than a small table's whole lookup. These run the same device kernels (through the dispatcher, so CPU and CUDA
// alike) with torch's own C++ autograd overhead. Under torch.compile the Python path is used (fastcore_kernels/ops).
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/grad_mode.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <initializer_list>

#include "fck/ops.h"

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// `fn()`: the typed handle of op `name`, looked up once (a dispatcher lookup is a string search per call).
#define FCK_OP_HANDLE(fn, Sig, name)                                                               \
  const c10::TypedOperatorHandle<Sig>& fn() {                                                      \
    static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>(); \
    return op;                                                                                     \
  }

// Plain strided CPU tensors, which a CPU function may take directly: a FakeTensor, another Python subclass, a
// functionalized or functorch-wrapped tensor goes through the dispatcher as usual.
bool plain_cpu(std::initializer_list<at::Tensor> tensors) {
  static const c10::DispatchKeySet wrapped({c10::DispatchKey::Python, c10::DispatchKey::Functionalize,
                                            c10::DispatchKey::FuncTorchBatched,
                                            c10::DispatchKey::FuncTorchGradWrapper});
  for (const auto& t : tensors) {
    if (!t.device().is_cpu() || t.layout() != at::kStrided || t.key_set().has_any(wrapped)) return false;
  }
  return true;
}

// A backward asked to build a graph (create_graph=True: a gradient penalty, a Hessian-vector product) must be
// differentiable; the kernels' backward is not, and its result would silently carry no second derivative. Ops
// whose backward has a differentiable form below take it; the others refuse, as torch's embedding_bag does.
// `works`: where the op's family does support it, if anywhere. (The recurrent layer nodes keep what their kernels'
// backward reads, not their input projection, so they cannot re-run their forward; the whole-stack and cell nodes
// can: rnn_seq_grad_graph, rnn_cell_grad_graph.)
void refuse_double_backward(const char* op, const char* works = "") {
  TORCH_CHECK_NOT_IMPLEMENTED(!at::GradMode::is_enabled(), "fastcore_kernels ", op,
                              ": this path's fused backward is not differentiable (double backward / "
                              "create_graph=True). ", works, "Use torch's module for this part of the model.");
}

constexpr const char* kRnnDoubleBackward =
    "Stacks without proj_size on padded input, and the cells, support it on the cpu and cuda backends in eager "
    "mode. ";

using EmbeddingBagFwd = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                           int64_t, const std::optional<at::Tensor>&, int64_t);
using EmbeddingBagBwd = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t,
                                   int64_t, const std::optional<at::Tensor>&, int64_t);

FCK_OP_HANDLE(embedding_bag_fwd, EmbeddingBagFwd, "fck::embedding_bag_fwd")
FCK_OP_HANDLE(embedding_bag_bwd, EmbeddingBagBwd, "fck::embedding_bag_bwd")

// A lookup is an embedding bag with one index per bag: offsets 0, 1, ..., n. Plain CPU tensors go straight to the
// CPU lookup (fck::cpu::embedding_lookup), without the offsets and the bag op's dispatch.
at::Tensor embedding_forward(const at::Tensor& weight, const at::Tensor& flat) {
  TORCH_CHECK(weight.dim() == 2, "fck::embedding: weight must be a 2-D (num_embeddings, dim) tensor");
  if (plain_cpu({weight, flat})) return fck::cpu::embedding_lookup(weight, flat);
  const at::Tensor offsets = at::arange(flat.numel() + 1, flat.options());
  return std::get<0>(embedding_bag_fwd().call(weight, flat, offsets, 0, std::nullopt, -1));
}

std::vector<int64_t> output_shape(const at::Tensor& indices, const at::Tensor& weight) {
  std::vector<int64_t> shape = indices.sizes().vec();
  shape.push_back(weight.size(1));
  return shape;
}

// The padding row's value is returned as it is (as torch's embedding); it only gets no gradient.
struct Embedding : public torch::autograd::Function<Embedding> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& weight, const at::Tensor& indices,
                            int64_t padding_idx) {
    const at::Tensor flat = indices.reshape({-1}).contiguous();
    const at::Tensor out = embedding_forward(weight, flat);
    ctx->save_for_backward({flat});
    ctx->saved_data["num_weights"] = weight.size(0);
    ctx->saved_data["padding_idx"] = padding_idx;
    return out.view(output_shape(indices, weight));
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor flat = ctx->get_saved_variables()[0];
    const at::Tensor grad = grads[0].reshape({flat.numel(), grads[0].size(-1)}).contiguous();
    if (at::GradMode::is_enabled()) {  // create_graph: the same sum of rows as differentiable ops
      const int64_t pad = ctx->saved_data["padding_idx"].toInt();
      const at::Tensor g = pad >= 0 ? grad * flat.ne(pad).unsqueeze(1).to(grad.scalar_type()) : grad;
      return {at::zeros({ctx->saved_data["num_weights"].toInt(), grad.size(1)}, grad.options()).index_add(0, flat, g),
              at::Tensor(), at::Tensor()};
    }
    if (plain_cpu({grad, flat})) {
      return {fck::cpu::embedding_lookup_bwd(grad, flat, ctx->saved_data["num_weights"].toInt(),
                                             ctx->saved_data["padding_idx"].toInt()),
              at::Tensor(), at::Tensor()};
    }
    const at::Tensor offsets = at::arange(flat.numel() + 1, flat.options());
    const at::Tensor no_max = at::empty({0}, flat.options().dtype(at::kLong));
    at::Tensor grad_weight = embedding_bag_bwd().call(grad, flat, offsets, no_max,
                                                      ctx->saved_data["num_weights"].toInt(), 0, std::nullopt,
                                                      ctx->saved_data["padding_idx"].toInt());
    return {grad_weight, at::Tensor(), at::Tensor()};
  }
};

at::Tensor embedding_autograd(const at::Tensor& weight, const at::Tensor& indices, int64_t padding_idx) {
  return Embedding::apply(weight, indices, padding_idx);
}

at::Tensor embedding_plain(const at::Tensor& weight, const at::Tensor& indices, int64_t padding_idx) {
  (void)padding_idx;
  return embedding_forward(weight, indices.reshape({-1}).contiguous()).view(output_shape(indices, weight));
}

struct EmbeddingBag : public torch::autograd::Function<EmbeddingBag> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& weight, const at::Tensor& indices,
                            const at::Tensor& offsets, int64_t mode, int64_t padding_idx) {
    auto [out, max_idx] = embedding_bag_fwd().call(weight, indices, offsets, mode, std::nullopt, padding_idx);
    ctx->save_for_backward({indices, offsets, max_idx});
    ctx->saved_data["num_weights"] = weight.size(0);
    ctx->saved_data["mode"] = mode;
    ctx->saved_data["padding_idx"] = padding_idx;
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    refuse_double_backward("embedding_bag");
    const variable_list saved = ctx->get_saved_variables();
    at::Tensor grad_weight = embedding_bag_bwd().call(
        grads[0].contiguous(), saved[0], saved[1], saved[2], ctx->saved_data["num_weights"].toInt(),
        ctx->saved_data["mode"].toInt(), std::nullopt, ctx->saved_data["padding_idx"].toInt());
    return {grad_weight, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

at::Tensor embedding_bag_autograd(const at::Tensor& weight, const at::Tensor& indices, const at::Tensor& offsets,
                                  int64_t mode, int64_t padding_idx) {
  return EmbeddingBag::apply(weight, indices, offsets, mode, padding_idx);
}

at::Tensor embedding_bag_plain(const at::Tensor& weight, const at::Tensor& indices, const at::Tensor& offsets,
                               int64_t mode, int64_t padding_idx) {
  return std::get<0>(embedding_bag_fwd().call(weight, indices, offsets, mode, std::nullopt, padding_idx));
}

// ---- a @ b into a pooled CPU block (the RNNs' input projection) ----
using MmPooled = at::Tensor(const at::Tensor&, const at::Tensor&);
FCK_OP_HANDLE(mm_pooled, MmPooled, "fck::mm_pooled")

// The gradients go to pooled blocks too: g b^T, and b's as (g^T a)^T. The projection passes b = w_ih^T, so w_ih's
// gradient comes contiguous and AccumulateGrad keeps it rather than copying it (a^T g's transpose was a 21 MB copy
// per layer at the AWD-LSTM's shape). In C++ rather than a Python autograd.Function: ~0.3 ms of interpreter time
// per lesson-7 LSTM step (two layers).
struct PooledMM : public torch::autograd::Function<PooledMM> {
  // (the op calls itself below the autograd layer; through it again it would recurse)
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& a, const at::Tensor& b) {
    ctx->save_for_backward({a, b});
    const at::AutoDispatchBelowADInplaceOrView below;
    return mm_pooled().call(a, b);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list s = ctx->get_saved_variables();
    if (at::GradMode::is_enabled()) {  // create_graph: torch's differentiable mm
      return {ctx->needs_input_grad(0) ? at::mm(grads[0], s[1].t()) : at::Tensor(),
              ctx->needs_input_grad(1) ? at::mm(s[0].t(), grads[0]) : at::Tensor()};
    }
    const at::AutoDispatchBelowADInplaceOrView below;
    at::Tensor grad_a, grad_b;
    if (ctx->needs_input_grad(0)) grad_a = mm_pooled().call(grads[0], s[1].t());
    if (ctx->needs_input_grad(1)) grad_b = mm_pooled().call(grads[0].t(), s[0]).t();
    return {grad_a, grad_b};
  }
};

at::Tensor mm_pooled_autograd(const at::Tensor& a, const at::Tensor& b) { return PooledMM::apply(a, b); }

// ---- batch norm (+ residual, + ReLU) ----
using BatchNormFwd = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
    const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, bool, double,
    double, bool);
using BatchNormBwd = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
    const at::Tensor&, const at::Tensor&, bool, bool, bool, const std::optional<at::Tensor>&, bool);

using BatchNormGradGraph = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
    const at::Tensor&, const at::Tensor&, bool, bool, double);

FCK_OP_HANDLE(batch_norm_fwd, BatchNormFwd, "fck::batch_norm_fwd")
FCK_OP_HANDLE(batch_norm_bwd, BatchNormBwd, "fck::batch_norm_bwd")
// The backward as differentiable torch ops (fastcore_kernels/ops/batch_norm.py defines it), for create_graph.
FCK_OP_HANDLE(batch_norm_grad_graph, BatchNormGradGraph, "fck::batch_norm_grad_graph")

std::optional<at::Tensor> opt(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

// The kernels take every full-size tensor in the input's layout (contiguous or channels-last).
at::Tensor like_input(const at::Tensor& t, const at::Tensor& x) {
  const auto fmt = x.suggest_memory_format();
  return t.is_contiguous(fmt) ? t : t.contiguous(fmt);
}

struct BatchNormAct : public torch::autograd::Function<BatchNormAct> {
  // Optional tensors stay std::optional: Function::apply treats a plain undefined Tensor as an input variable.
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const std::optional<at::Tensor>& residual,
                            const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                            const std::optional<at::Tensor>& running_mean,
                            const std::optional<at::Tensor>& running_var, bool training, double momentum, double eps,
                            bool relu) {
    auto [y, mean, invstd] =
        batch_norm_fwd().call(x, residual, weight, bias, running_mean, running_var, training, momentum, eps, relu);
    const at::Tensor w = weight.value_or(at::Tensor()), b = bias.value_or(at::Tensor());
    ctx->save_for_backward({x, relu ? y : at::Tensor(), w, mean, invstd, b});
    ctx->saved_data["training"] = training;
    ctx->saved_data["relu"] = relu;
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["mask_from_input"] = relu && training && !residual;
    // Which gradients to make, by argument (needs_input_grad counts only the tensors given).
    ctx->saved_data["need"] = std::vector<bool>{x.requires_grad(), residual && residual->requires_grad(),
                                                w.defined() && w.requires_grad(), bias && bias->requires_grad()};
    ctx->saved_data["bias_dtype"] = bias ? bias->scalar_type() : x.scalar_type();
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &y = saved[1], &weight = saved[2];
    const c10::List<bool> need = ctx->saved_data["need"].toBoolList();
    const bool training = ctx->saved_data["training"].toBool(), relu = ctx->saved_data["relu"].toBool();
    auto [dx, dres, dw, db] =
        at::GradMode::is_enabled()
            ? batch_norm_grad_graph().call(grads[0], x, opt(y), opt(weight), saved[3], saved[4], training, relu,
                                           ctx->saved_data["eps"].toDouble())
            : batch_norm_bwd().call(like_input(grads[0], x), x, opt(y), opt(weight), saved[3], saved[4], training,
                                    relu, need[1], opt(saved[5]), ctx->saved_data["mask_from_input"].toBool());
    const auto bias_dtype = ctx->saved_data["bias_dtype"].toScalarType();
    return {need[0] ? dx : at::Tensor(),
            need[1] ? dres : at::Tensor(),
            need[2] ? dw.to(weight.scalar_type()) : at::Tensor(),
            need[3] ? db.to(bias_dtype) : at::Tensor(),
            at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

at::Tensor batch_norm_act_autograd(const at::Tensor& x, const std::optional<at::Tensor>& residual,
                                   const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                                   const std::optional<at::Tensor>& running_mean,
                                   const std::optional<at::Tensor>& running_var, bool training, double momentum,
                                   double eps, bool relu) {
  return BatchNormAct::apply(x, residual, weight, bias, running_mean, running_var, training, momentum, eps, relu);
}

at::Tensor batch_norm_act_plain(const at::Tensor& x, const std::optional<at::Tensor>& residual,
                                const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                                const std::optional<at::Tensor>& running_mean,
                                const std::optional<at::Tensor>& running_var, bool training, double momentum,
                                double eps, bool relu) {
  return std::get<0>(
      batch_norm_fwd().call(x, residual, weight, bias, running_mean, running_var, training, momentum, eps, relu));
}

// ---- LSTM / GRU layers ----
using LstmFwd = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, bool);
using LstmBwd = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const at::Tensor&, const at::Tensor&, const at::Tensor&, bool);
using GruFwd = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                              const std::optional<at::Tensor>&,
                                                              const std::optional<at::Tensor>&, bool);
using GruBwd = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    bool);

FCK_OP_HANDLE(lstm_fwd, LstmFwd, "fck::lstm_layer_fwd")
FCK_OP_HANDLE(lstm_bwd, LstmBwd, "fck::lstm_layer_bwd")
FCK_OP_HANDLE(gru_fwd, GruFwd, "fck::gru_layer_fwd")
FCK_OP_HANDLE(gru_bwd, GruBwd, "fck::gru_layer_bwd")

// Backwards that build a graph (create_graph=True): the forward re-run on differentiable ops from the node's inputs
// (fastcore_kernels/ops/rnn.py defines both). Each returns a gradient per tensor input, empty where none is needed.
using SeqGradGraph = std::vector<at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                             const at::Tensor&, at::TensorList, const at::Tensor&, const at::Tensor&,
                                             bool, bool, int64_t, bool,
                                             const c10::List<std::optional<at::Tensor>>&);
using CellGradGraph = std::vector<at::Tensor>(const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&,
                                              const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&,
                                              const at::Tensor&, const std::optional<at::Tensor>&,
                                              const std::optional<at::Tensor>&);
FCK_OP_HANDLE(rnn_seq_grad_graph, SeqGradGraph, "fck::rnn_seq_grad_graph")
FCK_OP_HANDLE(rnn_cell_grad_graph, CellGradGraph, "fck::rnn_cell_grad_graph")

// The graph op's gradients (one per tensor argument, `given` says which were passed: an absent optional is no
// input edge) for the inputs that need one, the others undefined; `total` counts every argument of forward.
variable_list needed(AutogradContext* ctx, std::vector<at::Tensor> grads, const std::vector<bool>& given,
                     size_t total) {
  variable_list result(total);
  size_t edge = 0;
  for (size_t i = 0; i < grads.size(); ++i) {
    if (given[i] && ctx->needs_input_grad(edge++)) result[i] = std::move(grads[i]);
  }
  return result;
}

struct LstmLayer : public torch::autograd::Function<LstmLayer> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& xg, const at::Tensor& h0, const at::Tensor& c0,
                               const at::Tensor& w_hh, const std::optional<at::Tensor>& bias, bool reverse) {
    auto [out, h_n, c_n, c_all, gates] =
        lstm_fwd().call(xg, h0, c0, w_hh, bias, reverse);
    ctx->save_for_backward({h0, c0, w_hh, out, c_all, gates});
    ctx->saved_data["reverse"] = reverse;
    ctx->saved_data["has_bias"] = bias.has_value();
    return {out, h_n, c_n};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list s = ctx->get_saved_variables();
    refuse_double_backward("lstm", kRnnDoubleBackward);
    auto [dxg, dh0, dc0, dw, db] = lstm_bwd().call(
        grads[0].contiguous(), grads[1].contiguous(), grads[2].contiguous(), s[0], s[1], s[2], s[3], s[4], s[5],
        ctx->saved_data["reverse"].toBool());
    return {dxg, dh0, dc0, dw, ctx->saved_data["has_bias"].toBool() ? db : at::Tensor(), at::Tensor()};
  }
};

struct GruLayer : public torch::autograd::Function<GruLayer> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& xg, const at::Tensor& h0, const at::Tensor& w_hh,
                               const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh,
                               bool reverse) {
    auto [out, h_n, saved] = gru_fwd().call(xg, h0, w_hh, b_ih, b_hh, reverse);
    ctx->save_for_backward({h0, w_hh, out, saved});
    ctx->saved_data["reverse"] = reverse;
    ctx->saved_data["has_bias"] = b_ih.has_value();
    return {out, h_n};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list s = ctx->get_saved_variables();
    refuse_double_backward("gru", kRnnDoubleBackward);
    auto [dxg, dh0, dw, db_ih, db_hh] = gru_bwd().call(
        grads[0].contiguous(), grads[1].contiguous(), s[0], s[1], s[2], s[3], ctx->saved_data["reverse"].toBool());
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    return {dxg, dh0, dw, has_bias ? db_ih : at::Tensor(), has_bias ? db_hh : at::Tensor(), at::Tensor()};
  }
};

// Whether a layer call can take the CPU forward that saves nothing for a backward (fck::cpu::lstm_layer_infer):
// plain CPU tensors (plain_cpu) and no gradient to record. A no-grad forward then allocates and writes no
// (T, B, 4H) gates and (T, B, H) cell states.
bool infer_on_cpu(std::initializer_list<std::optional<at::Tensor>> tensors) {
  bool needs_grad = false;
  for (const auto& t : tensors) {
    if (!t.has_value() || !t->defined()) continue;
    if (!plain_cpu({*t})) return false;
    needs_grad = needs_grad || t->requires_grad();
  }
  return !(needs_grad && at::GradMode::is_enabled());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_layer_autograd(const at::Tensor& xg, const at::Tensor& h0,
                                                                   const at::Tensor& c0, const at::Tensor& w_hh,
                                                                   const std::optional<at::Tensor>& bias,
                                                                   bool reverse) {
  if (infer_on_cpu({xg, h0, c0, w_hh, bias})) return fck::cpu::lstm_layer_infer(xg, h0, c0, w_hh, bias, reverse);
  const variable_list r = LstmLayer::apply(xg, h0, c0, w_hh, bias, reverse);
  return {r[0], r[1], r[2]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_layer_plain(const at::Tensor& xg, const at::Tensor& h0,
                                                                const at::Tensor& c0, const at::Tensor& w_hh,
                                                                const std::optional<at::Tensor>& bias, bool reverse) {
  if (infer_on_cpu({xg, h0, c0, w_hh, bias})) return fck::cpu::lstm_layer_infer(xg, h0, c0, w_hh, bias, reverse);
  auto [out, h_n, c_n, c_all, gates] =
      lstm_fwd().call(xg, h0, c0, w_hh, bias, reverse);
  return {out, h_n, c_n};
}

std::tuple<at::Tensor, at::Tensor> gru_layer_autograd(const at::Tensor& xg, const at::Tensor& h0,
                                                      const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
                                                      const std::optional<at::Tensor>& b_hh, bool reverse) {
  if (infer_on_cpu({xg, h0, w_hh, b_ih, b_hh})) return fck::cpu::gru_layer_infer(xg, h0, w_hh, b_ih, b_hh, reverse);
  const variable_list r = GruLayer::apply(xg, h0, w_hh, b_ih, b_hh, reverse);
  return {r[0], r[1]};
}

std::tuple<at::Tensor, at::Tensor> gru_layer_plain(const at::Tensor& xg, const at::Tensor& h0, const at::Tensor& w_hh,
                                                   const std::optional<at::Tensor>& b_ih,
                                                   const std::optional<at::Tensor>& b_hh, bool reverse) {
  if (infer_on_cpu({xg, h0, w_hh, b_ih, b_hh})) return fck::cpu::gru_layer_infer(xg, h0, w_hh, b_ih, b_hh, reverse);
  auto [out, h_n, saved] = gru_fwd().call(xg, h0, w_hh, b_ih, b_hh, reverse);
  return {out, h_n};
}

// ---- the cells: the input GEMM, the one-step layer and every gradient in one node ----

std::optional<at::Tensor> summed_bias(const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh) {
  TORCH_CHECK(b_ih.has_value() == b_hh.has_value(), "fck::lstm_cell: give both b_ih and b_hh, or neither");
  if (!b_ih) return std::nullopt;
  // the sum would promote a mixed pair to a dtype the layer then accepts
  TORCH_CHECK(b_ih->scalar_type() == b_hh->scalar_type(), "fck::lstm_cell: b_ih is ", b_ih->scalar_type(),
              " but b_hh is ", b_hh->scalar_type());
  return at::add(*b_ih, *b_hh);
}

// The one-step layer's input, x W_ih^T as a (1, B, GH) sequence.
at::Tensor cell_xg(const at::Tensor& x, const at::Tensor& w_ih) {
  TORCH_CHECK(x.dim() == 2 && w_ih.dim() == 2, "fck cell: input must be (batch, input_size) and w_ih 2-D, got ",
              x.sizes(), " and ", w_ih.sizes());
  return at::mm(x, w_ih.t()).unsqueeze(0);
}

bool needs(const std::optional<at::Tensor>& t) { return t.has_value() && t->requires_grad(); }

// x's and w_ih's gradients from the step's dxg (B, GH): dxg W_ih and dxg^T x (contiguous, as the parameter).
void input_grads(const at::Tensor& dxg, const at::Tensor& x, const at::Tensor& w_ih, const c10::List<bool>& need,
                 at::Tensor& dx, at::Tensor& dw_ih) {
  if (need[0]) dx = at::mm(dxg, w_ih);
  if (need[3]) dw_ih = at::mm(dxg.t(), x);
}

struct LstmCell : public torch::autograd::Function<LstmCell> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& h, const at::Tensor& c,
                               const at::Tensor& w_ih, const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
                               const std::optional<at::Tensor>& b_hh) {
    auto [out, h_n, c_n, c_all, gates] =
        lstm_fwd().call(cell_xg(x, w_ih), h, c, w_hh, summed_bias(b_ih, b_hh), false);
    ctx->save_for_backward({x, h, c, w_ih, w_hh, out, c_all, gates, b_ih.value_or(at::Tensor()),
                            b_hh.value_or(at::Tensor())});
    ctx->saved_data["need"] = std::vector<bool>{x.requires_grad(), h.requires_grad(),    c.requires_grad(),
                                                w_ih.requires_grad(), w_hh.requires_grad(), needs(b_ih),
                                                needs(b_hh)};
    return {h_n, c_n};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list s = ctx->get_saved_variables();
    const c10::List<bool> need = ctx->saved_data["need"].toBoolList();
    if (at::GradMode::is_enabled()) {  // create_graph: re-run on differentiable ops
      return needed(ctx, rnn_cell_grad_graph().call(grads[0], grads[1], s[0], s[1], s[2], s[3], s[4], opt(s[8]),
                                                     opt(s[9])),
                    {true, true, true, true, true, s[8].defined(), s[9].defined()}, 7);
    }
    // h' is the one-step output and h_n both: its gradient enters once, as the output's.
    const at::Tensor dh = grads[0].contiguous();
    auto [dxg, dh0, dc0, dw_hh, db] = lstm_bwd().call(dh.unsqueeze(0), at::zeros_like(dh), grads[1].contiguous(),
                                                      s[1], s[2], s[4], s[5], s[6], s[7], false);
    at::Tensor dx, dw_ih;
    input_grads(dxg.select(0, 0), s[0], s[3], need, dx, dw_ih);
    return {dx, need[1] ? dh0 : at::Tensor(), need[2] ? dc0 : at::Tensor(), dw_ih, need[4] ? dw_hh : at::Tensor(),
            need[5] ? db : at::Tensor(), need[6] ? (need[5] ? db.clone() : db) : at::Tensor()};
  }
};

struct GruCell : public torch::autograd::Function<GruCell> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& h, const at::Tensor& w_ih,
                            const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
                            const std::optional<at::Tensor>& b_hh) {
    auto [out, h_n, saved] = gru_fwd().call(cell_xg(x, w_ih), h, w_hh, b_ih, b_hh, false);
    ctx->save_for_backward({x, h, w_ih, w_hh, out, saved, b_ih.value_or(at::Tensor()), b_hh.value_or(at::Tensor())});
    // in the LSTM's argument order (no c), so input_grads reads the same slots
    ctx->saved_data["need"] = std::vector<bool>{x.requires_grad(), h.requires_grad(), false, w_ih.requires_grad(),
                                                w_hh.requires_grad(), needs(b_ih), needs(b_hh)};
    return h_n;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list s = ctx->get_saved_variables();
    const c10::List<bool> need = ctx->saved_data["need"].toBoolList();
    if (at::GradMode::is_enabled()) {  // create_graph: as the LSTM cell's, without c
      std::vector<at::Tensor> g = rnn_cell_grad_graph().call(grads[0], std::nullopt, s[0], s[1], std::nullopt, s[2],
                                                             s[3], opt(s[6]), opt(s[7]));
      g.erase(g.begin() + 2);  // dc
      return needed(ctx, std::move(g), {true, true, true, true, s[6].defined(), s[7].defined()}, 6);
    }
    const at::Tensor dh = grads[0].contiguous();
    auto [dxg, dh0, dw_hh, db_ih, db_hh] =
        gru_bwd().call(dh.unsqueeze(0), at::zeros_like(dh), s[1], s[3], s[4], s[5], false);
    at::Tensor dx, dw_ih;
    input_grads(dxg.select(0, 0), s[0], s[2], need, dx, dw_ih);
    return {dx, need[1] ? dh0 : at::Tensor(), dw_ih, need[4] ? dw_hh : at::Tensor(), need[5] ? db_ih : at::Tensor(),
            need[6] ? db_hh : at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor> lstm_cell_plain(const at::Tensor& x, const at::Tensor& h, const at::Tensor& c,
                                                   const at::Tensor& w_ih, const at::Tensor& w_hh,
                                                   const std::optional<at::Tensor>& b_ih,
                                                   const std::optional<at::Tensor>& b_hh) {
  auto [out, h_n, c_n] = lstm_layer_plain(cell_xg(x, w_ih), h, c, w_hh, summed_bias(b_ih, b_hh), false);
  return {h_n, c_n};
}

std::tuple<at::Tensor, at::Tensor> lstm_cell_autograd(const at::Tensor& x, const at::Tensor& h, const at::Tensor& c,
                                                      const at::Tensor& w_ih, const at::Tensor& w_hh,
                                                      const std::optional<at::Tensor>& b_ih,
                                                      const std::optional<at::Tensor>& b_hh) {
  if (infer_on_cpu({x, h, c, w_ih, w_hh, b_ih, b_hh})) return lstm_cell_plain(x, h, c, w_ih, w_hh, b_ih, b_hh);
  const variable_list r = LstmCell::apply(x, h, c, w_ih, w_hh, b_ih, b_hh);
  return {r[0], r[1]};
}

at::Tensor gru_cell_plain(const at::Tensor& x, const at::Tensor& h, const at::Tensor& w_ih, const at::Tensor& w_hh,
                          const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh) {
  return std::get<1>(gru_layer_plain(cell_xg(x, w_ih), h, w_hh, b_ih, b_hh, false));
}

at::Tensor gru_cell_autograd(const at::Tensor& x, const at::Tensor& h, const at::Tensor& w_ih, const at::Tensor& w_hh,
                             const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh) {
  if (infer_on_cpu({x, h, w_ih, w_hh, b_ih, b_hh})) return gru_cell_plain(x, h, w_ih, w_hh, b_ih, b_hh);
  return GruCell::apply(x, h, w_ih, w_hh, b_ih, b_hh);
}


// ---- whole multi-layer sequences: every layer's projection, layer pass and gradient in one node ----
// torch.nn.LSTM/GRU's stack without inter-layer dropout (ops/rnn.py composes the layers in Python when dropout
// applies): x (T, B, I), params in torch's flat order, states (L*D, B, H). The same ops as the composition of
// projection, bias sum and layer nodes, so the same bits, without a Python-level op or autograd node per layer: on
// a GPU machine each costs tens of microseconds of host time, more than a small layer's kernels.
struct SeqSpec {
  bool lstm, has_biases;
  int64_t layers, dirs;
  double dropout = 0;  // between layers, where `train`
  bool train = false;
  bool drops() const { return train && dropout > 0 && layers > 1; }
  int64_t per() const { return has_biases ? 4 : 2; }
  int64_t w_ih(int64_t k) const { return k * per(); }
  int64_t w_hh(int64_t k) const { return k * per() + 1; }
};

// a @ b: into a pooled block on the CPU (as the Python projection, fck::mm_pooled), cuBLAS elsewhere.
at::Tensor mm_dev(const at::Tensor& a, const at::Tensor& b) {
  return a.is_cpu() ? mm_pooled().call(a, b) : at::mm(a, b);
}

at::Tensor initial_state(const std::optional<at::Tensor>& s, const at::Tensor& x, const SeqSpec& sp, int64_t H) {
  return s.has_value() ? s->contiguous() : at::zeros({sp.layers * sp.dirs, x.size(1), H}, x.options());
}

// Dropout between layers as torch's F.dropout draws and computes it, so the stack gives the layer-by-layer
// composition's bits for a seed. Returns the dropped input and what its backward keeps: on CUDA the fused kernel's
// boolean mask, elsewhere the Bernoulli noise scaled by 1 / (1 - p) (a scalar where p = 1 or the input is empty).
std::pair<at::Tensor, at::Tensor> drop(const at::Tensor& input, double p) {
  if (p >= 1 || input.numel() == 0) {
    const at::Tensor zero = at::zeros({}, input.options());
    return {p >= 1 ? input * zero : input, p >= 1 ? zero : at::ones({}, input.options())};
  }
  if (input.is_cuda()) {
    auto [out, mask] = at::native_dropout(input, p, true);
    return {out, mask};
  }
  at::Tensor noise = at::empty_like(input).bernoulli_(1 - p);
  noise.div_(1 - p);
  return {input * noise, noise};
}

// The factor drop() multiplied its input by, as a tensor of the input's dtype.
at::Tensor drop_factor(const at::Tensor& kept, double p, at::ScalarType dtype) {
  return kept.scalar_type() == at::kBool ? kept.to(dtype).mul_(1.0 / (1.0 - p)) : kept;
}

at::Tensor drop_backward(const at::Tensor& grad, const at::Tensor& kept, double p) {
  return kept.scalar_type() == at::kBool ? at::native_dropout_backward(grad, kept, 1.0 / (1.0 - p)) : grad * kept;
}

// Runs the stack. With `saved`, per layer its input and what its dropout keeps (undefined where none), then per
// direction the layer's output and the tensors its backward reads, are appended to it; without, the layers run as
// plain ops (a CPU inference saves nothing).
variable_list seq_forward(const at::Tensor& x, at::TensorList params, const at::Tensor& h0, const at::Tensor& c0,
                          const SeqSpec& sp, std::vector<at::Tensor>* saved) {
  const int64_t T = x.size(0), B = x.size(1);
  at::Tensor input = x;
  std::vector<at::Tensor> h_n, c_n;
  for (int64_t l = 0; l < sp.layers; ++l) {
    at::Tensor kept;
    if (l > 0 && sp.drops()) std::tie(input, kept) = drop(input, sp.dropout);
    const at::Tensor x2d = input.reshape({T * B, input.size(2)});
    if (saved) saved->insert(saved->end(), {x2d, kept});
    std::vector<at::Tensor> outs;
    for (int64_t d = 0; d < sp.dirs; ++d) {
      const int64_t k = l * sp.dirs + d;
      const at::Tensor& w_hh = params[sp.w_hh(k)];
      const at::Tensor& w_ih = params[sp.w_ih(k)];  // sizes spelled out: a batch of 0 leaves no -1 to infer
      const at::Tensor xg = mm_dev(x2d, w_ih.t()).view({T, B, w_ih.size(0)});
      std::optional<at::Tensor> b_ih, b_hh;
      if (sp.has_biases) b_ih = params[sp.w_ih(k) + 2], b_hh = params[sp.w_ih(k) + 3];
      if (sp.lstm) {
        const std::optional<at::Tensor> bias = b_ih ? std::optional<at::Tensor>(at::add(*b_ih, *b_hh)) : std::nullopt;
        if (saved) {
          auto [out, h, c, c_all, gates] = lstm_fwd().call(xg, h0[k], c0[k], w_hh, bias, d == 1);
          saved->insert(saved->end(), {out, c_all, gates});
          outs.push_back(out), h_n.push_back(h), c_n.push_back(c);
        } else {
          auto [out, h, c] = lstm_layer_plain(xg, h0[k], c0[k], w_hh, bias, d == 1);
          outs.push_back(out), h_n.push_back(h), c_n.push_back(c);
        }
      } else if (saved) {
        auto [out, h, sv] = gru_fwd().call(xg, h0[k], w_hh, b_ih, b_hh, d == 1);
        saved->insert(saved->end(), {out, sv});
        outs.push_back(out), h_n.push_back(h);
      } else {
        auto [out, h] = gru_layer_plain(xg, h0[k], w_hh, b_ih, b_hh, d == 1);
        outs.push_back(out), h_n.push_back(h);
      }
    }
    input = sp.dirs == 1 ? outs[0] : at::cat(outs, 2);
  }
  return {input, at::stack(h_n), sp.lstm ? at::stack(c_n) : at::Tensor()};
}

struct RnnSeq : public torch::autograd::Function<RnnSeq> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, at::TensorList params, const at::Tensor& h0,
                               const at::Tensor& c0, bool lstm, bool has_biases, int64_t layers, bool bidirectional,
                               double dropout, bool train) {
    const at::AutoDispatchBelowADInplaceOrView below;
    const SeqSpec sp{lstm, has_biases, layers, bidirectional ? 2 : 1, dropout, train};
    std::vector<at::Tensor> saved{h0, c0};
    saved.insert(saved.end(), params.begin(), params.end());
    variable_list r = seq_forward(x, params, h0, c0, sp, &saved);
    saved.push_back(x);  // last: for a backward that builds a graph (its storage is the first layer's input's)
    ctx->save_for_backward(saved);
    ctx->saved_data["spec"] = std::vector<int64_t>{lstm, has_biases, layers, sp.dirs, int64_t(params.size())};
    ctx->saved_data["dropout"] = dropout;
    if (!lstm) r[2] = at::empty({0}, x.options());  // an output of the node must be a tensor
    return r;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list s = ctx->get_saved_variables();
    const std::vector<int64_t> spec = ctx->saved_data["spec"].toIntVector();
    const SeqSpec sp{spec[0] != 0, spec[1] != 0, spec[2], spec[3]};
    const int64_t P = spec[4], L = sp.layers, D = sp.dirs;
    // after h0, c0 and the params: per layer its input and what its dropout kept, then per direction
    // (out, c_all, gates) or (out, saved)
    const int64_t per_dir = sp.lstm ? 3 : 2, per_layer = 2 + D * per_dir;
    const auto at_layer = [&](int64_t l, int64_t i) -> const at::Tensor& { return s[2 + P + l * per_layer + i]; };
    if (at::GradMode::is_enabled()) {  // create_graph: the stack re-run on differentiable ops from its inputs
      const std::vector<at::Tensor> params(s.begin() + 2, s.begin() + 2 + P);
      const double p = ctx->saved_data["dropout"].toDouble();
      c10::List<std::optional<at::Tensor>> noise;
      for (int64_t l = 0; l < L; ++l) {
        const at::Tensor& kept = at_layer(l, 1);
        noise.push_back(kept.defined() ? std::optional<at::Tensor>(drop_factor(kept, p, s.back().scalar_type()))
                                       : std::nullopt);
      }
      return needed(ctx, rnn_seq_grad_graph().call(grads[0], grads[1], grads[2], s.back(), params, s[0], s[1],
                                                   sp.lstm, sp.has_biases, L, D == 2, noise),
                    std::vector<bool>(1 + P + 2, true), 1 + P + 2 + 6);
    }
    const at::AutoDispatchBelowADInplaceOrView below;
    const at::Tensor &h0 = s[0], &c0 = s[1];
    const auto param = [&](int64_t i) -> const at::Tensor& { return s[2 + i]; };
    const int64_t H = h0.size(2), T = grads[0].size(0), B = grads[0].size(1);

    variable_list result(1 + P + 2 + 6);  // x, params, h0, c0, then the six non-tensor arguments
    std::vector<at::Tensor> dh0(L * D), dc0(L * D);
    at::Tensor dinput = grads[0];
    for (int64_t l = L - 1; l >= 0; --l) {
      const at::Tensor& x2d = at_layer(l, 0);
      at::Tensor dx2d;
      for (int64_t d = 0; d < D; ++d) {
        const int64_t k = l * D + d;
        const at::Tensor dy = (D == 1 ? dinput : dinput.narrow(2, d * H, H)).contiguous();
        const at::Tensor& w_hh = param(sp.w_hh(k));
        const at::Tensor& out = at_layer(l, 2 + d * per_dir);
        at::Tensor dxg, dw_hh, db_ih, db_hh;
        if (sp.lstm) {
          auto [g_x, g_h0, g_c0, g_w, g_b] =
              lstm_bwd().call(dy, grads[1][k].contiguous(), grads[2][k].contiguous(), h0[k], c0[k], w_hh, out,
                              at_layer(l, 3 + d * per_dir), at_layer(l, 4 + d * per_dir), d == 1);
          dxg = g_x, dh0[k] = g_h0, dc0[k] = g_c0, dw_hh = g_w, db_ih = g_b;
          if (sp.has_biases) db_hh = g_b.clone();  // b_ih + b_hh: one gradient, two parameters' own tensors
        } else {
          auto [g_x, g_h0, g_w, g_bi, g_bh] =
              gru_bwd().call(dy, grads[1][k].contiguous(), h0[k], w_hh, out, at_layer(l, 3 + d * per_dir), d == 1);
          dxg = g_x, dh0[k] = g_h0, dw_hh = g_w, db_ih = g_bi, db_hh = g_bh;
        }
        const at::Tensor dxg2d = dxg.view({T * B, dxg.size(2)});
        const int64_t wi = sp.w_ih(k);
        if (l > 0 || ctx->needs_input_grad(0)) {
          const at::Tensor part = mm_dev(dxg2d, param(wi));
          dx2d = dx2d.defined() ? dx2d + part : part;
        }
        if (ctx->needs_input_grad(1 + wi)) result[1 + wi] = mm_dev(dxg2d.t(), x2d);
        result[1 + wi + 1] = dw_hh;
        if (sp.has_biases) result[1 + wi + 2] = db_ih, result[1 + wi + 3] = db_hh;
      }
      if (dx2d.defined()) dinput = dx2d.view({T, B, x2d.size(1)});
      if (dx2d.defined() && at_layer(l, 1).defined()) {  // through the dropout
        dinput = drop_backward(dinput, at_layer(l, 1), ctx->saved_data["dropout"].toDouble());
      }
    }
    if (ctx->needs_input_grad(0)) result[0] = dinput;
    if (ctx->needs_input_grad(1 + P)) result[1 + P] = at::stack(dh0);
    if (sp.lstm && ctx->needs_input_grad(2 + P)) result[2 + P] = at::stack(dc0);
    return result;
  }
};

bool seq_needs_grad(const at::Tensor& x, at::TensorList params, const std::optional<at::Tensor>& h0,
                    const std::optional<at::Tensor>& c0) {
  if (!at::GradMode::is_enabled()) return false;
  bool any = x.requires_grad() || needs(h0) || needs(c0);
  for (const at::Tensor& p : params) any = any || p.requires_grad();
  return any;
}

SeqSpec seq_spec(const at::Tensor& x, at::TensorList params, bool lstm, bool has_biases, int64_t layers,
                 bool bidirectional, double dropout, bool train, const char* op) {
  const SeqSpec sp{lstm, has_biases, layers, bidirectional ? 2 : 1, dropout, train};
  TORCH_CHECK(x.dim() == 3, op, ": input must be (T, B, input_size), got ", x.sizes());
  TORCH_CHECK(layers > 0 && int64_t(params.size()) == sp.per() * layers * sp.dirs, op, ": expected ",
              sp.per() * layers * sp.dirs, " weight tensors, got ", params.size());
  // checked where torch's stack checks it: when it draws
  TORCH_CHECK(!(train && layers > 1 && dropout != 0) || (dropout >= 0 && dropout <= 1),
              "dropout probability has to be between 0 and 1, but got ", dropout);
  return sp;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_seq_plain(const at::Tensor& x, at::TensorList params,
                                                              const std::optional<at::Tensor>& h0,
                                                              const std::optional<at::Tensor>& c0, bool has_biases,
                                                              int64_t layers, bool bidirectional, double dropout,
                                                              bool train) {
  const SeqSpec sp = seq_spec(x, params, true, has_biases, layers, bidirectional, dropout, train, "fck::lstm_seq");
  const int64_t H = params[1].size(1);
  const variable_list r =
      seq_forward(x, params, initial_state(h0, x, sp, H), initial_state(c0, x, sp, H), sp, nullptr);
  return {r[0], r[1], r[2]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_seq_autograd(const at::Tensor& x, at::TensorList params,
                                                                 const std::optional<at::Tensor>& h0,
                                                                 const std::optional<at::Tensor>& c0,
                                                                 bool has_biases, int64_t layers, bool bidirectional,
                                                                 double dropout, bool train) {
  if (!seq_needs_grad(x, params, h0, c0)) {
    return lstm_seq_plain(x, params, h0, c0, has_biases, layers, bidirectional, dropout, train);
  }
  const SeqSpec sp = seq_spec(x, params, true, has_biases, layers, bidirectional, dropout, train, "fck::lstm_seq");
  const int64_t H = params[1].size(1);
  const variable_list r = RnnSeq::apply(x, params, initial_state(h0, x, sp, H), initial_state(c0, x, sp, H), true,
                                        has_biases, layers, bidirectional, dropout, train);
  return {r[0], r[1], r[2]};
}

std::tuple<at::Tensor, at::Tensor> gru_seq_plain(const at::Tensor& x, at::TensorList params,
                                                 const std::optional<at::Tensor>& h0, bool has_biases, int64_t layers,
                                                 bool bidirectional, double dropout, bool train) {
  const SeqSpec sp = seq_spec(x, params, false, has_biases, layers, bidirectional, dropout, train, "fck::gru_seq");
  const at::Tensor h = initial_state(h0, x, sp, params[1].size(1));
  const variable_list r = seq_forward(x, params, h, h, sp, nullptr);
  return {r[0], r[1]};
}

std::tuple<at::Tensor, at::Tensor> gru_seq_autograd(const at::Tensor& x, at::TensorList params,
                                                    const std::optional<at::Tensor>& h0, bool has_biases,
                                                    int64_t layers, bool bidirectional, double dropout, bool train) {
  if (!seq_needs_grad(x, params, h0, std::nullopt)) {
    return gru_seq_plain(x, params, h0, has_biases, layers, bidirectional, dropout, train);
  }
  const SeqSpec sp = seq_spec(x, params, false, has_biases, layers, bidirectional, dropout, train, "fck::gru_seq");
  const at::Tensor h = initial_state(h0, x, sp, params[1].size(1));
  // the GRU has no cell state: c0's slot holds an empty tensor that no gradient reaches
  const variable_list r = RnnSeq::apply(x, params, h, at::empty({0}, x.options()), false, has_biases, layers,
                                        bidirectional, dropout, train);
  return {r[0], r[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(fck, Autograd, m) {
  m.impl("embedding", &embedding_autograd);
  m.impl("embedding_bag", &embedding_bag_autograd);
  m.impl("batch_norm_act", &batch_norm_act_autograd);
  m.impl("lstm_layer", &lstm_layer_autograd);
  m.impl("gru_layer", &gru_layer_autograd);
  m.impl("mm_pooled", &mm_pooled_autograd);
  m.impl("lstm_cell", &lstm_cell_autograd);
  m.impl("gru_cell", &gru_cell_autograd);
  m.impl("lstm_seq", &lstm_seq_autograd);
  m.impl("gru_seq", &gru_seq_autograd);
}

TORCH_LIBRARY_IMPL(fck, CompositeExplicitAutograd, m) {
  m.impl("embedding", &embedding_plain);
  m.impl("embedding_bag", &embedding_bag_plain);
  m.impl("batch_norm_act", &batch_norm_act_plain);
  m.impl("lstm_layer", &lstm_layer_plain);
  m.impl("gru_layer", &gru_layer_plain);
  m.impl("lstm_cell", &lstm_cell_plain);
  m.impl("gru_cell", &gru_cell_plain);
  m.impl("lstm_seq", &lstm_seq_plain);
  m.impl("gru_seq", &gru_seq_plain);
}
