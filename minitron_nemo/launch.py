"""Start the ranks of a one-node job and report as a recipe does: ``python -m minitron_nemo.launch``.

    python -m minitron_nemo.launch --nproc_per_node=2 recipes/distill.py --config-name NAME key=value ...

What ``torchrun --standalone`` does for one node, with the project's exit contract: each rank gets the
torchrun environment (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``) and,
in place of ``MASTER_PORT``, ``MINITRON_STORE_FILE``: rank 0 starts the job's store on a port the system picks
and writes the port there for the others (``runtime._launch_store``), so two jobs started at once cannot take
each other's port. The ranks share this terminal's stdout and stderr. When a rank fails, the others get SIGTERM
(SIGKILL 30 s later) and the launcher exits with the failed rank's code, adding nothing to the rank's own
one line (rank 0 speaks for all: ``entry._say``). Ctrl-C and SIGTERM go to every rank once; each rank
checkpoints and stops as it would alone. A rank killed by a signal nobody sent (the OOM killer) is named
in one line. Several nodes: torchrun or ``launchers/submit.py``.

This module imports only the standard library and ``children``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from minitron_nemo.children import FORWARDED, sigterm_when_parent_dies

USAGE = "usage: python -m minitron_nemo.launch --nproc_per_node=N SCRIPT [ARG ...]"
GRACE_S = 30.0


def parse(argv: list) -> tuple:
    """(number of ranks, the script and its arguments) from the command line; one line on a bad one."""
    n, rest = None, list(argv)
    while rest and rest[0].startswith("--"):
        opt = rest.pop(0)
        key, _, value = opt.partition("=")
        if key not in ("--nproc_per_node", "--nproc-per-node"):
            _fail(f"unknown option {opt}; allowed: --nproc_per_node=N")
        if not value:
            value = rest.pop(0) if rest else ""
        if not value.isdigit() or int(value) < 1:
            _fail(f"--nproc_per_node={value!r}; allowed: a number of ranks >= 1")
        n = int(value)
    if n is None or not rest:
        _fail(f"no {'--nproc_per_node' if n is None else 'script'} given; {USAGE}")
    if not os.path.isfile(rest[0]):
        _fail(f"script {rest[0]} is not a file; {USAGE}")
    return n, rest


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def rank_env(rank: int, n: int, store_file: str) -> dict:
    """A rank's environment: torchrun's variables, and in place of a port chosen here (which another job could
    take before rank 0 binds it) the file rank 0 writes its store's port into (``runtime.STORE_FILE``)."""
    env = {k: v for k, v in os.environ.items() if k != "MASTER_PORT"}
    return dict(env, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(n), LOCAL_WORLD_SIZE=str(n),
                GROUP_RANK="0", MASTER_ADDR="127.0.0.1", MINITRON_STORE_FILE=store_file)


class Ranks:
    """The running ranks; a signal handler that sends each received stop signal to all of them once."""

    def __init__(self):
        self.procs: list[subprocess.Popen] = []
        self.received: list[int] = []

    def __call__(self, signum, _frame):
        self.received.append(signum)
        self.send(signum)

    def send(self, signum: int) -> None:
        for p in self.procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    p.send_signal(signum)

    def wait_first_failure(self) -> subprocess.Popen | None:
        """Wait until every rank succeeded (None) or one failed (that rank)."""
        while True:
            running = [p for p in self.procs if p.poll() is None]
            failed = [p for p in self.procs if p.returncode not in (None, 0)]
            if failed:
                return failed[0]
            if not running:
                return None
            with contextlib.suppress(ChildProcessError, InterruptedError):
                os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOWAIT)
            time.sleep(0.05)

    def stop_all(self) -> None:
        self.send(signal.SIGTERM)
        deadline = time.time() + GRACE_S
        for p in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=max(0.0, deadline - time.time()))
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def main(argv=None) -> int:
    n, cmd = parse(sys.argv[1:] if argv is None else argv)
    ranks, rendezvous = Ranks(), tempfile.mkdtemp(prefix="minitron_launch_")
    before = {s: signal.getsignal(s) for s in FORWARDED}
    for s, h in before.items():
        if h not in (signal.SIG_IGN, None):
            signal.signal(s, ranks)
    try:
        for r in range(n):
            env = rank_env(r, n, os.path.join(rendezvous, "store_port"))
            ranks.procs.append(subprocess.Popen([sys.executable, *cmd], env=env, start_new_session=True,
                                                preexec_fn=sigterm_when_parent_dies()))
        failed = ranks.wait_first_failure()
    finally:
        ranks.stop_all()
        shutil.rmtree(rendezvous, ignore_errors=True)
    if failed is None:
        return 128 + ranks.received[0] if ranks.received else 0
    code = failed.returncode
    if code < 0 and -code not in ranks.received:  # killed by a signal nobody here sent
        print(f"error: rank {ranks.procs.index(failed)} (pid {failed.pid}) was killed by "
              f"{signal.Signals(-code).name}; re-run the same command to resume", file=sys.stderr, flush=True)
        return 128 - code
    return 128 - code if code < 0 else code


if __name__ == "__main__":
    sys.exit(main())
