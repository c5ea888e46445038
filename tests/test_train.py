"""The main job: the megatron.core trainer lowers the loss, writes TensorBoard, resumes exactly from its
checkpoints, gives the same losses under TP=2 / TP=2+SP / PP=2 / PP=3 (gloo), reads Megatron datasets, and
rejects bad flags by name."""
import math

import pytest
import torch

pytest.importorskip("megatron.core")

from nsa_parallel.arguments import add_nsa_args, nsa_config_from_args  # noqa: E402
from conftest import recording_model, spawn_ranks, three_documents  # noqa: E402
from nsa_parallel.train import build_parser, train  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
# exact on CPU; on GPUs the Triton dK/dV atomics sum in a varying order
RTOL = 2e-3 if HAS_CUDA else 1e-5
TINY = ["--seq-length", "128", "--micro-batch-size", "4", "--hidden-size", "64", "--num-attention-heads", "4",
        "--num-query-groups", "2", "--recall-pairs", "8", "--recall-keys", "16", "--recall-values", "8",
        "--nsa-window", "16", "--nsa-select-block", "16", "--nsa-select-topn", "4", "--nsa-compress-block", "8",
        "--nsa-compress-stride", "4", "--lr-warmup-iters", "1"]
# four steps in all, the schedule fixed by --lr-decay-iters so that a run stopped at 2 continues the same curve
RESUMABLE = TINY + ["--lr-decay-iters", "4", "--log-interval", "1"]
# document masking on Megatron's mock data (EOD = the last id of --vocab-size)
DOCUMENTS = ["--mock-data", "--vocab-size", "64", "--seq-length", "512", "--micro-batch-size", "1",
             "--global-batch-size", "2", "--reset-attention-mask", "--eod-mask-loss"]


def _losses(res):
    return [h["loss"] for h in res["history"]]


def test_training_lowers_the_loss_and_logs_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    res = train(TINY + ["--train-iters", "60", "--lr", "1e-2", "--log-interval", "5",
                        "--tensorboard-dir", str(tmp_path)])
    losses = _losses(res)
    assert len(losses) == 12 and all(math.isfinite(x) for x in losses)
    # the loss is on recalled values only: chance is ln 8 = 2.08 once the model knows the value range
    assert sum(losses[-3:]) / 3 < losses[0] - 0.5, losses
    ea = EventAccumulator(str(tmp_path))
    ea.Reload()
    nsa_tags = [f"nsa/layer{i}/{k}" for i in range(2) for k in ("gate_cmp", "gate_slc", "gate_swa", "select_reach",
                                                                "select_reach_max", "select_forced_share")]
    for tag in ["loss", "lr", "grad_norm", "tokens_per_s", "tflops_per_gpu", "mem_gib",
                "attention_time_share"] + nsa_tags:
        values = [e.value for e in ea.Scalars(tag)]
        assert len(values) == 12 and all(math.isfinite(v) for v in values), tag
    share = [e.value for e in ea.Scalars("attention_time_share")]
    assert all(0 < v < 1 for v in share), share
    forced = [e.value for e in ea.Scalars("nsa/layer0/select_forced_share")]
    assert all(0 < v <= 1 for v in forced)
    gates = [e.value for e in ea.Scalars("nsa/layer1/gate_slc")]
    assert all(0 < v < 1 for v in gates)  # sigmoid gates


