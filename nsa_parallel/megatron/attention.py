"""NSA self-attention for Megatron-Core (tensors ``[s, b, h]`` at the module boundary, as Megatron's).

One column-parallel projection yields, group by group, the G query heads of a KV group, the keys and values of the
three branches (compressed, selected, window) and the G x 3 gate logits (Megatron's ``attention_output_gate`` is
the precedent for riding extra per-head channels along). Laying the output out per group means Megatron's even split
of the output dimension over tensor-parallel ranks hands each rank whole GQA groups, so selection scores never need
a cross-rank reduction. The compression MLP phi has its own weights per KV head and lives with its heads' rank.
"""
from __future__ import annotations

import math
import weakref
from typing import Optional

import torch
from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group, make_sharded_tensors_for_checkpoint

from ..context_parallel import local_positions, nsa_attention_cp
from ..kernels import Compression, NSAConfig, nsa_attention
from ..kernels.cache import NSAKVCache
from ..kernels.decode import nsa_decode
from ..kernels.reference import activate_gates
from ..kernels.varlen import host_values
from ..metrics import RegionTimer, nsa_stats

NUM_BRANCHES = 3


def _tp_group(pg_collection):
    if pg_collection is not None and getattr(pg_collection, "tp", None) is not None:
        return pg_collection.tp
    from megatron.core import parallel_state
    return parallel_state.get_tensor_model_parallel_group()


def packed_cu_seqlens(packed_seq_params, batch: int):
    """The whole sequences' bounds of a THD batch (the padded ones where Megatron pads for CP), or None."""
    if packed_seq_params is None:
        return None
    if packed_seq_params.qkv_format not in (None, "thd"):
        raise ValueError(f"NSA: packed_seq_params.qkv_format={packed_seq_params.qkv_format!r}; allowed: 'thd'")
    if getattr(packed_seq_params, "local_cp_size", None) is not None:
        raise ValueError("NSA: packed_seq_params.local_cp_size (dynamic / hierarchical CP) is not supported; the "
                         "context-parallel group comes from the model's process groups")
    if batch != 1:
        raise ValueError(f"packed sequences need micro-batch size 1 ([t, 1, h] inputs), got b={batch}")
    q, kv = packed_seq_params.cu_seqlens_q, packed_seq_params.cu_seqlens_kv
    q_pad = getattr(packed_seq_params, "cu_seqlens_q_padded", None)
    kv_pad = getattr(packed_seq_params, "cu_seqlens_kv_padded", None)
    q, kv = (q_pad if q_pad is not None else q), (kv_pad if kv_pad is not None else kv)
    if kv is not None and kv is not q and not torch.equal(q, kv):  # the same tensor as a rule: no device sync
        raise ValueError("NSA is self-attention: packed_seq_params must give the same cu_seqlens for q and kv")
    return q


def whole_documents(packed_seq_params, cp_group):
    """Under :func:`nsa_parallel.documents.documents_on_cp_rank`'s layout: ``(split, cu_seqlens_whole,
    positions)``, the rank's tokens of split documents (they come first), the bounds of the documents it holds
    whole after them and those tokens' positions in their documents; None for any other batch."""
    whole = getattr(packed_seq_params, "cu_seqlens_whole", None)
    if whole is None:
        return None
    if cp_group is None:
        raise ValueError("NSA: packed_seq_params.cu_seqlens_whole (documents kept whole on a CP rank) needs "
                         "context_parallel_size > 1")
    split = host_values(packed_cu_seqlens(packed_seq_params, 1))[-1] // torch.distributed.get_world_size(cp_group)
    return split, whole, packed_seq_params.positions[split:]


