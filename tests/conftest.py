import os
import sys

import torch

# Triton kernels run through the interpreter where there is no GPU; it must be set before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
else:
    # The fp32 tests bound errors for exact fp32 products (as the interpreter computes them); compiled for a GPU,
    # Triton's fp32 dots default to TF32 (~1e-3 relative), which fails those bounds and flips near-tied blocks.
    # Full fp32 products let the same tests check the compiled kernels' logic (masks, offsets, odd shapes) there;
    # the gpu-marked tests check the bf16 path users train with.
    os.environ.setdefault("TRITON_F32_DEFAULT", "ieee")

import pytest  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))

from nsa_parallel.distributed import all_done, leave_spawned_rank  # noqa: E402
from nsa_parallel.kernels import Compression, NSAConfig  # noqa: E402


def make_inputs(b, t, hq, hkv, dk, dv, cfg, dtype=torch.float32, seed=0, requires_grad=False, device="cpu"):
    """Random NSA inputs: (q, [k_cmp, v_cmp, k_slc, v_slc, k_swa, v_swa], gate, compress_k, compress_v)."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype).to(device).requires_grad_(
            requires_grad)

    q = rnd(b, t, hq, dk)
    kvs = [rnd(b, t, hkv, d) for d in (dk, dv, dk, dv, dk, dv)]
    gate = torch.rand(b, t, hq, 3, generator=gen, dtype=torch.float64).to(dtype).to(device).requires_grad_(
        requires_grad)
    torch.manual_seed(seed)
    ck = Compression(hkv, dk, cfg.compress_block, cfg.compress_stride, dtype=dtype, device=device)
    cv = Compression(hkv, dv, cfg.compress_block, cfg.compress_stride, dtype=dtype, device=device)
    return q, kvs, gate, ck, cv


def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


# Small blocks so that short test sequences still have many compressed and selection blocks.
SMALL = NSAConfig(compress_block=8, compress_stride=4, select_block=16, select_topn=4, window=24)


@pytest.fixture
def small_cfg():
    return SMALL


def recording_model(seen: dict):
    """A stand-in model for ``forward_step`` tests: it records the keyword arguments it is called with."""
    def model(*args, **kw):
        seen.update(kw)
        return torch.zeros(())
    return model


def three_documents() -> dict:
    """One sample ``[1, 6]`` of three documents ending at EOD id 9 (bounds 0, 3, 5, 6), Megatron's batch keys."""
    return {"tokens": torch.tensor([[1, 5, 9, 2, 9, 3]]), "position_ids": torch.arange(6)[None],
            "labels": torch.tensor([[5, 9, 2, 9, 3, 4]]), "loss_mask": torch.ones(1, 6)}


def gpu_tiles_on_cpu(monkeypatch):
    """Launches take the tiles a GPU takes in 16-bit (``flash.tuned_tiles``) wherever their shape fits, so the
    interpreter runs them."""
    from nsa_parallel.kernels import flash
    monkeypatch.setattr(flash, "tuned_tiles", lambda gp, dk, dv, q: flash.tuned_shape(gp, dk, dv))


HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"


def _spawned(rank, world, port, fn, args, result):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    import warnings
    warnings.filterwarnings("ignore")
    try:
        result[rank] = fn(*args)
        all_done()
    except BaseException as e:  # noqa: BLE001 - report it to the parent
        result[rank] = repr(e)
        raise
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    leave_spawned_rank()


def spawn_ranks(world: int, fn, *args) -> list:
    """``[fn(*args) on rank r for r in range(world)]``, each rank a spawned process with torchrun's variables set
    (``fn`` must be importable: a module-level function)."""
    import torch.multiprocessing as mp

    from nsa_parallel.distributed import free_port
    result = mp.Manager().dict()
    mp.spawn(_spawned, args=(world, free_port(), fn, args, result), nprocs=world, join=True)
    return [result[r] for r in range(world)]
