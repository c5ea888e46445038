"""Generate tokens with a GPT built from the NSA spec: the prompt runs through the training kernels (prefill),
each new token through the NSA KV cache (:func:`nsa_parallel.kernels.decode.nsa_decode`).

    from nsa_parallel.generate import generate
    tokens = generate(model, [[1, 5, 9], [4, 2]], max_new_tokens=32)                    # greedy
    tokens = generate(model, prompts, 32, temperature=0.8, top_k=40, generator=g)       # sampling

    python -m nsa_parallel.generate --load ckpt/ <the trainer's model flags> --prompt 3 17 5 --max-new-tokens 16

Prompts may differ in length (ragged). One process, no tensor/pipeline/context parallelism yet.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch


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


def sample(logits: torch.Tensor, temperature: float = 0.0, top_k: int = 0,
           generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """``[B, V]`` logits -> ``[B]`` tokens: argmax at temperature 0, else softmax(logits / T) over the top k."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)[:, 0]


@torch.no_grad()
def generate(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, temperature: float = 0.0,
             top_k: int = 0, generator: Optional[torch.Generator] = None, backend: Optional[str] = None,
             return_logits: bool = False):
    """New tokens for each prompt (``max_new_tokens`` each); with ``return_logits`` also the ``[B, V]`` logits
    each token was drawn from, step by step."""
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
        logits = gpt(ids, torch.arange(tmax, device=device)[None].expand(bsz, -1), None)
        last = logits[torch.arange(bsz, device=device), lens - 1]
        pos, out, seen = lens.clone(), [], []
        for step in range(max_new_tokens):
            nxt = sample(last, temperature, top_k, generator)
            out.append(nxt)
            seen.append(last)
            if step + 1 == max_new_tokens:
                break
            state.mode, state.lens = "decode", pos
            if rope is not None:
                state.rotary = rope[pos].permute(1, 0, 2, 3)  # [max_len, 1, 1, d] rows -> [1, B, 1, d]
            last = gpt(nxt[:, None], pos[:, None], None)[:, 0]
            pos = pos + 1
    finally:
        for a in attns:
            a.decode_state = None
        gpt.train(was_training)
    tokens = torch.stack(out, dim=1).tolist()
    return (tokens, torch.stack(seen, dim=1)) if return_logits else tokens


def main(argv: Optional[List[str]] = None) -> List[List[int]]:
    """Load a trainer checkpoint (the trainer's model flags describe the model) and print continuations."""
    from .train import build_parser, load_for_inference
    p = build_parser()
    p.prog = "python -m nsa_parallel.generate"
    g = p.add_argument_group("generation")
    g.add_argument("--prompt", type=int, nargs="+", action="append", required=True,
                   help="token ids of one prompt; repeat the flag for a batch of prompts")
    g.add_argument("--max-new-tokens", type=int, default=16)
    g.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    g.add_argument("--top-k", type=int, default=0, help="0: the whole vocabulary")
    args = p.parse_args(argv)
    if not args.load:
        raise SystemExit("nsa_parallel.generate: --load DIR (a trainer checkpoint) is required")
    model = load_for_inference(args)
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(args.seed)
    try:
        tokens = generate(model, args.prompt, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                          generator=gen)
    except ValueError as e:
        raise SystemExit(f"nsa_parallel.generate: {e}") from None
    for prompt, new in zip(args.prompt, tokens):
        print(" ".join(map(str, prompt)), "->", " ".join(map(str, new)), flush=True)
    return tokens


if __name__ == "__main__":
    main()
