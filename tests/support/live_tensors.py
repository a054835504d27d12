"""How many bytes of tensor storage are alive, op by op, while some code runs (tests and benchmarks).

On a CPU-only machine the decode device and the offload device are the same RAM, so peak RSS
cannot show what a GPU would have to hold. This tracker sees every tensor an op creates (a
``TorchDispatchMode``), counts each storage once while any tensor on it lives, and records the
peak of ``live - excluded()``, where ``excluded`` reports bytes that would sit on another device
(the tiles parked by the precise tiled decode).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveTensors(TorchDispatchMode):
    def __init__(self, excluded: Callable[[], int] = lambda: 0) -> None:
        super().__init__()
        self.excluded = excluded
        self.live = 0
        self.peak = 0
        self._holders: dict[int, set[int]] = {}
        self._sizes: dict[int, int] = {}

    def _forget(self, key: int, holder: int) -> None:
        holders = self._holders.get(key)
        if holders is None:
            return
        holders.discard(holder)
        if not holders:
            del self._holders[key]
            self.live -= self._sizes.pop(key)

    def _track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key == 0:
            return
        holders = self._holders.setdefault(key, set())
        if not holders:
            self._sizes[key] = storage.nbytes()
            self.live += storage.nbytes()
        holders.add(id(tensor))
        weakref.finalize(tensor, self._forget, key, id(tensor))
        self.peak = max(self.peak, self.live - self.excluded())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for item in tree_flatten(out)[0]:
            if isinstance(item, torch.Tensor):
                self._track(item)
        return out
