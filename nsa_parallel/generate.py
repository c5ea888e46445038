"""Generate tokens with a GPT built from the NSA spec: the prompt runs through the training kernels (prefill),
each new token through the NSA KV cache (:func:`nsa_parallel.kernels.decode.nsa_decode`).

    from nsa_parallel.generate import generate
    tokens = generate(model, [[1, 5, 9], [4, 2]], max_new_tokens=32)                    # greedy
    tokens = generate(model, prompts, 32, temperature=0.8, top_k=40, generator=g)       # sampling

    python -m nsa_parallel.generate --load ckpt/ <the trainer's model flags> --prompt 3 17 5 --max-new-tokens 16

    torchrun --nproc-per-node 4 -m nsa_parallel.generate --load ckpt/ ... --tensor-model-parallel-size 2
        --pipeline-model-parallel-size 2

Prompts may differ in length (ragged). Tensor parallelism: each rank decodes its own heads (its slice of every
layer's NSA KV cache), the vocab-parallel logits are gathered, and TP rank 0's token is broadcast so every rank
feeds the same one. Pipeline parallelism: each stage runs its layers (and fills their caches) on the hidden states
the previous stage sends; the last stage's token is broadcast to all stages. Context parallelism is refused by
name (a checkpoint saved with it loads at CP = 1).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch
import torch.distributed as dist


@dataclass
class DecodeState:
    """What the NSA attention layers read while :func:`generate` runs (``NSASelfAttention.decode_state``)."""
    mode: str  # "prefill" or "decode"
    max_len: int
    lens: torch.Tensor  # [B] tokens each sequence held before this forward's tokens
    backend: Optional[str] = None
    rotary: Optional[torch.Tensor] = None  # decode: RoPE angles at each sequence's position, [1, B, 1, d]
    caches: Dict[int, object] = field(default_factory=dict)  # layer number -> NSAKVCache


def _unwrap(model):
    while hasattr(model, "module"):
        model = model.module
    return model


def _group(gpt, name: str):
    """The model's ``name`` ("tp" / "pp") process group, None on one rank."""
    group = getattr(getattr(gpt, "pg_collection", None), name, None)
    if group is None and dist.is_initialized():
        from megatron.core import parallel_state as ps
        if ps.model_parallel_is_initialized():
            group = (ps.get_tensor_model_parallel_group() if name == "tp" else
                     ps.get_pipeline_model_parallel_group())
    return group if group is not None and dist.get_world_size(group) > 1 else None


