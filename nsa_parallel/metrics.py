"""One logger for progress: a line on stdout and, when a directory is given, TensorBoard scalars."""
from __future__ import annotations

import sys
import time
from typing import Dict, Optional

import torch


class MetricsLogger:
    def __init__(self, tensorboard_dir: Optional[str] = None, stream=None, quiet: bool = False) -> None:
        self.stream = stream or sys.stdout
        self.quiet = quiet  # ranks other than the logging one stay silent
        self.writer = None
        if tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(tensorboard_dir)

    def log(self, step: int, scalars: Dict[str, float], line_keys=None) -> None:
        """Write every scalar to TensorBoard; print ``line_keys`` (default: all) on one line."""
        if self.writer is not None:
            for k, v in scalars.items():
                self.writer.add_scalar(k, v, step)
        if self.quiet:
            return
        keys = line_keys or scalars.keys()
        fields = " | ".join(f"{k} {_fmt(scalars[k])}" for k in keys if k in scalars)
        print(f"iteration {step:6d} | {fields}", file=self.stream, flush=True)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()


def _fmt(v: float) -> str:
    if isinstance(v, int) or (abs(v) >= 100 and float(v).is_integer()):
        return f"{int(v)}"
    return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.3e}"


@torch.no_grad()
def nsa_stats(gate: torch.Tensor, block_indices: torch.Tensor, config, positions: Optional[torch.Tensor] = None,
              group=None, real: Optional[torch.Tensor] = None) -> Dict[str, float]:
    """NSA's own health numbers for one layer and batch.

    gate ``[b, t, hq, 3]`` (activated), block_indices ``[b, t, hkv, n]`` (-1 = none); ``positions`` ``[t]`` the
    tokens' positions in their sequence (default ``0 .. t-1``; a context-parallel rank passes its chunks', a
    packed batch each token's position in its own sequence); ``real`` ``[t]`` bool: the tokens to count (padding
    left out). With a process ``group`` (or a sequence of groups: tensor- and context-parallel) the numbers are
    those of the group's tokens and heads together (sums and maxima reduced over it):
    - ``gate_cmp`` / ``gate_slc`` / ``gate_swa``: mean branch weight;
    - ``select_reach``: mean distance in tokens from a query back to the start of the blocks it selected beyond
      the forced ones (0 if there are none), ``select_reach_max`` the largest;
    - ``select_forced_share``: share of the selected blocks that are forced (first + local) ones.
    """
    dev = block_indices.device
    if real is not None:
        real = real.to(dev)
        gate, block_indices = gate[:, real.to(gate.device)], block_indices[:, real]
        positions = (torch.arange(real.shape[0], device=dev) if positions is None else positions.to(dev))[real]
    b, t, hkv, n = block_indices.shape
    pos = (torch.arange(t, device=dev) if positions is None else positions.to(dev)).view(1, t, 1, 1)
    own = pos // config.select_block
    idx = block_indices.long()
    valid = idx >= 0
    forced = valid & ((idx < config.select_initial) | (idx > own - config.select_local))
    free = valid & ~forced
    reach = (pos - idx * config.select_block).double()
    g = gate.double().flatten(0, -2)  # [tokens x heads, 3]
    sums = torch.stack([*g.sum(0), torch.tensor(g.shape[0], dtype=torch.float64, device=g.device),
                        reach[free].sum().to(g.device), free.sum().double().to(g.device),
                        forced.sum().double().to(g.device), valid.sum().double().to(g.device)])
    top = (reach[free].max() if free.any() else torch.zeros((), dtype=torch.float64, device=dev)).to(g.device)
    for g in ([] if group is None else group if isinstance(group, (list, tuple)) else [group]):
        torch.distributed.all_reduce(sums, group=g)
        torch.distributed.all_reduce(top, op=torch.distributed.ReduceOp.MAX, group=g)
    gc, gs, gw, count, reach_sum, nfree, nforced, nvalid = sums.tolist()
    count = max(count, 1.0)  # a rank of padding only, alone
    return {"gate_cmp": gc / count, "gate_slc": gs / count, "gate_swa": gw / count,
            "select_reach": reach_sum / nfree if nfree else 0.0, "select_reach_max": top.item(),
            "select_forced_share": nforced / max(1.0, nvalid)}


def _now(device: torch.device) -> float:
    if device.type == "cuda":  # kernels run asynchronously: a wall clock means nothing without a sync
        torch.cuda.synchronize(device)
    return time.perf_counter()


class _Enter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, timer, *xs):
        ctx.timer = timer
        timer._t0 = _now(xs[0].device)
        return tuple(x.view_as(x) for x in xs)

    @staticmethod
    def backward(ctx, *grads):  # runs once every input's gradient exists: the region's backward has ended
        ref = next((g for g in grads if g is not None), None)
        if ref is not None:
            ctx.timer.backward_s += _now(ref.device) - ctx.timer._tb
        return (None, *grads)


class _Leave(torch.autograd.Function):
    @staticmethod
    def forward(ctx, timer, x):
        ctx.timer = timer
        timer.forward_s += _now(x.device) - timer._t0
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):  # the region's backward starts now
        ctx.timer._tb = _now(grad.device)
        return None, grad


class RegionTimer:
    """Wall time of a differentiable region, forward and backward, for the steps that ask for it.

    ``xs = timer.enter(*xs)`` before the region and ``y = timer.leave(y)`` after it; identity functions whose
    backward marks when the region's backward starts and ends. On CUDA each mark synchronises the device, so use it
    on logging steps only. ``pop()`` returns the seconds accumulated since the last pop.
    """

    def __init__(self) -> None:
        self.forward_s = self.backward_s = 0.0
        self._t0 = self._tb = 0.0

    def enter(self, *xs: torch.Tensor):
        return _Enter.apply(self, *xs)

    def leave(self, y: torch.Tensor) -> torch.Tensor:
        return _Leave.apply(self, y)

    def pop(self) -> float:
        total, self.forward_s, self.backward_s = self.forward_s + self.backward_s, 0.0, 0.0
        return total
