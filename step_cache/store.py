"""Where the cached diffs (model output minus model input, one per cond) live during a run.

Core's EasyCache keeps them on the compute device in the model's dtype. Here the caller picks the
device (``compute`` / ``offload`` / ``auto``), a storage dtype (``same``, ``bf16``, ``fp16``, or
``fp8``: float8_e4m3fn with one float32 scale per sample and channel) and a budget per device.
A diff that does not fit under the budget spills to the offload device; one that fits nowhere
(or whose allocation fails for lack of memory) is not stored, and the step that needs it is
computed instead: storing never raises for lack of memory.

Accounting is exact: the bytes reported for a device are the bytes of the tensors this store
holds there (each stored tensor owns its storage: slices of a larger tensor are copied).
Plain torch; no ComfyUI import.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass

import torch

log = logging.getLogger("memkit")

CACHE_DEVICES = ("auto", "compute", "offload")
STORE_DTYPES = ("same", "bf16", "fp16", "fp8")
TIERS = ("compute", "offload")
FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
AUTO_FREE_FRACTION = 0.1  # auto keeps the cache on the compute device while it stays under this share of free memory
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp8": FP8}


def _is_out_of_memory(error: BaseException) -> bool:
    if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and ("out of memory" in text or "can't allocate" in text)


def _nbytes(tensor: torch.Tensor | None) -> int:
    return 0 if tensor is None else tensor.numel() * tensor.element_size()


def _owned(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor itself if it owns its whole storage, else a compact copy (so that the bytes we
    count are the bytes we keep alive)."""
    if tensor.is_contiguous() and tensor.untyped_storage().nbytes() == _nbytes(tensor):
        return tensor
    return tensor.contiguous().clone()


@dataclass
class _Entry:
    data: torch.Tensor
    scale: torch.Tensor | None  # fp8 only: float32, shape (batch, channels, 1, ...)
    dtype: torch.dtype           # the dtype it was given in
    tier: str

    @property
    def nbytes(self) -> int:
        return _nbytes(self.data) + _nbytes(self.scale)


