"""fastcore_kernels: fused PyTorch kernels (C++ CPU, CUDA, Triton) behind autograd and torch.library ops.

Pick where ops run with `set_backend(name)`, `with use_backend(name): ...` or FCK_BACKEND; `backends()` says what is
available here and why not. The compiled kernels load (or build) on first use, never at import.
"""

from fastcore_kernels import functional, nn, ops, optim
from fastcore_kernels._backend import backends, get_backend, set_backend, use_backend
from fastcore_kernels.nn import fuse
from fastcore_kernels.optim import FusedAdam, FusedAdamW
from fastcore_kernels.learner import DataLoaders, Learner, load_learner

__version__ = "0.1.0"

__all__ = ["backends", "get_backend", "set_backend", "use_backend", "functional", "nn", "ops", "optim", "fuse",
           "FusedAdam", "FusedAdamW",
           "DataLoaders", "Learner", "load_learner"]
