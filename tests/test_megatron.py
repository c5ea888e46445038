"""NSA inside megatron.core on CPU (gloo, one process): the layer's projection layout and math, a GPTModel built
from the NSA spec, and its named errors."""
import math
import os
import warnings

import pytest
import torch

from conftest import SMALL, rel_err
from nsa_parallel.distributed import all_done, leave_spawned_rank

warnings.filterwarnings("ignore", message=".*Apex.*")
warnings.filterwarnings("ignore", message=".*Transformer Engine.*")

megatron = pytest.importorskip("megatron.core")
from megatron.core import parallel_state  # noqa: E402
from megatron.core.transformer.spec_utils import build_module  # noqa: E402
from megatron.core.transformer.transformer_config import TransformerConfig  # noqa: E402

from nsa_parallel.kernels import nsa_attention  # noqa: E402
from nsa_parallel.megatron import get_gpt_layer_nsa_spec  # noqa: E402


@pytest.fixture(scope="module")
def model_parallel():
    from nsa_parallel.distributed import init_distributed
    init_distributed()  # gloo here; on GPU hosts gloo for these CPU tensors and NCCL for the trainer's CUDA ones
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(1, 1)
    yield
    parallel_state.destroy_model_parallel()


def _config(**kw):
    base = dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, use_cpu_initialization=True,
                hidden_dropout=0.0, attention_dropout=0.0, add_bias_linear=False, params_dtype=torch.float32)
    base.update(kw)
    return TransformerConfig(**base)


def manual_forward(hidden, w_qkv, w_proj, compress_k, compress_v, groups, g, d):
    """Independent reading of the documented layout: per group [G q heads | k,v cmp | k,v slc | k,v swa | G*3
    gate logits], then the reference NSA and the output projection (full, unsharded weights)."""
    s, b, _ = hidden.shape
    mixed = hidden @ w_qkv.t()
    width = g * d + 6 * d + 3 * g
    q, ks, gl = [], [[] for _ in range(6)], []
    for grp in range(groups):
        w = mixed[..., grp * width:(grp + 1) * width]
        q.append(w[..., :g * d].reshape(s, b, g, d))
        for i in range(6):
            ks[i].append(w[..., g * d + i * d:g * d + (i + 1) * d].reshape(s, b, 1, d))
        gl.append(w[..., g * d + 6 * d:].reshape(s, b, g, 3))
    to_bt = lambda xs: torch.cat(xs, 2).transpose(0, 1)  # noqa: E731
    o = nsa_attention(to_bt(q), *[to_bt(x) for x in ks], torch.sigmoid(to_bt(gl)), compress_k=compress_k,
                      compress_v=compress_v, config=SMALL, scale=1 / math.sqrt(d))
    return o.transpose(0, 1).reshape(s, b, -1) @ w_proj.t()


def test_layer_matches_per_group_reference(model_parallel):
    cfg = _config()
    spec = get_gpt_layer_nsa_spec(nsa_config=SMALL, backend="reference")
    torch.manual_seed(0)
    attn = build_module(spec.submodules.self_attention, config=cfg, layer_number=1)
    s, b, h = 70, 2, 64
    hidden = torch.randn(s, b, h, requires_grad=True)
    out, _ = attn(hidden, None)
    core = attn.core_attention
    want = manual_forward(hidden, attn.linear_qkv.weight, attn.linear_proj.weight, core.compress_k,
                          core.compress_v, groups=2, g=2, d=16)
    assert rel_err(out, want) < 1e-5
    g1 = torch.autograd.grad(out.square().sum(), hidden)[0]
    g2 = torch.autograd.grad(want.square().sum(), hidden)[0]
    assert rel_err(g1, g2) < 1e-5


def test_gpt_model_with_nsa_spec_trains(model_parallel):
    from megatron.core.models.gpt import GPTModel
    cfg = _config()
    torch.manual_seed(0)
    model = GPTModel(config=cfg, transformer_layer_spec=get_gpt_layer_nsa_spec(nsa_config=SMALL),
                     vocab_size=64, max_sequence_length=96, position_embedding_type="learned_absolute")
    tokens = torch.randint(0, 64, (2, 96), generator=torch.Generator().manual_seed(1))
    pos = torch.arange(96)[None].expand(2, -1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        loss = model(tokens[:, :-1], pos[:, :-1], None, labels=tokens[:, 1:]).float().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    phi = model.decoder.layers[0].self_attention.core_attention.compress_k.w1
    assert phi.grad is not None and torch.isfinite(phi.grad).all() and phi.grad.abs().sum() > 0
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0] - 0.5, losses


