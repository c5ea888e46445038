"""The main job: the trainer runs, lowers the loss, writes TensorBoard scalars, and rejects bad flags by name."""
import math

import pytest
import torch

from nsa_parallel.arguments import add_nsa_args, nsa_config_from_args
from nsa_parallel.train import build_parser, train

TINY = ["--seq-length", "128", "--micro-batch-size", "4", "--hidden-size", "32", "--num-attention-heads", "4",
        "--num-query-groups", "2", "--recall-pairs", "8", "--recall-keys", "16", "--recall-values", "8",
        "--nsa-window", "16", "--nsa-select-block", "16", "--nsa-select-topn", "4", "--nsa-compress-block", "8",
        "--nsa-compress-stride", "4", "--log-interval", "5"]


def test_training_lowers_the_loss_and_logs_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    res = train(TINY + ["--train-iters", "60", "--lr", "1e-2", "--tensorboard-dir", str(tmp_path)])
    losses = [h["loss"] for h in res["history"]]
    assert len(losses) == 12 and all(math.isfinite(x) for x in losses)
    # chance is ln 8 = 2.08 after the model learns the value range; it starts above it (random init)
    assert sum(losses[-3:]) / 3 < losses[0] - 0.1, losses
    ea = EventAccumulator(str(tmp_path))
    ea.Reload()
    nsa_tags = [f"nsa/layer{i}/{k}" for i in range(2) for k in ("gate_cmp", "gate_slc", "gate_swa", "select_reach",
                                                                "select_reach_max", "select_forced_share")]
    for tag in ["loss", "recall_acc", "lr", "grad_norm", "tokens_per_s"] + nsa_tags:
        values = [e.value for e in ea.Scalars(tag)]
        assert len(values) == 12 and all(math.isfinite(v) for v in values), tag
    share = [e.value for e in ea.Scalars("nsa/layer0/select_forced_share")]
    assert all(0 < v <= 1 for v in share)


def test_dense_attention_switch_trains_same_shapes():
    res = train(TINY + ["--train-iters", "5", "--attention", "dense"])
    assert math.isfinite(res["history"][-1]["loss"])


@pytest.mark.parametrize("flags,msg", [
    (["--nsa-compress-block", "10"], "NSAConfig.compress_block=10 must be a multiple of compress_stride=4"),
    (["--hidden-size", "30"], "--hidden-size=30 must be a multiple of --num-attention-heads=4"),
    (["--recall-pairs", "100"], "RecallTask.num_pairs=100 must be <= num_keys=16"),
    (["--train-iters", "0"], "--train-iters=0 must be >= 1"),
])
def test_bad_flags_are_named(flags, msg):
    with pytest.raises(SystemExit, match=msg):
        train(TINY + flags)


def test_nsa_args_cover_every_config_field():
    import argparse
    args = add_nsa_args(argparse.ArgumentParser()).parse_args(["--nsa-window", "128", "--nsa-gate-activation",
                                                               "softmax"])
    cfg = nsa_config_from_args(args)
    assert cfg.window == 128 and cfg.gate_activation == "softmax" and cfg.select_topn == 16
    with pytest.raises(SystemExit):
        add_nsa_args(argparse.ArgumentParser()).parse_args(["--nsa-gate-activation", "tanh"])
    assert "--nsa-select-topn" in build_parser().format_help()


def test_nsa_stats_hand_worked():
    from nsa_parallel.kernels import NSAConfig
    from nsa_parallel.metrics import nsa_stats
    cfg = NSAConfig(compress_block=8, compress_stride=4, select_block=16, select_topn=4, window=8)
    idx = torch.full((1, 100, 1, 4), -1, dtype=torch.int32)
    idx[0, 99, 0] = torch.tensor([0, 2, 5, 6])   # query 99 (own block 6): 0, 5, 6 forced, 2 chosen
    idx[0, 0, 0, 0] = 0                           # query 0: only its own block
    gate = torch.stack([torch.full((1, 100, 2), v) for v in (0.1, 0.2, 0.3)], dim=-1)
    st = nsa_stats(gate, idx, cfg)
    assert st["select_reach"] == st["select_reach_max"] == 99 - 2 * 16
    assert st["select_forced_share"] == 4 / 5
    assert [round(st[k], 6) for k in ("gate_cmp", "gate_slc", "gate_swa")] == [0.1, 0.2, 0.3]
