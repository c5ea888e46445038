"""Which blocks the cached run and the full forward select at the step where their logits part (a diagnostic)."""
import sys

import torch
sys.path.insert(0, "tests")
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_config import TransformerConfig
from nsa_parallel.distributed import init_distributed
from nsa_parallel.megatron import get_gpt_layer_nsa_spec
import nsa_parallel.megatron.attention as A
from nsa_parallel.generate import generate
from conftest import SMALL
init_distributed()
parallel_state.initialize_model_parallel(1, 1)
config = TransformerConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                           use_cpu_initialization=True, hidden_dropout=0.0, attention_dropout=0.0,
                           add_bias_linear=False, params_dtype=torch.float32, init_method_std=0.2)
torch.manual_seed(0)
model = GPTModel(config=config, transformer_layer_spec=get_gpt_layer_nsa_spec(nsa_config=SMALL), vocab_size=50,
                 max_sequence_length=128, position_embedding_type="rope").eval().cuda().to(torch.bfloat16)
PROMPTS = [[3, 1, 4, 1, 5], list(range(2, 30)), [7] * 41]
prompts = [p * 8 for p in PROMPTS]
dec, full = [], []
real_dec, real_att = A.nsa_decode, A.nsa_attention
def rec_dec(*a, **k):
    k["return_indices"] = True
    o, idx = real_dec(*a, **k)
    dec.append(idx.clone())
    return o
def rec_att(*a, **k):
    o, idx = real_att(*a, **k)
    full.append(idx[:, -1].clone())
    return o, idx
A.nsa_decode, A.nsa_attention = rec_dec, rec_att
got, got_logits = generate(model, prompts, 6, return_logits=True)
full.clear()
toks = [list(p) for p in prompts]
with torch.no_grad():
    for step in range(6):
        for b, t in enumerate(toks):
            full.clear()
            want = model(torch.tensor([t], device="cuda"), torch.arange(len(t), device="cuda")[None], None)[0, -1]
            err = ((got_logits[b, step].float() - want.float()).abs().max() / want.float().abs().max()).item()
            # decode calls: per step one call per layer (2 layers); step s uses dec[2*s], dec[2*s+1]
            same = [None, None] if step == 0 else [
                torch.equal(dec[2 * (step - 1) + layer][b].cpu(), full[layer][0].cpu()) for layer in range(2)]
            print(f"b={b} step={step} err={err:.4f} blocks_equal_per_layer={same}", flush=True)
            if not all(x is not False for x in same):
                for layer in range(2):
                    print("   decode", dec[2 * (step - 1) + layer][b].tolist(), "\n   full  ", full[layer][0].tolist())
            t.append(got[b][step])
