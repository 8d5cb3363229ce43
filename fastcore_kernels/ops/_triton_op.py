"""Every op's Triton backend is a torch.library custom op with the C++ op's schema, around a launcher that is
imported on first call (Triton is optional)."""

from __future__ import annotations

import importlib

import torch


def triton_op(name: str, launcher: str, schema: str, fake, mutates_args=()):
    """Register `fck::<name>` running `fastcore_kernels.triton.<launcher>` ("module.function")."""
    module_name, function = launcher.rsplit(".", 1)

    def impl(*args):
        return getattr(importlib.import_module(f"fastcore_kernels.triton.{module_name}"), function)(*args)

    op = torch.library.custom_op(f"fck::{name}", impl, mutates_args=mutates_args, schema=schema)
    op.register_fake(fake)
    return op
