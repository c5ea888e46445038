"""Who am I and where is rank 0: the rendezvous of a job from its launcher's environment.

Launchers (``--launcher``):

- ``torchrun``: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``.
- ``slurm``: one task per GPU started by ``srun``: ``SLURM_PROCID``, ``SLURM_NTASKS`` (the step's),
  ``SLURM_LOCALID``; rank 0's host is the first of ``SLURM_JOB_NODELIST`` (or ``SLURM_STEP_NODELIST``), the port
  ``MASTER_PORT`` or one derived from ``SLURM_JOB_ID`` so that every task of the job agrees without talking.
- ``mpi``: ``mpirun``/``srun --mpi`` through mpi4py: rank and size from ``COMM_WORLD``, the local rank from the
  shared-memory split, and rank 0's host name and a free port broadcast to all.
- ``single``: one process on a free local port.
- ``auto`` (default): the first of torchrun, slurm (inside an ``srun`` step), mpi (an MPI launcher's variables
  present) and single whose variables are there.

Nothing here starts ``torch.distributed``; :func:`nsa_parallel.distributed.init_distributed` does, after
:func:`export` wrote the result into the ``env://`` variables that torch and Megatron read.
"""
from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass
from typing import List, Mapping, MutableMapping, Optional

LAUNCHERS = ("auto", "torchrun", "slurm", "mpi", "single")
# variables that only an MPI launcher sets (Open MPI, MPICH/Hydra, Intel MPI, PMIx, Slurm's PMI2)
_MPI_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS")
_SLURM_PORT_BASE, _SLURM_PORT_SPAN = 20000, 20000


@dataclass(frozen=True)
class Rendezvous:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def expand_nodelist(nodelist: str) -> List[str]:
    """Slurm's compressed host list in order, as ``scontrol show hostnames`` expands it:
    ``"gpu[01-03,07],n[1-2]-r[3,5]"`` -> gpu01 gpu02 gpu03 gpu07 n1-r3 n1-r5 n2-r3 n2-r5 (zero padding kept)."""
    hosts: List[str] = []
    for item in re.findall(r"(?:[^,\[]|\[[^\]]*\])+", nodelist):
        names = [""]
        for text, group in re.findall(r"([^\[]*)(?:\[([^\]]*)\])?", item):
            names = [n + text for n in names]
            if group:
                names = [n + part for n in names for part in _expand_ranges(group, nodelist)]
        hosts.extend(n for n in names if n)
    if not hosts:
        raise ValueError(f"SLURM_JOB_NODELIST={nodelist!r} names no host")
    return hosts


def _expand_ranges(group: str, nodelist: str) -> List[str]:
    out = []
    for part in group.split(","):
        lo, sep, hi = part.partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise ValueError(f"SLURM_JOB_NODELIST={nodelist!r}: bad range {part!r} (allowed: N or N-M, digits)")
        if not sep:
            out.append(lo)
            continue
        if int(hi) < int(lo):
            raise ValueError(f"SLURM_JOB_NODELIST={nodelist!r}: range {part!r} runs backwards")
        out.extend(str(i).zfill(len(lo)) for i in range(int(lo), int(hi) + 1))
    return out


def _int(env: Mapping[str, str], name: str, default: Optional[int] = None) -> int:
    raw = env.get(name)
    if raw is None:
        if default is None:
            raise ValueError(f"environment variable {name} is not set")
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} must be an integer") from None


def _checked(r: Rendezvous) -> Rendezvous:
    if r.world_size < 1 or not 0 <= r.rank < r.world_size:
        raise ValueError(f"{r.launcher} rendezvous: rank {r.rank} must be in [0, world size {r.world_size})")
    if not 0 < r.master_port < 65536:
        raise ValueError(f"{r.launcher} rendezvous: MASTER_PORT={r.master_port} must be in [1, 65535]")
    return r


