"""The NSA core on one sequence as a fixed-length batch and as a packed one (``cu_seqlens = [0, T]``), A/B on one GPU.

    python -P benchmarks/packed_ab.py --t 65536 --heads 64 --kv-heads 8 --out packed_ab.json

The same inputs and the same work both ways; a packed batch whose longest sequence's selected-branch buffers
(``select.SEL_FWD_BUFFER_BYTES``, ``SEL_DS_BUFFER_BYTES``) do not fit goes in chunks of local positions as the
fixed-length batch goes in row chunks, so the two should time alike (before the twenty-sixth session such a
packed batch fell back to the union walk at G < 16). Checks that output and gradients agree, then times forward
and forward+backward (``nsa_parallel.bench.bench``) alternating in each round. ``--budget BYTES`` sets both
budgets (small ones force chunks at small T, e.g. on the CPU interpreter: ``TRITON_INTERPRET=1 python -P
benchmarks/packed_ab.py --t 256 --heads 8 --kv-heads 2 --d 16 --budget 65536 --rounds 0``). JSON lines to stdout
and ``--out``.
"""
from __future__ import annotations

import argparse

import torch


def main() -> None:
    from nsa_parallel.bench import ab_check, bench, core_inputs, emit
    from nsa_parallel.kernels import NSAConfig, nsa_attention
    from nsa_parallel.kernels import select
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--t", type=int, default=65536)
    p.add_argument("--heads", type=int, default=64)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--d", type=int, default=128, help="head dim of queries, keys and values")
    p.add_argument("--rounds", type=int, default=2, help="timed rounds (0: the check only)")
    p.add_argument("--budget", type=int, default=None, help="bytes for both selected-branch buffers")
    p.add_argument("--out", default="packed_ab.json")
    p.add_argument("--kernels", action="store_true", help="also each way's forward kernels (profiler, 3 calls)")
    args = p.parse_args()
    if args.budget is not None:
        select.SEL_FWD_BUFFER_BYTES = select.SEL_DS_BUFFER_BYTES = args.budget
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    cfg = NSAConfig()
    torch.manual_seed(0)
    q, kvs, gate, ck, cv = core_inputs(args.t, args.heads, args.kv_heads, args.d, args.d, cfg, dev, dtype)
    leaves = [q, *kvs, gate, *ck.parameters(), *cv.parameters()]
    cu = torch.tensor([0, args.t], dtype=torch.int32, device=dev)
    packed = [False]
    core = lambda: nsa_attention(q, *kvs, gate, compress_k=ck, compress_v=cv, config=cfg,  # noqa: E731
                                 cu_seqlens=cu if packed[0] else None, backend="triton")
    do = torch.randn(1, args.t, args.heads, args.d, device=dev, dtype=dtype)

    def switch(second: bool) -> None:
        packed[0] = second

    rows = []
    emit(rows, args.out, check=f"core output and gradients, packed [0, {args.t}] vs fixed-length",
         max_rel_err=ab_check(core, leaves, do, switch))
    for r in range(args.rounds):
        for way in (False, True):
            switch(way)
            fwd, fwdbwd = bench(core, lambda o: do, leaves)
            emit(rows, args.out, round=r, packed=way, heads=f"{args.heads}/{args.kv_heads}", fwd_ms=fwd,
                 fwdbwd_ms=fwdbwd)
    if args.kernels:
        from nsa_parallel.bench import kernel_times
        for way in (False, True):
            switch(way)
            with torch.no_grad():
                emit(rows, args.out, packed=way, forward_kernels_us=kernel_times(core, 3))


if __name__ == "__main__":
    main()
