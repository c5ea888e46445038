"""Launching: the rendezvous read from torchrun's, Slurm's and MPI's environments, and real launches on CPU
(gloo): the sbatch scripts on a one-node Slurm (srun per task, torchrun per node) and ``mpirun -np 2`` through
the mpi4py bootstrap. Each real launch trains the tiny GPT and must print the single-process losses."""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from nsa_parallel.rendezvous import detect, discover, expand_nodelist

ROOT = Path(__file__).resolve().parents[1]
# the tiny model of test_train, as one string for the scripts' MODEL_ARGS
TINY = ("--micro-batch-size 4 --hidden-size 64 --num-attention-heads 4 --num-query-groups 2 --recall-pairs 8 "
        "--recall-keys 16 --recall-values 8 --nsa-window 16 --nsa-select-block 16 --nsa-select-topn 4 "
        "--nsa-compress-block 8 --nsa-compress-stride 4 --lr-warmup-iters 1 --lr-decay-iters 4 --log-interval 1")
SEQ, ITERS = 128, 3


NODELISTS = [
    ("vm", ["vm"]),
    ("gpu[01-03,07]", ["gpu01", "gpu02", "gpu03", "gpu07"]),
    ("a[8-10],login-[1-2]", ["a8", "a9", "a10", "login-1", "login-2"]),
    ("n[1-2]-r[3,5]", ["n1-r3", "n1-r5", "n2-r3", "n2-r5"]),
    ("node007,node[009-010]", ["node007", "node009", "node010"]),
]


@pytest.mark.parametrize("nodelist,hosts", NODELISTS)
def test_slurm_nodelist_expands(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("bad", ["n[3-1]", "n[a-b]", ""])
def test_bad_nodelists_are_named(bad):
    with pytest.raises(ValueError, match="SLURM_JOB_NODELIST"):
        expand_nodelist(bad)


def test_rendezvous_from_each_environment():
    tr = dict(RANK="3", WORLD_SIZE="8", LOCAL_RANK="1", MASTER_ADDR="h0", MASTER_PORT="1234")
    assert detect(tr) == "torchrun"
    r = discover(env=tr)
    assert (r.rank, r.world_size, r.local_rank, r.master_addr, r.master_port) == (3, 8, 1, "h0", 1234)
    step = dict(SLURM_PROCID="5", SLURM_NTASKS="16", SLURM_STEP_NUM_TASKS="16", SLURM_LOCALID="5",
                SLURM_STEP_ID="0", SLURM_JOB_NODELIST="gpu[03-04]", SLURM_JOB_ID="41234")
    assert detect(step) == "slurm"
    r = discover(env=step)
    assert (r.rank, r.world_size, r.local_rank, r.master_addr) == (5, 16, 5, "gpu03")
    assert r.master_port == discover(env=dict(step, SLURM_PROCID="0")).master_port  # agreed without talking
    batch = {k: v for k, v in step.items() if k != "SLURM_STEP_ID"}  # a script sbatch runs, outside srun
    assert detect(batch) == "single"
    assert detect(dict(OMPI_COMM_WORLD_SIZE="2")) == "mpi"
    assert discover(env={}).world_size == 1


@pytest.mark.parametrize("env,launcher,match", [
    (dict(RANK="2", WORLD_SIZE="2", MASTER_ADDR="h"), "auto", "rank 2 must be in"),
    (dict(RANK="0", WORLD_SIZE="2"), "auto", "MASTER_ADDR is not set"),
    (dict(RANK="x", WORLD_SIZE="2", MASTER_ADDR="h"), "auto", "RANK='x' must be an integer"),
    ({}, "slurm", "SLURM_PROCID is not set"),
    ({}, "pbs", "launcher='pbs'; allowed: auto, torchrun, slurm, mpi, single"),
])
def test_bad_rendezvous_is_named(env, launcher, match):
    with pytest.raises(ValueError, match=re.escape(match)):
        discover(launcher, env=env)


# ------------------------------------------------------------------------------------------------ real launches
megatron = pytest.importorskip("megatron.core")


def _printed_losses(text: str):
    return [float(m) for m in re.findall(r"iteration +\d+ \| loss ([0-9.eE+-]+)", text)]


@pytest.fixture(scope="module")
def single_losses():
    from nsa_parallel.train import train
    res = train(["--device", "cpu", "--seq-length", str(SEQ), "--train-iters", str(ITERS)] + TINY.split())
    return [h["loss"] for h in res["history"]]


def _assert_same(text, want):
    got = _printed_losses(text)
    assert len(got) == len(want), text[-3000:]
    for a, b in zip(got, want):  # printed to 4 significant digits
        assert abs(a - b) <= 1e-3 * abs(b), (got, want)


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    from slurm_cluster import OneNodeSlurm, missing
    why = missing()
    if why:
        pytest.skip(f"no one-node Slurm here: {why}")
    cluster = OneNodeSlurm(tmp_path_factory.mktemp("slurm")).start()
    yield cluster
    cluster.stop()


def test_nodelist_expansion_agrees_with_scontrol(slurm):
    for nodelist, hosts in NODELISTS:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             env=slurm.env, check=True)
        assert out.stdout.split() == hosts == expand_nodelist(nodelist)


