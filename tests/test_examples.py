"""The examples run as documented (small settings) and say what they claim."""
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_CUDA = torch.cuda.is_available()


def _run(cmd, tmp_path, timeout=600):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


def test_attention_example(tmp_path):
    out = _run([sys.executable, os.path.join(ROOT, "examples", "nsa_attention_example.py"), "--t", "128"], tmp_path)
    assert re.search(r"reference: out \(1, 128, 16, 64\), 16 blocks per query", out), out


@pytest.mark.skipif(HAS_CUDA and torch.cuda.device_count() < 2, reason="the TP=2 part needs 2 GPUs (NCCL)")
@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun is not on PATH")
def test_train_and_generate_example(tmp_path):
    """Training logs losses and validation, and both generations (1 process, TP=2) print the same tokens."""
    out = _run(["bash", os.path.join(ROOT, "examples", "train_and_generate.sh"), str(tmp_path / "run")], tmp_path)
    assert re.search(r"iteration +40 \| loss [0-9.]+", out), out
    assert len(re.findall(r"iteration +(20|40) \| validation/loss [0-9.]+ \| validation/ppl", out)) == 2, out
    one = out.split("== one process")[1].split("== two tensor-parallel processes")[0].strip().splitlines()
    two = out.split("== two tensor-parallel processes")[1].strip().splitlines()
    one = [line for line in one if "->" in line]
    two = [line for line in two if "->" in line]
    assert len(one) == 2 and one == two, (one, two)
    assert one[0].startswith("3 35 17 33 3 -> ") and len(one[0].split("->")[1].split()) == 6
    assert (tmp_path / "run" / "ckpt" / "latest_checkpointed_iteration.txt").read_text() == "40"
