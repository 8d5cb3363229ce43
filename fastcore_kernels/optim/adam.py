"""FusedAdam / FusedAdamW: drop-ins for torch.optim.Adam / AdamW whose step is one multi-tensor kernel per
(dtype, master-weights) bucket of a param group, on the backend fastcore_kernels selects.

Same constructor arguments, defaults, param-group keys and state layout as torch ('step' as a float32 CPU tensor,
'exp_avg', 'exp_avg_sq', 'max_exp_avg_sq'), so state_dicts move between the two in both directions. One addition:
`master_weights=True` keeps an fp32 copy ('master_param') and fp32 moments for float16/bfloat16 params.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from fastcore_kernels import _backend
from fastcore_kernels.ops.adam import _dense, adam_

_HALF = (torch.float16, torch.bfloat16)
_MOMENTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")


def _scalar(x) -> float:
    return float(x.item()) if isinstance(x, torch.Tensor) else float(x)


class _Bucket(NamedTuple):
    """The lists one adam_ call takes: the params of one (dtype, master weights, dense) kind in a group."""

    params: list
    grads: list
    exp_avgs: list
    exp_avg_sqs: list
    max_exp_avg_sqs: list
    master_params: list
    state_steps: list

    @staticmethod
    def empty() -> "_Bucket":
        return _Bucket([], [], [], [], [], [], [])

    def with_grads(self, grads: list) -> "_Bucket":
        # Not _replace, which torch 2.4's torch.compile will not trace (it lives in collections).
        return _Bucket(self.params, grads, self.exp_avgs, self.exp_avg_sqs, self.max_exp_avg_sqs, self.master_params,
                       self.state_steps)


class _GroupPlan:
    """What FusedAdam knows about a param group between steps. `full`: the buckets (without grads) and the params'
    contiguity, once every param of the group has state; reused while every param keeps getting a grad."""

    __slots__ = ("group", "flags", "entries", "full")

    def __init__(self, group: dict, flags: tuple, entries: list) -> None:
        self.group, self.flags, self.entries, self.full = group, flags, entries, None


class FusedAdam(torch.optim.Optimizer):
    """Adam (L2 weight decay) or, with `decoupled_weight_decay=True`, AdamW; see torch.optim.Adam for the math.

    Extra keyword arguments: `master_weights` (fp32 master copy and fp32 moments for half params) and `backend`
    (pin this optimizer to "cpu", "cuda", "triton" or "reference"; default: fastcore_kernels' selection).
    `foreach` and `fused` are accepted for compatibility and ignored: the step is always fused.
    """

    def __init__(
        self,
        params,
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        decoupled_weight_decay: bool = False,
        master_weights: bool = False,
        backend: str | None = None,
    ) -> None:
        if isinstance(lr, torch.Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        betas = (_scalar(betas[0]), _scalar(betas[1]))
        if not 0.0 <= betas[0] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 0: {betas[0]}")
        if not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 1: {betas[1]}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if capturable:
            raise ValueError(f"{type(self).__name__} does not support capturable=True (CUDA-graph capture of step)")
        if differentiable:
            raise ValueError(f"{type(self).__name__} does not support differentiable=True")
        if backend is not None:
            from fastcore_kernels._backend import _validate

            backend = _validate(backend)
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize,
            foreach=foreach, capturable=False, differentiable=False, fused=fused,
            decoupled_weight_decay=decoupled_weight_decay, master_weights=master_weights,
        )
        self._plans: dict[int, _GroupPlan] = {}
        super().__init__(params, defaults)
        self.backend = backend
        # GradScaler then hands us `grad_scale`/`found_inf` instead of unscaling the grads itself (no extra pass).
        self._step_supports_amp_scaling = True

    def __setstate__(self, state) -> None:
        super().__setstate__(state)
        self._plans = {}
        for group in self.param_groups:
            for key, value in (("amsgrad", False), ("maximize", False), ("foreach", None), ("capturable", False),
                               ("differentiable", False), ("fused", None), ("decoupled_weight_decay", False),
                               ("master_weights", False)):
                group.setdefault(key, value)

    def load_state_dict(self, state_dict) -> None:
        saved_state = state_dict["state"]
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        super().load_state_dict(state_dict)
        self._plans = {}
        params = [p for g in self.param_groups for p in g["params"]]
        for pid, p in zip(saved_ids, params):
            state = self.state.get(p)
            if not state:
                continue
            step = state.get("step")
            if step is not None and not (torch.is_tensor(step) and step.device.type == "cpu"
                                         and step.dtype == torch.float32):
                state["step"] = torch.tensor(_scalar(step), dtype=torch.float32)
            saved = saved_state.get(pid, {})
            if "master_param" in saved:
                # The generic loader casts all floating state to the param's dtype; master-weight state is fp32.
                for key in ("master_param",) + _MOMENTS:
                    if key in saved:
                        state[key] = saved[key].to(device=p.device, dtype=torch.float32, copy=True)

    def add_param_group(self, param_group) -> None:
        super().add_param_group(param_group)
        self._plans = {}

    def _state_for(self, p: torch.Tensor, amsgrad: bool, master: bool) -> dict:
        state = self.state[p]
        if len(state) == 0:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            dtype = torch.float32 if master else p.dtype
            state["exp_avg"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
            if master:
                state["master_param"] = p.detach().to(torch.float32, memory_format=torch.preserve_format, copy=True)
        elif master != ("master_param" in state):
            # master_weights was switched, or the state came from torch.optim.Adam: convert once.
            if master:
                state["master_param"] = p.detach().to(torch.float32, memory_format=torch.preserve_format, copy=True)
            else:
                del state["master_param"]
            dtype = torch.float32 if master else p.dtype
            for key in _MOMENTS:
                if key in state:
                    state[key] = state[key].to(dtype)
        if amsgrad and "max_exp_avg_sq" not in state:
            state["max_exp_avg_sq"] = torch.zeros_like(state["exp_avg_sq"], memory_format=torch.preserve_format)
        return state

    def _plan(self, group) -> _GroupPlan:
        """Per-param facts that do not change between steps (bucket key, whether grads can be used as they come,
        the param's state dict), computed once per group and rebuilt when the group's options, its params or the
        optimizer's state are replaced."""
        if _backend.compiling():
            # Traced once per compilation, so nothing to save; and torch 2.4-2.6 cannot trace the cache's checks
            # (the id or identity of a dict).
            return self._new_plan(group, None)
        flags = (group["amsgrad"], group["master_weights"], len(group["params"]), id(self.state))
        cached = self._plans.get(id(group))
        if cached is not None and cached.group is group and cached.flags == flags:
            return cached
        plan = self._plans[id(group)] = self._new_plan(group, flags)
        return plan

    def _new_plan(self, group, flags: tuple | None) -> _GroupPlan:
        amsgrad, master_weights = group["amsgrad"], group["master_weights"]
        name = type(self).__name__
        entries, device = [], None
        for p in group["params"]:
            if device is None:
                device = p.device
            elif p.device != device:
                raise ValueError(
                    f"{name}: all params of a param group must be on one device; found {device} and {p.device}. "
                    "Put params of different devices in different groups."
                )
            if torch.is_complex(p):
                raise TypeError(f"{name} does not support complex params (got {p.dtype})")
            if not p.is_floating_point():
                raise TypeError(f"{name}: params must be floating point, got {p.dtype}")
            master = master_weights and p.dtype in _HALF
            dense = p.is_contiguous() or _dense(p)
            state = self._state_for(p, amsgrad, master) if self.state.get(p) else None
            entries.append([p, (p.dtype, master, dense), p.is_contiguous(), state])
        return _GroupPlan(group, flags, entries)

    def _grad_for(self, p: torch.Tensor, grad: torch.Tensor, contiguous: bool, dense: bool) -> torch.Tensor:
        if grad.is_sparse:
            raise RuntimeError(
                f"{type(self).__name__} does not support sparse gradients, please consider SparseAdam instead"
            )
        if not (contiguous and grad.is_contiguous()) and dense and grad.stride() != p.stride():
            grad = torch.empty_like(p).copy_(grad)  # kernels read grad and param as equal flat arrays
        return grad

    def _buckets(self, group) -> dict[tuple, _Bucket]:
        plan = self._plan(group)
        if plan.full is not None:
            # Steady state (every param has state and, so far, a grad each step): reuse the bucketed state lists
            # and gather only the grads.
            out = {}
            for key, (b, contiguous) in plan.full.items():
                grads = [p.grad for p in b.params]
                if any(g is None for g in grads):
                    break
                out[key] = b.with_grads(
                    [self._grad_for(p, g, c, key[2]) for p, g, c in zip(b.params, grads, contiguous)]
                )
            else:
                return out

        amsgrad = group["amsgrad"]
        buckets: dict[tuple, _Bucket] = {}
        contiguity: dict[tuple, list] = {}
        for entry in plan.entries:
            p, key, contiguous, state = entry
            grad = p.grad
            if grad is None:
                continue
            grad = self._grad_for(p, grad, contiguous, key[2])
            if state is None:
                state = entry[3] = self._state_for(p, amsgrad, key[1])
            b = buckets.get(key)
            if b is None:
                b = buckets[key] = _Bucket.empty()
                contiguity[key] = []
            contiguity[key].append(contiguous)
            b.params.append(p)
            b.grads.append(grad)
            b.exp_avgs.append(state["exp_avg"])
            b.exp_avg_sqs.append(state["exp_avg_sq"])
            if amsgrad:
                b.max_exp_avg_sqs.append(state["max_exp_avg_sq"])
            if key[1]:
                b.master_params.append(state["master_param"])
            b.state_steps.append(state["step"])
        if sum(len(b.params) for b in buckets.values()) == len(plan.entries):
            plan.full = {key: (b.with_grads([]), contiguity[key]) for key, b in buckets.items()}
        return buckets

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        inv_grad_scale = 1.0
        grad_scale, found_inf = getattr(self, "grad_scale", None), getattr(self, "found_inf", None)
        if found_inf is not None and _scalar(found_inf) != 0.0:
            return loss  # GradScaler found inf/nan: skip the step entirely, as torch's fused Adam does
        if grad_scale is not None:
            inv_grad_scale = 1.0 / _scalar(grad_scale)

        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for (_, _, dense), b in self._buckets(group).items():
                adam_(
                    b.params, b.grads, b.exp_avgs, b.exp_avg_sqs, b.max_exp_avg_sqs, b.master_params, b.state_steps,
                    lr=_scalar(group["lr"]), beta1=_scalar(beta1), beta2=_scalar(beta2), eps=group["eps"],
                    weight_decay=group["weight_decay"], amsgrad=group["amsgrad"], maximize=group["maximize"],
                    decoupled_weight_decay=group["decoupled_weight_decay"], inv_grad_scale=inv_grad_scale,
                    backend=self.backend if dense else "reference",
                )
        return loss


class FusedAdamW(FusedAdam):
    """AdamW (decoupled weight decay, default 1e-2): a drop-in for torch.optim.AdamW."""

    def __init__(
        self,
        params,
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        master_weights: bool = False,
        backend: str | None = None,
    ) -> None:
        super().__init__(
            params, lr, betas, eps, weight_decay, amsgrad, foreach=foreach, maximize=maximize, capturable=capturable,
            differentiable=differentiable, fused=fused, decoupled_weight_decay=True, master_weights=master_weights,
            backend=backend,
        )

    def __setstate__(self, state) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group["decoupled_weight_decay"] = True