def _tp2_worker(rank, port, result, sequence_parallel=False):
    import torch.distributed as dist
    from nsa_parallel.kernels import Compression
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=2)
    from nsa_parallel.megatron import enable_cpu_shims
    enable_cpu_shims(force=True)  # this worker runs on the CPU even on a GPU host
    try:
        cfg = _config(num_attention_heads=8, num_query_groups=4, hidden_size=64,  # d = 8, G = 2, 2 groups/rank
                      tensor_model_parallel_size=2, sequence_parallel=sequence_parallel)
        attn = build_module(get_gpt_layer_nsa_spec(nsa_config=SMALL, backend="reference").submodules.self_attention,
                            config=cfg, layer_number=1)
        gen = torch.Generator().manual_seed(0)  # the same full weights and input on both ranks
        d, g, groups = 8, 2, 4
        width = g * d + 6 * d + 3 * g
        w_qkv = torch.randn(groups * width, 64, generator=gen) * 0.1
        w_proj = torch.randn(64, 8 * d, generator=gen) * 0.1
        torch.manual_seed(3)
        phi_k, phi_v = Compression(groups, d, 8, 4), Compression(groups, d, 8, 4)
        hidden = torch.randn(40, 2, 64, generator=gen)
        with torch.no_grad():  # this rank's shard: whole groups, their heads' projection columns, their phi
            attn.linear_qkv.weight.copy_(w_qkv[rank * 2 * width:(rank + 1) * 2 * width])
            attn.linear_proj.weight.copy_(w_proj[:, rank * 4 * d:(rank + 1) * 4 * d])
            for mine, full in ((attn.core_attention.compress_k, phi_k), (attn.core_attention.compress_v, phi_v)):
                for name, p in mine.named_parameters():
                    p.copy_(getattr(full, name)[rank * 2:(rank + 1) * 2])
        # with sequence parallelism each rank holds (and returns) its half of the sequence
        local = hidden.chunk(2, dim=0)[rank] if sequence_parallel else hidden
        out, _ = attn(local, None)
        with torch.no_grad():
            want = manual_forward(hidden, w_qkv, w_proj, phi_k, phi_v, groups=groups, g=g, d=d)
        if sequence_parallel:
            want = want.chunk(2, dim=0)[rank]
        result[rank] = rel_err(out.detach(), want)
        try:  # fewer KV groups than TP ranks would split a group: a named error
            build_module(get_gpt_layer_nsa_spec(nsa_config=SMALL).submodules.self_attention,
                         config=_config(num_attention_heads=8, num_query_groups=1, tensor_model_parallel_size=2),
                         layer_number=1)
            result[f"err{rank}"] = "no error"
        except ValueError as e:
            result[f"err{rank}"] = str(e)
        all_done()
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()
    leave_spawned_rank()


@pytest.mark.parametrize("sequence_parallel", [False, True])
def test_tensor_parallel_2_equals_full_layer(sequence_parallel):
    import socket
    import torch.multiprocessing as mp
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result = mp.Manager().dict()
    mp.spawn(_tp2_worker, args=(port, result, sequence_parallel), nprocs=2, join=True)
    assert result[0] < 1e-5 and result[1] < 1e-5, dict(result)
    for rank in (0, 1):
        assert "num_query_groups=1 must be a multiple of tensor_model_parallel_size=2" in result[f"err{rank}"]


