"""Let megatron.core run NSA models on CPU-only machines (tests, the CPU main job).

megatron.core assumes CUDA in a few places that matter on CPU; each shim below replaces one of them and is
installed only when CUDA is absent (or when a process asks to run on the CPU), so GPU runs see no change. Call
:func:`enable_cpu_shims` once before building the model; it is idempotent and returns the names of the shims it
installed.
"""
from __future__ import annotations

import contextlib
import types
from typing import List

import torch

_INSTALLED: List[str] = []


def _rope_get_emb_on_cpu():
    """``RotaryEmbedding.get_emb`` moves its inverse frequencies to ``torch.cuda.current_device()`` on first use;
    on a CPU-only machine keep them on the CPU and build the same ``[s, 1, 1, dim]`` table there."""
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    original = RotaryEmbedding.get_emb

    def get_emb(self, max_seq_len: int, offset: int = 0):
        if self.inv_freq.device.type != "cpu":
            return original(self, max_seq_len, offset)
        freqs = self.get_freqs_non_repeated(max_seq_len, offset)  # [s, dim/2]
        if self.rotary_interleaved:
            emb = torch.repeat_interleave(freqs, 2, dim=-1)
        else:
            emb = torch.cat((freqs, freqs), dim=-1)
        return emb[:, None, None, :]

    RotaryEmbedding.get_emb = get_emb


def _rope_cp_slice_on_cpu():
    """Megatron slices the RoPE table for this CP rank with an index tensor built in pinned memory and moved to
    CUDA; on a CPU-only machine take the same load-balanced slice (chunks r and 2P-1-r) with our layout helper."""
    from megatron.core.models.common.embeddings import rotary_pos_embedding

    from ..context_parallel.layout import split_for_rank
    original = rotary_pos_embedding.get_pos_emb_on_this_cp_rank

    def get_pos_emb_on_this_cp_rank(pos_emb, seq_dim, cp_group):
        if pos_emb.device.type != "cpu":
            return original(pos_emb, seq_dim, cp_group)
        return split_for_rank(pos_emb, cp_group.size(), cp_group.rank(), "load_balanced", dim=seq_dim)

    rotary_pos_embedding.get_pos_emb_on_this_cp_rank = get_pos_emb_on_this_cp_rank


def _current_device_is_cpu():
    """Sequence parallelism's gather/scatter outputs and Megatron's global memory buffer are allocated on
    ``torch.cuda.current_device()``; without CUDA that call can only raise, so answer with the CPU instead."""
    torch.cuda.current_device = lambda: torch.device("cpu")


def _cuda_synchronize_is_a_no_op():
    """dist_checkpointing's writers call ``torch.cuda.synchronize()`` before copying tensors out; with no device
    there is nothing to wait for."""
    torch.cuda.synchronize = lambda *args, **kwargs: None


class _NoCudaStream:
    """What ``torch.cuda.current_stream()`` answers without CUDA. A CPU run records no CUDA events, so nothing
    should ask it to wait; a caller that does has met a case these shims do not cover, and hears so."""

    def wait_event(self, event):
        raise RuntimeError(f"cpu_shims: asked to wait on a CUDA event ({event!r}) in a CPU-only run")

    def wait_stream(self, stream):
        raise RuntimeError(f"cpu_shims: asked to wait on a CUDA stream ({stream!r}) in a CPU-only run")


def _current_stream_without_cuda():
    """megatron-core 0.19's gradient sync (``_ParamAndGradBucketGroup.start_grad_sync``) takes
    ``torch.cuda.current_stream()`` to wait for CUDA-graph events before reducing a bucket, also when every
    parameter is on the CPU; without CUDA that call raises. Parameters on the CPU carry no such events, so the
    stream is never asked to wait."""
    torch.cuda.current_stream = lambda device=None: _NoCudaStream()


def _tensor_cuda_stays_on_cpu():
    """With pipeline parallelism and tied embeddings, ``LanguageModule.setup_embeddings_and_output_layer`` moves
    the shared weight with ``weight.data.cuda()`` before all-reducing it; without CUDA keep it where it is."""
    torch.Tensor.cuda = lambda self, *args, **kwargs: self


