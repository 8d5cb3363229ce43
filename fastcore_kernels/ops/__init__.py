"""The ops users call: input checks, then dispatch to the selected backend. One module per op."""

from fastcore_kernels.ops.adam import adam_
from fastcore_kernels.ops.batch_norm import batch_norm_act
from fastcore_kernels.ops.conv_bn_relu import conv_bn_relu


def _register_fakes() -> None:
    """Called once the C++ library is loaded: its ops get fake (meta) kernels so torch.compile can trace them."""
    from fastcore_kernels.ops import adam, batch_norm

    adam.register_fake()
    batch_norm.register_fake()


__all__ = ["adam_", "batch_norm_act", "conv_bn_relu"]