def test_validation_loss_is_the_held_out_batches_loss(tmp_path):
    """--eval-interval 3 over 4 iterations: validation after 3 and after the last; at 4 it is the mean loss of
    the first --eval-iters held-out global batches under the saved weights, recomputed here by hand; TensorBoard
    has it."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from nsa_parallel.data import RecallTask
    from nsa_parallel.train import load_for_inference
    ckpt, tb = tmp_path / "ckpt", tmp_path / "tb"
    res = train(RESUMABLE + ["--train-iters", "4", "--eval-interval", "3", "--eval-iters", "2", "--save", str(ckpt),
                             "--tensorboard-dir", str(tb)])
    assert [v["iteration"] for v in res["validation"]] == [3, 4]
    model, _ = load_for_inference(build_parser().parse_args(RESUMABLE + ["--load", str(ckpt)]))
    task = RecallTask(seq_length=128, num_pairs=8, num_keys=16, num_values=8, seed=1234)
    held = [task[(1 << 31) + i] for i in range(8)]  # samples training never reaches
    assert not torch.equal(held[0]["tokens"], task[0]["tokens"])
    model.eval()
    want = []
    with torch.no_grad():
        for m in range(2):  # --eval-iters 2 global batches of one micro-batch of 4
            batch = {k: torch.stack([held[4 * m + j][k] for j in range(4)]) for k in held[0]}
            per_token = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"]).float()
            want.append(((per_token * batch["loss_mask"]).sum() / batch["loss_mask"].sum()).item())
    want = sum(want) / 2
    assert abs(res["validation"][-1]["loss"] - want) < RTOL * want, (res["validation"], want)
    ea = EventAccumulator(str(tb))
    ea.Reload()
    assert [e.step for e in ea.Scalars("validation/loss")] == [3, 4]
    got = [e.value for e in ea.Scalars("validation/loss")]
    assert all(abs(a - v["loss"]) < 1e-6 * a for a, v in zip(got, res["validation"])), got
    ppl = ea.Scalars("validation/ppl")[-1].value
    assert abs(ppl - math.exp(got[-1])) < 1e-4 * ppl


def test_save_and_resume_gives_the_same_next_losses(tmp_path):
    full = _steps(train(RESUMABLE + ["--train-iters", "4"]))
    train(RESUMABLE + ["--train-iters", "2", "--save", str(tmp_path)])
    assert (tmp_path / "latest_checkpointed_iteration.txt").read_text() == "2"
    resumed = _steps(train(RESUMABLE + ["--train-iters", "4", "--load", str(tmp_path)]))
    assert_same_steps(resumed, full[2:], RTOL)


def _steps(res):
    """``(loss, grad norm)`` of every logged step."""
    return [(h["loss"], h["grad_norm"]) for h in res["history"]]


def _train_steps(argv):
    return _steps(train(argv))


def run_ranks(world: int, argv):
    """The steps the last rank logs (it holds the last pipeline stage) when ``world`` processes train."""
    return spawn_ranks(world, _train_steps, argv)[-1]


def assert_same_steps(got, want, rtol: float = max(RTOL, 1e-4)):
    """Losses and gradient norms agree step by step. The norm catches gradients scaled by a constant, which the
    losses do not show: Adam's update does not change with the gradients' scale, and clipping removes it."""
    assert isinstance(got, list) and len(got) == len(want), (got, want)
    for (loss_a, norm_a), (loss_b, norm_b) in zip(got, want):
        assert abs(loss_a - loss_b) < rtol * abs(loss_b), (got, want)
        assert abs(norm_a - norm_b) < rtol * abs(norm_b), (got, want)


@pytest.fixture(scope="module")
def tp1_checkpoint(tmp_path_factory):
    """Losses of 4 uninterrupted TP=1 steps, and a checkpoint after 2 of them."""
    return _tp1_run(tmp_path_factory)[:2]


@pytest.fixture(scope="module")
def tp1_stats(tmp_path_factory):
    """NSA's per-layer statistics of the same 4 steps."""
    return _tp1_run(tmp_path_factory)[2]


_TP1 = {}


def _tp1_run(tmp_path_factory):
    if not _TP1:
        ckpt = tmp_path_factory.mktemp("tp1")
        res = train(RESUMABLE + ["--train-iters", "4"])
        train(RESUMABLE + ["--train-iters", "2", "--save", str(ckpt)])
        _TP1["run"] = (_steps(res), ckpt, _nsa_stats(res))
    return _TP1["run"]