def from_torchrun(env: Mapping[str, str]) -> Rendezvous:
    world = _int(env, "WORLD_SIZE")
    if world > 1 and "MASTER_ADDR" not in env:
        raise ValueError(f"WORLD_SIZE={world} but MASTER_ADDR is not set: launch with torchrun (or set MASTER_ADDR "
                         "and MASTER_PORT)")
    return _checked(Rendezvous(_int(env, "RANK"), world, _int(env, "LOCAL_RANK", 0),
                               env.get("MASTER_ADDR", "127.0.0.1"),
                               _int(env, "MASTER_PORT", 0) or (29500 if world > 1 else free_port()), "torchrun"))


def from_slurm(env: Mapping[str, str]) -> Rendezvous:
    if "SLURM_PROCID" not in env:
        raise ValueError("--launcher slurm: SLURM_PROCID is not set; start one task per GPU with srun")
    world = _int(env, "SLURM_STEP_NUM_TASKS", _int(env, "SLURM_NTASKS", 1))
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        raise ValueError("--launcher slurm: SLURM_JOB_NODELIST is not set")
    addr = env.get("MASTER_ADDR") or expand_nodelist(nodelist)[0]
    port = _int(env, "MASTER_PORT", _SLURM_PORT_BASE + _int(env, "SLURM_JOB_ID", 0) % _SLURM_PORT_SPAN)
    return _checked(Rendezvous(_int(env, "SLURM_PROCID"), world, _int(env, "SLURM_LOCALID", 0), addr, port, "slurm"))


def from_mpi(env: Mapping[str, str]) -> Rendezvous:
    try:
        from mpi4py import MPI
    except ImportError as e:
        raise ValueError(f"--launcher mpi needs mpi4py ({e}); install it with: pip install 'nsa-parallel[mpi]'") \
            from None
    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    local = comm.Split_type(MPI.COMM_TYPE_SHARED, key=rank)
    local_rank = local.Get_rank()
    local.Free()
    # rank 0 names itself and a port it found free; everyone else learns both from it
    mine = (env.get("MASTER_ADDR") or socket.gethostname(), _int(env, "MASTER_PORT", 0) or free_port()) \
        if rank == 0 else None
    addr, port = comm.bcast(mine, root=0)
    return _checked(Rendezvous(rank, comm.Get_size(), local_rank, addr, port, "mpi"))


def single(env: Mapping[str, str]) -> Rendezvous:
    return Rendezvous(0, 1, 0, env.get("MASTER_ADDR", "127.0.0.1"), _int(env, "MASTER_PORT", 0) or free_port(),
                      "single")


def detect(env: Mapping[str, str]) -> str:
    """The launcher ``auto`` picks for this environment."""
    if "RANK" in env and "WORLD_SIZE" in env:
        return "torchrun"
    # only inside an `srun` step: a script that sbatch runs directly (the batch step, no SLURM_STEP_ID) is one
    # process even where SLURM_NTASKS says more
    if "SLURM_PROCID" in env and "SLURM_STEP_ID" in env:
        return "slurm"
    if any(v in env for v in _MPI_VARS):
        return "mpi"
    return "single"


def discover(launcher: str = "auto", env: Optional[Mapping[str, str]] = None) -> Rendezvous:
    env = os.environ if env is None else env
    if launcher not in LAUNCHERS:
        raise ValueError(f"launcher={launcher!r}; allowed: {', '.join(LAUNCHERS)}")
    if launcher == "auto":
        launcher = detect(env)
    return {"torchrun": from_torchrun, "slurm": from_slurm, "mpi": from_mpi, "single": single}[launcher](env)


def export(r: Rendezvous, env: Optional[MutableMapping[str, str]] = None) -> None:
    """Write the rendezvous into torch's ``env://`` variables (and ``LOCAL_RANK``), for torch and Megatron."""
    env = os.environ if env is None else env
    env.update(RANK=str(r.rank), WORLD_SIZE=str(r.world_size), LOCAL_RANK=str(r.local_rank),
               MASTER_ADDR=r.master_addr, MASTER_PORT=str(r.master_port))
