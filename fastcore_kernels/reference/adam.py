"""Adam/AdamW step in plain PyTorch: the specification every backend of `fck::adam_` is tested against.

It is torch.optim.Adam's single-tensor algorithm (foreach=False), op for op, with two additions that the fused
kernels share: half-precision params are updated in fp32 and rounded once at the end, and an optional fp32 master
copy (with fp32 state) carries the true value of a half param.
"""

from __future__ import annotations

import torch

from fastcore_kernels import _backend


def adam_(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    max_exp_avg_sqs: list[torch.Tensor],
    master_params: list[torch.Tensor],
    state_steps: list[torch.Tensor],
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    amsgrad: bool,
    maximize: bool,
    decoupled_weight_decay: bool,
    inv_grad_scale: float,
) -> None:
    for i, param in enumerate(params):
        low_precision = param.dtype in (torch.float16, torch.bfloat16)
        compute = torch.float32 if low_precision else param.dtype
        # For fp32/fp64 these are the stored tensors themselves (updated in place); for half, fp32 working copies.
        p = master_params[i] if master_params else param.to(compute)
        m = exp_avgs[i].to(compute)
        v = exp_avg_sqs[i].to(compute)
        grad = grads[i].to(compute)
        if inv_grad_scale != 1.0:
            grad = grad * inv_grad_scale
        if maximize:
            grad = -grad

        step_t = state_steps[i]
        step_t += 1
        # Under torch.compile the step stays a tensor, as in torch's own Adam: .item() breaks the graph (torch 2.5
        # refused it under fullgraph=True).
        step = step_t if _backend.compiling() else step_t.item()

        if weight_decay != 0:
            if decoupled_weight_decay:
                p.mul_(1 - lr * weight_decay)
            else:
                grad = grad.add(p, alpha=weight_decay)

        m.lerp_(grad, 1 - beta1)
        v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)

        bias_correction1 = 1 - beta1**step
        bias_correction2 = 1 - beta2**step
        step_size = lr / bias_correction1
        bias_correction2_sqrt = bias_correction2**0.5

        if amsgrad:
            vmax = max_exp_avg_sqs[i].to(compute)
            torch.maximum(vmax, v, out=vmax)
            denom = (vmax.sqrt() / bias_correction2_sqrt).add_(eps)
            if vmax is not max_exp_avg_sqs[i]:
                max_exp_avg_sqs[i].copy_(vmax)
        else:
            denom = (v.sqrt() / bias_correction2_sqrt).add_(eps)

        if isinstance(step_size, torch.Tensor):
            p.addcdiv_(m, denom.div_(-step_size))  # addcdiv_'s value must be a number
        else:
            p.addcdiv_(m, denom, value=-step_size)

        for stored, work in ((param, p), (exp_avgs[i], m), (exp_avg_sqs[i], v)):
            if work is not stored:
                stored.copy_(work)
