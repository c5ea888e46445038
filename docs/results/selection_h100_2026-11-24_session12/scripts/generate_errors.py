"""Per (step, sequence) logit errors of cached bf16 generation against the full forward on one GPU, with the
record 25332a8's phi and with the old phi patched in (run 9; a diagnostic, not shipped)."""
import sys
import torch
sys.path.insert(0, "tests")
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_config import TransformerConfig
from nsa_parallel.distributed import init_distributed
from nsa_parallel.megatron import get_gpt_layer_nsa_spec
from nsa_parallel.generate import generate
from nsa_parallel.kernels import compression as C
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

def old_blocks(self, blocks):
    x = (blocks + self.pos_emb.to(blocks.dtype)).flatten(-2)
    hid = torch.einsum("...hi,hio->...ho", x, self.w1.to(x.dtype)) + self.b1.to(x.dtype)
    return torch.einsum("...hi,hio->...ho", torch.nn.functional.silu(hid), self.w2.to(x.dtype)) + self.b2.to(x.dtype)
def old_compress(self, x):
    return old_blocks(self, C.unfold_blocks(x, self.block, self.stride))

def run(tag):
    got, got_logits = generate(model, prompts, 6, return_logits=True)
    toks = [list(p) for p in prompts]
    errs = []
    with torch.no_grad():
        for step in range(6):
            row = []
            for b, t in enumerate(toks):
                want = model(torch.tensor([t], device="cuda"), torch.arange(len(t), device="cuda")[None], None)[0, -1]
                err = (got_logits[b, step].float() - want.float()).abs().max() / want.float().abs().max()
                row.append(round(err.item(), 4))
                t.append(got[b][step])
            errs.append(row)
    print(tag, errs, flush=True)

run("new")
C.Compression.compress_blocks = old_blocks
C.Compression._compress = old_compress
run("old")
