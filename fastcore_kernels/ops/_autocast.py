"""torch.autocast's lower-precision policy, for the ops torch would cast inside an autocast region (convolutions,
recurrent layers and cells): which dtype the region asks for on a device, and the cast autocast applies."""

from __future__ import annotations

import torch


def autocast_dtype(device: torch.device):
    """The dtype an enabled autocast region runs lower-precision ops in on `device`, or None outside one."""
    if device.type in ("cpu", "cuda") and torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


def lower(t, dtype):
    """t in `dtype` where autocast would cast it (a floating tensor other than float64), else t: lists and tuples of
    them (states, weights) element by element."""
    if isinstance(t, (list, tuple)):
        return type(t)(lower(u, dtype) for u in t)
    if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype not in (dtype, torch.float64):
        return t.to(dtype)
    return t