@pytest.mark.parametrize("script,extra", [
    ("slurm/train.sbatch", dict(CP="2")),  # srun: 2 tasks, each a rank holding half of every sequence
    ("slurm/train_torchrun.sbatch", dict(TP="2", PROCS_PER_NODE="2")),  # srun: 1 task running torchrun x 2
])
def test_sbatch_scripts_train_on_a_real_slurm(slurm, single_losses, tmp_path, script, extra):
    import socket
    busy = socket.socket()  # a stale rendezvous in the submitting shell (sbatch copies it into the job) ...
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    env = dict(NSA_DEVICE="cpu", DATA="recall", SEQ_LEN=str(SEQ), TRAIN_ITERS=str(ITERS), MODEL_ARGS=TINY,
               RUN_DIR=str(tmp_path / "run"), PYTHON=sys.executable, MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(busy.getsockname()[1]), RANK="5", WORLD_SIZE="9", **extra)  # ... is not used
    out = tmp_path / "job.out"
    ntasks = "2" if script.endswith("train.sbatch") else "1"
    res = slurm.sbatch(script, f"--ntasks={ntasks}", "--ntasks-per-node", ntasks, f"--output={out}",
                       cwd=str(ROOT), env=env)
    busy.close()
    text = out.read_text() if out.exists() else ""
    assert res.returncode == 0, f"{res.stdout}{res.stderr}\n--- job output\n{text[-4000:]}\n{slurm.logs()}"
    assert re.search(r"world 2 = TP \d x PP 1 x CP \d x DP 1", text), text[-3000:]
    _assert_same(text, single_losses)
    assert any((tmp_path / "run" / "tensorboard").iterdir())  # the logging rank wrote its scalars


def test_mpirun_through_the_mpi4py_bootstrap(single_losses, tmp_path):
    if shutil.which("mpirun") is None:
        pytest.skip("mpirun not installed (Debian: openmpi-bin; bash tests/system_deps.sh installs it)")
    pytest.importorskip("mpi4py", reason="mpi4py not installed: pip install 'nsa-parallel[mpi]'")
    cmd = ["mpirun", "-np", "2", "--oversubscribe"] + (["--allow-run-as-root"] if os.geteuid() == 0 else [])
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    res = subprocess.run(cmd + [sys.executable, "-P", "-m", "nsa_parallel.train", "--launcher", "mpi", "--device",
                                "cpu", "--seq-length", str(SEQ), "--train-iters", str(ITERS),
                                "--tensor-model-parallel-size", "2"] + TINY.split(),
                         capture_output=True, text=True, timeout=600, cwd=str(tmp_path), env=env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "world 2 = TP 2 x PP 1 x CP 1 x DP 1" in res.stdout
    _assert_same(res.stdout, single_losses)


def test_a_spawned_rank_leaves_with_status_0_and_its_output_flushed():
    """``leave_spawned_rank`` skips the interpreter's teardown (os._exit) but not what the rank printed."""
    code = ("import sys; from nsa_parallel.distributed import leave_spawned_rank; print('out', end=''); "
            "sys.stderr.write('err'); leave_spawned_rank(); print('never')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stdout, done.stderr) == (0, "out", "err")