def packed_positions(packed_seq_params, cp_group):
    """``(positions, real)`` ``[t_local]`` of a THD batch on this rank: each row's position in its sequence and
    whether it is a sequence's token rather than CP padding (``cu_seqlens_q`` real, ``cu_seqlens_q_padded`` padded
    bounds), for NSA's statistics."""
    if getattr(packed_seq_params, "real", None) is not None:  # nsa_parallel.documents' layout
        return packed_seq_params.positions, packed_seq_params.real
    cp, rank = (1, 0) if cp_group is None else (cp_group.size(), cp_group.rank())
    padded = host_values(packed_cu_seqlens(packed_seq_params, 1))
    lengths = [b - a for a, b in zip(padded, padded[1:])]
    real_bounds = host_values(packed_seq_params.cu_seqlens_q) if packed_seq_params.cu_seqlens_q is not None else padded
    positions = [local_positions(n, cp, rank) if cp > 1 else torch.arange(n) for n in lengths]
    real = [p < b - a for p, a, b in zip(positions, real_bounds, real_bounds[1:])]
    device = packed_seq_params.cu_seqlens_q.device if packed_seq_params.cu_seqlens_q is not None else None
    return torch.cat(positions).to(device), torch.cat(real).to(device)


def _kv_bthd(keys, values):
    """Branch keys / values (cmp, slc, swa), each ``[s, b, hkv, d]`` -> ``[k_cmp, v_cmp, k_slc, v_slc, k_swa,
    v_swa]`` as ``[b, s, hkv, d]`` views."""
    return [x.transpose(0, 1) for pair in zip(keys, values) for x in pair]


def _cp_group(config, pg_collection):
    """The context-parallel group, or None without CP."""
    if getattr(config, "context_parallel_size", 1) == 1:
        return None
    if pg_collection is not None and getattr(pg_collection, "cp", None) is not None:
        return pg_collection.cp
    from megatron.core import parallel_state
    return parallel_state.get_context_parallel_group()


def _partition_of(full: Compression, first: int, count: int, dtype) -> Compression:
    """phi for KV heads ``first .. first+count-1`` of ``full``: every rank draws the whole model's phi from the same
    RNG stream and keeps its heads, so a model initialises identically for every TP size."""
    part = Compression(count, full.head_dim, full.block, full.stride, full.hidden, device="meta")  # draws nothing
    for name, p in full.named_parameters():
        param = torch.nn.Parameter(p.detach()[first:first + count].to(dtype).clone())
        # sharded along heads like a column-parallel weight: counted once per rank in the grad norm, and
        # checkpointed as one global [num_query_groups, ...] tensor (so TP sizes can change on resume)
        set_tensor_model_parallel_attributes(param, is_parallel=True, dim=0, stride=1)
        setattr(part, name, param)
    return part