class _Ranks:
    """Tensor- and pipeline-parallel plumbing: a forward gives logits of the whole (real) vocabulary on the last
    stage, and every rank leaves :meth:`choose` with the same tokens."""

    def __init__(self, gpt, vocab_size: Optional[int]):
        cfg = gpt.config
        if getattr(cfg, "context_parallel_size", 1) > 1:
            raise ValueError(f"generate: config.context_parallel_size={cfg.context_parallel_size}; allowed: 1 (load "
                             "the checkpoint with context parallel size 1: it reshards)")
        self.tp, self.pp = _group(gpt, "tp"), _group(gpt, "pp")
        if self.tp is not None and cfg.sequence_parallel:
            raise ValueError("generate: config.sequence_parallel=True splits the one new token of a decode step "
                             "over the tensor-parallel ranks; build the model with sequence_parallel=False (same "
                             "weights)")
        self.gather = self.tp is not None and getattr(gpt, "parallel_output", True)
        # checked on every rank before any forward: a rank that raised mid-way would leave the others waiting
        if vocab_size is not None and not 1 <= vocab_size <= gpt.vocab_size:
            raise ValueError(f"generate: vocab_size={vocab_size}; allowed: 1..{gpt.vocab_size} (the model's output "
                             "rows)")
        self.vocab_size = vocab_size
        self.width = vocab_size or gpt.vocab_size  # the logits' columns after the cut
        self.stages = dist.get_process_group_ranks(self.pp) if self.pp is not None else [None]
        self.stage = dist.get_rank(self.pp) if self.pp is not None else 0
        self.first, self.last = self.stage == 0, self.stage == len(self.stages) - 1
        self.hidden, self.dtype = cfg.hidden_size, next(gpt.parameters()).dtype

    def forward(self, gpt, ids: torch.Tensor, pos: torch.Tensor) -> Optional[torch.Tensor]:
        """``ids [B, s]`` through this stage: ``[B, s, vocab]`` logits on the last stage, None elsewhere (the
        hidden states ``[s, B, h]`` went to the next stage)."""
        if not self.first:
            x = torch.empty(ids.shape[1], ids.shape[0], self.hidden, dtype=self.dtype, device=ids.device)
            dist.recv(x, src=self.stages[self.stage - 1], group=self.pp)
            gpt.set_input_tensor(x)
        out = gpt(ids, pos, None)
        if not self.last:
            dist.send(out.to(self.dtype).contiguous(), dst=self.stages[self.stage + 1], group=self.pp)
            return None
        return self._full_vocab(out)

    def _full_vocab(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., V / tp]`` (vocab-parallel) or ``[..., V]`` -> ``[..., vocab_size]``."""
        if self.gather:
            parts = [torch.empty_like(x) for _ in range(dist.get_world_size(self.tp))]
            dist.all_gather(parts, x.contiguous(), group=self.tp)
            x = torch.cat(parts, dim=-1)
        if self.vocab_size is not None:
            x = x[..., :self.vocab_size]  # Megatron pads the vocabulary; padded rows are never drawn
        return x

    def choose(self, logits: Optional[torch.Tensor], bsz: int, device, draw, keep_logits: bool):
        """``(tokens [B], logits [B, vocab] or None)`` on every rank: drawn by ``draw(logits)`` on the last stage,
        TP rank 0's draw (sampling generators may differ per rank), broadcast to the other stages."""
        if self.last:
            tokens = draw(logits)
            if self.tp is not None:
                dist.broadcast(tokens, src=dist.get_global_rank(self.tp, 0), group=self.tp)
        else:
            tokens = torch.empty(bsz, dtype=torch.long, device=device)
            logits = torch.empty(bsz, self.width, dtype=torch.float32, device=device) if keep_logits else None
        if self.pp is not None:
            dist.broadcast(tokens, src=self.stages[-1], group=self.pp)
            if keep_logits:
                logits = logits.float().contiguous()
                dist.broadcast(logits, src=self.stages[-1], group=self.pp)
        return tokens, logits