def test_gpt_model_with_rope_on_cpu(model_parallel):
    """Megatron's default RoPE through the CPU shim; RoPE reaches the attention (outputs depend on position)."""
    from megatron.core.models.gpt import GPTModel
    from nsa_parallel.megatron.cpu_shims import enable_cpu_shims
    if torch.cuda.is_available():
        assert enable_cpu_shims() == []  # inert where CUDA exists
        pytest.skip("the CPU shims are exercised on CPU-only hosts; this one has CUDA")
    assert enable_cpu_shims() == ["RotaryEmbedding.get_emb", "rotary_pos_embedding.get_pos_emb_on_this_cp_rank",
                                  "torch.cuda.current_device", "schedules.torch.zeros",
                                  "torch.Tensor.cuda", "torch.cuda.synchronize", "torch.cuda.current_stream",
                                  "tensor_parallel.random (CPU RNG tracker)"]
    # megatron-core 0.19's grad sync takes the current stream on CPU runs; a wait there would be a CUDA event
    with pytest.raises(RuntimeError, match="CUDA event .* CPU-only run"):
        torch.cuda.current_stream().wait_event(object())
    torch.manual_seed(0)
    model = GPTModel(config=_config(), transformer_layer_spec=get_gpt_layer_nsa_spec(nsa_config=SMALL),
                     vocab_size=64, max_sequence_length=96, position_embedding_type="rope")
    tokens = torch.randint(0, 64, (2, 95), generator=torch.Generator().manual_seed(1))
    pos = torch.arange(95)[None].expand(2, -1)
    loss = model(tokens, pos, None, labels=tokens).float().mean()
    loss.backward()
    assert math.isfinite(loss.item())
    emb = model.rotary_pos_emb(95)
    with torch.no_grad():
        from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
        x = torch.randn(95, 1, 1, 16)
        y = apply_rotary_pos_emb(x, emb, config=model.config)
        # rotate-half RoPE by hand at position 5
        half = 8
        inv = 1.0 / (10000 ** (torch.arange(0, half, dtype=torch.float32) / half))
        ang = 5 * inv
        x1, x2 = x[5, 0, 0, :half], x[5, 0, 0, half:]
        want = torch.cat([x1 * ang.cos() - x2 * ang.sin(), x2 * ang.cos() + x1 * ang.sin()])
        assert rel_err(y[5, 0, 0], want) < 1e-5


def _rope(max_len: int, d: int) -> torch.Tensor:
    """Megatron's RoPE frequencies ``[max_len, 1, 1, d]`` (rotate-half layout), built by hand."""
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    ang = torch.arange(max_len, dtype=torch.float32)[:, None] * inv
    return torch.cat([ang, ang], dim=-1)[:, None, None, :]


@pytest.mark.parametrize("rope", [False, True])
def test_packed_sequences_equal_separate_sequences(rope, model_parallel):
    """THD batches (RoPE restarting at every sequence, as Megatron's THD RoPE does) equal each sequence alone."""
    from megatron.core.packed_seq_params import PackedSeqParams
    attn = build_module(get_gpt_layer_nsa_spec(nsa_config=SMALL, backend="reference").submodules.self_attention,
                        config=_config(), layer_number=1)
    lens = [37, 16, 45]
    cu = torch.tensor([0, 37, 53, 98], dtype=torch.int32)
    hidden = torch.randn(sum(lens), 1, 64, generator=torch.Generator().manual_seed(2))
    emb = _rope(64, 16) if rope else None
    packed = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=45, max_seqlen_kv=45)
    with torch.no_grad():
        out, _ = attn(hidden, None, rotary_pos_emb=emb, packed_seq_params=packed)
        for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
            alone, _ = attn(hidden[s:e], None, rotary_pos_emb=None if emb is None else emb[:e - s])
            assert rel_err(out[s:e], alone) < 1e-5
    bad = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu.flip(0))
    with pytest.raises(ValueError, match="the same cu_seqlens for q and kv"):
        attn(hidden, None, packed_seq_params=bad)
    with pytest.raises(ValueError, match="micro-batch size 1"):
        attn(hidden.expand(-1, 2, -1), None, packed_seq_params=packed)


