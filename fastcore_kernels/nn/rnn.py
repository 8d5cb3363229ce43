"""LSTM and GRU modules on the fused recurrent kernels: drop-ins for torch's (subclasses: same constructors,
parameter names such as `weight_hh_l0_reverse`, state_dict keys), swapped in by `fastcore_kernels.fuse(model)`.

The weights are read by name at every forward, so code that replaces `weight_hh_l0` between calls (AWD-LSTM's weight
dropout) just works, with no flatten_parameters() and no re-packing. Input may be a padded tensor or a
PackedSequence (output packed like it, states in the caller's batch order), as torch's modules take.
"""

from __future__ import annotations

from torch import nn

from fastcore_kernels.nn._script import NotScriptable
from fastcore_kernels.ops import rnn as ops


class _Sequence(NotScriptable):
    """What LSTM and GRU share: the weights by name, and the options torch's module holds."""

    def _params(self):
        return [getattr(self, n) for n in self._flat_weights_names]

    def _options(self):
        return dict(has_biases=self.bias, num_layers=self.num_layers, dropout=float(self.dropout),
                    training=self.training, bidirectional=self.bidirectional, batch_first=self.batch_first)


class LSTM(_Sequence, nn.LSTM):
    """torch.nn.LSTM on the fused kernels: forward(input, (h_0, c_0)=None) -> (output, (h_n, c_n)), proj_size
    included (ops/rnn.py: _lstm_projected_layer)."""

    def forward(self, input, hx=None):
        return ops.lstm(input, self._params(), hx, proj_size=self.proj_size, **self._options())


class GRU(_Sequence, nn.GRU):
    """torch.nn.GRU on the fused kernels: forward(input, h_0=None) -> (output, h_n)."""

    def forward(self, input, hx=None):
        return ops.gru(input, self._params(), hx, **self._options())


class LSTMCell(NotScriptable, nn.LSTMCell):
    """torch.nn.LSTMCell on the fused cell kernel: forward(input, (h, c)=None) -> (h', c')."""

    def forward(self, input, hx=None):
        return ops.lstm_cell(input, hx, self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh)


class GRUCell(NotScriptable, nn.GRUCell):
    """torch.nn.GRUCell on the fused cell kernel: forward(input, h=None) -> h'."""

    def forward(self, input, hx=None):
        return ops.gru_cell(input, hx, self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh)
