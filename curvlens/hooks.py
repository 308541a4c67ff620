"""Capture of layer inputs and output gradients, owned by a context manager.

:class:`Capture` registers one forward hook per chosen matrix's module (or the hooks of the
matrix's capture adapter, e.g. for ``nn.MultiheadAttention``, whose projections no module hook
sees). The hook stores the input (detached) and, when the output takes part in autograd, hangs a
tensor hook on the output that stores ``dL/dy`` during backward. Matrices without an adapter
(``LayerInfo.spec is None``) are not hooked. Every handle lives in the manager and is removed in
``__exit__`` (also when the body raises); captured tensors live in the manager's own dict, keyed
by layer name, never on the modules. Forward passes under ``torch.no_grad()`` are ignored, and
nothing captured holds on to the autograd graph.

Example:
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    >>> with Capture(net) as cap:
    ...     net(torch.randn(5, 3)).square().mean().backward()
    >>> [tuple(cap.records["0"].inputs[0].shape), tuple(cap.records["0"].output_grads[0].shape)]
    [(5, 3), (5, 4)]
    >>> net._forward_hooks
    OrderedDict()
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from curvlens.layers import LayerInfo, find_layers

__all__ = ["Capture", "LayerRecord"]


@dataclass
class LayerRecord:
    """What one layer saw since the last :meth:`Capture.clear`.

    Attributes:
        inputs: one detached input tensor per forward call (shape as the layer received it).
        output_grads: ``dL/dy`` per backward through that call's output, in the order backward
            produced them; ``calls[i]`` says which forward call ``output_grads[i]`` belongs to.
        calls: forward-call index of each entry of ``output_grads``.
        samples: samples in each forward call (the batch size the adapter reads off).
    """

    inputs: list[Tensor] = field(default_factory=list)
    samples: list[int] = field(default_factory=list)
    output_grads: list[Tensor] = field(default_factory=list)
    calls: list[int] = field(default_factory=list)

    def pairs(self) -> list[tuple[Tensor, Tensor]]:
        """``(input, output_grad)`` for every captured backward, matched by forward call."""
        return [(self.inputs[c], g) for c, g in zip(self.calls, self.output_grads)]


class Capture:
    """Context manager that records inputs and output gradients of supported layers.

    Args:
        model: the model whose layers are hooked.
        layers: ``{name: LayerInfo}`` (from :func:`curvlens.find_layers`), an iterable of
            qualified names, or ``None`` for every supported layer.
        inputs: record layer inputs.
        output_grads: record ``dL/dy`` of layer outputs during backward.
        enabled: a callable ``() -> bool`` checked on every forward; when it returns ``False``
            nothing is recorded (the lens uses this to capture only every N steps).
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Mapping[str, LayerInfo] | Iterable[str] | None = None,
        *,
        inputs: bool = True,
        output_grads: bool = True,
        enabled=None,
    ) -> None:
        if not isinstance(layers, Mapping):
            layers = find_layers(model, layers, on_unsupported="skip")
        self.layers = {name: info for name, info in layers.items() if info.spec is not None}
        self.model = model
        self._want_inputs = inputs
        self._want_grads = output_grads
        self._enabled = enabled
        self._handles: list[RemovableHandle] = []
        self.records: dict[str, LayerRecord] = {name: LayerRecord() for name in self.layers}
        self.active = False

    # ----------------------------------------------------------------- context manager
    def __enter__(self) -> Capture:
        if self.active:
            raise RuntimeError("this Capture is already active; use a new one to nest captures")
        groups: dict[tuple[int, int], tuple[LayerInfo, dict[str, LayerInfo]]] = {}
        for name, info in self.layers.items():
            key = (id(info.module), id(info.spec))
            groups.setdefault(key, (info, {}))[1][name] = info
        try:
            for first, infos in groups.values():
                if first.spec.attach is not None:
                    self._handles += first.spec.attach(first.module, infos, self)
                    continue
                for name in infos:
                    self._handles.append(first.module.register_forward_hook(self._hook_for(name)))
        except BaseException:
            self.remove()
            raise
        self.active = True
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.remove()

    def remove(self) -> None:
        """Remove every hook this capture registered (safe to call twice)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.active = False

    def clear(self) -> None:
        """Forget everything recorded so far (hooks stay in place)."""
        for record in self.records.values():
            record.inputs.clear()
            record.samples.clear()
            record.output_grads.clear()
            record.calls.clear()

    # ----------------------------------------------------------------- hooks
    def save_input(self, name: str, x: Tensor, samples: int | None = None) -> int | None:
        """Record one forward call's input of matrix ``name``; its call index, or ``None`` when
        nothing is recorded (gradients off, or the ``enabled`` switch says no)."""
        if not torch.is_grad_enabled():
            return None
        if self._enabled is not None and not self._enabled():
            return None
        record = self.records[name]
        record.inputs.append(x.detach() if self._want_inputs else x.new_empty(0))
        record.samples.append(int(samples if samples is not None else
                                  (x.shape[0] if x.dim() > 0 else 1)))
        return len(record.inputs) - 1

    def watch(self, name: str, call: int, y: Any, select: Callable | None = None) -> None:
        """Record ``dL/dy`` (through ``select``, e.g. a block of columns) during backward."""
        if not (self._want_grads and isinstance(y, Tensor) and y.requires_grad):
            return
        record = self.records[name]

        def grad_hook(grad: Tensor) -> None:
            g = grad if select is None else select(grad)
            record.output_grads.append(g.detach())
            record.calls.append(call)

        y.register_hook(grad_hook)

    def _hook_for(self, name: str):
        def forward_hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            call = self.save_input(name, args[0])
            if call is not None:
                self.watch(name, call, output)

        return forward_hook
