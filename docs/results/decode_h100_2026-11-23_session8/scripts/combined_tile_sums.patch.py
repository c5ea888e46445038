# The kernels/decode_triton.py edit measured in run9 (applied with `python combined_tile_sums.patch.py` from the repo
# root at d5b2ebe, then its _cmp_scores docstring re-wrapped to 120 columns); kept as a record, not part of the package.
src = open("kernels/decode_triton.py").read()
def rep(a, c):
    global src
    assert a in src, a[:80]
    src = src.replace(a, c, 1)
rep('''        # the selection scores need these probabilities once the global max is known: per head, summed into the
        # tile's selection blocks relative to m_new (kept as the tile's max); 1/S of the logits' bytes
        p3 = tl.reshape(p, [BG, TB, S])
        tile = i0 // BN
        j = tile * TB + tl.arange(0, TB)
        sel = rows[:, None] * NSP + j[None, :]
        gm = (g < G)[:, None] & (j < NSP)[None, :]
        tl.store(own_ptr + sel, tl.sum(p3 * w_own[None, None, :], 2), mask=gm)
        tl.store(spill_ptr + sel, tl.sum(p3 * w_spill[None, None, :], 2), mask=gm)
        tl.store(mt_ptr + rows * NT + tile, m_new, mask=g < G)''', '''        # the selection scores need these probabilities once the global max is known: per head, summed into the
        # tile's selection blocks relative to m_new (kept as the tile's max); 1/S of the logits' bytes. Block k
        # takes its own tokens' share and block k - 1's spill: inside the tile both are relative to the same max,
        # so they are added here, and only the last block's spill (into the next tile's first) is kept apart
        # (storing own and spill separately cost 1.7 us of the 60 at 64k x 8: these stores are pure bytes)
        p3 = tl.reshape(p, [BG, TB, S])
        tile = i0 // BN
        kk = tl.arange(0, TB)
        j = tile * TB + kk
        spill = tl.sum(p3 * w_spill[None, None, :], 2)
        nxt = (kk[:, None] + 1 == kk[None, :]).to(tl.float32)  # [TB, TB]: block k - 1's spill -> block k
        comb = tl.sum(p3 * w_own[None, None, :], 2) + tl.sum(spill[:, :, None] * nxt[None, :, :], 1)
        gm = (g < G)[:, None] & (j < NSP)[None, :]
        tl.store(own_ptr + rows[:, None] * NSP + j[None, :], comb, mask=gm)
        tl.store(spill_ptr + rows * NT + tile, tl.sum(tl.where(kk[None, :] == TB - 1, spill, 0.0), 1), mask=g < G)
        tl.store(mt_ptr + rows * NT + tile, m_new, mask=g < G)''')
rep('''    """Block scores (eq. 10) of ``BJ`` blocks: each head's tile sums rescaled by exp2(tile max - global lse),
    summed over the group; block j takes its own tokens' share and the spill of block j - 1's (kept by j - 1's
    tile). (Measured''', '''    """Block scores (eq. 10) of ``BJ`` blocks: each head's tile sums rescaled by exp2(tile max - global lse),
    summed over the group; the first block of a tile also takes the previous tile's last spill (the other blocks'
    spills are already in their tile sums). (Measured''')
i0 = src.index("    sc = tl.zeros([BJ], tl.float32)\n    for back in tl.static_range(2):")
i1 = src.index("    tl.store(sc_ptr + bh * NSMAX + j, sc, mask=j < NSMAX)")
src = src[:i0] + '''    tile = j // TB
    vis = gm & (tile * BN < nc)[None, :]  # tiles past nc were never written
    mt = tl.load(mt_ptr + rows * NT + tile[None, :], mask=vis, other=0.0)
    x = tl.load(own_ptr + rows * NSP + j[None, :], mask=vis, other=0.0)
    sc = tl.sum(x * tl.where(vis, tl.exp2(mt - lse[:, None]), 0.0), 0)
    prev = tile - 1  # a tile's first block: the spill of the previous tile's last block, relative to that tile's max
    vis = gm & ((j % TB == 0) & (prev >= 0) & (prev * BN < nc))[None, :]
    mt = tl.load(mt_ptr + rows * NT + prev[None, :], mask=vis, other=0.0)
    x = tl.load(spill_ptr + rows * NT + prev[None, :], mask=vis, other=0.0)
    sc += tl.sum(x * tl.where(vis, tl.exp2(mt - lse[:, None]), 0.0), 0)
''' + src[i1:]
rep('''    own = torch.empty(bsz * hkv, G, nsp, **f32)  # per-head partial block scores, relative to the tile's max
    spill = torch.empty_like(own)
    mt = torch.empty(bsz * hkv, G, nt, **f32)''', '''    own = torch.empty(bsz * hkv, G, nsp, **f32)  # per-head partial block scores, relative to the tile's max
    spill = torch.empty(bsz * hkv, G, nt, **f32)  # each tile's last block's spill into the next tile
    mt = torch.empty_like(spill)''')
open("kernels/decode_triton.py", "w").write(src)