class _TorchWithCudaZerosOnCPU(types.ModuleType):
    """``torch`` as seen by one megatron module, except that ``torch.zeros(..., device="cuda")`` lands on the CPU."""

    def __init__(self) -> None:
        super().__init__("torch")

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def zeros(*args, **kwargs):
        if kwargs.get("device") == "cuda":
            kwargs["device"] = "cpu"
        return torch.zeros(*args, **kwargs)


def _schedules_token_counter_on_cpu():
    """Megatron's forward-backward schedules count tokens in ``torch.zeros([], device="cuda")``; give the
    schedules module a ``torch`` whose ``zeros`` puts that counter on the CPU (nothing else changes)."""
    from megatron.core.pipeline_parallel import schedules
    schedules.torch = _TorchWithCudaZerosOnCPU()


def _rng_tracker_on_cpu():
    """Megatron forks a named RNG stream for tensor-parallel regions (``get_cuda_rng_tracker().fork()``, e.g. in
    the embedding's dropout) and saves CUDA RNG states for activation recomputation. Keep the named streams as CPU
    generator states instead; :func:`seed_cpu_rng_tracker` adds them as ``model_parallel_cuda_manual_seed`` would."""
    from megatron.core.tensor_parallel import random as mrandom

    class CPURNGStatesTracker(mrandom.CudaRNGStatesTracker):
        def add(self, name, seed):
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            orig = torch.get_rng_state()
            torch.manual_seed(seed)
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(orig)

        @contextlib.contextmanager
        def fork(self, name=mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME):
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            orig = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(orig)

    mrandom._CUDA_RNG_STATE_TRACKER = CPURNGStatesTracker()
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    # recomputation saves and restores "CUDA" states next to the CPU one: there are none
    mrandom._get_cuda_rng_state = lambda *args, **kwargs: torch.empty(0, dtype=torch.uint8)
    mrandom._set_cuda_rng_state = lambda *args, **kwargs: None


def seed_cpu_rng_tracker(seed: int, tp_rank: int) -> None:
    """The CPU counterpart of ``model_parallel_cuda_manual_seed``: same stream names, same seed offsets."""
    from megatron.core.tensor_parallel import random as mrandom
    tracker = mrandom.get_cuda_rng_tracker()
    tracker.reset()
    tracker.add(mrandom._DATA_PARALLEL_RNG_TRACKER_NAME, seed)
    tracker.add(mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME, seed + 2718 + tp_rank)
    tracker.add(mrandom._EXPERT_PARALLEL_RNG_TRACKER_NAME, seed + 1024)


def enable_cpu_shims(force: bool = False) -> List[str]:
    """Install the shims when torch sees no CUDA device, or with ``force=True`` for a process that runs megatron
    on the CPU on a GPU host (``--device cpu``, CPU tests there): CUDA is then out of reach for that process."""
    if torch.cuda.is_available() and not force:
        return []
    if not _INSTALLED:
        _rope_get_emb_on_cpu()
        _INSTALLED.append("RotaryEmbedding.get_emb")
        _rope_cp_slice_on_cpu()
        _INSTALLED.append("rotary_pos_embedding.get_pos_emb_on_this_cp_rank")
        _current_device_is_cpu()
        _INSTALLED.append("torch.cuda.current_device")
        _schedules_token_counter_on_cpu()
        _INSTALLED.append("schedules.torch.zeros")
        _tensor_cuda_stays_on_cpu()
        _INSTALLED.append("torch.Tensor.cuda")
        _cuda_synchronize_is_a_no_op()
        _INSTALLED.append("torch.cuda.synchronize")
        _current_stream_without_cuda()
        _INSTALLED.append("torch.cuda.current_stream")
        _rng_tracker_on_cpu()
        _INSTALLED.append("tensor_parallel.random (CPU RNG tracker)")
    return list(_INSTALLED)
