"""Two CUDA streams for kernels that share the SMs instead of taking turns.

A big kernel (8 warps, or two 4-warp programs, under a register cap) runs on a
high-priority side stream so that its programs take the SMs first; a small one-warp kernel bound by something else
(L2 reads, ALU) runs on the current stream and fills the registers and shared memory they leave. Without a GPU (the
Triton interpreter) everything runs in line, in the order it was issued, which is also the order of the
dependencies the events express, so the CPU tests check the same data flow.
"""
from __future__ import annotations

import torch

def capped(opts: dict, x: torch.Tensor, maxnreg) -> dict:
    """Launch options with a register cap per thread (on a GPU; the interpreter has no registers): a 64K-register
    SM holds 8 warps x 224 registers (57,344) and one-warp programs of up to 255 beside them (sm_90)."""
    return dict(opts, maxnreg=maxnreg) if maxnreg is not None and x.is_cuda else opts


class SideLane:
    """A high-priority side stream beside the current one (``main``), on a GPU; in line elsewhere.

    ``run(fn)`` calls ``fn()`` on the side stream after everything it was given before (at construction: all the
    current stream had queued, so the inputs are ready) and returns ``(result, event)``; ``wait(event)`` makes the
    current stream wait for it; ``hand_over(t)`` tells the caching allocator that a tensor made on the side stream
    is read on the current one (else its memory could go to the side stream's next allocation while still read);
    ``join()``: the current stream waits for all of the side stream's work."""

    def __init__(self, x: torch.Tensor, on: bool = True):
        self.on = on and x.is_cuda
        if self.on:
            self.main = torch.cuda.current_stream(x.device)
            self.high = torch.cuda.Stream(device=x.device, priority=-1)
            self.high.wait_stream(self.main)

    def catch_up(self):
        """The side stream waits for what the current stream has queued so far."""
        if self.on:
            self.high.wait_stream(self.main)

    def run(self, fn):
        if not self.on:
            return fn(), None
        with torch.cuda.stream(self.high):
            out = fn()
        return out, self.high.record_event()

    def wait(self, event):
        if event is not None:
            self.main.wait_event(event)

    def hand_over(self, x: torch.Tensor):
        if self.on:
            x.record_stream(self.main)

    def join(self):
        if self.on:
            self.main.wait_stream(self.high)
