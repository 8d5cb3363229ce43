"""Optimizers whose step runs as fused multi-tensor kernels."""

from fastcore_kernels.optim.adam import FusedAdam, FusedAdamW

__all__ = ["FusedAdam", "FusedAdamW"]
