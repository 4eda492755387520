"""The few collectives the project needs, through torch.distributed when it is initialised with more
than one rank (Ray Train initialises it: gloo on CPU, NCCL on GPU), else the identity."""

from __future__ import annotations

import numpy as np
import torch


class Collective:
    """The few collectives the modes need; the identity with one rank or no process group."""

    def __init__(self) -> None:
        import torch.distributed as dist

        self._dist = dist if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1 else None
        self.rank = self._dist.get_rank() if self._dist else 0
        self.world_size = self._dist.get_world_size() if self._dist else 1
        backend = self._dist.get_backend() if self._dist else "gloo"
        self._device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")

    def sum(self, values: np.ndarray) -> np.ndarray:
        """float64 element-wise sum over ranks."""
        values = np.asarray(values, dtype=np.float64)
        if self._dist is None:
            return values.copy()
        tensor = torch.from_numpy(values.copy()).to(self._device)
        self._dist.all_reduce(tensor)
        return tensor.cpu().numpy()

    def all_true(self, flag: bool) -> bool:
        return bool(self.sum(np.array([0.0 if flag else 1.0]))[0] == 0)

    def broadcast(self, value, src: int = 0):
        if self._dist is None:
            return value
        holder = [value]
        self._dist.broadcast_object_list(holder, src=src, device=self._device)
        return holder[0]

    def gather_all(self, value) -> list:
        if self._dist is None:
            return [value]
        out = [None] * self.world_size
        self._dist.all_gather_object(out, value)
        return out


@torch.no_grad()
def weight_spread(module: torch.nn.Module, collective: Collective) -> float:
    """The largest difference between any rank and rank 0 in any parameter tensor's sum: 0 while
    DDP keeps the ranks' weights equal (a rank resumed with another's optimizer state, or a
    differently seeded layer, makes it grow)."""
    sums = np.array([float(p.detach().double().sum()) for p in module.parameters()])
    gathered = np.stack(collective.gather_all(sums))
    return float(np.abs(gathered - gathered[0]).max())
