// Autograd kernels written in C++ for the ops a model calls many times per step on small tensors. A Python
// torch.autograd.Function costs ~100-150 us of interpreter time per forward+backward on this project's CPU: more
// than a small table's whole lookup. These run the same device kernels (through the dispatcher, so CPU and CUDA
// alike) with torch's own C++ autograd overhead. Under torch.compile the Python path is used (fastcore_kernels/ops).
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using EmbeddingBagFwd = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                           int64_t, const std::optional<at::Tensor>&, int64_t);
using EmbeddingBagBwd = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t,
                                   int64_t, const std::optional<at::Tensor>&, int64_t);

const c10::TypedOperatorHandle<EmbeddingBagFwd>& embedding_bag_fwd() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("fck::embedding_bag_fwd", "").typed<EmbeddingBagFwd>();
  return op;
}

const c10::TypedOperatorHandle<EmbeddingBagBwd>& embedding_bag_bwd() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("fck::embedding_bag_bwd", "").typed<EmbeddingBagBwd>();
  return op;
}

// A lookup is an embedding bag with one index per bag: offsets 0, 1, ..., n.
at::Tensor embedding_forward(const at::Tensor& weight, const at::Tensor& flat) {
  TORCH_CHECK(weight.dim() == 2, "fck::embedding: weight must be a 2-D (num_embeddings, dim) tensor");
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

}  // namespace

TORCH_LIBRARY_IMPL(fck, Autograd, m) {
  m.impl("embedding", &embedding_autograd);
}

TORCH_LIBRARY_IMPL(fck, CompositeExplicitAutograd, m) {
  m.impl("embedding", &embedding_plain);
}
