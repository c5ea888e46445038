"""A second CUDA stream for the NSA core, so a bandwidth-bound branch runs beside a compute-bound one.

The selected branch streams ~137 GB of K/V blocks through L2 per pass at 64k (it is bound by that, not by the
tensor cores), while the compressed and window kernels are bound by their matrix products. On one stream they take
turns; on two, their thread blocks share the SMs (profile in docs/benchmarks.md, twelfth session).

Memory safety with PyTorch's caching allocator rests on two rules the core keeps: every block of side-stream work
starts by waiting for all main-stream work queued before it (``side()``), and the main stream waits for the side
stream (``join()``) before the core returns, so no tensor is freed on one stream while the other may still use it.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch

# False runs every branch on the caller's stream (same results: the branches write disjoint buffers, and the one
# they share, dq, is ordered by an event); benchmarks flip it to measure the overlap
OVERLAP = True

_STREAMS: dict = {}


class Streams:
    """The caller's stream and a side stream of its device, or neither (CPU tensors, or ``OVERLAP`` off): then
    every method is a no-op and the work stays on the caller's stream in program order."""

    def __init__(self, like: torch.Tensor):
        self.on = OVERLAP and like.is_cuda
        if self.on:
            self.main = torch.cuda.current_stream(like.device)
            key = (like.device, self.main)
            if key not in _STREAMS:
                _STREAMS[key] = torch.cuda.Stream(like.device)
            self.other = _STREAMS[key]

    @contextlib.contextmanager
    def side(self):
        """Queue the body on the side stream, after everything already queued on the main one."""
        if not self.on:
            yield
            return
        self.other.wait_stream(self.main)
        with torch.cuda.stream(self.other):
            yield

    def mark(self) -> Optional[torch.cuda.Event]:
        """An event at the side stream's current end (call inside ``side()``), for ``wait``."""
        return self.other.record_event() if self.on else None

    def wait(self, event: Optional[torch.cuda.Event]) -> None:
        """The main stream waits for ``event`` (from ``mark``)."""
        if self.on:
            self.main.wait_event(event)

    def join(self) -> None:
        """The main stream waits for all side-stream work queued so far."""
        if self.on:
            self.main.wait_stream(self.other)