class NSACoreAttention(MegatronModule):
    """Runs the NSA core (:func:`nsa_attention`) on Megatron's ``[s, b, h, d]`` tensors of this TP partition.

    Holds phi (the compression MLP) for the partition's KV heads. Accepts Megatron's core-attention constructor
    arguments so that ``SelfAttention`` can build it from a spec.
    """

    def __init__(self, config, layer_number: int, attn_mask_type=AttnMaskType.causal, attention_type: str = "self",
                 cp_comm_type=None, softmax_scale: Optional[float] = None, pg_collection=None,
                 nsa_config: Optional[NSAConfig] = None, backend: Optional[str] = None, **kwargs):
        super().__init__(config=config)
        if attn_mask_type != AttnMaskType.causal:
            raise ValueError(f"NSA is causal: attn_mask_type must be AttnMaskType.causal, got {attn_mask_type}")
        self.layer_number = layer_number  # 1-based over the whole model (Megatron adds the stage's offset)
        self.tp_group = _tp_group(pg_collection)
        self.cp_group = _cp_group(config, pg_collection)
        rank, tp = torch.distributed.get_rank(self.tp_group), torch.distributed.get_world_size(self.tp_group)
        self.tp_size = tp
        self.nsa_config = nsa_config or NSAConfig()
        self.backend = backend
        self.num_kv_heads = config.num_query_groups // tp
        self.head_dim = config.kv_channels
        self.softmax_scale = softmax_scale or 1.0 / math.sqrt(self.head_dim)
        c, first = self.nsa_config, rank * self.num_kv_heads
        for name in ("compress_k", "compress_v"):
            full = Compression(config.num_query_groups, self.head_dim, c.compress_block, c.compress_stride)
            setattr(self, name, _partition_of(full, first, self.num_kv_heads, config.params_dtype))
        self.collect_stats = False  # set by the trainer on logging steps
        self.stats: dict = {}
        self.timer = RegionTimer()

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None):
        """phi's parameters as TP-sharded tensors along their leading (KV head) axis."""
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        out = {}
        for name in ("compress_k", "compress_v"):
            sd = getattr(self, name).state_dict(prefix="", keep_vars=True)
            out.update(make_sharded_tensors_for_checkpoint(
                sd, f"{prefix}{name}.", {k: 0 for k in sd}, sharded_offsets, tp_group=self.tp_group,
                dp_cp_group=metadata["dp_cp_group"]))
        return out

    def forward(self, query, keys, values, gate, packed_seq_params=None):
        """query ``[s, b, hq, d]``; keys / values: (cmp, slc, swa) each ``[s, b, hkv, d]``; gate ``[s, b, hq, 3]``
        activated. Returns ``[s, b, hq * d]``."""
        s, b = query.shape[:2]
        cu = packed_cu_seqlens(packed_seq_params, b)
        whole = whole_documents(packed_seq_params, self.cp_group)
        kv = _kv_bthd(keys, values)
        backend = self.backend or ("triton" if query.is_cuda else "reference")
        # Under autocast (--bf16) some upstream ops leave fp32 (e.g. softmax gates): run the core in q's dtype,
        # autocast off, so the kernels see one dtype and phi computes in it.
        kv = [x.to(query.dtype) for x in kv]
        q, gate = query.transpose(0, 1), gate.transpose(0, 1).to(query.dtype)
        with torch.autocast(device_type=query.device.type, enabled=False):
            return self._core(q, kv, gate, packed_seq_params, cu, None if whole is None else whole[1], backend, s, b)

    def _core(self, q, kv, gate, packed_seq_params, cu, cu_whole, backend, s, b):
        if self.collect_stats:
            q, gate, *kv = self.timer.enter(q, gate, *kv)
        positions = real = None
        if self.cp_group is not None and cu is not None:
            # THD under CP: every sequence split on its own by the load-balanced layout (TE's
            # thd_get_partitioned_indices, Megatron's THD RoPE); cu holds the whole sequences' bounds; documents
            # a rank holds whole, if any, follow (nsa_parallel.documents)
            o, idx = nsa_attention_cp(q, *kv, gate, compress_k=self.compress_k, compress_v=self.compress_v,
                                      cp_group=self.cp_group, config=self.nsa_config, scale=self.softmax_scale,
                                      layout="load_balanced", backend=backend, cu_seqlens=cu,
                                      cu_seqlens_whole=cu_whole, return_block_indices=True)
        elif self.cp_group is not None:  # Megatron's load-balanced split, which its RoPE slicing also assumes
            o, idx = nsa_attention_cp(q, *kv, gate, compress_k=self.compress_k, compress_v=self.compress_v,
                                      cp_group=self.cp_group, config=self.nsa_config, scale=self.softmax_scale,
                                      layout="load_balanced", backend=backend, return_block_indices=True)
            cp = torch.distributed.get_world_size(self.cp_group)
            positions = local_positions(q.shape[1] * cp, cp, torch.distributed.get_rank(self.cp_group))
        else:
            o, idx = nsa_attention(q, *kv, gate, compress_k=self.compress_k, compress_v=self.compress_v,
                                   config=self.nsa_config, scale=self.softmax_scale, cu_seqlens=cu, backend=backend,
                                   return_block_indices=True)
        if self.collect_stats:
            o = self.timer.leave(o)
            if cu is not None:  # each token at its position in its own sequence, padding left out
                positions, real = packed_positions(packed_seq_params, self.cp_group)
            # over every head (the TP ranks') and under CP over the whole sequences (every CP rank's tokens)
            groups = [g for g in (self.tp_group if self.tp_size > 1 else None, self.cp_group) if g is not None]
            self.stats = nsa_stats(gate, idx, self.nsa_config, positions=positions, group=groups, real=real)
        return o.transpose(0, 1).reshape(s, b, -1)


