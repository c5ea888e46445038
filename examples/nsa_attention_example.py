"""Run NSA on random inputs with the reference and, on a GPU, the Triton backend, and compare them.

    python examples/nsa_attention_example.py            # CPU: reference backend, T=1024
    python examples/nsa_attention_example.py --t 16384  # on a GPU: reference vs triton, bf16
"""
import argparse
import time

import torch

from nsa_parallel import Compression, NSAConfig, nsa_attention


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--t", type=int, default=1024)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    args = p.parse_args()
    cuda = torch.cuda.is_available()
    dev, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    cfg = NSAConfig()
    b, t, hq, hkv, d = 1, args.t, args.heads, args.kv_heads, args.head_dim
    q = torch.randn(b, t, hq, d, device=dev, dtype=dtype, requires_grad=True)
    kv = [torch.randn(b, t, hkv, d, device=dev, dtype=dtype, requires_grad=True) for _ in range(6)]
    gate = torch.rand(b, t, hq, 3, device=dev, dtype=dtype)
    phi_k = Compression(hkv, d, cfg.compress_block, cfg.compress_stride, device=dev, dtype=dtype)
    phi_v = Compression(hkv, d, cfg.compress_block, cfg.compress_stride, device=dev, dtype=dtype)
    outs = {}
    for backend in ["reference"] + (["triton"] if cuda else []):
        t0 = time.perf_counter()
        o, idx = nsa_attention(q, *kv, gate, compress_k=phi_k, compress_v=phi_v, config=cfg, backend=backend,
                               return_block_indices=True)
        o.float().square().mean().backward()
        if cuda:
            torch.cuda.synchronize()
        outs[backend] = o.detach().float()
        print(f"{backend:9s}: out {tuple(o.shape)}, {idx.shape[-1]} blocks per query, "
              f"fwd+bwd {1e3 * (time.perf_counter() - t0):.1f} ms (first call, includes compilation)")
    if len(outs) == 2:
        err = (outs["triton"] - outs["reference"]).norm() / outs["reference"].norm()
        print(f"relative difference triton vs reference (bf16): {err:.2e}")


if __name__ == "__main__":
    main()
