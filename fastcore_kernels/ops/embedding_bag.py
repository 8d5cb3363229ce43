"""Embedding bags and plain embedding lookups, forward and backward.

`embedding_bag` normalises torch.nn.functional.embedding_bag's input forms (1-D input with offsets, 2-D input of
fixed-size bags, include_last_offset) into one: a 1-D index tensor and offsets ending with the number of indices.
The kernels are the torch.library ops `fck::embedding_bag_fwd`/`_bwd` (C++: CPU and CUDA) and
`fck::embedding_bag_fwd_triton`/`_bwd_triton` (Triton). The fused optimizer update (EmbeddingUpdate,
`fck::embedding_bag_fused_update_`) is C++, CPU and CUDA. The dense weight gradient is
deterministic (no atomics, no sort); `sparse=True` gives a COO gradient (one row per index, uncoalesced, as torch's)
for torch.optim.SparseAdam/SGD.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fastcore_kernels import _backend
from fastcore_kernels.ops._triton_op import triton_op
from fastcore_kernels.reference import embedding_bag as reference

MODES = {"sum": 0, "mean": 1, "max": 2}
IMPLEMENTED = ("reference", "cpu", "cuda", "triton")
_SUPPORTED_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def _fake_fwd(weight, indices, offsets, mode, per_sample_weights, padding_idx):
    n_bags = offsets.shape[0] - 1
    max_idx = weight.new_empty((n_bags, weight.shape[1]) if mode == 2 else (0,), dtype=torch.long)
    return weight.new_empty(n_bags, weight.shape[1]), max_idx


def _fake_bwd(grad_output, indices, offsets, max_indices, num_weights, mode, per_sample_weights, padding_idx):
    return grad_output.new_empty(num_weights, grad_output.shape[1])


def register_fake() -> None:
    torch.library.register_fake("fck::embedding_bag_fwd")(_fake_fwd)
    torch.library.register_fake("fck::embedding_bag_bwd")(_fake_bwd)


# The schemas of python/register_ops.cpp, so the Triton ops take exactly the C++ ops' arguments.
FWD_SCHEMA = ("(Tensor weight, Tensor indices, Tensor offsets, int mode, Tensor? per_sample_weights, int padding_idx)"
              " -> (Tensor, Tensor)")
BWD_SCHEMA = ("(Tensor grad_output, Tensor indices, Tensor offsets, Tensor max_indices, int num_weights, int mode, "
              "Tensor? per_sample_weights, int padding_idx) -> Tensor")


triton_op("embedding_bag_fwd_triton", "embedding_bag.embedding_bag_fwd", FWD_SCHEMA, _fake_fwd)
triton_op("embedding_bag_bwd_triton", "embedding_bag.embedding_bag_bwd", BWD_SCHEMA, _fake_bwd)


def _kernels(backend: str):
    if backend == "triton":
        return torch.ops.fck.embedding_bag_fwd_triton, torch.ops.fck.embedding_bag_bwd_triton
    return torch.ops.fck.embedding_bag_fwd, torch.ops.fck.embedding_bag_bwd  # resolve() has loaded the library


# A library op rather than torch.library.custom_op: torch 2.4 runs a custom_op under torch.func's grad and jvp
# through an autograd.Function that those transforms refuse.
_LIB = torch.library.Library("fck", "FRAGMENT")
_LIB.define("embedding_bag_checked(Tensor indices, Tensor offsets, int num_weights) -> Tensor")


def _check_and_copy(indices, offsets, num_weights):
    reference.check_bags(indices, offsets, num_weights)
    return indices.clone()


def _checked(indices, offsets, num_weights):
    """A copy of `indices` once they and `offsets` pass the bag kernels' checks (reference.check_bags). For the code
    outside the kernels that reads rows by index — the reference backend, max_norm's renormalisation — as an op,
    so that torch.compile keeps the check (data-dependent, it cannot be traced) and orders what reads the indices
    after it (they read its result)."""
    return torch.ops.fck.embedding_bag_checked(indices, offsets, num_weights)


def _checked_vmap(info, in_dims, indices, offsets, num_weights):
    """Under torch.func.vmap (the reference ops run there): each vmapped call's indices checked against its offsets.
    Without this rule torch loops over the batch anyway, with a warning that it has no batching rule."""
    samples = [t.movedim(d, 0) if d is not None else None for t, d in zip((indices, offsets), in_dims[:2])]
    for b in range(info.batch_size):
        reference.check_bags(*(t if s is None else s[b] for t, s in zip((indices, offsets), samples)), num_weights)
    return indices.clone(), in_dims[0]


_LIB.impl("embedding_bag_checked", _check_and_copy, "CompositeExplicitAutograd")
torch.library.register_fake("fck::embedding_bag_checked")(lambda indices, offsets, num_weights:
                                                          torch.empty_like(indices))
if hasattr(torch.library, "register_vmap"):  # torch >= 2.5; torch 2.4 loops with its warning
    torch.library.register_vmap("fck::embedding_bag_checked", _checked_vmap)


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass
class EmbeddingUpdate:
    """An optimizer step that embedding_bag's backward applies to the rows it touches instead of returning a weight
    gradient (FBGEMM's table-batched-embedding idea): no dense (num_embeddings, dim) gradient is ever made, so
    tables too large for one can train. C++ CPU kernel; mode 'sum' or 'mean'.

    optimizer "sgd": w -= lr * g. "rowwise_adagrad": G += mean(g^2) over the row, w -= lr * g / (sqrt(G) + eps),
    with one float32 state value per row (`state`, created on first use). Duplicate indices are summed first, so
    the step equals the unfused one on the summed gradient (SGD on fp32/fp64 rows on the CPU applies each
    occurrence as it comes: the same step up to summation order). C++ kernels for the CPU (threads own disjoint
    rows) and CUDA (the indices sorted once, one block per distinct row: deterministic, no atomics).
    """

    optimizer: str
    lr: float
    eps: float = 1e-10
    state: torch.Tensor | None = field(default=None, repr=False)

    def __post_init__(self):
        if self.optimizer not in ("sgd", "rowwise_adagrad"):
            raise ValueError(f"EmbeddingUpdate: optimizer must be 'sgd' or 'rowwise_adagrad', got {self.optimizer!r}")

    def apply(self, weight, grad, indices, offsets, mode, psw, pad):
        code = 0
        if self.optimizer == "rowwise_adagrad":
            code = 1
            if self.state is None:
                self.state = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device)
        with torch.no_grad():
            torch.ops.fck.embedding_bag_fused_update_(weight, self.state, grad, indices, offsets, mode, psw, pad,
                                                      code, float(self.lr), float(self.eps))


class _EmbeddingBag(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight, psw, indices, offsets, mode, pad_fwd, pad_bwd, sparse, freq, backend, update=None):
        out, max_idx = _kernels(backend)[0](weight, indices, offsets, mode, psw, pad_fwd)
        ctx.save_for_backward(weight if psw is not None else None, psw, indices, offsets, max_idx)
        ctx.mode, ctx.pad, ctx.sparse, ctx.freq, ctx.backend = mode, pad_bwd, sparse, freq, backend
        ctx.update, ctx.weight = update, weight if update is not None else None
        ctx.num_weights = weight.shape[0]
        ctx.mark_non_differentiable(max_idx)
        return out, max_idx

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad, _unused):
        weight, psw, indices, offsets, max_idx = ctx.saved_tensors
        grad = grad.contiguous()
        grad_w = grad_psw = None
        if ctx.update is not None:
            ctx.update.apply(ctx.weight, grad, indices, offsets, ctx.mode, psw, ctx.pad)
        elif ctx.needs_input_grad[0]:
            if ctx.sparse:
                scale, bags = reference.per_index_scale(indices, offsets, ctx.mode, psw, ctx.pad, ctx.freq,
                                                          _acc(grad.dtype))
                values = (grad[bags].to(scale.dtype) * scale[:, None]).to(grad.dtype)
                grad_w = torch.sparse_coo_tensor(indices.long()[None], values, (ctx.num_weights, grad.shape[1]),
                                                 check_invariants=False)  # indices were range-checked
            else:
                bwd_psw = psw
                if ctx.freq:
                    bwd_psw = reference.per_index_scale(indices, offsets, 0, psw, -1, True, _acc(grad.dtype))[0]
                    bwd_psw = bwd_psw.to(grad.dtype)
                grad_w = _kernels(ctx.backend)[1](grad, indices, offsets, max_idx, ctx.num_weights, ctx.mode,
                                                  bwd_psw, ctx.pad)
        if ctx.needs_input_grad[1]:
            bags = reference.bag_ids(offsets, indices.numel())
            acc = _acc(psw.dtype)
            grad_psw = (grad[bags].to(acc) * weight[indices.long()].to(acc)).sum(1)
            if ctx.pad >= 0:  # by selection: a padding row holding inf or NaN gives 0, not NaN
                grad_psw = torch.where(indices != ctx.pad, grad_psw, 0.0)
            grad_psw = grad_psw.to(psw.dtype)
        return grad_w, grad_psw, None, None, None, None, None, None, None, None, None


def _check_weight(weight, input, name) -> None:
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"{name}: weight must be a 2-D (num_embeddings, dim) tensor")
    if weight.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"{name}: weight must be float64, float32, float16 or bfloat16, got {weight.dtype}")
    if input.dtype not in (torch.int64, torch.int32):
        raise RuntimeError(f"Expected tensor for argument #1 'indices' to have one of the following scalar types: "
                           f"Long, Int; but got {input.dtype} instead (while checking arguments for {name})")
    if input.device != weight.device:
        raise ValueError(f"{name}: input is on {input.device} but weight is on {weight.device}")


def _normalize(input, weight, offsets, mode, per_sample_weights, include_last_offset, padding_idx, name):
    """Flat indices, offsets with the end offset last, per-sample weights and padding row. Nothing here reads a
    value of a tensor: the ops check the offsets and indices, in PyTorch's words (C++ CUDA: as its kernel reads
    them; C++ CPU: in one loop; Triton: in its launcher; reference: fck::embedding_bag_checked), so no call waits
    for a GPU and torch.compile traces every form. include_last_offset's offsets get the input's length appended as
    well: the indices past their last offset (none, when the offsets are as torch documents them) form one more
    bag, which the caller drops. The caller has run _check_weight."""
    if mode not in MODES:
        raise ValueError(f"{name}: mode has to be one of sum, mean or max, got {mode!r}")
    if per_sample_weights is not None:
        if mode != "sum":
            raise NotImplementedError(f"embedding_bag: per_sample_weights was not None. per_sample_weights is only "
                                      f"supported for mode='sum' (got mode='{mode}')")
        if per_sample_weights.shape != input.shape:
            raise ValueError(f"embedding_bag: If per_sample_weights ({tuple(per_sample_weights.shape)}) is not None, "
                             f"then it must have the same shape as the input ({tuple(input.shape)})")
        if per_sample_weights.dtype != weight.dtype or per_sample_weights.device != weight.device:
            raise TypeError(f"{name}: per_sample_weights must be {weight.dtype} on {weight.device}")
    if input.dim() == 2:
        if offsets is not None:
            raise ValueError("if input is 2D, then offsets has to be None, as input is treated is a mini-batch of "
                             "fixed length sequences")
        bags, length = input.shape
        offsets = torch.arange(0, bags * length + 1, max(length, 1), device=input.device, dtype=input.dtype)
        offsets = offsets[: bags + 1] if length else torch.zeros(bags + 1, dtype=input.dtype, device=input.device)
        input = input.reshape(-1)
        per_sample_weights = None if per_sample_weights is None else per_sample_weights.reshape(-1)
    elif input.dim() == 1:
        if offsets is None:
            raise ValueError("offsets has to be a 1D Tensor but got None")
        if offsets.dim() != 1:
            raise ValueError("offsets has to be a 1D Tensor")
        offsets = offsets.to(device=input.device, dtype=input.dtype)
        if include_last_offset and offsets.numel() == 0:
            raise ValueError("include_last_offset: offsets must hold at least the end offset")
        if offsets.numel() == 0:  # no bags: PyTorch ignores the indices
            input = input[:0]
            per_sample_weights = None if per_sample_weights is None else per_sample_weights[:0]
        offsets = torch.cat([offsets, offsets.new_full((1,), input.numel())])  # (F.pad: 2.5x the time, a dozen ops)
    else:
        raise ValueError(f"input has to be 1D or 2D Tensor, but got Tensor of dimension {input.dim()}")
    return input.contiguous(), offsets.contiguous(), per_sample_weights, _padding_index(padding_idx, weight.shape[0],
                                                                                        name)


def _padding_index(padding_idx, num_embeddings: int, name: str) -> int:
    """padding_idx as a row number (negative counts from the end), -1 for none."""
    if padding_idx is None:
        return -1
    if not -num_embeddings <= padding_idx < num_embeddings:
        raise ValueError(f"{name}: padding_idx must be within num_embeddings ({num_embeddings})")
    return padding_idx % num_embeddings


def embedding_bag(input, weight, offsets=None, max_norm=None, norm_type=2.0, scale_grad_by_freq=False, mode="mean",
                  sparse=False, per_sample_weights=None, include_last_offset=False, padding_idx=None, *,
                  update: EmbeddingUpdate | None = None, backend=None):
    """torch.nn.functional.embedding_bag, on fastcore_kernels' kernels. With `update`, the backward steps the
    touched rows of `weight` in place (see EmbeddingUpdate) and gives it no gradient."""
    _check_weight(weight, input, "embedding_bag")
    impl = _backend.resolve(weight.device, backend, IMPLEMENTED, "embedding_bag")
    indices, offsets, psw, pad = _normalize(input, weight, offsets, mode, per_sample_weights, include_last_offset,
                                            padding_idx, "embedding_bag")
    if mode == "max" and scale_grad_by_freq:  # torch's errors, in its order
        raise ValueError("max mode does not support scaling the gradient by the frequency")
    if mode == "max" and sparse:
        raise ValueError("max mode does not support sparse weights")
    out = _bags(indices, weight, offsets, max_norm, norm_type, scale_grad_by_freq, mode, sparse, psw, pad, update,
                impl)
    return out[:-1] if include_last_offset and input.dim() == 1 else out


def _bags(indices, weight, offsets, max_norm, norm_type, scale_grad_by_freq, mode, sparse, psw, pad, update, impl):
    """embedding_bag on normalised arguments (_normalize)."""
    if impl == "reference" or max_norm is not None:
        indices = _checked(indices, offsets, weight.shape[0])
    if max_norm is not None:
        with torch.no_grad():
            torch.embedding_renorm_(weight, indices, max_norm, norm_type)
    code = MODES[mode]
    if impl != "reference" and not weight.is_contiguous():
        # The kernels read packed rows (Triton's read a strided view's as packed, silently wrong). A copy is
        # differentiable, so gradients still reach the view; the fused update, which writes rows in place, is not.
        if update is not None:
            raise ValueError("embedding_bag: the fused update writes into weight in place; weight must be contiguous")
        weight = weight.contiguous()
    if update is not None:
        if impl not in ("cpu", "cuda") or mode == "max" or sparse or scale_grad_by_freq:
            raise NotImplementedError("embedding_bag: the fused update runs on the cpu and cuda backends, for mode "
                                      "'sum' or 'mean', without sparse or scale_grad_by_freq")
        if not weight.requires_grad:
            raise ValueError("embedding_bag: the fused update needs weight.requires_grad=True, so a backward runs")
        return _EmbeddingBag.apply(weight, psw, indices, offsets, code, pad, pad, False, False, impl, update)[0]
    if impl == "reference":
        return reference.embedding_bag(weight, indices, offsets, mode, psw, None if pad < 0 else pad,
                                       bool(scale_grad_by_freq), bool(sparse))
    if impl in ("cpu", "cuda") and psw is None and not sparse and not scale_grad_by_freq and not _backend.compiling():
        # One C++ op with its autograd in C++: a Python autograd.Function costs more than a small table's bags.
        return torch.ops.fck.embedding_bag(weight, indices, offsets, code, pad)
    needs_grad = torch.is_grad_enabled() and (weight.requires_grad or (psw is not None and psw.requires_grad))
    if not needs_grad:
        return _kernels(impl)[0](weight, indices, offsets, code, psw, pad)[0]
    return _EmbeddingBag.apply(weight, psw, indices, offsets, code, pad, pad, bool(sparse),
                               bool(scale_grad_by_freq), impl)[0]


def embedding(input, weight, padding_idx=None, max_norm=None, norm_type=2.0, scale_grad_by_freq=False, sparse=False,
              *, backend=None):
    """torch.nn.functional.embedding: rows for any index shape. padding_idx rows are returned as they are and get
    no gradient."""
    _check_weight(weight, input, "embedding")
    impl = _backend.resolve(weight.device, backend, IMPLEMENTED, "embedding")
    plain = max_norm is None and not sparse and not scale_grad_by_freq
    if impl in ("cpu", "cuda") and plain and not _backend.compiling():
        # The C++ op with C++ autograd: a small table's lookup is otherwise mostly Python overhead.
        return torch.ops.fck.embedding(weight.contiguous(), input,
                                       _padding_index(padding_idx, weight.shape[0], "embedding"))
    flat = input.reshape(-1)
    _, offsets, _, pad = _normalize(flat[:, None], weight, None, "sum", None, False, padding_idx, "embedding")
    if impl == "reference" or max_norm is not None:
        flat = _checked(flat, offsets, weight.shape[0])
    if max_norm is not None:
        with torch.no_grad():
            torch.embedding_renorm_(weight, flat, max_norm, norm_type)
    shape = (*input.shape, weight.shape[1])
    if impl == "reference":
        out = reference.rows_of(weight, flat, bool(scale_grad_by_freq), bool(sparse))
        if pad >= 0 and weight.requires_grad:  # the padding row's value, without a gradient path
            keep = (flat != pad)[:, None]
            out = torch.where(keep, out, weight.detach()[flat.long()])
        return out.reshape(shape)
    flat, weight = flat.contiguous(), weight.contiguous()  # (after the renorm, which writes into the caller's)
    if not (torch.is_grad_enabled() and weight.requires_grad):
        return _kernels(impl)[0](weight, flat, offsets, 0, None, -1)[0].reshape(shape)
    out = _EmbeddingBag.apply(weight, None, flat, offsets, 0, -1, pad, bool(sparse), bool(scale_grad_by_freq),
                              impl)[0]
    return out.reshape(shape)
