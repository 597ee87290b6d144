"""A throw-away Slurm cluster on this host for tests: munged + slurmctld + slurmd in a temp dir.

    with SlurmCluster(tmp_path, cpus=2) as c:
        job = c.sbatch(script)              # job id
        c.wait(job)                          # final state, e.g. "COMPLETED"

Cgroup-free (proctrack/pgid: a step's processes are its tasks' process groups, so children a task leaves
behind, e.g. a multiprocessing manager orphaned by ``os._exit``, are killed with the step as cgroups
would; task/none), no accounting daemon; every daemon is a child process
of the test, stopped (by its own pid) on exit, even on failure. Needs root and Debian's slurm-wlm/munge,
installed on demand by ``ensure_installed()`` (returns a reason string when that is impossible).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

PACKAGES = ("slurm-wlm", "munge")


def ensure_installed() -> str | None:
    """``None`` when slurmctld/slurmd/munged are there (apt-get installs them), else why not."""
    if all(shutil.which(b) or Path(f"/usr/sbin/{b}").exists() for b in ("slurmctld", "slurmd", "munged", "sbatch")):
        return None
    if os.geteuid() != 0:
        return "Slurm is not installed and the test is not root (apt-get install slurm-wlm munge)"
    if not shutil.which("apt-get"):
        return "Slurm is not installed and there is no apt-get"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *PACKAGES]):
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
        if p.returncode != 0:
            return f"{' '.join(cmd)} failed: {' '.join(p.stderr.split())[-300:]}"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SlurmCluster:
    """``nodes``: ``[(name, address, netns or None)]``, default one node named after this host;
    ``ctl_addr``: where slurmctld (in this namespace) is reached from every node."""

    def __init__(self, root: Path, cpus: int = 2, nodes=None, ctl_addr: str = "127.0.0.1"):
        self.root = Path(root)
        self.ctl_addr = ctl_addr
        self.cpus = cpus
        self.nodes = nodes or [(socket.gethostname(), "127.0.0.1", None)]
        self.procs: list[subprocess.Popen] = []
        self.conf = self.root / "slurm.conf"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))

    # -- daemons ---------------------------------------------------------------------------------
    def _spawn(self, name, cmd, netns=None):
        if netns:  # tests/slurm/netns.py: that namespace's network and /etc/hosts
            from .netns import in_netns

            cmd = in_netns(netns, cmd)
        log = open(self.root / f"{name}.stdout", "w")
        p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
        self.procs.append(p)
        return p

    def _write_conf(self, ctl_addr: str):
        r = self.root
        for d in ("state", "spool", "munge", *(f"spool/{n}" for n, _, _ in self.nodes)):
            (r / d).mkdir(parents=True, exist_ok=True)
        ctl_host = socket.gethostname()
        lines = [
            "ClusterName=minitrontest", f"SlurmctldHost={ctl_host}({ctl_addr})", "SlurmUser=root", "SlurmdUser=root",
            f"SlurmctldPort={free_port()}", f"SlurmdPort={free_port()}",
            "AuthType=auth/munge", "CredType=cred/munge", f"AuthInfo=socket={r}/munge/munge.sock,cred_expire=10",
            f"StateSaveLocation={r}/state", f"SlurmdSpoolDir={r}/spool/%n",
            f"SlurmctldPidFile={r}/slurmctld.pid", f"SlurmdPidFile={r}/slurmd-%n.pid",
            f"SlurmctldLogFile={r}/slurmctld.log", f"SlurmdLogFile={r}/slurmd-%n.log",
            "ProctrackType=proctrack/pgid", "TaskPlugin=task/none", "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none", f"JobCompType=jobcomp/filetxt",
            f"JobCompLoc={r}/jobcomp.txt", "SchedulerType=sched/builtin", "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU", "MpiDefault=none", "ReturnToService=2", "KillWait=30",
            "MinJobAge=600", "SlurmctldDebug=info", "SlurmdDebug=info", "JobRequeue=1",
            "PlugStackConfig=/dev/null", "InactiveLimit=0", "SchedulerParameters=bf_interval=1,sched_interval=1",
        ]
        for name, addr, _ in self.nodes:
            lines.append(f"NodeName={name} NodeAddr={addr} NodeHostname={name} CPUs={self.cpus} State=UNKNOWN")
        lines.append(f"PartitionName=test Nodes={','.join(n for n, _, _ in self.nodes)} Default=YES "
                     f"MaxTime=INFINITE State=UP OverSubscribe=NO")
        self.conf.write_text("\n".join(lines) + "\n")

    def start(self, timeout: float = 60):
        self._write_conf(self.ctl_addr)
        m = self.root / "munge"
        key = m / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        m.chmod(0o700)
        subprocess.run(["/usr/sbin/munged", "--force", f"--key-file={key}", f"--socket={m}/munge.sock",
                        f"--pid-file={m}/munged.pid", f"--log-file={m}/munged.log", f"--seed-file={m}/seed"],
                       check=True, capture_output=True, timeout=30)
        self.munged_pid = int((m / "munged.pid").read_text())
        self._spawn("slurmctld", ["/usr/sbin/slurmctld", "-D", "-i", "-f", str(self.conf)])
        for name, _addr, netns in self.nodes:
            self._spawn(f"slurmd-{name}", ["/usr/sbin/slurmd", "-D", "-N", name, "-f", str(self.conf)], netns)
        deadline = time.time() + timeout
        while time.time() < deadline:
            p = self.run("sinfo", "-h", "-o", "%n %t", check=False)
            states = dict(l.split() for l in p.stdout.split("\n") if l.strip())
            if len(states) == len(self.nodes) and all(s.rstrip("*") in ("idle", "mix", "alloc") for s in states.values()):
                return self
            time.sleep(1)
        raise RuntimeError(f"Slurm did not come up: {p.stdout} {p.stderr}\n{self.logs()}")

    def stop(self):
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in reversed(self.procs):
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
        if getattr(self, "munged_pid", None):
            try:
                os.kill(self.munged_pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    def __enter__(self):
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc):
        self.stop()

    def logs(self, tail: int = 3000) -> str:
        out = []
        for f in sorted(self.root.glob("*.log")) + sorted(self.root.glob("*.stdout")):
            out.append(f"== {f.name}\n{f.read_text(errors='replace')[-tail:]}")
        return "\n".join(out)

    # -- client commands -------------------------------------------------------------------------
    def run(self, *cmd, check=True, env=None) -> subprocess.CompletedProcess:
        p = subprocess.run(list(cmd), capture_output=True, text=True, env={**self.env, **(env or {})}, timeout=120)
        if check and p.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}): {p.stdout} {p.stderr}")
        return p

    def leftovers(self, job_id: str) -> list[str]:
        """Processes still alive with ``SLURM_JOB_ID=job_id`` in their environment (``pid cmdline``)."""
        found = []
        for proc in Path("/proc").iterdir():
            try:
                env = (proc / "environ").read_bytes().split(b"\0")
                if f"SLURM_JOB_ID={job_id}".encode() in env:
                    cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                    found.append(f"{proc.name} {cmd[:200]}")
            except (OSError, ValueError):
                continue
        return found

    def job(self, job_id: str) -> dict:
        """``scontrol show job`` as a dict (JobState, ExitCode, Restarts, ...)."""
        p = self.run("scontrol", "-o", "show", "job", str(job_id), check=False)
        return dict(kv.split("=", 1) for kv in p.stdout.split() if "=" in kv)

    def wait(self, job_id: str, states=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL",
                                         "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"), timeout: float = 240,
             until=None) -> dict:
        """Poll until the job reaches one of ``states`` (or ``until(info)`` is true); returns the job info."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in states or (until and until(info)):
                return info
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} still {self.job(job_id).get('JobState')} after {timeout}s\n{self.logs()}")