@pytest.mark.parametrize("flags", [
    ["--tensor-model-parallel-size", "2"],
    ["--tensor-model-parallel-size", "2", "--sequence-parallel"],
    ["--pipeline-model-parallel-size", "2"],
    ["--micro-batch-size", "2"],  # data parallel: each rank takes half of the same global batch of 4
    ["--context-parallel-size", "2"],  # each rank holds 2 of the 4 chunks of every sequence
], ids=["tp2", "tp2-sp", "pp2", "dp2", "cp2"])
@pytest.mark.skipif(HAS_CUDA and torch.cuda.device_count() < 2, reason="2 ranks on CUDA need 2 GPUs (NCCL)")
def test_two_ranks_equal_one_rank(flags, tp1_checkpoint, tp1_stats):
    """From the same start (a model initialised identically for any TP size; for PP, the TP=1 checkpoint loaded
    into two stages), 2 processes give the losses of 1: the NSA module, phi's sharding, SP norms, the grad norm,
    DDP's gradient averaging and the checkpoint's resharding all line up. Under TP and CP NSA's statistics are
    the whole model's too (every head, every token)."""
    full, ckpt = tp1_checkpoint
    if "--pipeline-model-parallel-size" in flags:
        got, want = run_ranks(2, RESUMABLE + ["--train-iters", "4", "--load", str(ckpt)] + flags), full[2:]
    else:
        (got, stats), want = spawn_ranks(2, _steps_and_stats, RESUMABLE + ["--train-iters", "4"] + flags)[-1], full
        if "--micro-batch-size" not in flags:  # data parallel: the last rank's last micro-batch is another one
            assert_same_stats(stats, tp1_stats)
    assert_same_steps(got, want)


def _steps_and_stats(argv):
    res = train(argv)
    return _steps(res), _nsa_stats(res)


def assert_same_stats(got, want):
    """NSA's statistics, step by step: the same layers' numbers as ``want``'s, within 1e-4."""
    assert got[0] and len(got) == len(want) and all(k in w for g, w in zip(got, want) for k in g)
    for g, w in zip(got, want):
        bad = {k: (v, w[k]) for k, v in g.items() if not abs(v - w[k]) <= 1e-4 * max(abs(w[k]), 1.0)}
        assert not bad, bad


@pytest.mark.parametrize("flags", [[], DOCUMENTS], ids=["recall", "documents"])
@pytest.mark.skipif(HAS_CUDA and torch.cuda.device_count() < 3, reason="3 ranks on CUDA need 3 GPUs (NCCL)")
def test_three_pipeline_stages_equal_one_rank(flags, tmp_path):
    """PP=3: the middle stage has no data of its own (it takes the previous stage's activations; under document
    masking it reads the tokens for the documents' bounds), and the losses equal one process's from the same
    checkpoint."""
    three = RESUMABLE + ["--num-layers", "3"] + flags
    full = _steps(train(three + ["--train-iters", "4"]))
    train(three + ["--train-iters", "2", "--save", str(tmp_path)])
    got = run_ranks(3, three + ["--train-iters", "4", "--load", str(tmp_path), "--pipeline-model-parallel-size", "3"])
    assert_same_steps(got, full[2:])


@pytest.mark.parametrize("world,flags", [
    (2, ["--context-parallel-size", "2"]),
    (4, ["--context-parallel-size", "2", "--pipeline-model-parallel-size", "2"]),
], ids=["cp2", "cp2-pp2"])
def test_documents_under_context_parallelism_equal_one_rank(world, flags, tmp_path):
    """Document masking under CP: each long document padded to split over the CP ranks on its own (the padding
    after its last token changes no real token's output and is out of the loss), each short one held whole by a
    rank (Megatron's mock documents give both), so the losses and gradient norms equal one process's; with PP the
    micro-batches' varying lengths go between the stages as shapes first."""
    if HAS_CUDA and torch.cuda.device_count() < world:
        pytest.skip(f"{world} ranks on CUDA need {world} GPUs (NCCL)")
    argv = RESUMABLE + DOCUMENTS + ["--eval-interval", "4", "--eval-iters", "1"]
    res = train(argv + ["--train-iters", "4"])
    full, valid, full_stats = _steps(res), res["validation"][-1]["loss"], _nsa_stats(res)
    if "--pipeline-model-parallel-size" in flags:  # the stages split the one-rank model: same start via checkpoint
        train(argv + ["--train-iters", "2", "--save", str(tmp_path)])
        argv, full, full_stats = argv + ["--load", str(tmp_path)], full[2:], full_stats[2:]
    got, padding, got_valid, stats = spawn_ranks(world, _steps_and_padding, argv + ["--train-iters", "4"] + flags)[-1]
    assert_same_steps(got, full)
    assert abs(got_valid - valid) < max(RTOL, 1e-4) * valid, (got_valid, valid)
    # NSA's per-layer statistics of packed documents (each token at its position in its document, padding out):
    # the last rank's layers' numbers are the one-rank run's
    assert_same_stats(stats, full_stats)
    # mock documents: some padding, ranks within a few short documents of each other
    assert len(padding) == len(got) and all(0 < share < 0.2 and 1 <= imb < 1.2 for share, imb in padding), padding


