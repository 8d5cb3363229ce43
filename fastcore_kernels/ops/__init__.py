"""The ops users call: input checks, then dispatch to the selected backend. One module per op."""

from fastcore_kernels.ops.adam import adam_


def _register_fakes() -> None:
    """Called once the C++ library is loaded: its ops get fake (meta) kernels so torch.compile can trace them."""
    from fastcore_kernels.ops import adam

    adam.register_fake()


__all__ = ["adam_"]