def sample(logits: torch.Tensor, temperature: float = 0.0, top_k: int = 0,
           generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """``[B, V]`` logits -> ``[B]`` tokens: argmax at temperature 0, else softmax(logits / T) over the top k."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k > logits.shape[-1]:
        raise ValueError(f"top_k={top_k}; allowed: 0 (all) .. {logits.shape[-1]} (the vocabulary)")
    if top_k:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)[:, 0]


@torch.no_grad()
def generate(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, temperature: float = 0.0,
             top_k: int = 0, generator: Optional[torch.Generator] = None, backend: Optional[str] = None,
             vocab_size: Optional[int] = None, stop_token: Optional[int] = None, return_logits: bool = False):
    """New tokens for each prompt (``max_new_tokens`` each, or up to and including ``stop_token``: decoding ends
    once every sequence has drawn it); with ``return_logits`` also the ``[B, steps, V]`` logits each token was
    drawn from, step by step. ``vocab_size``: the data's vocabulary when the model's output rows
    are padded (tokens are drawn below it); default all rows. Under tensor / pipeline parallelism every rank
    calls this with the same arguments and gets the same tokens (and logits)."""
    from .megatron.attention import NSASelfAttention
    gpt = _unwrap(model)
    attns = [m for m in gpt.modules() if isinstance(m, NSASelfAttention)]
    if not attns:
        raise ValueError("generate: the model has no NSASelfAttention layers; build it from get_gpt_layer_nsa_spec")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate: prompts must be a non-empty list of non-empty token lists")
    if max_new_tokens < 1 or temperature < 0 or top_k < 0:
        raise ValueError(f"generate: max_new_tokens={max_new_tokens} must be >= 1, temperature={temperature} and "
                         f"top_k={top_k} >= 0")
    limit = vocab_size or getattr(gpt, "vocab_size", None)
    bad = [t for p in prompts for t in p if limit is not None and not 0 <= t < limit]
    if bad:  # a vocab-parallel embedding would silently embed them as zeros
        raise ValueError(f"generate: prompt token ids {bad[:8]} outside the vocabulary; allowed: 0..{limit - 1}")
    longest = max(len(p) for p in prompts) + max_new_tokens
    if getattr(gpt, "position_embedding_type", "") == "learned_absolute" and longest > gpt.max_sequence_length:
        raise ValueError(f"generate: the longest prompt + max_new_tokens = {longest} positions; a model with learned "
                         f"absolute positions has {gpt.max_sequence_length} (allowed: <= it)")
    ranks = _Ranks(gpt, vocab_size)
    if top_k > ranks.width:
        raise ValueError(f"generate: top_k={top_k}; allowed: 0 (all) .. {ranks.width} (the vocabulary)")
    device = next(gpt.parameters()).device
    bsz = len(prompts)
    lens = torch.tensor([len(p) for p in prompts], device=device)
    tmax = int(lens.max())
    max_len = tmax + max_new_tokens
    ids = torch.zeros(bsz, tmax, dtype=torch.long, device=device)  # right padding: causal, never seen
    for b, p in enumerate(prompts):
        ids[b, :len(p)] = torch.tensor(list(p), device=device)
    rope = gpt.rotary_pos_emb(max_len) if getattr(gpt, "position_embedding_type", "") == "rope" else None
    state = DecodeState("prefill", max_len, lens, backend=backend)
    was_training = gpt.training
    gpt.eval()
    for a in attns:
        a.decode_state = state
    try:
        logits = ranks.forward(gpt, ids, torch.arange(tmax, device=device)[None].expand(bsz, -1))
        last = None if logits is None else logits[torch.arange(bsz, device=device), lens - 1]
        pos, out, seen = lens.clone(), [], []
        stopped = torch.zeros(bsz, dtype=torch.bool, device=device)
        for step in range(max_new_tokens):
            nxt, last = ranks.choose(last, bsz, device, lambda x: sample(x, temperature, top_k, generator),
                                     return_logits)
            out.append(nxt)
            seen.append(last)
            if stop_token is not None:
                stopped |= nxt == stop_token
            if step + 1 == max_new_tokens or (stop_token is not None and bool(stopped.all())):
                break
            state.mode, state.lens = "decode", pos
            if rope is not None:
                state.rotary = rope[pos].permute(1, 0, 2, 3)  # [max_len, 1, 1, d] rows -> [1, B, 1, d]
            logits = ranks.forward(gpt, nxt[:, None], pos[:, None])
            last = None if logits is None else logits[:, 0]
            pos = pos + 1
    finally:
        for a in attns:
            a.decode_state = None
        gpt.train(was_training)
    tokens = torch.stack(out, dim=1).tolist()
    if stop_token is not None:
        tokens = [t[:t.index(stop_token) + 1] if stop_token in t else t for t in tokens]
    return (tokens, torch.stack(seen, dim=1)) if return_logits else tokens


def main(argv: Optional[List[str]] = None) -> List[List[int]]:
    """Load a trainer checkpoint (the trainer's model flags describe the model) and print continuations."""
    from .train import build_parser, load_for_inference
    p = build_parser()
    p.prog = "python -m nsa_parallel.generate"
    p.description = ("Continue prompts with a GPT the trainer saved: give --load and the trainer's model flags "
                     "(one process, or TP x PP processes under torchrun / srun).")
    g = p.add_argument_group("generation")
    g.add_argument("--prompt", type=int, nargs="+", action="append", required=True,
                   help="token ids of one prompt; repeat the flag for a batch of prompts")
    g.add_argument("--max-new-tokens", type=int, default=16)
    g.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    g.add_argument("--top-k", type=int, default=0, help="0: the whole vocabulary")
    g.add_argument("--stop-token", type=int, default=None,
                   help="end a continuation at this id (kept); decoding stops once every prompt has drawn it")
    args = p.parse_args(argv)
    if not args.load:
        raise SystemExit("nsa_parallel.generate: --load DIR (a trainer checkpoint) is required")
    model, vocab_size = load_for_inference(args)
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(args.seed)
    try:
        tokens = generate(model, args.prompt, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                          generator=gen, vocab_size=vocab_size, stop_token=args.stop_token)
    except ValueError as e:
        raise SystemExit(f"nsa_parallel.generate: {e}") from None
    if dist.get_rank() == 0:  # every TP rank holds the same tokens
        for prompt, new in zip(args.prompt, tokens):
            print(" ".join(map(str, prompt)), "->", " ".join(map(str, new)), flush=True)
    return tokens


if __name__ == "__main__":
    main()
    # a TP rank of this command aborted at exit in a fresh-clone CI run (2026-12-07) without the trainer's ending
    from .train import close_parallel
    close_parallel()