def _nsa_stats(res):
    return [{k: v for k, v in h.items() if k.startswith("nsa/")} for h in res["history"]]


def _steps_and_padding(argv):
    res = train(argv)
    return (_steps(res), [(h["document_padding_share"], h["document_cp_imbalance"]) for h in res["history"]],
            res["validation"][-1]["loss"], _nsa_stats(res))


def test_a_checkpoint_with_fewer_vocabulary_rows_loads_its_rows(tmp_path):
    """A checkpoint of the unpadded vocabulary (--make-vocab-size-divisible-by 1: 24 rows, the shape saved before the
    padding existed) loads into the padded model (128 rows): the stored rows are loaded, as docs/troubleshooting.md
    says (Megatron allows the embedding's shape to differ)."""
    from nsa_parallel.train import load_for_inference
    train(RESUMABLE + ["--train-iters", "2", "--save", str(tmp_path), "--make-vocab-size-divisible-by", "1"])
    old, _ = load_for_inference(build_parser().parse_args(RESUMABLE + ["--load", str(tmp_path),
                                                                       "--make-vocab-size-divisible-by", "1"]))
    rows = old.module.embedding.word_embeddings.weight.detach().clone()
    new, _ = load_for_inference(build_parser().parse_args(RESUMABLE + ["--load", str(tmp_path)]))
    padded = new.module.embedding.word_embeddings.weight.detach()
    assert rows.shape[0] == 24 and padded.shape[0] == 128
    assert torch.equal(padded[:24], rows)


def _validation(argv):
    return [v["loss"] for v in train(argv)["validation"]]


@pytest.mark.parametrize("flags", [["--pipeline-model-parallel-size", "2"], ["--micro-batch-size", "2"]],
                         ids=["pp2", "dp2"])
@pytest.mark.skipif(HAS_CUDA and torch.cuda.device_count() < 2, reason="2 ranks on CUDA need 2 GPUs (NCCL)")
def test_validation_under_two_ranks_equals_one(flags, tp1_checkpoint):
    """Validation through the pipelined forward-only schedule (PP=2, loaded from the TP=1 checkpoint) or averaged
    over data-parallel ranks (DP=2, half the batch each) gives one rank's validation losses."""
    _, ckpt = tp1_checkpoint
    argv = RESUMABLE + ["--train-iters", "4", "--load", str(ckpt), "--eval-interval", "1", "--eval-iters", "2"]
    want = _validation(argv)
    got = spawn_ranks(2, _validation, argv + flags)[-1]  # the last rank holds the last stage
    assert len(got) == len(want) == 2
    for a, b in zip(got, want):
        assert abs(a - b) < max(RTOL, 1e-4) * abs(b), (got, want)


