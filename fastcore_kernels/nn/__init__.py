"""Drop-in modules on fastcore_kernels' fused ops, and `fuse(model)` to swap them into an existing model."""

from fastcore_kernels.nn.batch_norm import (AbsorbedBatchNorm2d, BatchNorm1d, BatchNorm2d, BatchNorm3d,
                                            BatchNormAddReLU2d, BatchNormReLU1d, BatchNormReLU2d, Conv2d,
                                            ConvBNReLU2d, ConvReLU2d, FusedConv2d)
from fastcore_kernels.nn.embedding import Embedding, EmbeddingBag, EmbeddingUpdate
from fastcore_kernels.nn.fuse import fuse
from fastcore_kernels.nn.pool import AvgPool2d, MaxPool2d
from fastcore_kernels.nn.rnn import GRU, LSTM, GRUCell, LSTMCell

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "BatchNormReLU1d", "BatchNormReLU2d", "BatchNormAddReLU2d",
           "Conv2d", "ConvBNReLU2d", "ConvReLU2d", "FusedConv2d", "AbsorbedBatchNorm2d", "Embedding", "EmbeddingBag",
           "EmbeddingUpdate", "LSTM", "GRU", "LSTMCell", "GRUCell", "MaxPool2d", "AvgPool2d", "fuse"]
