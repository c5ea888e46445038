"""One logger for progress: a line on stdout and, when a directory is given, TensorBoard scalars."""
from __future__ import annotations

import sys
from typing import Dict, Optional


class MetricsLogger:
    def __init__(self, tensorboard_dir: Optional[str] = None, stream=None) -> None:
        self.stream = stream or sys.stdout
        self.writer = None
        if tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(tensorboard_dir)

    def log(self, step: int, scalars: Dict[str, float], line_keys=None) -> None:
        """Write every scalar to TensorBoard; print ``line_keys`` (default: all) on one line."""
        if self.writer is not None:
            for k, v in scalars.items():
                self.writer.add_scalar(k, v, step)
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
