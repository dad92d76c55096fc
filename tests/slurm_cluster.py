"""A real one-node SLURM cluster on this machine, for the tests (and by hand).

Debian's ``slurm-wlm`` and ``munge`` packages give ``munged``, ``slurmctld`` and ``slurmd``. This
module writes a ``slurm.conf`` for this host under a folder of its own (its ports, state, spool, pid
and log files, and its own munge key and socket there too), starts the three daemons as root and
stops exactly those processes again: nothing of the system's SLURM or munge setup is used or
touched, and two clusters on one machine do not meet. Accounting is off (no slurmdbd), as on many
small clusters, so ``sacct`` fails, which submitit works around.

By hand (root): ``python tests/slurm_cluster.py /tmp/slurm`` starts one and prints the
``SLURM_CONF`` line to export; Ctrl-C (or SIGTERM) stops it.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")


def missing() -> str | None:
    """Why no cluster can be started here (None when one can)."""
    absent = [d for d in (*DAEMONS, "sbatch", "squeue", "scontrol") if _which(d) is None]
    if absent:
        return f"SLURM/munge not installed ({', '.join(absent)} missing): apt-get install slurm-wlm munge"
    if os.geteuid() != 0:
        return "starting slurmd and slurmctld needs root"
    return None


def _which(name: str) -> str | None:
    return shutil.which(name) or next(
        (str(p) for p in (Path("/usr/sbin") / name, Path("/sbin") / name) if p.exists()), None
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LocalSlurm:
    """munged + slurmctld + slurmd for this host, configured and run under ``root``.

    ``cpus`` and ``memory_mb`` are what the node advertises (``SlurmdParameters=config_overrides``:
    more CPUs than the machine has let several tiny jobs run at once).
    """

    def __init__(self, root: Path, *, cpus: int = 4, memory_mb: int = 16000) -> None:
        self.root = Path(root).resolve()
        self.cpus = cpus
        self.memory_mb = memory_mb
        self.node = socket.gethostname().split(".")[0]
        self.procs: dict[str, int] = {}
        self.conf = self.root / "slurm.conf"

    # ------------------------------------------------------------------------------------ config
    def write_config(self) -> None:
        r = self.root
        for sub in ("state", "spool", "log", "munge"):
            (r / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(r / "munge", 0o700)
        key = r / "munge" / "munge.key"
        if not key.exists():
            key.write_bytes(os.urandom(1024))
            key.chmod(0o400)
        self.munge_socket = r / "munge" / "munge.socket"
        ports = [_free_port()]
        while len(ports) < 2:
            port = _free_port()
            if port not in ports:
                ports.append(port)
        self.conf.write_text(
            "\n".join(
                [
                    "ClusterName=lexptest",
                    f"SlurmctldHost={self.node}(127.0.0.1)",
                    f"SlurmctldPort={ports[0]}",
                    f"SlurmdPort={ports[1]}",
                    "SlurmUser=root",
                    "SlurmdUser=root",
                    "AuthType=auth/munge",
                    "CredType=cred/munge",
                    f"AuthInfo=socket={self.munge_socket}",
                    f"StateSaveLocation={r / 'state'}",
                    f"SlurmdSpoolDir={r / 'spool'}",
                    f"SlurmctldPidFile={r / 'slurmctld.pid'}",
                    f"SlurmdPidFile={r / 'slurmd.pid'}",
                    f"SlurmctldLogFile={r / 'log' / 'slurmctld.log'}",
                    f"SlurmdLogFile={r / 'log' / 'slurmd.log'}",
                    "SlurmdParameters=config_overrides",
                    "ProctrackType=proctrack/linuxproc",
                    "TaskPlugin=task/none",
                    "SwitchType=switch/none",
                    "MpiDefault=none",
                    "JobAcctGatherType=jobacct_gather/none",
                    "AccountingStorageType=accounting_storage/none",
                    "JobCompType=jobcomp/none",
                    "SchedulerType=sched/backfill",
                    "SchedulerParameters=sched_interval=1",
                    "SelectType=select/cons_tres",
                    "SelectTypeParameters=CR_CPU_Memory",
                    "ReturnToService=2",
                    "MinJobAge=600",
                    "KillWait=5",
                    "OverTimeLimit=0",
                    "InactiveLimit=0",
                    "JobRequeue=1",
                    "MaxArraySize=1001",
                    f"NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={self.memory_mb} State=UNKNOWN",
                    "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
                    "",
                ]
            )
        )

    def env(self) -> dict[str, str]:
        """The environment a client (sbatch, squeue, a sweep) needs to talk to this cluster."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    # ---------------------------------------------------------------------------------- run/stop
    def start(self, timeout_s: float = 60) -> None:
        self.write_config()
        env = self.env()
        r = self.root
        munged = _which("munged")
        subprocess.run(
            [
                str(munged),
                "--force",
                f"--key-file={r / 'munge' / 'munge.key'}",
                f"--socket={self.munge_socket}",
                f"--pid-file={r / 'munge' / 'munged.pid'}",
                f"--log-file={r / 'log' / 'munged.log'}",
                f"--seed-file={r / 'munge' / 'munged.seed'}",
            ],
            check=True,
            env=env,
            capture_output=True,
            timeout=30,
        )
        self.procs["munged"] = self._pid(r / "munge" / "munged.pid", timeout_s)
        subprocess.run([str(_which("slurmctld")), "-i"], check=True, env=env, capture_output=True, timeout=30)
        self.procs["slurmctld"] = self._pid(r / "slurmctld.pid", timeout_s)
        subprocess.run([str(_which("slurmd"))], check=True, env=env, capture_output=True, timeout=30)
        self.procs["slurmd"] = self._pid(r / "slurmd.pid", timeout_s)
        self._wait_idle(timeout_s)

    def _pid(self, path: Path, timeout_s: float) -> int:
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            try:
                return int(path.read_text().split()[0])
            except (OSError, ValueError, IndexError):
                time.sleep(0.1)
        raise RuntimeError(f"{path.name} did not appear in {timeout_s:.0f} s; logs in {self.root / 'log'}")

    def _wait_idle(self, timeout_s: float) -> None:
        deadline = time.time() + timeout_s
        state = ""
        while time.time() < deadline:
            out = subprocess.run(
                ["sinfo", "-h", "-N", "-o", "%t"], capture_output=True, text=True, env=self.env(), timeout=30
            )
            state = out.stdout.strip()
            if out.returncode == 0 and state.startswith(("idle", "mix", "alloc")):
                return
            time.sleep(0.5)
        raise RuntimeError(
            f"the node is not idle after {timeout_s:.0f} s ({state!r}); see {self.root / 'log'}"
        )

    def stop(self, timeout_s: float = 30) -> list[str]:
        """Cancel what is left, stop the daemons this object started; return those that had to be killed."""
        if "slurmctld" in self.procs:
            subprocess.run(
                ["scancel", "--full", "-u", "root"], env=self.env(), capture_output=True, timeout=30
            )
        killed = []
        for name in ("slurmd", "slurmctld", "munged"):
            pid = self.procs.pop(name, None)
            if pid is None:
                continue
            _signal(pid, signal.SIGTERM)
            deadline = time.time() + timeout_s
            while _alive(pid) and time.time() < deadline:
                time.sleep(0.1)
            if _alive(pid):
                _signal(pid, signal.SIGKILL)
                killed.append(name)
        return killed

    def alive(self) -> list[str]:
        return [name for name, pid in self.procs.items() if _alive(pid)]


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie counts as gone
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


if __name__ == "__main__":
    why = missing()
    if why:
        sys.exit(f"cannot start a cluster: {why}")

    def _stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    # Ctrl-C or kill: also when started in the background (where a shell ignores SIGINT)
    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    cluster = LocalSlurm(Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/lexp-slurm"))
    cluster.start()
    print(f"export SLURM_CONF={cluster.conf}   # Ctrl-C stops munged, slurmctld and slurmd", flush=True)
    try:
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        cluster.stop()