def test_activation_recomputation_keeps_the_losses(tp1_checkpoint, monkeypatch):
    """--recompute-activations (Megatron's full, uniform layer recomputation) re-runs each layer's forward, NSA's
    included, in backward (twice the NSA core calls): the same losses as storing the activations."""
    from nsa_parallel.megatron.attention import NSACoreAttention
    full, _ = tp1_checkpoint
    calls, real = [], NSACoreAttention.forward
    monkeypatch.setattr(NSACoreAttention, "forward", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    got = _steps(train(RESUMABLE + ["--train-iters", "4", "--recompute-activations"]))
    assert len(calls) == 4 * 2 * 2  # iterations x layers x (forward + recomputation)
    assert_same_steps(got, full, RTOL)


@pytest.mark.skipif(HAS_CUDA and torch.cuda.device_count() < 2, reason="2 ranks on CUDA need 2 GPUs (NCCL)")
def test_a_tensor_parallel_checkpoint_resumes_on_one_rank(tmp_path, tp1_checkpoint):
    """Saved by TP=2 + SP (each rank its heads', MLP and vocabulary shards, optimizer state alike), resumed by one
    process: the next losses are the uninterrupted TP=1 run's (dist_checkpointing reshards on load)."""
    full, _ = tp1_checkpoint
    run_ranks(2, RESUMABLE + ["--train-iters", "2", "--save", str(tmp_path), "--tensor-model-parallel-size", "2",
                              "--sequence-parallel"])
    got = _steps(train(RESUMABLE + ["--train-iters", "4", "--load", str(tmp_path)]))
    assert_same_steps(got, full[2:])


@pytest.mark.skipif(HAS_CUDA and torch.cuda.device_count() < 4, reason="4 ranks on CUDA need 4 GPUs (NCCL)")
def test_tensor_and_context_parallel_together_equal_one_rank(tp1_checkpoint):
    """TP=2 x CP=2 (4 processes): each rank holds half the heads of half the sequence; the losses are TP=1's."""
    full, _ = tp1_checkpoint
    got = run_ranks(4, RESUMABLE + ["--train-iters", "4", "--tensor-model-parallel-size", "2",
                                    "--context-parallel-size", "2"])
    assert_same_steps(got, full)


def _zero_run(argv):
    """Steps, and the parameter elements whose AdamW state this rank holds against the model's."""
    from nsa_parallel import train as trainer
    made, build = [], trainer.build_optimizer
    trainer.build_optimizer = lambda *a: made.append(build(*a)) or made[-1]
    res = trainer.train(argv)
    local = made[0][0].optim
    held = sum(p.numel() for g in local.param_groups for p in g["params"])
    return _steps(res), held, sum(p.numel() for g in made[0][0].param_groups for p in g["params"])


@pytest.mark.skipif(HAS_CUDA and torch.cuda.device_count() < 2, reason="2 ranks on CUDA need 2 GPUs (NCCL)")
def test_distributed_optimizer_equals_adamw_and_shares_its_checkpoints(tmp_path, tp1_checkpoint):
    """--use-distributed-optimizer on 2 data-parallel ranks: each holds AdamW state for part of the parameters, the
    steps are one rank's, and its checkpoints are AdamW's: saved with ZeRO, resumed with ZeRO and by one plain
    process; the one-process checkpoint resumed with ZeRO."""
    full, plain = tp1_checkpoint
    zero = RESUMABLE + ["--micro-batch-size", "2", "--use-distributed-optimizer"]
    runs = spawn_ranks(2, _zero_run, zero + ["--train-iters", "2", "--save", str(tmp_path)])
    (steps, held0, total), (_, held1, _) = runs
    assert held0 + held1 == total and 0 < held0 < total, (held0, held1, total)
    assert_same_steps(steps, full[:2])
    assert_same_steps(run_ranks(2, zero + ["--train-iters", "4", "--load", str(tmp_path)]), full[2:])
    assert_same_steps(_steps(train(RESUMABLE + ["--train-iters", "4", "--load", str(tmp_path)])), full[2:])
    assert_same_steps(run_ranks(2, zero + ["--train-iters", "4", "--load", str(plain)]), full[2:])


def test_dense_attention_switch_trains():
    res = train(TINY + ["--train-iters", "5", "--attention", "dense", "--lr", "1e-2"])
    assert all(math.isfinite(x) for x in _losses(res))


def test_megatron_datasets(tmp_path):
    import numpy
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
    prefix = str(tmp_path / "toy")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=numpy.uint16)
    gen = torch.Generator().manual_seed(0)
    for _ in range(40):
        n = int(torch.randint(40, 300, (1,), generator=gen))
        builder.add_item(torch.arange(n) % 50)  # a learnable pattern: counting mod 50
        builder.end_document()
    builder.finalize(prefix + ".idx")
    res = train(TINY + ["--train-iters", "20", "--log-interval", "5", "--lr", "1e-2", "--data-path", prefix,
                        "--vocab-size", "64"])
    losses = _losses(res)
    assert losses[-1] < losses[0] - 1.0, losses
    res = train(TINY + ["--train-iters", "2", "--log-interval", "1", "--mock-data", "--vocab-size", "128",
                        "--eval-interval", "2", "--eval-iters", "1"])
    assert all(math.isfinite(x) for x in _losses(res))
    assert math.isfinite(res["validation"][0]["loss"])
    # validation from the indexed data's own split
    res = train(TINY + ["--train-iters", "4", "--lr", "1e-2", "--data-path", prefix, "--vocab-size", "64",
                        "--split", "80,20,0", "--eval-interval", "2", "--eval-iters", "2"])
    val = [v["loss"] for v in res["validation"]]
    assert len(val) == 2 and val[1] < val[0], val
    with pytest.raises(SystemExit, match="--eval-interval needs validation data, but --split 100,0,0 leaves none"):
        train(TINY + ["--train-iters", "2", "--data-path", prefix, "--vocab-size", "64", "--eval-interval", "1"])
    with pytest.raises(ValueError, match="holds token id 49, but --vocab-size=32"):
        train(TINY + ["--train-iters", "2", "--data-path", prefix, "--vocab-size", "32"])


