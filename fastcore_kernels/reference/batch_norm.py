"""Batch norm, optionally followed by a residual add and a ReLU, in plain PyTorch: the specification every backend of
`fck::batch_norm_fwd`/`fck::batch_norm_bwd` is tested against. Autograd through these ops gives the reference
gradients.

Statistics are computed in fp32 (float64 for float64 input) whatever the input dtype, with the biased variance for
normalising and the unbiased one for the running estimate, as torch.nn.functional.batch_norm does.
"""

from __future__ import annotations

import torch


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def batch_norm_act(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    training: bool,
    momentum: float,
    eps: float,
    relu: bool,
) -> torch.Tensor:
    """relu?(batch_norm(x) + residual?), the running statistics updated in place when training."""
    acc = acc_dtype(x.dtype)
    shape = [1, x.shape[1]] + [1] * (x.dim() - 2)
    dims = [0] + list(range(2, x.dim()))
    xf = x.to(acc)
    if training and x.numel() == 0:  # an empty batch normalizes nothing and leaves the running statistics alone
        mean, var = xf.new_zeros(x.shape[1]), xf.new_ones(x.shape[1])
    elif training:
        # Shifted by each channel's first value (0 where that is not finite: inf - inf would be NaN): an fp32 CUDA
        # variance loses to rounding when |mean| >> std; the shift leaves the statistics (and, detached, their
        # gradients) as they are. The mean is a sum, as torch's batch norm takes it: an inf in the batch gives an
        # inf mean (var_mean's running update gives NaN).
        pivot = xf.detach()[(0, slice(None)) + (0,) * (x.dim() - 2)].view(shape)
        pivot = torch.where(pivot.isfinite(), pivot, 0.0)
        shifted = xf - pivot
        var = torch.var(shifted, dim=dims, unbiased=False)
        mean = shifted.mean(dim=dims) + pivot.view(-1)
        if running_mean is not None or running_var is not None:
            count = x.numel() // x.shape[1]
            with torch.no_grad():
                if running_mean is not None:
                    running_mean.copy_(running_mean * (1 - momentum) + mean.detach() * momentum)
                if running_var is not None:
                    unbiased = var.detach() * (count / (count - 1))
                    running_var.copy_(running_var * (1 - momentum) + unbiased * momentum)
    else:
        mean, var = running_mean.detach().to(acc), running_var.detach().to(acc)
    z = (xf - mean.view(shape)) * torch.rsqrt(var + eps).view(shape)
    if weight is not None:
        z = z * weight.to(acc).view(shape)
    if bias is not None:
        z = z + bias.to(acc).view(shape)
    if residual is not None:
        z = z + residual.to(acc)
    if relu:
        z = torch.relu(z)
    return z.to(x.dtype)


def batch_norm_act_backward(
    grad: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor | None,
    weight: torch.Tensor | None,
    save_mean: torch.Tensor,
    save_invstd: torch.Tensor,
    training: bool,
    relu: bool,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients (input, residual, weight, bias) of batch_norm_act given its output's gradient, as
    differentiable PyTorch ops: what the fused kernels' backward computes, for a backward that must itself be
    differentiated (create_graph=True). y: the output (its sign is the ReLU mask, piecewise constant). Batch
    statistics are recomputed from x, so their dependence on x is in the graph; eval mode uses the saved (running)
    ones."""
    acc = acc_dtype(x.dtype)
    shape = [1, x.shape[1]] + [1] * (x.dim() - 2)
    dims = [0] + list(range(2, x.dim()))
    g = grad.to(acc)
    if relu:
        g = g * (y > 0)
    xf = x.to(acc)
    if training:
        mean = xf.mean(dim=dims, keepdim=True)
        invstd = torch.rsqrt(torch.var(xf, dim=dims, unbiased=False, keepdim=True) + eps)
    else:
        mean, invstd = save_mean.to(acc).view(shape), save_invstd.to(acc).view(shape)
    xhat = (xf - mean) * invstd
    scale = invstd if weight is None else invstd * weight.to(acc).view(shape)
    if training:
        dx = scale * (g - g.mean(dim=dims, keepdim=True) - xhat * (g * xhat).mean(dim=dims, keepdim=True))
    else:
        dx = scale * g
    return dx.to(x.dtype), g.to(x.dtype), (g * xhat).sum(dim=dims), g.sum(dim=dims)
