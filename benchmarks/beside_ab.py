"""Kernels beside each other on two CUDA streams against one after the other, A/B on one GPU: the compressed
branch's dq beside the selected branch's dq-from-dS kernels (``select.SEL_DQ_BESIDE``, backward) and the top-n
beside the next query chunk's selection scores (``topn.TOPN_BESIDE``, forward).

    python -P benchmarks/beside_ab.py --t 65536 --rounds 3 --out beside_ab.json

Checks that both switched on give the same core output and gradients as neither (bf16, the bench's inputs), how
much of one forward and of one forward+backward's kernel time overlaps (torch.profiler: the sum of kernel times
against their union), the peak memory, the registers and shared memory of the kernels that are to share each SM
(they fit together only below 64K registers and 228 KiB), then per round times the core's forward and
forward+backward (``nsa_parallel.bench.bench``) for each variant: off; the dq beside (on), without the register
cap, with the dq kernel on 3 pipeline stages, with a 4 GiB dS budget; the top-n beside (topn), without the cap, with
a 2 GiB scores budget (two chunks at 64k instead of four); both. JSON lines to stdout and ``--out``.
"""
from __future__ import annotations

import argparse


def compiled(fn) -> list:
    """``[(name, registers, spills, shared bytes)]`` of the variants of a Triton kernel compiled so far."""
    out = []
    for cache in getattr(fn, "device_caches", {}).values():
        kernels = cache[0] if isinstance(cache, tuple) else cache
        for k in kernels.values():
            out.append((k.name, getattr(k, "n_regs", None), getattr(k, "n_spills", None), k.metadata.shared))
    return out


def overlap(step) -> dict:
    """Sum and union (ms) of the kernels of one ``step()`` (torch.profiler)."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                   if e.device_type.name == "CUDA" and e.time_range.end > e.time_range.start)
    total = sum(e - s for s, e in spans)
    union, cur_s, cur_e = 0.0, None, None
    for s, e in spans:
        if cur_e is None or s > cur_e:
            union += 0 if cur_e is None else cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    union += 0 if cur_e is None else cur_e - cur_s
    return dict(kernels_ms=round(total / 1e3, 3), union_ms=round(union / 1e3, 3))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--t", type=int, default=65536)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default="beside_ab.json")
    ap.add_argument("--variants", nargs="+",
                    default=["off", "on", "on_nocap", "on_dq3", "on_4gib", "topn", "topn_nocap", "topn_2gib", "both"])
    args = ap.parse_args()
    import torch

    from nsa_parallel.bench import ab_check, bench, core_case, emit, peak_mem
    from nsa_parallel.kernels import NSAConfig, compress, flash, select

    from nsa_parallel.kernels import topn
    defaults = dict(on=select.SEL_DQ_BESIDE, reg=select.BESIDE_MAXNREG, budget=select.SEL_DS_BUFFER_BYTES,
                    topn=topn.TOPN_BESIDE, topn_reg=topn.SCORES_MAXNREG, scores_budget=topn.SCORES_BUFFER_BYTES)
    init = select._SelLaunch.__init__
    variants = {"off": dict(on=False, topn=False), "on": dict(on=True), "on_nocap": dict(on=True, reg=None),
                "on_dq3": dict(on=True, dq_stages=3), "on_4gib": dict(on=True, budget=4 << 30),
                "topn": dict(topn=True), "topn_nocap": dict(topn=True, topn_reg=None),
                "topn_2gib": dict(topn=True, scores_budget=2 << 30), "both": dict(on=True, topn=True)}
    variants = {name: variants[name] for name in args.variants}

    def use(name) -> None:
        v = dict(defaults, **variants[name])
        select.SEL_DQ_BESIDE, select.BESIDE_MAXNREG, select.SEL_DS_BUFFER_BYTES = v["on"], v["reg"], v["budget"]
        topn.TOPN_BESIDE, topn.SCORES_MAXNREG, topn.SCORES_BUFFER_BYTES = v["topn"], v["topn_reg"], v["scores_budget"]

        def patched(self, *a, **kw):
            init(self, *a, **kw)
            if "dq_stages" in v:
                self.ds_dq = dict(self.ds_dq, num_stages=v["dq_stages"])
        select._SelLaunch.__init__ = patched

    rows = []
    q, kvs, gate, ck, cv, leaves, core, do = core_case(args.t, NSAConfig())
    emit(rows, args.out, check="core output and gradients, both beside (dq, top-n) vs neither",
         max_rel_err=ab_check(core, leaves, do, lambda on: use("both" if on else "off")))

    def step():
        return torch.autograd.grad(core(), leaves, do)

    for name in variants:
        use(name)
        try:  # diagnostics: a profiler API change must not cost the timings below
            spans = overlap(step)
            spans.update({f"fwd_{k}": x for k, x in overlap(core).items()})
        except Exception as e:  # noqa: BLE001
            spans = dict(overlap_error=repr(e))
        emit(rows, args.out, variant=name, **spans, peak_gib=peak_mem(core))
    try:
        emit(rows, args.out, compiled={"cmp_dq": compiled(flash._bwd_dq_kernel),
                                       "sel_dq_ds": compiled(select._sel_dq_ds_kernel),
                                       "scores": compiled(compress._scores_kernel),
                                       "topn": compiled(topn._topn_kernel)})
    except Exception as e:  # noqa: BLE001
        emit(rows, args.out, compiled_error=repr(e))
    for rnd in range(args.rounds):
        for name in variants:
            use(name)
            fwd, fwdbwd = bench(core, lambda o: do, leaves)
            emit(rows, args.out, round=rnd, variant=name, fwd_ms=fwd, fwdbwd_ms=fwdbwd)
    select._SelLaunch.__init__ = init
    select.SEL_DQ_BESIDE, select.BESIDE_MAXNREG, select.SEL_DS_BUFFER_BYTES = (defaults[k]
                                                                               for k in ("on", "reg", "budget"))
    topn.TOPN_BESIDE, topn.SCORES_MAXNREG, topn.SCORES_BUFFER_BYTES = (defaults[k] for k in ("topn", "topn_reg",
                                                                                            "scores_budget"))


if __name__ == "__main__":
    main()
