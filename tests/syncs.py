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

    def __init__(self, skip: tuple[tuple[object, str], ...] = ()):
        """``skip``: (object, method name) pairs whose ops are not counted: stock vLLM code
        (a vision tower, input parsing), whose host work the CPU cannot tell from device work."""
        super().__init__()
        self.seen: Counter[str] = Counter()
        self._inside = 0
        self._skip = skip

    def __enter__(self):
        # On the instance (vLLM's compiled-module wrapper calls forward past module hooks).
        def skipping(method):
            def run(*args, **kwargs):
                self._inside += 1
                try:
                    return method(*args, **kwargs)
                finally:
                    self._inside -= 1
            return run

        for owner, name in self._skip:
            setattr(owner, name, skipping(getattr(owner, name)))
        return super().__enter__()

    def __exit__(self, *exc):
        for owner, name in self._skip:
            delattr(owner, name)  # the class's own again
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