@pytest.mark.parametrize("flags,msg", [
    (["--nsa-compress-block", "10"], "NSAConfig.compress_block=10 must be a multiple of compress_stride=4"),
    (["--hidden-size", "30"], "--hidden-size=30 must be a multiple of --num-attention-heads=4"),
    (["--num-query-groups", "3"], "--num-attention-heads=4 must be a multiple of --num-query-groups=3"),
    (["--recall-pairs", "100"], "RecallTask.num_pairs=100 must be <= num_keys=16"),
    (["--train-iters", "0"], "--train-iters=0 must be >= 1"),
    (["--train-iters", "5", "--lr-warmup-iters", "5"], "--lr-warmup-iters=5 must be >= 0 and < --lr-decay-iters"),
    (["--mock-data"], "--vocab-size is required with --data-path / --mock-data"),
    (["--mock-data", "--data-path", "x", "--vocab-size", "8"], "--data-path and --mock-data exclude each other"),
    (["--context-parallel-size", "2", "--attention", "dense"], "--context-parallel-size=2 needs --attention nsa"),
    (["--context-parallel-size", "2", "--seq-length", "96"], "must be a multiple of 4 chunks x select_block 16"),
    (["--context-parallel-size", "2", "--seq-length", "64", "--nsa-window", "32"],
     "chunks of 16 tokens .* must be at least the halo it sends its neighbour"),
    (["--tensor-model-parallel-size", "2"], "world size 1 must be a multiple of tensor x pipeline x context"),
    (["--global-batch-size", "6"], "--global-batch-size=6 must be a multiple of micro batch x data-parallel"),
    (["--save-interval", "2"], "--save-interval needs --save DIR"),
    (["--make-vocab-size-divisible-by", "0"], "--make-vocab-size-divisible-by=0 must be >= 1"),
    (["--eval-interval", "0"], "--eval-interval=0 must be >= 1"),
    (["--eval-iters", "0"], "--eval-iters=0 must be >= 1"),
    (["--reset-attention-mask"], "--reset-attention-mask needs documents that end with an EOD token"),
    (["--mock-data", "--vocab-size", "64", "--reset-position-ids"],
     "--reset-position-ids does nothing for --position-embedding-type rope"),
    (["--eod-mask-loss"], "--eod-mask-loss needs documents that end with an EOD token"),
    (["--mock-data", "--vocab-size", "64", "--reset-attention-mask"],
     "--micro-batch-size=4; allowed: 1"),
    (["--mock-data", "--vocab-size", "64", "--reset-attention-mask", "--micro-batch-size", "1", "--attention",
      "dense"], "--reset-attention-mask needs --attention nsa"),
    (["--mock-data", "--vocab-size", "64", "--reset-attention-mask", "--micro-batch-size", "1", "--seq-length", "160",
      "--context-parallel-size", "2", "--tensor-model-parallel-size", "8", "--sequence-parallel",
      "--num-attention-heads", "8", "--num-query-groups", "8", "--nsa-select-block", "20"],
     "--nsa-select-block=20 must be a multiple of --tensor-model-parallel-size=8 with --sequence-parallel and "
     "--reset-attention-mask under context parallelism"),
])
def test_bad_flags_are_named(flags, msg):
    with pytest.raises(SystemExit, match=msg.replace("(", r"\(")):
        train(TINY + ["--train-iters", "3"] + flags)