def test_a_document_mask_is_refused_by_name(model_parallel):
    """Stock ``pretrain_gpt.py --reset-attention-mask`` hands every layer Megatron's dense document mask, which NSA
    cannot apply: a named error, not documents attending across each other. The plain causal mask passes, also
    split over CP ranks (its rows' later keys are hidden)."""
    from megatron.core.datasets.gpt_dataset import _get_ltor_masks_and_position_ids
    attn = build_module(get_gpt_layer_nsa_spec(nsa_config=SMALL, backend="reference").submodules.self_attention,
                        config=_config(), layer_number=1)
    tokens = torch.tensor([1, 5, 9, 2, 9, 3] * 8)
    hidden = torch.randn(48, 1, 64, generator=torch.Generator().manual_seed(3))

    def mask(reset: bool):
        m = _get_ltor_masks_and_position_ids(tokens, 9, False, reset, False, True)[0]
        return m[None]  # [1, 1, s, s], True = hidden

    with torch.no_grad():
        want, _ = attn(hidden, None)
        got, _ = attn(hidden, mask(False))
        assert torch.equal(got, want)
        got, _ = attn(hidden[:24], mask(False)[:, :, :24])  # a CP rank's rows: later keys hidden
        with pytest.raises(ValueError, match="NSA takes documents as packed sequences"):
            attn(hidden, mask(True))


def _rope_gpt_on_cpu():
    """A 2-layer NSA GPTModel with RoPE on the CPU (seed 0); skips on GPU hosts, where RoPE's CPU shims are off."""
    from megatron.core.models.gpt import GPTModel
    from nsa_parallel.megatron.cpu_shims import enable_cpu_shims
    if torch.cuda.is_available():
        pytest.skip("RoPE on CPU tensors needs the CPU shims, exercised on CPU-only hosts")
    enable_cpu_shims()
    torch.manual_seed(0)
    return GPTModel(config=_config(), transformer_layer_spec=get_gpt_layer_nsa_spec(nsa_config=SMALL),
                    vocab_size=64, max_sequence_length=160, position_embedding_type="rope")


def test_documents_of_a_sample_equal_separate_samples(model_parallel):
    """--reset-attention-mask's packing: a GPTModel (RoPE) given one sample's documents, split at each EOD by
    ``document_packed_seq_params``, gives every document the logits it gets alone."""
    from nsa_parallel.documents import document_packed_seq_params
    model = _rope_gpt_on_cpu()
    eod = 63
    tokens = torch.randint(0, eod, (1, 150), generator=torch.Generator().manual_seed(1))
    tokens[0, [39, 60, 120]] = eod  # documents of 40, 21, 60 and (unfinished) 29 tokens
    packed = document_packed_seq_params(tokens, eod)
    assert packed.cu_seqlens_q.tolist() == [0, 40, 61, 121, 150] and packed.max_seqlen_q == 60
    with torch.no_grad():
        logits = model(tokens, torch.arange(150)[None], None, packed_seq_params=packed)
        for s, e in zip(packed.cu_seqlens_q[:-1].tolist(), packed.cu_seqlens_q[1:].tolist()):
            alone = model(tokens[:, s:e], torch.arange(e - s)[None], None)
            assert rel_err(logits[:, s:e], alone) < 1e-5
    with pytest.raises(ValueError, match=r"tokens must be \[1, s\], got \[2, 150\] \(--micro-batch-size 1\)"):
        document_packed_seq_params(tokens.expand(2, -1), eod)


