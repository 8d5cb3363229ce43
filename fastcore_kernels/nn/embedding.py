"""Embedding modules on fastcore_kernels' embedding-bag kernels: drop-ins for torch's (subclasses: same constructor,
`from_pretrained`, parameters and state_dict keys)."""

from __future__ import annotations

from torch import nn

from fastcore_kernels.nn._script import NotScriptable
from fastcore_kernels.ops.embedding_bag import EmbeddingUpdate, embedding, embedding_bag


class Embedding(NotScriptable, nn.Embedding):
    """torch.nn.Embedding on the fused kernels."""

    def forward(self, input):
        return embedding(input, self.weight, self.padding_idx, self.max_norm, self.norm_type,
                         self.scale_grad_by_freq, self.sparse)


class EmbeddingBag(NotScriptable, nn.EmbeddingBag):
    """torch.nn.EmbeddingBag on the fused kernels. `update=EmbeddingUpdate("rowwise_adagrad", lr=0.1)` makes the
    backward step the touched rows itself (leave the weight out of the optimizer's params then)."""

    def __init__(self, *args, update: EmbeddingUpdate | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.update = update

    def forward(self, input, offsets=None, per_sample_weights=None):
        return embedding_bag(input, self.weight, offsets, self.max_norm, self.norm_type, self.scale_grad_by_freq,
                             self.mode, self.sparse, per_sample_weights, self.include_last_offset, self.padding_idx,
                             update=getattr(self, "update", None))