def test_reset_attention_mask_packs_each_samples_documents(monkeypatch):
    """--reset-attention-mask: forward_step hands the model the sample's documents (ending at each EOD) as a
    packed batch; the model-level equality with separate documents is tests/test_megatron.py's."""
    from megatron.core import parallel_state as ps

    from nsa_parallel import train as trainer
    monkeypatch.setattr(trainer, "_cp_shard", lambda batch: batch)
    monkeypatch.setattr(ps, "get_context_parallel_world_size", lambda: 1)
    seen = {}
    model, batch = recording_model(seen), three_documents()
    trainer.forward_step(iter([batch]), model, document_eod=9)
    packed = seen["packed_seq_params"]
    assert packed.qkv_format == "thd" and packed.cu_seqlens_q.tolist() == [0, 3, 5, 6] and packed.max_seqlen_q == 3
    assert packed.cu_seqlens_kv is packed.cu_seqlens_q
    trainer.forward_step(iter([batch]), model)
    assert seen["packed_seq_params"] is None
    args = build_parser().parse_args(["--reset-attention-mask", "--vocab-size", "10", "--nsa-window", "64"])
    step = trainer._forward_step_func(args)
    assert step.keywords["document_eod"] == 9 and step.keywords["nsa_config"].window == 64  # VocabTokenizer's EOD


