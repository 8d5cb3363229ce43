"""What every fastcore_kernels module says to torch.jit.script."""

from __future__ import annotations


class NotScriptable:
    """torch.jit.script compiles a module's forward from its Python source; ours reach the fused kernels through
    Python (backend choice, input checks, autograd Functions) that TorchScript cannot compile, and its own error
    points deep inside that code. TorchScript asks each module for `__prepare_scriptable__` before compiling, so
    refusing there names the module and what works instead, and leaves the model as it was."""

    def __prepare_scriptable__(self):
        raise RuntimeError(
            f"torch.jit.script cannot compile fastcore_kernels' {type(self).__name__}: its forward reaches the fused "
            "kernels through Python that TorchScript does not compile. torch.jit.trace, torch.export and "
            "torch.compile take fused models; to script, script the model before fastcore_kernels.fuse() (torch's "
            "modules), whose state_dict loads into the fused one and back.")
