"""The benchmark's comparison with earlier runs (pure Python: the timing itself needs a GPU)."""
import json

import pytest

from nsa_parallel.bench import compare, main


def _row(t, fwd, fwdbwd, hq=64, hkv=4, dk=128, dv=128):
    return dict(T=t, hq=hq, hkv=hkv, dk=dk, dv=dv, nsa_fwd_ms=fwd, nsa_fwdbwd_ms=fwdbwd)


def test_compare_takes_the_last_baseline_row_of_the_same_shape():
    res = dict(rows=[_row(65536, 33.0, 99.0), _row(65536, 66.0, 230.0, dk=192), _row(8192, 3.0, 12.0)])
    old = [("a.json", dict(rows=[_row(65536, 30.0, 100.0), _row(65536, 60.0, 200.0, dk=192)])),
           ("b.json", dict(rows=[_row(65536, 32.0, 100.0), _row(65536, 1.0, 1.0, hkv=8)]))]
    text, worst = compare(res, old)
    lines = text.splitlines()
    assert "33 (32) | 1.031 | 99 (100) | 0.990 | b.json" in lines[2]  # b.json is later: its row wins
    assert "66 (60) | 1.100 | 230 (200) | 1.150 | a.json" in lines[3]
    assert "no baseline row" in lines[4]
    assert worst == pytest.approx(1.15)


def test_compare_without_any_match_has_no_ratio():
    text, worst = compare(dict(rows=[_row(1024, 1.0, 2.0)]), [("a.json", dict(rows=[]))])
    assert worst is None and "no baseline row" in text


@pytest.mark.parametrize("argv,message", [
    (["--max-slowdown", "0.03"], "--max-slowdown 0.03: needs --compare"),
    (["--compare", "missing.json"], "--compare missing.json:"),
])
def test_bench_arguments_fail_before_timing(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_bench_negative_slowdown_is_refused(capsys, tmp_path):
    base = tmp_path / "base.json"
    base.write_text(json.dumps(dict(rows=[])))
    with pytest.raises(SystemExit):
        main(["--compare", str(base), "--max-slowdown", "-1"])
    assert "a fraction >= 0" in capsys.readouterr().err


def test_head_dims_and_kernel_settings_are_read_or_named():
    from nsa_parallel.bench import head_dims, kernel_setting
    from nsa_parallel.kernels import topn
    assert head_dims("192/128") == (192, 128)
    with pytest.raises(ValueError):
        head_dims("192")
    assert kernel_setting("topn.TOPN_PREFILTER") == (topn, "TOPN_PREFILTER")
    with pytest.raises(ValueError, match="nsa_parallel.kernels.topn has no setting NOPE"):
        kernel_setting("topn.NOPE")
    with pytest.raises(ValueError, match="no module nsa_parallel.kernels.nomodule"):
        kernel_setting("nomodule.X")


def test_ab_block_flips_counts_changed_block_entries():
    """The A/B scripts' block-flip count: none for a switch that leaves the selection alone, the changed entries
    and rows for one that moves it."""
    import torch
    from conftest import SMALL, make_inputs
    from nsa_parallel.bench import ab_block_flips
    from nsa_parallel.kernels import nsa_attention
    q, kvs, gate, ck, cv = make_inputs(1, 200, 4, 2, 8, 8, SMALL, seed=3)  # 13 blocks, 1 free pick
    sign = [1.0]

    def indices():
        return nsa_attention(q * sign[0], *kvs, gate, compress_k=ck, compress_v=cv, config=SMALL,
                             return_block_indices=True)[1]
    same = ab_block_flips(indices, lambda on: None)
    assert same == dict(block_entries_differ=0, block_rows_differ=0, block_entries=200 * 2 * SMALL.select_topn)
    moved = ab_block_flips(indices, lambda on: sign.__setitem__(0, -1.0 if on else 1.0))
    want = (indices() != (sign.__setitem__(0, 1.0) or indices()))
    assert moved["block_entries_differ"] == int(want.sum()) > 0
    assert moved["block_rows_differ"] == int(want.any(-1).sum())
