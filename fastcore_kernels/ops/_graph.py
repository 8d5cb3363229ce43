"""Backwards that build a graph (create_graph=True: a gradient penalty, a Hessian-vector product) for ops whose
kernels' backward builds none: the forward re-run on differentiable torch ops, differentiated with a graph."""

from __future__ import annotations

import torch


def grads_with_graph(outputs, grads, inputs, needed):
    """d outputs / d inputs against grads, as a graph: None for each input not `needed`, zeros for one the outputs
    do not depend on."""
    want = [t for t, n in zip(inputs, needed) if n]
    with torch.enable_grad():
        got = iter(torch.autograd.grad(outputs, want, grads, create_graph=True, allow_unused=True) if want else ())
    result = []
    for t, n in zip(inputs, needed):
        g = next(got) if n else None
        result.append(torch.zeros_like(t) if n and g is None else g)
    return result