def _cp2_packed_worker(rank, port, result, documents):
    """CP=2 (gloo): a THD batch split the Megatron way (each sequence in 4 chunks, rank r holding r and 3 - r) with
    RoPE, through the module, against one rank's module on the whole batch: outputs, input and weight gradients.
    ``documents``: three short documents more, held whole by one rank each (``nsa_parallel.documents``' layout,
    RoPE from 0 in each, padding after them)."""
    import torch.distributed as dist
    from megatron.core.packed_seq_params import PackedSeqParams
    from nsa_parallel.context_parallel import split_for_rank
    from nsa_parallel.documents import documents_on_cp_rank, plan_cp_documents
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    from nsa_parallel.megatron import enable_cpu_shims
    enable_cpu_shims(force=True)
    try:
        spec = get_gpt_layer_nsa_spec(nsa_config=SMALL, backend="reference").submodules.self_attention
        parallel_state.initialize_model_parallel()  # the reference: every rank the whole batch, CP = 1
        full = build_module(spec, config=_config(), layer_number=1)
        with torch.no_grad():  # one model: rank 0's weights everywhere
            for p in full.parameters():
                dist.broadcast(p, 0)
        bounds = [0, 128, 320]  # sequences of 128 and 192 tokens: chunks of 32 and 48
        if documents:
            bounds += [360, 385, 400]  # 40 on rank 0; 25 and 15 on rank 1 (split, each would take 128)
        cu = torch.tensor(bounds, dtype=torch.int32)
        packed = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=192,
                                 max_seqlen_kv=192)
        gen = torch.Generator().manual_seed(5)
        hidden = torch.randn(bounds[-1], 1, 64, generator=gen)
        probe = torch.randn(bounds[-1], 1, 64, generator=gen)
        emb = _rope(192, 16)

        real = slice(None)
        if documents:
            plan = plan_cp_documents(bounds, 2, SMALL)
            assert len(plan.split) == 2 and plan.whole == (((320, 360),), ((360, 385), (385, 400)))
            mine_tokens, mine_packed = documents_on_cp_rank({"tokens": torch.arange(bounds[-1])[None]}, -1, plan, rank)
            rows = mine_tokens["tokens"][0]
            real = rows >= 0

        def local(x):  # the rows this rank holds: its THD share, sequence after sequence (padding zero)
            if documents:
                return x[rows.clamp(min=0)].masked_fill(~real[:, None, None], 0)
            return torch.cat([split_for_rank(x[s:e], 2, rank, "load_balanced", dim=0)
                              for s, e in zip(bounds[:-1], bounds[1:])])

        h_full = hidden.clone().requires_grad_()
        full.core_attention.collect_stats = True  # NSA's statistics: each token at its position in its sequence
        out_full, _ = full(h_full, None, rotary_pos_emb=emb, packed_seq_params=packed)
        (out_full * probe).sum().backward()
        parallel_state.destroy_model_parallel()
        parallel_state.initialize_model_parallel(context_parallel_size=2)
        mine = build_module(spec, config=_config(context_parallel_size=2), layer_number=1)
        mine.load_state_dict(full.state_dict())
        h_mine = local(hidden).requires_grad_()
        mine.core_attention.collect_stats = True
        out_mine, _ = mine(h_mine, None, rotary_pos_emb=emb, packed_seq_params=mine_packed if documents else packed)
        want = full.core_attention.stats
        result[f"stats{rank}"] = max(abs(v - want[k]) / max(abs(want[k]), 1e-12)
                                     for k, v in mine.core_attention.stats.items())
        (out_mine * local(probe)).sum().backward()
        result[f"out{rank}"] = rel_err(out_mine.detach()[real], local(out_full.detach())[real])
        result[f"dx{rank}"] = rel_err(h_mine.grad[real], local(h_full.grad)[real])
        worst = 0.0
        pairs = list(zip(full.named_parameters(), mine.parameters()))
        scale = max(p.grad.abs().max().item() for (_, p), _ in pairs)
        for (name, p), q in pairs:
            g = q.grad.clone()
            dist.all_reduce(g)  # the trainer reduces weight gradients over data x context parallel ranks
            if name == "core_attention.compress_k.b2":
                # a shift of every compressed key leaves the softmax unchanged: this gradient is 0 up to rounding,
                # so it is held to the scale of the others
                worst = max(worst, (g - p.grad).abs().max().item() / scale)
            else:
                worst = max(worst, rel_err(g, p.grad))
        result[f"dw{rank}"] = worst
        all_done()
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()
    leave_spawned_rank()


@pytest.mark.parametrize("documents", [False, True], ids=["split", "split-and-whole"])
def test_context_parallel_2_packed_with_rope_equals_one_rank(documents):
    import torch.multiprocessing as mp
    from nsa_parallel.rendezvous import free_port
    result = mp.Manager().dict()
    mp.spawn(_cp2_packed_worker, args=(free_port(), result, documents), nprocs=2, join=True)
    for rank in (0, 1):
        for key in ("out", "dx", "dw", "stats"):
            assert result[f"{key}{rank}"] < 1e-5, dict(result)


def test_transformer_engine_flavour_is_a_named_error_without_it(model_parallel):
    from nsa_parallel.megatron.spec import transformer_engine_available
    if transformer_engine_available():
        spec = get_gpt_layer_nsa_spec(transformer_impl="transformer_engine")
        assert spec.submodules.self_attention.submodules.linear_qkv.__name__ == "TELayerNormColumnParallelLinear"
    else:
        with pytest.raises(ValueError, match="transformer_impl='transformer_engine' needs transformer-engine"):
            get_gpt_layer_nsa_spec(transformer_impl="transformer_engine")
    with pytest.raises(ValueError, match="transformer_impl='fast'; allowed: 'local', 'transformer_engine'"):
        get_gpt_layer_nsa_spec(transformer_impl="fast")


