"""Recipes run as child processes of a wrapper (recipes/compress.py, recipes/demo.py, the experiments).

``run`` starts the child in a session of its own, so a Ctrl-C in the terminal (a SIGINT to the terminal's
foreground process group) reaches the wrapper only, and the wrapper passes each SIGINT, SIGTERM, SIGHUP
and SIGQUIT it gets to the child exactly once. The child reacts as it would when run directly: its
training loop finishes the step, saves a checkpoint and exits 128 + signal (a second Ctrl-C stops it at
once). The wrapper waits for the child's own exit, then exits 128 + signal: silently when the child
shares its stderr and exited 128 + one of the forwarded signals (the child has printed the line saying
where it stopped), else with one line on stderr. A signal the wrapper ignores (``nohup``, ``&`` in a
script) is not forwarded; the child inherits the ignoring. On Linux the child also gets SIGTERM when the
wrapper dies without forwarding (``kill -9``), so it checkpoints and stops instead of running on alone.

This module imports only the standard library, so any script can use it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys

FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)


class _Forward:
    """The signal handler while a child runs: records each signal and sends it on once."""

    def __init__(self):
        self.child: subprocess.Popen | None = None
        self.received: list[int] = []
        self._pending: list[int] = []  # received before the child existed

    def __call__(self, signum, _frame):
        self.received.append(signum)
        if self.child is None:
            self._pending.append(signum)
        else:
            _send(self.child, signum)

    def started(self, child: subprocess.Popen) -> None:
        self.child = child  # from here on the handler sends
        while self._pending:
            _send(child, self._pending.pop(0))


def _send(child: subprocess.Popen, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        child.send_signal(signum)  # a no-op once the child has been waited for


def sigterm_when_parent_dies():
    """``preexec_fn`` (Linux): the kernel sends the child SIGTERM when the process that started it dies."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    prctl, parent = ctypes.CDLL(None, use_errno=True).prctl, os.getpid()

    def preexec():
        prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before the call
            os.kill(os.getpid(), signal.SIGTERM)

    return preexec


def run(cmd: list, **popen) -> int:
    """Run ``cmd`` (``popen``: ``subprocess.Popen`` keyword arguments such as ``cwd`` or ``stdout``) and
    return its exit code; after a stop signal, exit 128 + signal once the child has exited (see the module)."""
    forward = _Forward()
    before = {s: signal.getsignal(s) for s in FORWARDED}
    before = {s: h for s, h in before.items() if h not in (signal.SIG_IGN, None)}  # None: set outside Python
    for s in before:
        signal.signal(s, forward)
    child = None
    try:
        child = subprocess.Popen(cmd, start_new_session=True, preexec_fn=sigterm_when_parent_dies(), **popen)
        forward.started(child)
        code = child.wait()
    finally:
        if child is not None and child.poll() is None:  # the wrapper itself failed: leave no child behind
            child.kill()
            child.wait()
        for s, handler in before.items():
            signal.signal(s, handler)
    if forward.received:
        said = popen.get("stderr") is None and code in {128 + s for s in forward.received}
        _leave(code if said else 128 + forward.received[0], said=said)
    return code


def _leave(code: int, said: bool = False) -> None:
    """Exit with ``code`` (128 + a signal) after the child stopped; one line on stderr unless ``said``."""
    if not said:
        with contextlib.suppress(OSError):  # a hung-up terminal
            print(f"interrupted by {signal.Signals(code - 128).name}; re-run the same command to continue",
                  file=sys.stderr, flush=True)
    sys.exit(code)


def run_recipe(script, args: list, nproc: int, tag: str) -> None:
    """A wrapper's step: recipe ``script`` with ``args`` in a child (under torchrun for ``nproc`` > 1, one
    node), through ``run``; a failure ends the wrapper with the recipe's exit code and a note that the same
    command resumes (recipes/compress.py, recipes/align.py)."""
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] \
        if nproc > 1 else [sys.executable]
    name = os.path.basename(str(script))
    print(f"[{tag}] {name} {' '.join(map(str, args))}", flush=True)
    code = run([*launch, str(script), *map(str, args)])
    if code != 0:
        print(f"[{tag}] {name} exited with {code}; re-run the same command to resume", flush=True)
        sys.exit(code)
