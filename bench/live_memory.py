"""The peak of live tensor bytes on the CPU: what ``torch.cuda.max_memory_allocated`` says on a GPU.

No allocator statistics exist for the CPU, so this counts storages: every tensor an operator
returns is followed (through PyTorch's dispatcher, ``TorchDispatchMode``) from its creation until
its storage is freed, and the running sum's maximum is the peak. Views share their storage and
count once. Storages made before the ``with`` block are not counted when an operator merely views
them: pass the model (its parameters and buffers) as ``existing``.

    with PeakLiveBytes(existing=model) as peak:
        model.generate(...)
    print(peak.peak)
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class PeakLiveBytes(TorchDispatchMode):
    """Live bytes of the tensor storages created inside the block, and their peak (``peak``)."""

    def __init__(self, existing: torch.nn.Module | None = None, device: str = "cpu") -> None:
        super().__init__()
        self.device = device
        self.live = 0
        self.peak = 0
        self._tracked: set[int] = set()
        tensors = [*existing.parameters(), *existing.buffers()] if existing is not None else []
        self._existing = {tensor.untyped_storage()._cdata for tensor in tensors}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor) and tensor.device.type == self.device:
                self._track(tensor.untyped_storage())
        return out

    def _track(self, storage: torch.UntypedStorage) -> None:
        key = storage._cdata
        if key in self._tracked or key in self._existing:
            return
        size = storage.nbytes()
        self._tracked.add(key)
        self.live += size
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._freed, key, size)

    def _freed(self, key: int, size: int) -> None:
        self._tracked.discard(key)
        self.live -= size