def test_nsa_config_file_for_stock_pretrain_gpt(tmp_path, monkeypatch):
    """``--spec nsa_parallel.megatron get_gpt_layer_nsa_spec`` passes only the model config: NSA settings come
    from the JSON file named by $NSA_CONFIG."""
    import json
    cfg_file = tmp_path / "nsa.json"
    cfg_file.write_text(json.dumps({"window": 128, "select_topn": 8, "backend": "reference"}))
    monkeypatch.setenv("NSA_CONFIG", str(cfg_file))
    core = get_gpt_layer_nsa_spec(_config(transformer_impl="local")).submodules.self_attention.submodules.core_attention
    assert core.params["nsa_config"].window == 128 and core.params["nsa_config"].select_topn == 8
    assert core.params["backend"] == "reference"
    cfg_file.write_text(json.dumps({"windw": 128}))
    with pytest.raises(ValueError, match=r"unknown keys \['windw'\]"):
        get_gpt_layer_nsa_spec(_config(transformer_impl="local"))
    cfg_file.write_text(json.dumps({"backend": "cuda"}))
    with pytest.raises(ValueError, match="backend='cuda'; allowed: reference, triton"):
        get_gpt_layer_nsa_spec(_config(transformer_impl="local"))


def test_phi_is_marked_tensor_parallel(model_parallel):
    """phi holds different KV heads on each TP rank: Megatron must count it once per rank in the grad norm and
    checkpoint it as one global tensor sharded along heads."""
    attn = build_module(get_gpt_layer_nsa_spec(nsa_config=SMALL).submodules.self_attention, config=_config(),
                        layer_number=1)
    for p in attn.core_attention.parameters():
        assert p.tensor_model_parallel and p.partition_dim == 0
    sd = attn.core_attention.sharded_state_dict(prefix="core.")
    w1 = sd["core.compress_k.w1"]
    assert w1.global_shape == (2, 8 * 16, 16) and w1.axis_fragmentations[0] == 1


def test_pretrain_gpt_needs_megatron_training():
    """``python -m nsa_parallel.pretrain_gpt`` runs Megatron-LM's ``pretrain()``; megatron-core < 0.17 has no
    megatron.training, which must be a named error (the GPU run with 0.19.2 is in docs/benchmarks.md)."""
    import importlib.util
    from nsa_parallel import pretrain_gpt
    if importlib.util.find_spec("megatron.training") is not None:
        pytest.skip("megatron.training is installed: the entry point runs as a job, not a unit test")
    with pytest.raises(SystemExit, match="needs megatron.training, shipped with megatron-core >= 0.17"):
        pretrain_gpt.main()


