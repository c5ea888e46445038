"""The scaling tool at toy sizes on CPU: every point measured, the derived columns right, the files written, the
dense CP baseline equal to one-device dense attention, bad options named."""
import csv
import json
import math

import pytest
import torch

from nsa_parallel import scaling
from nsa_parallel.distributed import all_done, leave_spawned_rank

TOY = ["--device", "cpu", "--heads", "4", "--kv-heads", "2", "--head-dim", "16", "--nsa-window", "32",
       "--nsa-select-block", "16", "--nsa-select-topn", "4", "--nsa-compress-block", "16", "--nsa-compress-stride",
       "8", "--iters", "1"]


def test_sweep_writes_table_plots_and_tensorboard(tmp_path):
    pytest.importorskip("matplotlib")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    study = scaling.main(TOY + ["--seqlens", "128", "256", "--cp-sizes", "1", "2", "--out", str(tmp_path)])
    rows = study["rows"]
    assert {(r["attention"], r["P"], r["T"]) for r in rows} == {
        (a, p, t) for a in ("nsa", "dense") for p in (1, 2) for t in (128, 256)}
    for r in rows:
        assert "error" not in r, r
        assert 0 < r["fwd_ms"] and 0 < r["fwdbwd_ms"] and r["peak_mem_gib"] > 0
        assert r["tokens_per_s"] == pytest.approx(r["T"] / (r["fwdbwd_ms"] / 1e3))
    with open(tmp_path / "scaling.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(rows)
    assert json.loads((tmp_path / "scaling.json").read_text())["rows"] == rows
    for name in ("time_vs_length", "memory_vs_length", "speedup_vs_dense", "cp_efficiency"):
        assert (tmp_path / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
    ea = EventAccumulator(str(tmp_path / "tensorboard"))
    ea.Reload()
    times = ea.Scalars("scaling/nsa/cp2/fwdbwd_ms")
    assert [e.step for e in times] == [128, 256]
    want = {r["T"]: r["fwdbwd_ms"] for r in rows if r["attention"] == "nsa" and r["P"] == 2}
    assert all(math.isclose(e.value, want[e.step], rel_tol=1e-6) for e in times)
    assert len(ea.Scalars("scaling/nsa/cp2/cp_efficiency")) == 2


def test_derived_columns():
    rows = [dict(attention="nsa", P=1, T=8, fwdbwd_ms=10.0), dict(attention="dense", P=1, T=8, fwdbwd_ms=40.0),
            dict(attention="nsa", P=2, T=8, fwdbwd_ms=6.0), dict(attention="dense", P=2, T=8, error="OOM")]
    got = {(d["attention"], d["P"]): d for d in scaling.derived(rows)}
    assert got[("nsa", 1)]["speedup_vs_dense"] == 4.0
    assert got[("nsa", 2)]["cp_efficiency"] == pytest.approx(10 / 12)
    assert "speedup_vs_dense" not in got[("nsa", 2)]  # the dense point failed: no ratio, no made-up number


def _dense_cp_worker(rank, world, port, result):
    import os

    import torch.distributed as dist

    from nsa_parallel.context_parallel import split_for_rank
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    args = scaling.build_parser().parse_args(TOY)
    tensors, grad = scaling._inputs(64, args, torch.device("cpu"), torch.float64)
    single = scaling._dense_fn(tensors, args, None)()
    single.backward(grad.transpose(1, 2))
    out = scaling._dense_fn(tensors, args, dist.group.WORLD)()
    # the CP output is [b, h, local t, d] in load-balanced order
    want = split_for_rank(single.detach().transpose(1, 2), world, rank).transpose(1, 2)
    result[rank] = (out.detach() - want).abs().max().item() / want.abs().max().item()
    all_done()
    dist.destroy_process_group()
    leave_spawned_rank()


def test_dense_cp_baseline_equals_one_device():
    import torch.multiprocessing as mp

    from nsa_parallel.rendezvous import free_port
    result = mp.Manager().dict()
    mp.spawn(_dense_cp_worker, args=(2, free_port(), result), nprocs=2, join=True)
    assert max(result.values()) < 1e-12, dict(result)


@pytest.mark.parametrize("flags,match", [
    (["--cp-sizes", "0"], "--cp-sizes [0] must be >= 1"),
    (["--heads", "6", "--kv-heads", "4"], "--heads=6 must be a multiple of --kv-heads=4"),
    (["--nsa-compress-stride", "0"], "compress_stride=0 must be >= 1"),
])
def test_bad_options_are_named(flags, match, tmp_path):
    with pytest.raises(SystemExit, match=match.replace("[", r"\[").replace("]", r"\]")):
        scaling.main(TOY + ["--seqlens", "64", "--no-plots", "--out", str(tmp_path)] + flags)
