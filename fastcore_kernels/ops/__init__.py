"""The ops users call: input checks, then dispatch to the selected backend. One module per op."""

import torch

from fastcore_kernels.ops.adam import adam_
from fastcore_kernels.ops.avg_pool import avg_pool2d
from fastcore_kernels.ops.batch_norm import batch_norm_act
from fastcore_kernels.ops.conv_bn_relu import conv2d, conv2d_relu, conv_bn_relu
from fastcore_kernels.ops.embedding_bag import embedding, embedding_bag
from fastcore_kernels.ops.max_pool import max_pool2d
from fastcore_kernels.ops.rnn import gru, gru_cell, lstm, lstm_cell


def release_cpu_pool() -> int:
    """Return the large CPU output blocks the C++ kernels keep cached for reuse (csrc/include/fck/cpu_pool.h; at
    most FCK_CPU_POOL_MB, default 2048) to the system. Returns the number of bytes released."""
    from fastcore_kernels._ext import extension

    return int(torch.ops.fck.cpu_pool_release()) if extension().ok else 0


def _register_fakes() -> None:
    """Called once the C++ library is loaded: its ops get fake (meta) kernels so torch.compile can trace them."""
    from fastcore_kernels.ops import adam, avg_pool, batch_norm, max_pool, rnn
    from fastcore_kernels.ops.embedding_bag import register_fake as register_embedding_bag_fakes

    adam.register_fake()
    batch_norm.register_fake()
    register_embedding_bag_fakes()
    rnn.register_fake()
    max_pool.register_fake()
    avg_pool.register_fake()
    # the pooled-output helpers (CPU): plain tensors of the result's shape
    torch.library.register_fake("fck::mm_pooled")(lambda a, b: a.new_empty(a.shape[0], b.shape[1]))
    torch.library.register_fake("fck::contiguous_pooled")(
        lambda x: torch.empty_like(x, memory_format=torch.contiguous_format))
    torch.library.register_fake("fck::winograd_weight")(
        lambda w, m, transposed=False: w.new_empty((m + 2) ** 2, -(-w.shape[1 if transposed else 0] // 16),
                                                   -(-w.shape[0 if transposed else 1] // 8) * 8, 16))
    def winograd_conv_fake(x, u, bias, padding, out_channels, relu):
        # the output in the input's memory format, as the kernel returns it
        nhwc = not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
        return x.new_empty(x.shape[0], out_channels, x.shape[2] + 2 * padding[0] - 2,
                           x.shape[3] + 2 * padding[1] - 2).contiguous(
            memory_format=torch.channels_last if nhwc else torch.contiguous_format)

    torch.library.register_fake("fck::conv3x3_winograd")(winograd_conv_fake)

    def depthwise_fake(x, w, b, stride, padding, act, scalars):
        return x.new_empty(x.shape[0], x.shape[1], (x.shape[2] + 2 * padding[0] - w.shape[2]) // stride[0] + 1,
                           (x.shape[3] + 2 * padding[1] - w.shape[3]) // stride[1] + 1)

    torch.library.register_fake("fck::depthwise_conv2d")(depthwise_fake)
    torch.library.register_fake("fck::depthwise_conv2d_weight_grad")(
        lambda x, grad_out, kernel_size, stride, padding: x.new_empty(x.shape[1], 1, *kernel_size))
    torch.library.register_fake("fck::depthwise_conv2d_input_grad")(
        lambda grad_out, w, input_size, stride, padding: grad_out.new_empty(input_size))
    torch.library.register_fake("fck::conv3x3_winograd_weight_grad")(
        lambda x, grad_out, padding, m: x.new_empty(grad_out.shape[1], x.shape[1], 3, 3))


__all__ = ["adam_", "avg_pool2d", "batch_norm_act", "conv2d", "conv2d_relu", "conv_bn_relu", "embedding",
           "embedding_bag", "gru", "gru_cell", "lstm", "lstm_cell", "max_pool2d", "release_cpu_pool"]
