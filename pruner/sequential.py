"""Sequential (layer-by-layer) calibration: every decoder layer sees the outputs of the layers before
it as they are after their own update, as SparseGPT, Wanda and the ADMM weight update run it.

    walk = SequentialInputs(model, adapter, windows)
    for layer in range(walk.n_layers):
        inputs = walk.collect()             # Gram matrices of the layer's linear inputs
        ...                                 # change the layer's weights in place
        walk.advance()                      # its outputs, with the new weights: the next layer's inputs

1. Capture (the usual "catcher"): every decoder layer is swapped for a recorder that keeps the
   hidden states and keyword arguments it is called with (position embeddings, attention mask, ...)
   and passes the hidden states on; the last one stops the forward (no final norm, no lm_head).
   Keyword arguments are kept per layer and batch: they depend on the batch's shape only, and differ
   between layers where an architecture mixes attention types (Gemma 3's sliding-window layers).
2. `collect(names)`: one pass of the current layer over all batches with forward pre-hooks that
   accumulate, per input group of the adapter (q/k/v share one input, gate/up another), the Gram
   matrix G = X^T X = sum_tokens x x^T (each batch's product in fp32, summed in fp64), sum x (fp64)
   and the token count. `collect` may run several times per layer (first attention, then the MLP
   through the updated attention).
3. `advance()`: one pass of the updated layer gives the inputs of the next one.

With `dense_reference=True` the walk also follows the dense model: when it reaches a layer (nothing
in it updated yet, while the layers before it already are, so the model as a whole no longer is the
dense network) it runs that layer once on a second stream of hidden states, the dense model's,
keeping the dense input of each input group and the dense outputs (the next layer's dense inputs).
`collect` then also accumulates, per input, the cross products with the dense model's input to the
same linear, sum_tokens x x_dense^T, and that input's own moments: what a refit needs to match the
dense model's outputs rather than the dense layer's response to already-changed inputs.

Memory: the hidden states of all windows (windows x seqlen x hidden, the model's dtype) twice (three
times with the dense stream, plus the dense inputs of the current layer's input groups), and the
statistics of one `collect` of one layer.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .adapters import Adapter
from .errors import PrunerError


@dataclass
class InputGram:
    """Second moments of one linear input over the calibration tokens (and, when the walk follows
    the dense model, its cross moments with the dense model's input to the same linear)."""

    gram: Tensor  # (d_in, d_in) float64: sum_tokens x x^T
    total: Tensor  # (d_in,) float64: sum_tokens x
    count: int = 0  # tokens
    cross: Tensor | None = None  # (d_in, d_in) float64: sum_tokens x x_dense^T
    dense_gram: Tensor | None = None  # (d_in, d_in) float64: sum_tokens x_dense x_dense^T
    dense_total: Tensor | None = None  # (d_in,) float64: sum_tokens x_dense

    @classmethod
    def empty(cls, d_in: int, device: torch.device, with_dense: bool = False) -> "InputGram":
        def zeros(*shape):
            return torch.zeros(*shape, dtype=torch.float64, device=device)

        if not with_dense:
            return cls(zeros(d_in, d_in), zeros(d_in))
        return cls(zeros(d_in, d_in), zeros(d_in), 0, zeros(d_in, d_in), zeros(d_in, d_in), zeros(d_in))

    def add(self, x: Tensor, dense: Tensor | None = None) -> None:
        """Accumulate a batch of inputs (..., d_in) (and the dense model's inputs for the same
        tokens): the products in fp32, the sums in fp64."""
        flat = x.detach().reshape(-1, x.shape[-1]).float()  # (tokens, d_in)
        self.gram += (flat.T @ flat).double()
        self.total += flat.sum(0, dtype=torch.float64)
        self.count += flat.shape[0]
        if self.cross is not None:
            ref = dense.detach().reshape(-1, dense.shape[-1]).float()  # (tokens, d_in)
            self.cross += (flat.T @ ref).double()
            self.dense_gram += (ref.T @ ref).double()
            self.dense_total += ref.sum(0, dtype=torch.float64)

    @property
    def mean(self) -> Tensor:
        return self.total / max(self.count, 1)


class _Stop(Exception):
    """Raised by the last recorder: the forward has reached every layer."""


class _Recorder(nn.Module):
    """Stands in for one decoder layer during the capture: keeps what the decoder passes it."""

    def __init__(self, kwargs: list[dict], hidden: list[Tensor] | None, last: bool):
        super().__init__()
        self.kwargs, self.hidden, self.last = kwargs, hidden, last

    def forward(self, hidden_states: Tensor, **kwargs):
        self.kwargs.append(kwargs)
        if self.hidden is not None:
            self.hidden.append(hidden_states.detach())
        if self.last:
            raise _Stop
        return hidden_states


@torch.no_grad()
def capture_layer_inputs(model: nn.Module, adapter: Adapter, windows: Tensor,
                         batch_size: int = 8) -> tuple[list[Tensor], list[list[dict]]]:
    """The hidden states entering layer 0 (one (b, T, H) tensor per batch of windows) and, per layer
    and batch, the keyword arguments the decoder passes that layer."""
    layers = adapter.layers(model)
    n = len(layers)
    if n == 0:
        raise PrunerError("the model has no decoder layers to calibrate")
    originals = list(layers)
    hidden: list[Tensor] = []
    kwargs: list[list[dict]] = [[] for _ in range(n)]
    device = next(model.parameters()).device
    try:
        for i in range(n):
            layers[i] = _Recorder(kwargs[i], hidden if i == 0 else None, last=i == n - 1)
        for start in range(0, len(windows), batch_size):
            try:
                model(windows[start:start + batch_size].to(device), use_cache=False)
            except _Stop:
                pass
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer
    return hidden, kwargs


class SequentialInputs:
    """Walks a model's decoder layers in order; see the module docstring."""

    def __init__(self, model: nn.Module, adapter: Adapter, windows: Tensor, batch_size: int = 8,
                 dense_reference: bool = False):
        if batch_size < 1:
            raise PrunerError(f"batch size must be at least 1, got {batch_size}")
        self.model, self.adapter = model, adapter
        self.hidden, self.kwargs = capture_layer_inputs(model, adapter, windows, batch_size)
        self.n_layers = len(self.kwargs)
        self.layer = 0
        self.dense_hidden = list(self.hidden) if dense_reference else None
        self._dense_inputs: list[dict[str, Tensor]] = []  # per batch: the dense input of each input group
        self._dense_arrival()

    @torch.no_grad()
    def _dense_arrival(self) -> None:
        """With the dense stream: run the current layer as it is on arrival (nothing in it updated
        yet, so it is the dense model's layer) once on the dense hidden states, keeping the input of
        each input group's first linear per batch (for `collect`) and the outputs (for `advance`)."""
        if self.dense_hidden is None or self.layer >= self.n_layers:
            return
        l = self.layer
        layer = self.adapter.layers(self.model)[l]
        linears = self.adapter.decoder_linears(self.model, l)
        self._dense_inputs = [{} for _ in self.dense_hidden]
        batch = [0]
        handles = []

        def keep(group):
            return lambda module, args: self._dense_inputs[batch[0]].__setitem__(group, args[0].detach())

        try:
            for group in self.adapter.input_groups(self.model, l):
                handles.append(linears[group[0]].register_forward_pre_hook(keep(group[0])))
            outputs = []
            for b, hidden in enumerate(self.dense_hidden):
                batch[0] = b
                outputs.append(self.adapter.run_layer(layer, hidden, self.kwargs[l][b]))
        finally:
            for h in handles:
                h.remove()
        self.dense_hidden = outputs  # the dense model's inputs of the next layer

    def _check(self) -> None:
        if self.layer >= self.n_layers:
            raise PrunerError("every layer has been calibrated already")

    @torch.no_grad()
    def collect(self, names: Iterable[str] | None = None) -> dict[str, InputGram]:
        """Input statistics of the current layer's linears `names` (default: all that exist), by
        linear name; linears of one input group share one InputGram object."""
        self._check()
        l = self.layer
        layer = self.adapter.layers(self.model)[l]
        linears = self.adapter.decoder_linears(self.model, l)
        wanted = set(linears) if names is None else set(names) & set(linears)
        with_dense = self.dense_hidden is not None
        stats: dict[str, InputGram] = {}
        batch = [0]
        handles = []

        def accumulate(first, acc):
            if not with_dense:
                return lambda module, args: acc.add(args[0])
            return lambda module, args: acc.add(args[0], self._dense_inputs[batch[0]][first])

        try:
            for group in self.adapter.input_groups(self.model, l):
                members = [n for n in group if n in wanted]
                if not members:
                    continue
                first = linears[group[0]]
                acc = InputGram.empty(first.in_features, first.weight.device, with_dense=with_dense)
                stats.update({n: acc for n in members})
                handles.append(first.register_forward_pre_hook(accumulate(group[0], acc)))
            for b, hidden in enumerate(self.hidden):
                batch[0] = b
                self.adapter.run_layer(layer, hidden, self.kwargs[l][b])
        finally:
            for h in handles:
                h.remove()
        return stats

    @torch.no_grad()
    def advance(self) -> None:
        """Run the (updated) current layer on its inputs: they become the next layer's inputs."""
        self._check()
        l = self.layer
        layer = self.adapter.layers(self.model)[l]
        self.hidden = [self.adapter.run_layer(layer, h, self.kwargs[l][b]) for b, h in enumerate(self.hidden)]
        self.kwargs[l] = []  # no longer needed
        self.layer += 1
        self._dense_arrival()  # the dense stream's outputs of layer l are already in dense_hidden