def fp8_compress(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float8_e4m3fn values with a float32 scale per (sample, channel): each channel's largest
    magnitude maps to 448, so the relative error is at most 2^-4 for values above 2^-6 of it."""
    values = tensor.float()
    if values.ndim >= 3:
        amax = values.abs().amax(dim=tuple(range(2, values.ndim)), keepdim=True)
    else:
        amax = values.abs().amax().reshape((1,) * values.ndim)
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    return (values / scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8), scale


def fp8_decompress(data: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (data.float() * scale).to(dtype)


class DiffStore:
    """Cached diffs by key (a cond's uuid), on the compute or offload device, within a budget."""

    def __init__(self, compute_device: torch.device | str, offload_device: torch.device | str,
                 cache_device: str = "auto", store_dtype: str = "same", budget_bytes: int = 0,
                 free_memory: Callable[[torch.device], int] | None = None) -> None:
        if cache_device not in CACHE_DEVICES:
            raise ValueError(f"cache_device {cache_device!r} is not one of {', '.join(CACHE_DEVICES)}")
        if store_dtype not in STORE_DTYPES:
            raise ValueError(f"store_dtype {store_dtype!r} is not one of {', '.join(STORE_DTYPES)}")
        self.devices = {"compute": torch.device(compute_device), "offload": torch.device(offload_device)}
        self.cache_device = cache_device
        self.store_dtype = store_dtype
        self.budget_bytes = max(0, int(budget_bytes))
        self.free_memory = free_memory
        # pinned host buffers make the offload copies asynchronous; only where a GPU reads them
        self.pin = self.devices["offload"].type == "cpu" and self.devices["compute"].type == "cuda"
        self._entries: dict[Hashable, _Entry] = {}
        self._prefetched: dict[Hashable, torch.Tensor] = {}
        self.held = dict.fromkeys(TIERS, 0)
        self.peak = dict.fromkeys(TIERS, 0)
        self.spilled = 0   # diffs stored on the offload device because the compute device was over budget
        self.dropped = 0   # diffs not stored at all (over budget everywhere, or out of memory)

    # --- placement ---------------------------------------------------------------------------
    def _tiers(self, nbytes: int) -> list[str]:
        """Devices to try, in order."""
        if self.cache_device == "offload":
            return ["offload"]
        if self.cache_device == "compute" or self.devices["compute"] == self.devices["offload"]:
            return ["compute", "offload"]
        if self.free_memory is not None:  # auto: the compute device while the cache is small beside its free memory
            try:
                free = int(self.free_memory(self.devices["compute"]))
            except Exception as error:
                log.debug("[memkit] step cache: free memory unknown (%s), diffs go to the offload device", error)
                free = 0
            if self.held["compute"] + nbytes > AUTO_FREE_FRACTION * (free + self.held["compute"]):
                return ["offload"]
        return ["compute", "offload"]

    def _fits(self, tier: str, nbytes: int) -> bool:
        return self.budget_bytes <= 0 or self.held[tier] + nbytes <= self.budget_bytes

    def _account(self, tier: str, delta: int) -> None:
        self.held[tier] += delta
        self.peak[tier] = max(self.peak[tier], self.held[tier])

    # --- entries -----------------------------------------------------------------------------
    def put(self, key: Hashable, diff: torch.Tensor) -> bool:
        """Keep ``diff`` for ``key`` (replacing the previous one); False when it could not be kept,
        in which case the key has no diff and its next step is computed."""
        old = self._entries.pop(key, None)
        if old is not None:
            self._account(old.tier, -old.nbytes)
        self._drop_prefetched(key)
        try:
            scale = None
            if self.store_dtype == "fp8":
                data, scale = fp8_compress(diff)
            elif self.store_dtype in _DTYPES:
                data = diff.to(_DTYPES[self.store_dtype])
            else:
                data = diff
            nbytes = _nbytes(data) + _nbytes(scale)
            for position, tier in enumerate(self._tiers(nbytes)):
                if not self._fits(tier, nbytes):
                    continue
                entry = self._place(data, scale, diff.dtype, tier, reuse=old)
                self._entries[key] = entry
                self._account(tier, entry.nbytes)
                if position > 0:
                    self.spilled += 1
                return True
        except Exception as error:
            if not _is_out_of_memory(error):
                raise
            log.warning("[memkit] step cache: out of memory keeping a diff of %s %s; that step will be computed",
                        tuple(diff.shape), diff.dtype)
        self.dropped += 1
        return False

    def _place(self, data: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype, tier: str,
               reuse: _Entry | None) -> _Entry:
        device = self.devices[tier]
        scale = None if scale is None else _owned(scale.to(device))
        if data.device == device:
            return _Entry(_owned(data), scale, dtype, tier)
        if (reuse is not None and reuse.tier == tier and reuse.data.shape == data.shape
                and reuse.data.dtype == data.dtype and reuse.data.device == device):
            reuse.data.copy_(data, non_blocking=self.pin)  # the same (pinned) buffer, step after step
            return _Entry(reuse.data, scale, dtype, tier)
        pinned = self.pin and tier == "offload"
        if pinned:
            try:
                buffer = torch.empty(data.shape, dtype=data.dtype, device=device, pin_memory=True)
            except RuntimeError:  # pinning refused: a plain buffer
                buffer, pinned = torch.empty(data.shape, dtype=data.dtype, device=device), False
        else:
            buffer = torch.empty(data.shape, dtype=data.dtype, device=device)
        buffer.copy_(data, non_blocking=pinned)
        return _Entry(buffer, scale, dtype, tier)

    def held_keys(self) -> list[Hashable]:
        return list(self._entries)

    def has(self, key: Hashable) -> bool:
        return key in self._entries

    def has_all(self, keys: Iterable[Hashable]) -> bool:
        return all(key in self._entries for key in keys)

    def prefetch(self, keys: Iterable[Hashable], device: torch.device | str) -> None:
        """Start moving these diffs to ``device`` now (asynchronous from pinned memory), so that a
        later ``get`` in the same step does not wait for the copy."""
        device = torch.device(device)
        for key in keys:
            entry = self._entries.get(key)
            if entry is None or key in self._prefetched or entry.data.device == device:
                continue
            try:
                moved = entry.data.to(device, non_blocking=self.pin)
            except Exception as error:
                if not _is_out_of_memory(error):
                    raise
                return
            self._prefetched[key] = moved
            self._account("compute", _nbytes(moved))

    def _drop_prefetched(self, key: Hashable) -> torch.Tensor | None:
        moved = self._prefetched.pop(key, None)
        if moved is not None:
            self._account("compute", -_nbytes(moved))
        return moved

    def get(self, key: Hashable, device: torch.device | str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The diff for ``key`` on ``device`` in ``dtype`` (default: the dtype it was given in)."""
        entry = self._entries[key]
        dtype = dtype or entry.dtype
        moved = self._drop_prefetched(key)
        data = moved if moved is not None else entry.data.to(device, non_blocking=self.pin)
        if entry.scale is not None:
            return fp8_decompress(data, entry.scale.to(data.device), dtype)
        return data.to(dtype)

    def clear(self) -> None:
        """Forget every diff; the bytes held drop to 0 (peaks are kept for the report)."""
        self._entries.clear()
        self._prefetched.clear()
        self.held = dict.fromkeys(TIERS, 0)

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor held (stored diffs, their scales, prefetched copies)."""
        found = [t for e in self._entries.values() for t in (e.data, e.scale) if t is not None]
        return found + list(self._prefetched.values())

    def usage(self) -> dict[str, dict[str, object]]:
        return {tier: {"device": str(self.devices[tier]), "bytes": self.held[tier], "peak_bytes": self.peak[tier]}
                for tier in TIERS}