def test_pretrain_gpt_writes_nsa_statistics_to_tensorboard(model_parallel, monkeypatch, tmp_path):
    """Under Megatron's ``pretrain()`` (``--tensorboard-dir``), ``forward_step`` asks the NSA layers for their
    statistics on the first micro-batch of each iteration Megatron logs and writes them as the lean trainer names
    them (``nsa/layer{N}/...``), here for a sample of documents (each token at its place in its document)."""
    import argparse
    from types import SimpleNamespace

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from nsa_parallel import pretrain_gpt
    from nsa_parallel.arguments import add_nsa_args
    model = _rope_gpt_on_cpu()
    args = add_nsa_args(argparse.ArgumentParser()).parse_args([])
    args.reset_attention_mask, args.pipeline_model_parallel_size, args.micro_batch_size = True, 1, 1
    args.tensorboard_dir, args.log_interval, args.curr_iteration = str(tmp_path), 2, 0
    monkeypatch.setattr(pretrain_gpt, "_args", lambda: args)
    monkeypatch.setattr(pretrain_gpt, "_tokenizer", lambda a: SimpleNamespace(eod=9))
    monkeypatch.setattr(pretrain_gpt, "_DOCUMENT_SETUP", {})
    monkeypatch.setattr(pretrain_gpt, "_STATS", {"iteration": None, "writer": None})
    tokens = torch.randint(0, 9, (1, 150), generator=torch.Generator().manual_seed(1))
    tokens[0, [59, 99]] = 9  # documents of 60, 40 and 50 tokens
    batch = {"tokens": tokens, "labels": tokens.roll(-1, 1), "loss_mask": torch.ones(1, 150),
             "position_ids": torch.arange(150)[None]}
    cores = [layer.self_attention.core_attention for layer in model.decoder.layers]
    written = {}
    for it in range(4):  # iterations 1-4: 2 and 4 are logged, each once however many micro-batches it has
        args.curr_iteration = it
        for _ in range(2):
            with torch.no_grad():
                pretrain_gpt.forward_step(iter([batch]), model)
            if it % 2 == 1 and not written.get(it + 1):
                written[it + 1] = {f"nsa/layer{i}/{k}": v for i, c in enumerate(cores) for k, v in c.stats.items()}
            assert not any(c.collect_stats for c in cores)
    pretrain_gpt._STATS["writer"].close()
    ea = EventAccumulator(str(tmp_path))
    ea.Reload()
    tags = ea.Tags()["scalars"]
    assert len(tags) == 12 and set(tags) == set(written[2])
    for tag in tags:
        got = [(e.step, e.value) for e in ea.Scalars(tag)]
        assert got == [(it, pytest.approx(written[it][tag], rel=1e-6)) for it in (2, 4)], tag


def test_pretrain_gpt_forward_step_packs_documents(monkeypatch):
    """``pretrain_gpt.forward_step`` with ``--reset-attention-mask`` hands the model the sample's documents (ending
    at the tokenizer's EOD) as a packed batch, as the lean trainer does (before, the documents attended across each
    other silently); without it no packing. The flags it cannot take are named."""
    import argparse
    from types import SimpleNamespace

    from megatron.core import parallel_state as ps

    from conftest import recording_model, three_documents
    from nsa_parallel import pretrain_gpt
    from nsa_parallel.arguments import add_nsa_args
    args = add_nsa_args(argparse.ArgumentParser()).parse_args([])
    args.reset_attention_mask, args.pipeline_model_parallel_size, args.micro_batch_size = True, 1, 1
    monkeypatch.setattr(pretrain_gpt, "_args", lambda: args)
    built = []
    monkeypatch.setattr(pretrain_gpt, "_tokenizer", lambda a: built.append(a) or SimpleNamespace(eod=9))
    monkeypatch.setattr(pretrain_gpt, "_DOCUMENT_SETUP", {})
    monkeypatch.setattr(ps, "is_pipeline_first_stage", lambda **kw: True)
    monkeypatch.setattr(ps, "get_context_parallel_world_size", lambda: 1)
    seen = {}
    model = recording_model(seen)
    batch = {**three_documents(), "attention_mask": torch.ones(1)}  # keys the step does not take are left behind
    pretrain_gpt.forward_step(iter([batch]), model)
    assert seen["packed_seq_params"].cu_seqlens_q.tolist() == [0, 3, 5, 6]
    pretrain_gpt.forward_step(iter([batch]), model)
    assert len(built) == 1  # the tokenizer (and NSA config) once per run, not per micro-batch
    args.reset_attention_mask = False
    pretrain_gpt.forward_step(iter([batch]), model)
    assert seen["packed_seq_params"] is None
    args.reset_attention_mask, args.pipeline_model_parallel_size = True, 3
    with pytest.raises(SystemExit, match="--reset-attention-mask with --pipeline-model-parallel-size=3; allowed"):
        pretrain_gpt._check_args(args)
    args.pipeline_model_parallel_size, args.micro_batch_size = 2, 4
    with pytest.raises(SystemExit, match="--micro-batch-size=4; allowed: 1"):
        pretrain_gpt._check_args(args)
    args.micro_batch_size, args.context_parallel_size, args.calculate_per_token_loss = 1, 2, False
    with pytest.raises(SystemExit, match="--context-parallel-size=2 holds short documents whole .* add "
                                         "--calculate-per-token-loss"):
        pretrain_gpt._check_args(args)
    args.calculate_per_token_loss = True
    pretrain_gpt._check_args(args)
