"""A real one-node Slurm cluster in a temp dir: munged, slurmctld and slurmd on private sockets and ports.

Used by tests/test_launch.py to run the sbatch scripts as a user would. Needs Debian's slurm-wlm and munge
(tests/system_deps.sh) and root (slurmd starts jobs as their user). :func:`missing` says why it cannot start.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Optional

from nsa_parallel.rendezvous import free_port

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "sinfo")


def missing() -> Optional[str]:
    """Why no cluster can start here, or None."""
    absent = [d for d in DAEMONS if shutil.which(d) is None and not Path("/usr/sbin", d).exists()]
    if absent:
        return f"{', '.join(absent)} not installed (Debian: slurm-wlm munge; bash tests/system_deps.sh installs them)"
    if os.geteuid() != 0:
        return "a private slurmd must run as root to start jobs"
    return None


def _which(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


class OneNodeSlurm:
    def __init__(self, root: Path, cpus: int = 2) -> None:
        self.root = root
        self.cpus = cpus
        self.host = socket.gethostname().split(".")[0]
        self.conf = root / "slurm.conf"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))

    def start(self) -> "OneNodeSlurm":
        r = self.root
        for d in ("state", "spool", "log", "munge"):
            (r / d).mkdir(parents=True, exist_ok=True)
        (r / "munge").chmod(0o711)
        key = r / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        self.munge_socket = r / "munge" / "socket"
        subprocess.run([_which("munged"), "--force", f"--socket={self.munge_socket}", f"--key-file={key}",
                        f"--log-file={r / 'log' / 'munged.log'}", f"--pid-file={r / 'munge' / 'pid'}",
                        f"--seed-file={r / 'munge' / 'seed'}"], check=True, env=self.env)
        ctld_port, d_port = free_port(), free_port()
        self.conf.write_text(f"""\
ClusterName=nsatest
SlurmctldHost={self.host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket}
StateSaveLocation={r / 'state'}
SlurmdSpoolDir={r / 'spool'}
SlurmctldPidFile={r / 'slurmctld.pid'}
SlurmdPidFile={r / 'slurmd.pid'}
SlurmctldLogFile={r / 'log' / 'slurmctld.log'}
SlurmdLogFile={r / 'log' / 'slurmd.log'}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
InactiveLimit=0
KillWait=5
NodeName={self.host} NodeAddr=127.0.0.1 CPUs={self.cpus} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
""")
        subprocess.run([_which("slurmctld"), "-i"], check=True, env=self.env)
        subprocess.run([_which("slurmd")], check=True, env=self.env)
        deadline = time.time() + 60
        while time.time() < deadline:
            out = subprocess.run(["sinfo", "-h", "-o", "%t"], env=self.env, capture_output=True, text=True).stdout
            if out.strip() == "idle":
                return self
            time.sleep(0.5)
        raise RuntimeError(f"the one-node Slurm did not come up (sinfo: {out!r}); logs in {r / 'log'}:\n"
                           + self.logs())

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n" + p.read_text()[-3000:] for p in sorted((self.root / "log").glob("*.log")))

    def sbatch(self, script: str, *args: str, cwd: str, timeout: float = 600,
               env: Optional[dict] = None) -> subprocess.CompletedProcess:
        """Submit and wait for the job to end (``sbatch --wait``); its exit code is the job's."""
        return subprocess.run(["sbatch", "--wait", *args, script], cwd=cwd, env={**self.env, **(env or {})},
                              capture_output=True, text=True, timeout=timeout)

    def stop(self) -> None:
        subprocess.run(["scancel", "--full", "-u", "root"], env=self.env, capture_output=True)
        for pidfile in ("slurmd.pid", "slurmctld.pid", "munge/pid"):
            try:
                os.kill(int((self.root / pidfile).read_text()), signal.SIGTERM)
            except (OSError, ValueError):
                pass