# the masks checked already: a micro-batch's mask goes to every layer, and the check reads it to the host once
_CHECKED_MASKS = weakref.WeakValueDictionary()


def refuse_document_mask(attention_mask: torch.Tensor) -> None:
    """NSA is causal by construction and takes no dense mask. Megatron's GPT datasets build a ``[b, 1, s, s]``
    mask (True = masked) that with ``--reset-attention-mask`` also hides earlier documents; ignoring it would
    let documents attend across each other unseen. A causal mask never hides the first token; a document mask
    hides it from the last query of a sample of two or more documents (under CP, rank 0 holds that query): that
    entry is checked, one host read per mask tensor."""
    if _CHECKED_MASKS.get(id(attention_mask)) is attention_mask:
        return
    if attention_mask.dim() == 4 and bool(attention_mask[..., -1, 0].any()):
        raise ValueError("NSA: attention_mask hides the first token from the last one (document masking, "
                         "--reset-attention-mask): NSA takes documents as packed sequences (THD PackedSeqParams), "
                         "not as a dense mask; use python -m nsa_parallel.pretrain_gpt or nsa_parallel.train, "
                         "whose --reset-attention-mask packs them")
    _CHECKED_MASKS[id(attention_mask)] = attention_mask


class NSASelfAttention(SelfAttention):
    """Megatron ``SelfAttention`` whose fused projection feeds NSA's three branches and gates.

    Spec params: ``nsa_config`` (:class:`NSAConfig`) and ``backend`` reach the core attention through its spec.
    Supported: tensor parallelism with ``num_query_groups`` divisible by the TP size (each rank owns whole GQA
    groups), sequence parallelism (handled by the linear layers), pipeline parallelism, context parallelism
    (Megatron's load-balanced split; :func:`nsa_attention_cp`); decoding through the NSA KV cache
    (:func:`nsa_parallel.generate.generate`).
    """

    decode_state = None
    """Set by :func:`nsa_parallel.generate.generate` while it runs: prefill fills this layer's NSA KV cache, decode
    steps attend through it."""

    def __init__(self, config, submodules, layer_number: int, attn_mask_type=AttnMaskType.causal, **kwargs):
        super().__init__(config, submodules, layer_number, attn_mask_type=attn_mask_type, **kwargs)
        tp = self.world_size
        if config.num_query_groups % tp:
            raise ValueError(f"NSA needs whole GQA groups per tensor-parallel rank: num_query_groups="
                             f"{config.num_query_groups} must be a multiple of tensor_model_parallel_size={tp}")
        self.group_size = config.num_attention_heads // config.num_query_groups
        d = config.kv_channels
        self.group_split = [self.group_size * d] + [d] * (2 * NUM_BRANCHES) + [self.group_size * NUM_BRANCHES]
        width = config.num_query_groups * sum(self.group_split)
        # Replace the stock q/k/v projection by one of NSA's width, built the same way (column-parallel).
        self.linear_qkv = submodules.linear_qkv(
            config.hidden_size, width, config=config, init_method=config.init_method, gather_output=False,
            bias=config.add_bias_linear or config.add_qkv_bias, skip_bias_add=False, is_expert=False,
            tp_comm_buffer_name="qkv", tp_group=self.pg_collection.tp)

    def split_projection(self, mixed: torch.Tensor):
        """``[s, b, groups_p * W]`` -> q ``[s, b, hq_p, d]``, keys/values (cmp, slc, swa) ``[s, b, hkv_p, d]``,
        gate logits ``[s, b, hq_p, 3]``."""
        s, b = mixed.shape[:2]
        g, d = self.num_query_groups_per_partition, self.config.kv_channels
        parts = mixed.view(s, b, g, -1).split(self.group_split, dim=-1)
        q = parts[0].reshape(s, b, g * self.group_size, d)
        keys = tuple(parts[1 + 2 * i] for i in range(NUM_BRANCHES))
        values = tuple(parts[2 + 2 * i] for i in range(NUM_BRANCHES))
        gate = parts[-1].reshape(s, b, g * self.group_size, NUM_BRANCHES)
        return q, keys, values, gate

    def forward(self, hidden_states, attention_mask=None, key_value_states=None, inference_context=None,
                rotary_pos_emb=None, rotary_pos_cos=None, rotary_pos_sin=None, rotary_pos_cos_sin=None,
                attention_bias=None, packed_seq_params=None, sequence_len_offset=None, *, inference_params=None,
                **kwargs):
        """hidden_states ``[s, b, h]`` -> ``(output [s, b, h], bias)``, as Megatron's attention modules return."""
        if inference_context is not None or inference_params is not None:
            raise NotImplementedError("NSASelfAttention: Megatron's inference contexts are not supported; decode "
                                      "with nsa_parallel.generate.generate (the NSA KV cache)")
        if attention_mask is not None and packed_seq_params is None:
            refuse_document_mask(attention_mask)
        state = self.decode_state
        mixed, _ = self.linear_qkv(hidden_states)
        q, keys, values, gate_logits = self.split_projection(mixed)
        if state is not None and state.mode == "decode":  # one new token per sequence, RoPE at its own position
            rotary_pos_emb = state.rotary
        if rotary_pos_emb is not None:
            q_emb, k_emb = rotary_pos_emb if isinstance(rotary_pos_emb, tuple) else (rotary_pos_emb,) * 2
            cu = packed_cu_seqlens(packed_seq_params, q.shape[1])
            cp_group = getattr(self.pg_collection, "cp", None)
            whole = whole_documents(packed_seq_params, self.core_attention.cp_group)

            def thd_rope(x, emb):  # Megatron's THD RoPE takes [t, h, d] and, under CP, each sequence's positions
                return apply_rotary_pos_emb(x[:, 0], emb, config=self.config, cu_seqlens=cu,
                                            cp_group=cp_group)[:, None]

            def rope(x, emb):
                if cu is None:
                    return apply_rotary_pos_emb(x, emb, config=self.config, cp_group=cp_group)
                if whole is None:
                    return thd_rope(x, emb)
                split, _, positions = whole  # the documents held whole: each token at its own position
                parts = [thd_rope(x[:split], emb)] if split else []
                if x.shape[0] > split:
                    parts.append(apply_rotary_pos_emb(x[split:], emb[positions], config=self.config,
                                                      cp_group=cp_group))
                return torch.cat(parts)

            q = rope(q, q_emb)
            keys = tuple(rope(k, k_emb) for k in keys)
        gate = activate_gates(gate_logits, self.core_attention.nsa_config)
        if state is not None and state.mode == "decode":
            return self.linear_proj(self._decode_step(q, keys, values, gate, state))
        core = self.core_attention(q, keys, values, gate, packed_seq_params=packed_seq_params)
        if state is not None:  # prefill: the training kernels ran; keep what the branches need for decoding
            self._fill_cache(keys, values, state)
        return self.linear_proj(core)

    def _decode_backend(self, state, x) -> str:
        return state.backend or self.core_attention.backend or ("triton" if x.is_cuda else "reference")

    def _fill_cache(self, keys, values, state) -> None:
        core = self.core_attention
        b = keys[0].shape[1]
        cache = NSAKVCache(b, state.max_len, core.num_kv_heads, core.head_dim, core.nsa_config, core.compress_k,
                           core.compress_v, device=keys[0].device, dtype=keys[0].dtype, backend=self._decode_backend(
                               state, keys[0]))
        cache.prefill(*_kv_bthd(keys, values), lens=state.lens)
        state.caches[self.layer_number] = cache

    def _decode_step(self, q, keys, values, gate, state) -> torch.Tensor:
        """q ``[1, b, hq, d]`` -> ``[1, b, hq * d]`` through this layer's cache."""
        core = self.core_attention
        cache = state.caches[self.layer_number]
        cache.append(*_kv_bthd(keys, values))
        o = nsa_decode(q[0], gate[0].to(q.dtype), cache, scale=core.softmax_scale,
                       backend=self._decode_backend(state, q))
        return o.reshape(1, o.shape[0], -1)
