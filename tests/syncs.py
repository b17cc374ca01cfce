"""Counting, on the CPU, the ops that would make a GPU wait: a ``TorchDispatchMode`` sees
every aten op a forward runs."""

from __future__ import annotations

from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

# Ops whose result size or value the host must read from the device.
_SYNCING = {aten._local_scalar_dense.default, aten.item.default, aten.nonzero.default, aten.nonzero_static.default,
            aten.masked_select.default, aten.bincount.default, aten.repeat_interleave.Tensor,
            aten._unique2.default, aten.unique_dim.default, aten.unique_consecutive.default}


class HostSyncs(TorchDispatchMode):
    """Counts, by op, the ops that sync a GPU with the host: reading a value (``.item()``,
    ``int()``, ``bool()``), data-dependent sizes (``nonzero``, boolean-mask indexing, ``unique``,
    ``bincount``), and copies from the device to the host (none can show on the CPU)."""

    def __init__(self, skip: tuple[torch.nn.Module, ...] = ()):
        """``skip``: modules whose own ops are not counted (a stock vision tower, whose host
        work the CPU cannot tell from device work)."""
        super().__init__()
        self.seen: Counter[str] = Counter()
        self._inside = 0
        self._skip = skip
        self._hooks: list = []

    def __enter__(self):
        def enter(*_):
            self._inside += 1

        def leave(*_):
            self._inside -= 1

        for module in self._skip:
            self._hooks += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]
        return super().__enter__()

    def __exit__(self, *exc):
        for hook in self._hooks:
            hook.remove()
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self._inside:
            pass
        elif func in _SYNCING:
            self.seen[str(func)] += 1
        elif func in (aten.index.Tensor, aten.index_put_.default, aten.index_put.default) and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] if i is not None):
            self.seen[f"{func} with a boolean mask"] += 1
        elif func is aten._to_copy.default and kwargs.get("device") is not None and (
                torch.device(kwargs["device"]).type == "cpu" != args[0].device.type):
            self.seen["copy to the host"] += 1
        return func(*args, **kwargs)

    @property
    def total(self) -> int:
        return sum(self.seen.values())