def test_documents_on_a_cp_rank_are_split_or_held_whole():
    """Under CP=2 (4 chunks; select blocks of 16, halo 15: split documents padded to a multiple of 64 tokens, at
    least 64) the documents of 70 and 80 tokens are padded at their ends and split on their own; the 20-token one
    is held whole by rank 0 (split, it would have computed 64), its padding closing it at a whole select block.
    The ranks' parts give back the sample, the padding out of the loss; the params carry the split documents'
    real and padded bounds, the whole ones' bounds and positions."""
    from nsa_parallel.context_parallel import join_from_ranks
    from nsa_parallel.documents import cp_document_lengths, documents_on_cp_rank, plan_cp_documents
    from nsa_parallel.kernels import NSAConfig
    cfg = NSAConfig(compress_block=8, compress_stride=4, select_block=16, select_topn=4, window=16)
    assert cp_document_lengths(2, cfg) == (64, 64)
    assert cp_document_lengths(2, NSAConfig()) == (256, 2048)  # the paper's window: chunks of 512 at least
    eod, s = 99, 170
    tokens = torch.arange(s)[None] % 50
    tokens[0, [69, 89]] = eod  # documents of 70, 20 and 80 tokens
    batch = {"tokens": tokens, "labels": tokens + 1, "loss_mask": torch.ones(1, s),
             "position_ids": torch.arange(s)[None]}
    plan = plan_cp_documents([0, 70, 90, 170], 2, cfg)
    assert plan.split == ((0, 70, 128), (90, 170, 128)) and plan.whole == (((70, 90),), ()) and plan.pad == (12, 0)
    assert plan.computed() == 256 + 32 and [plan.tokens(r) for r in range(2)] == [160, 128]
    parts = [documents_on_cp_rank(batch, eod, plan, r) for r in range(2)]
    assert [p[0]["tokens"].shape for p in parts] == [(1, 160), (1, 128)]
    for key, fill in (("tokens", eod), ("labels", eod), ("loss_mask", 0), ("position_ids", 0)):
        for (a, e, padded), off in zip(plan.split, [0, 64]):  # a document's start: half the padded ones before
            got = join_from_ranks([p[0][key][:, off:off + padded // 2] for p in parts])
            want = torch.cat([batch[key][:, a:e], torch.full((1, padded - (e - a)), fill, dtype=batch[key].dtype)],
                             dim=1)
            assert torch.equal(got, want), (key, a)
        want = torch.cat([batch[key][:, 70:90], torch.full((1, 12), fill, dtype=batch[key].dtype)], dim=1)
        assert torch.equal(parts[0][0][key][:, 128:], want), key
    for r, (_, packed) in enumerate(parts):
        assert packed.cu_seqlens_q.tolist() == [0, 70, 150] and packed.cu_seqlens_kv is packed.cu_seqlens_q
        assert packed.cu_seqlens_q_padded.tolist() == [0, 128, 256] and packed.max_seqlen_q == 128
        assert packed.cu_seqlens_whole.tolist() == [[0, 32], [0]][r]
    # every row's position in its document (the chunks of 64: positions 0-31 and 96-127 on rank 0), padding out
    chunk = [list(range(32)) + list(range(96, 128)), list(range(32, 96))]
    for r, (_, packed) in enumerate(parts):
        whole = list(range(32)) if r == 0 else []
        assert packed.positions.tolist() == chunk[r] * 2 + whole
    assert parts[0][1].real.tolist() == ([True] * 32 + [p < 70 for p in range(96, 128)] + [True] * 32
                                         + [p < 80 for p in range(96, 128)] + [True] * 20 + [False] * 12)
    with pytest.raises(ValueError, match=r"pads the batch keys .* got also \['attention_mask'\]"):
        documents_on_cp_rank({**batch, "attention_mask": tokens}, eod, plan, 0)


@pytest.mark.parametrize("lengths,cp,split,whole,pad", [
    # 8 x 1000 tokens at CP=2 (split, each would compute 2048): all whole, 4 per rank
    ([1000] * 8, 2, (), ((0, 2, 4, 6), (1, 3, 5, 7)), (32, 32)),
    # one 10000-token document split; the 2000-token one split too (1024 more on each rank) rather than whole on
    # one (2000 more on one)
    ([10000, 2000], 2, ((0, 10000, 10240), (10000, 12000, 2048)), ((), ()), (0, 0)),
    # fewer documents than ranks: the idle ranks get a select block of padding (every rank runs the layers)
    ([100], 4, (), ((0,), (), (), ()), (28, 64, 64, 64)),
], ids=["short", "long-and-short", "idle-ranks"])
def test_cp_document_plans(lengths, cp, split, whole, pad):
    """What :func:`plan_cp_documents` splits and where it puts the rest, at the paper's window (2P x 512 least)."""
    from nsa_parallel.documents import cp_document_lengths, plan_cp_documents
    from nsa_parallel.kernels import NSAConfig
    bounds = torch.tensor([0] + lengths).cumsum(0).tolist()
    docs = list(zip(bounds, bounds[1:]))
    plan = plan_cp_documents(bounds, cp, NSAConfig())
    assert plan.split == split
    assert plan.whole == tuple(tuple(docs[i] for i in w) for w in whole) and plan.pad == pad
    assert plan.length == bounds[-1] and plan.computed() >= plan.length
    # never more on the busiest rank than with every document padded and split (one of the plans tried)
    multiple, least = cp_document_lengths(cp, NSAConfig())
    everywhere = sum(max(least, -(-(e - s) // multiple) * multiple) for s, e in docs) // cp
    assert max(plan.tokens(r) for r in range(cp)) <= everywhere + NSAConfig().select_block  # + its padding


def test_document_masked_training_on_mock_data_lowers_the_loss():
    res = train(TINY + ["--train-iters", "30", "--lr", "1e-2", "--log-interval", "10", "--mock-data", "--vocab-size",
                        "64", "--micro-batch-size", "1", "--reset-attention-mask", "--reset-position-ids",
                        "--eod-mask-loss"])
    losses = _losses(res)
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses) and losses[-1] < losses[0] - 0.5, losses


def test_load_without_checkpoint_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no latest_checkpointed_iteration.txt"):
        train(TINY + ["--train-iters", "2", "--load", str(tmp_path)])


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


def test_region_timer_times_forward_and_backward_without_changing_gradients():
    from nsa_parallel.metrics import RegionTimer
    timer = RegionTimer()
    a, b = torch.randn(5, requires_grad=True), torch.randn(5, requires_grad=True)
    x, y = timer.enter(a, b)
    z = timer.leave((x * y).exp())
    z.sum().backward()
    assert timer.forward_s > 0 and timer.backward_s > 0
    assert torch.allclose(a.grad, b * (a * b).exp()) and torch.allclose(b.grad, a * (a * b).exp())
    assert timer.pop() > 0 and timer.pop() == 0


@pytest.mark.gpu
@pytest.mark.parametrize("attention", ["nsa", "dense"])
def test_trainer_on_gpu_bf16(attention):
    """The trainer on one GPU: bf16 autocast, Triton NSA kernels (or SDPA), head dim 64, 4k tokens."""
    res = train(["--seq-length", "4096", "--micro-batch-size", "1", "--hidden-size", "256", "--num-attention-heads",
                 "4", "--num-query-groups", "2", "--recall-pairs", "64", "--recall-keys", "256",
                 "--recall-values", "16",
                 "--train-iters", "30", "--log-interval", "10", "--lr", "3e-3", "--lr-warmup-iters", "5", "--bf16",
                 "--attention", attention])
    losses = _losses(res)
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0], losses
