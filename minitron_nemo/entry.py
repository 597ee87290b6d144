"""Entry points: user-facing failures become one line on stderr and an exit code, no traceback.

``user_errors_exit`` wraps every entry point. It is the one place where failures the user can act on
become one line on stderr:

* ``UserError`` (bad value, bad file, refused output): ``error: <message>``, exit 2;
* a full disk, a read-only file system or a permission error met while writing: ``error: cannot write
  PATH: <why>``, exit 2 (the writers have already removed their temporary output);
* stdout closed by its reader (``--help | head``): exit 141 quietly, as a shell tool does;
* Ctrl-C / SIGTERM outside the training loop: ``interrupted by SIGINT ...``, exit 130 / 143 (the
  training loop handles them itself: ``stop_signals``).

Under a launcher of several ranks, rank 0 prints the line and the others exit quietly (``_say``).
"""

from __future__ import annotations

import functools
import os
import signal
import sys
import time

from minitron_nemo import runtime, stop_signals
from minitron_nemo.errors import UserError
from minitron_nemo.outputs import write_error


# How long a rank other than 0 holds its line back (see ``_say``): long enough for a rank 0 that started
# later on a loaded node (3 s was not, with three ranks on two busy cores); a failure of one other rank
# alone is rare, and then only its line comes this much later.
PEER_WAIT_S = 20.0


def _say(line: str, code: int, peers_too: bool = True):
    """Print ``line`` and exit ``code``: at once on rank 0 (and in a single process). Every rank of a job
    checks the same config and files, so rank 0 normally meets the same failure and speaks for all; the
    launcher (torchrun, ``srun --kill-on-bad-exit``) then stops the other ranks while they wait, quietly. A
    failure met by one other rank alone is still shown after the wait, naming the rank (``peers_too``)."""
    r = runtime.rank()
    if r != 0:
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, lambda *_: os._exit(code))
        if not peers_too:
            sys.exit(code)
        time.sleep(PEER_WAIT_S)
        line = line.replace("error: ", f"error: rank {r}: ", 1)
    print(line, file=sys.stderr, flush=True)
    sys.exit(code)


def user_errors_exit(fn):
    """Decorator for entry points: user-actionable failures become one line and an exit code."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        stop_signals.entry()
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            _say(f"error: {e}", 2)
        except (KeyboardInterrupt, stop_signals.Interrupted) as e:
            signum = getattr(e, "signum", signal.SIGINT)
            _say(f"interrupted by {signal.Signals(signum).name}; outputs are written atomically, so none was "
                 f"left half-written; re-run the same command to continue", 128 + signum, peers_too=False)
        except BrokenPipeError:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
            sys.exit(128 + signal.SIGPIPE)
        except OSError as e:
            err = write_error(e, getattr(e, "filename", None) or "the output")
            if err is None:
                raise
            _say(f"error: {err}", 2)

    return wrapper
