"""Brute-force NSA written independently of kernels/reference.py: explicit loops over queries, heads and blocks.

Slow by design (Python loops); only for tiny shapes in tests.
"""
from __future__ import annotations

import math

import torch


def compress(x, phi, cfg):
    """x [b, t, h, d] -> [b, tc, h, d], one explicit block and head at a time."""
    b, t, h, d = x.shape
    out = []
    i = 0
    while i * cfg.compress_stride + cfg.compress_block <= t:
        s = i * cfg.compress_stride
        heads = []
        for hh in range(h):
            blk = x[:, s:s + cfg.compress_block, hh, :] + phi.pos_emb[hh]           # [b, l, d]
            hid = blk.reshape(b, -1) @ phi.w1[hh] + phi.b1[hh]
            heads.append(torch.nn.functional.silu(hid) @ phi.w2[hh] + phi.b2[hh])  # [b, d]
        out.append(torch.stack(heads, 1))
        i += 1
    if not out:
        return x.new_zeros(b, 0, h, d)
    return torch.stack(out, 1)


def attend(q_vec, keys, values, scale):
    """q_vec [dk]; keys [n, dk]; values [n, dv] -> (o [dv], probs [n]); empty key set gives zeros."""
    if keys.shape[0] == 0:
        return values.new_zeros(values.shape[-1]), keys.new_zeros(0)
    p = torch.softmax((keys @ q_vec) * scale, dim=0)
    return p @ values, p


def token_overlap(a0, a1, b0, b1):
    return max(0, min(a1, b1) - max(a0, b0))


def nsa(q, kc, vc, k_slc, v_slc, k_swa, v_swa, gate, cfg, scale=None):
    """Whole NSA for a fixed-length batch. kc/vc already compressed. Returns (o, per-branch outs, indices)."""
    b, t, hq, dk = q.shape
    hkv = k_slc.shape[2]
    g = hq // hkv
    scale = scale or 1.0 / math.sqrt(dk)
    dv = v_slc.shape[-1]
    tc = kc.shape[1]
    ns = -(-t // cfg.select_block)
    o_cmp = q.new_zeros(b, t, hq, dv)
    o_slc = q.new_zeros(b, t, hq, dv)
    o_swa = q.new_zeros(b, t, hq, dv)
    indices = torch.full((b, t, hkv, cfg.select_topn), -1, dtype=torch.int32)
    for bi in range(b):
        for ti in range(t):
            visible = [i for i in range(tc) if i * cfg.compress_stride + cfg.compress_block - 1 <= ti]
            for kh in range(hkv):
                score = [0.0] * ns
                for hh in range(kh * g, (kh + 1) * g):
                    o, p = attend(q[bi, ti, hh], kc[bi, visible, kh], vc[bi, visible, kh], scale)
                    o_cmp[bi, ti, hh] = o
                    for pi, i in enumerate(visible):
                        c0 = i * cfg.compress_stride
                        for j in range(ns):
                            w = token_overlap(c0, c0 + cfg.compress_block, j * cfg.select_block,
                                              (j + 1) * cfg.select_block) / cfg.compress_stride
                            score[j] += w * float(p[pi])
                own = ti // cfg.select_block
                candidates = list(range(own + 1))
                forced = sorted({j for j in candidates
                                 if j < cfg.select_initial or j > own - cfg.select_local})
                rest = sorted((j for j in candidates if j not in forced), key=lambda j: (-score[j], j))
                chosen = sorted(forced + rest[:cfg.select_topn - len(forced)])
                indices[bi, ti, kh, :len(chosen)] = torch.tensor(chosen, dtype=torch.int32)
                slc_tokens = [s for j in chosen for s in range(j * cfg.select_block, (j + 1) * cfg.select_block)
                              if s <= ti]
                swa_tokens = list(range(max(0, ti - cfg.window + 1), ti + 1))
                for hh in range(kh * g, (kh + 1) * g):
                    o_slc[bi, ti, hh] = attend(q[bi, ti, hh], k_slc[bi, slc_tokens, kh], v_slc[bi, slc_tokens, kh],
                                               scale)[0]
                    o_swa[bi, ti, hh] = attend(q[bi, ti, hh], k_swa[bi, swa_tokens, kh], v_swa[bi, swa_tokens, kh],
                                               scale)[0]
    o = gate[..., 0:1] * o_cmp + gate[..., 1:2] * o_slc + gate[..., 2:3] * o_swa
    return o, (o_cmp, o_slc, o_swa), indices
