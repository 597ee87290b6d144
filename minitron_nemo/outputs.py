"""The output policy: what a recipe may write, checked before any compute, and how it writes it.

Before any compute, every recipe that writes calls ``claim_dir`` / ``claim_file`` / ``claim_workdir``:

* refused outright: an empty path, ``/``, the current directory, an existing regular file where a
  directory goes (or a directory where a file goes), and an output that equals a source, lies inside
  one or contains one;
* an existing output is replaced only when this project wrote it (a directory's ``.minitron_output.json``
  manifest lists every file it wrote; a file carries its own mark): silently when the same recipe
  wrote it, with ``overwrite=true`` when another recipe did. Anything holding a file the project did
  not write is never replaced or deleted, ``overwrite`` or not;
* the output is locked (``flock`` on a sibling ``.NAME.lock``, which records the holder's pid, host and
  start time) for the rest of the run, so a second run on the same output stops at once with a line
  naming the first. Forked children never keep the lock and die with the run (``_in_forked_child``), so
  a killed run (kill -9, the OOM killer) leaves it free; a lock still held after its recorded owner
  ended is named as a leftover, with the process to stop;
* the parent directory must be writable.

Writes go to a hidden sibling temp directory that is renamed into place (``atomic_dir``); a failure,
including a full disk, removes the temp directory and leaves the previous output as it was.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import os
import re
import shutil
import signal
import socket
import sys
import threading
import time
from pathlib import Path

from minitron_nemo import runtime
from minitron_nemo.errors import UserError

MANIFEST = ".minitron_output.json"
WORKDIR_MARK = ".minitron_workdir.json"
ENV_ERRNOS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
              errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
              errno.EPERM: "permission denied"}
_LOCKS: dict = {}


def recipe_name() -> str:
    """The running recipe (its script name), recorded in manifests."""
    return Path(sys.argv[0]).stem if sys.argv and sys.argv[0] else "python"


# ----------------------------------------------------------------------------- path checks
def _resolve(path, key: str) -> Path:
    if path is None or not str(path).strip():
        raise UserError(f"{key} is empty; allowed: a path to a new directory or file")
    p = Path(os.path.expanduser(str(path))).resolve()
    if p == Path(p.anchor):
        raise UserError(f"{key}={path} is the file-system root; allowed: a new directory or file")
    if p == Path.cwd().resolve():
        raise UserError(f"{key}={path} is the current directory; allowed: a new directory or file "
                        f"(e.g. {key}=./out)")
    if p == Path.home().resolve():
        raise UserError(f"{key}={path} is the home directory; allowed: a new directory or file")
    return p


def _overlaps(out: Path, key: str, sources: dict, within: dict | None = None) -> None:
    """Refuse an output equal to, inside or containing a source (``{key: path}``, None ignored); an output
    may lie inside a directory of ``within`` (a job's workdir) but not equal or contain it."""
    for skey, src in (within or {}).items():
        w = Path(os.path.expanduser(str(src))).resolve()
        if out == w or out in w.parents:
            raise UserError(f"{key}={out} {'is' if out == w else 'contains'} {skey}={w}; allowed: a path "
                            f"inside or outside {skey}, not {skey} itself or a parent of it")
    for skey, src in sources.items():
        if src is None or not str(src).strip():
            continue
        s = Path(os.path.expanduser(str(src))).resolve()
        if out == s:
            raise UserError(f"{key}={out} is the same path as {skey}; allowed: a different output path")
        if s in out.parents:
            raise UserError(f"{key}={out} lies inside {skey}={s}; allowed: a path outside the source")
        if out in s.parents:
            raise UserError(f"{key}={out} contains {skey}={s}; writing it would replace the source; "
                            f"allowed: a path that does not contain the source")


def _writable_parent(p: Path, key: str) -> None:
    parent = p.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        probe = parent / f".{p.name}.probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UserError(f"{key}={p}: cannot write in {parent}: {ENV_ERRNOS.get(e.errno, e.strerror)}") from None


def project_files(d: Path) -> tuple[str | None, list[str]]:
    """``(recipe that wrote d, files in d it did not write)``; recipe None when d has no manifest."""
    files = sorted(str(f.relative_to(d)) for f in d.rglob("*") if not f.is_dir())
    m = d / MANIFEST
    if not m.is_file():
        return None, files
    try:
        info = json.loads(m.read_text())
        known = set(info["files"]) | {MANIFEST}
        recipe = str(info["recipe"])
    except (OSError, ValueError, KeyError, TypeError):
        return None, files
    return recipe, [f for f in files if f not in known]


def _replaceable_dir(p: Path, key: str, overwrite: bool, recipe: str, extra_ok=()) -> None:
    if not p.exists():
        return
    if not p.is_dir():
        raise UserError(f"{key}={p} is an existing file; allowed: a new or empty directory")
    if not any(p.iterdir()):
        return
    wrote, foreign = project_files(p)
    foreign = [f for f in foreign if f.split("/")[0] not in extra_ok]
    if wrote is None or foreign:
        names = ", ".join(foreign[:3]) + (" ..." if len(foreign) > 3 else "")
        raise UserError(f"{key}={p} holds files this project did not write ({names}); allowed: a new or "
                        f"empty directory (overwrite=true never deletes files the project did not write)")
    if wrote != recipe and not overwrite:
        raise UserError(f"{key}={p} is an output of {wrote}; pass overwrite=true to replace it, or choose "
                        f"another {key}")


# ----------------------------------------------------------------------------- claims
def claim_dir(path, *, key: str = "output", sources: dict | None = None, overwrite: bool = False,
              recipe: str | None = None, lock: bool = True, extra_ok=(), within: dict | None = None) -> Path:
    """Check and lock a directory output before any compute; returns its resolved path. ``within``: work
    directories the output may lie in (but not equal or contain)."""
    p = _resolve(path, key)
    _overlaps(p, key, sources or {}, within)
    _replaceable_dir(p, key, overwrite, recipe or recipe_name(), extra_ok)
    _writable_parent(p, key)
    if lock:
        take_lock(p.parent / f".{p.name}.lock", key, p)
    return p


def claim_file(path, *, key: str, sources: dict | None = None, is_ours=None, lock: bool = True) -> Path:
    """Check and lock a file output. An existing file is replaced only when ``is_ours(path)`` says this
    project wrote it."""
    p = _resolve(path, key)
    if str(path).endswith(os.sep) or p.is_dir():
        raise UserError(f"{key}={path} is a directory; allowed: a file path such as {Path(path) / 'out.json'}")
    _overlaps(p, key, sources or {})
    if p.exists() and not (is_ours and is_ours(p)):
        raise UserError(f"{key}={p} is an existing file this project did not write; allowed: a new file "
                        f"path (existing files are never replaced)")
    _writable_parent(p, key)
    if lock:
        take_lock(p.parent / f".{p.name}.lock", key, p)
    return p


def _outside_sources(p: Path, key: str, sources: dict | None) -> None:
    for skey, src in (sources or {}).items():
        if src is None or not str(src).strip():
            continue
        s = Path(os.path.expanduser(str(src))).resolve()
        if p == s or s in p.parents:
            raise UserError(f"{key}={p} {'is' if p == s else 'lies inside'} {skey}={s}; allowed: a "
                            f"directory outside the source")


def claim_cache_dir(path, *, key: str, sources: dict | None = None) -> Path:
    """A cache shared between jobs (``data.cache_dir``): never a source or inside one, in a writable place;
    neither marked nor locked (its entries are written atomically, each by one job)."""
    p = _resolve(path, key)
    _outside_sources(p, key, sources)
    if p.exists() and not p.is_dir():
        raise UserError(f"{key}={p} is an existing file; allowed: a directory")
    _writable_parent(p, key)
    return p


def claim_workdir(path, *, key: str = "workdir", sources: dict | None = None, lock: bool = True) -> Path:
    """A job's work directory: created and marked on first use, reused by re-runs (they resume), locked
    for the run. A directory with other files in it is refused; sources may lie inside it (the corrected
    teacher does), but the workdir may not lie inside a source."""
    p = _resolve(path, key)
    _outside_sources(p, key, sources)
    if p.exists() and not p.is_dir():
        raise UserError(f"{key}={p} is an existing file; allowed: a directory")
    if p.is_dir() and any(p.iterdir()) and not (p / WORKDIR_MARK).is_file():
        names = ", ".join(sorted(x.name for x in p.iterdir())[:3])
        raise UserError(f"{key}={p} holds files this project did not write ({names}); allowed: a new or "
                        f"empty directory, or the workdir of an earlier run")
    _writable_parent(p, key)
    if runtime.rank() == 0:
        try:
            p.mkdir(parents=True, exist_ok=True)
            if not (p / WORKDIR_MARK).is_file():
                (p / WORKDIR_MARK).write_text(json.dumps({"recipe": recipe_name(), "created": time.time()}))
        except OSError as e:
            raise UserError(f"{key}={p}: {ENV_ERRNOS.get(e.errno, e.strerror)}") from None
    if lock:
        take_lock(p / ".lock", key, p)
    return p


# ----------------------------------------------------------------------------- locks
def take_lock(lock_path: Path, key: str, what: Path) -> None:
    """Hold an exclusive ``flock`` on ``lock_path`` until this process ends (rank 0 only), with this process
    recorded in the file (``owner_record``) so that a refused run can name it."""
    if runtime.rank() != 0 or str(lock_path) in _LOCKS:
        return
    fd = _locked_fd(lock_path, key, what)
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(owner_record()).encode(), 0)
    _LOCKS[str(lock_path)] = fd


def _locked_fd(lock_path: Path, key: str, what: Path) -> int:
    """A descriptor of ``lock_path`` holding its flock. A busy lock is a UserError naming its holder; a lock
    whose recorded owner has ended is looked at twice, half a second apart (a new owner records itself
    just after taking the lock)."""
    looked_twice = False
    while True:
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise UserError(f"{key}={what}: cannot create {lock_path}: {ENV_ERRNOS.get(e.errno, e.strerror)}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            record = _read_record(fd)
            os.close(fd)
            if looked_twice or not _owner_ended(record):
                raise _busy_error(lock_path, key, what, record) from None
            looked_twice = True
            time.sleep(0.5)
            continue
        try:  # the file may have been removed by its previous holder between open and flock
            if os.fstat(fd).st_ino == os.stat(lock_path).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


def _machine() -> dict:
    """Where a pid names one process: this host, this boot, this pid namespace (None where unknown)."""
    def read(path: str, link: bool = False):
        try:
            return os.readlink(path) if link else Path(path).read_text().strip()
        except OSError:
            return None

    return {"host": socket.gethostname(), "boot": read("/proc/sys/kernel/random/boot_id"),
            "pidns": read("/proc/self/ns/pid", link=True)}


def start_time(pid) -> str | None:
    """When process ``pid`` started (clock ticks after boot, field 22 of /proc/PID/stat); None when no
    such process exists."""
    try:
        stat = Path(f"/proc/{int(pid)}/stat").read_text()
    except (OSError, ValueError, TypeError):
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def owner_record() -> dict:
    """This process as a lock file records it."""
    return {"pid": os.getpid(), **_machine(), "start": start_time(os.getpid()), "cmd": " ".join(sys.argv)[:300]}


def _read_record(fd: int) -> dict:
    text = os.pread(fd, 4096, 0).decode(errors="replace").strip()
    try:
        record = json.loads(text)
    except ValueError:
        record = None
    return record if isinstance(record, dict) else {"text": text}


def _describe(record: dict) -> str:
    if "pid" not in record:
        return record.get("text") or "another process"
    return f"pid {record['pid']} on {record.get('host')}, {record.get('cmd', '')}"


def _owner_ended(record: dict) -> bool:
    """The recorded owner is provably gone: it was recorded on this machine (host, boot, pid namespace) and
    no process has its pid and start time now. False when that cannot be told."""
    here = _machine()
    if record.get("start") is None or None in here.values() or any(record.get(k) != v for k, v in here.items()):
        return False
    return start_time(record.get("pid")) != record["start"]


def _lock_holders(lock_path: Path) -> list[int]:
    """The other processes (those this one may inspect) that have ``lock_path`` open."""
    found = []
    for proc in os.scandir("/proc"):
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            with os.scandir(f"/proc/{proc.name}/fd") as fds:
                if any(_link(fd.path) == str(lock_path) for fd in fds):
                    found.append(int(proc.name))
        except OSError:
            continue
    return found


def _link(path: str) -> str | None:
    try:
        return os.readlink(path)
    except OSError:
        return None


def _command(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()[:120]
    except OSError:
        return "?"


def _busy_error(lock_path: Path, key: str, what: Path, record: dict) -> UserError:
    """The one line for a lock held elsewhere: a live run is named; a process left over from an ended run
    is named with the command that stops it."""
    owner = _describe(record)
    if not _owner_ended(record):
        return UserError(f"{key}={what} is in use by another run ({owner}); allowed: wait for it to finish or "
                         f"choose another {key}")
    pids = _lock_holders(lock_path)
    if not pids:
        return UserError(f"{key}={what} is locked by a process left over from an ended run ({owner}); allowed: "
                         f"stop the process that holds {lock_path}, then re-run; or choose another {key}")
    names = ", ".join(f"pid {p} ({_command(p)})" for p in pids)
    return UserError(f"{key}={what} is locked by {names}, left over from an ended run ({owner}); allowed: stop "
                     f"it (kill {' '.join(map(str, pids))}), then re-run; or choose another {key}")


def release_locks() -> None:
    for path, fd in list(_LOCKS.items()):
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)
        del _LOCKS[path]


import atexit  # noqa: E402

atexit.register(release_locks)


# ----------------------------------------------------------------------------- forked children
_FORK: dict = {}
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
PR_SET_PDEATHSIG = 1


def _before_fork() -> None:
    _FORK.update(parent=os.getpid(), main_thread=threading.current_thread() is threading.main_thread())


def _in_forked_child() -> None:
    """A forked child (Megatron's checkpoint writers, any multiprocessing fork) closes its copies of the
    lock descriptors, since a flock lasts while any copy is open, and, when the main thread forked it
    (which lives as long as the run), is killed when its parent ends, kill -9 and the OOM killer included."""
    for fd in _LOCKS.values():
        with contextlib.suppress(OSError):
            os.close(fd)
    _LOCKS.clear()
    if _LIBC is not None and _FORK.get("main_thread"):
        _LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != _FORK["parent"]:  # the parent ended before prctl took effect
            os.kill(os.getpid(), signal.SIGKILL)


os.register_at_fork(before=_before_fork, after_in_child=_in_forked_child)


# ----------------------------------------------------------------------------- writing
def temp_of(final: Path) -> Path:
    return final.parent / f".{final.name}.tmp"


def write_manifest(tmp: Path, recipe: str | None = None) -> None:
    files = sorted(str(f.relative_to(tmp)) for f in tmp.rglob("*") if not f.is_dir())
    (tmp / MANIFEST).write_text(json.dumps({"recipe": recipe or recipe_name(), "files": files,
                                            "written": time.time()}, indent=0))


def commit(tmp: Path, final: Path, recipe: str | None = None) -> None:
    """Mark ``tmp`` as this project's output and rename it into place over ``final``."""
    write_manifest(tmp, recipe)
    old = final.parent / f".{final.name}.old"
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def discard(tmp: Path) -> None:
    shutil.rmtree(tmp, ignore_errors=True)


def env_error(exc: BaseException) -> OSError | None:
    """The disk-full / read-only / permission ``OSError`` behind ``exc`` (also inside the wrappers of
    torch.distributed.checkpoint and Megatron), or None."""
    seen, todo = set(), [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in ENV_ERRNOS:
            return e
        todo += [e.__cause__, e.__context__]
        failures = getattr(e, "failures", None)  # torch.distributed.checkpoint.CheckpointException
        if isinstance(failures, dict):
            for v in failures.values():
                todo += [x for x in (v if isinstance(v, tuple) else (v,)) if isinstance(x, BaseException)]
        todo += [a for a in getattr(e, "args", ()) if isinstance(a, BaseException)]
    return None


SHORT_WRITE = re.compile(r"\b\d+ requested and \d+ written\b")  # numpy's tofile on a full disk: no errno
# torch.save's zip writer when a write stops short (a RuntimeError, wrapped in Megatron-Core's "Worker failure"
# when its checkpoint writer process met it)
ZIP_SHORT_WRITE = re.compile(r"inline_container\.cc:\d+\] \. unexpected pos \d+ vs \d+")


def write_error(exc: BaseException, where) -> UserError | None:
    e = env_error(exc)
    if e is None:
        text = str(exc)
        short = (isinstance(exc, OSError) and SHORT_WRITE.search(text)) or ZIP_SHORT_WRITE.search(text)
        if short:  # the matched words only: the exception's text may hold a writer process's whole traceback
            return UserError(f"cannot write {where}: the disk is full (a write stopped short: {short.group(0)}); "
                             f"nothing was changed there")
        for code, why in ENV_ERRNOS.items():
            if os.strerror(code) in text:
                return UserError(f"cannot write {where}: {why}; nothing was changed there")
        return None
    return UserError(f"cannot write {e.filename or where}: {ENV_ERRNOS[e.errno]}; nothing was changed at {where}")


@contextlib.contextmanager
def atomic_dir(final, recipe: str | None = None, *, collective: bool = False):
    """Atomic directory write: ``with atomic_dir(out) as tmp: ...write into tmp...``; ``tmp`` is renamed
    into place when the block ends, and removed when it raises (the previous output stays).
    ``collective=True``: every rank of torch.distributed enters and writes into the same ``tmp`` (e.g.
    its checkpoint shard); rank 0 creates, commits or removes it, between barriers."""
    final = Path(final).resolve()
    tmp = temp_of(final)
    lead, sync = True, (lambda: None)
    if collective:
        import torch.distributed as dist

        if dist.is_initialized():
            lead, sync = dist.get_rank() == 0, dist.barrier
    try:
        if lead:
            discard(tmp)
            tmp.mkdir(parents=True)
        sync()
        yield tmp
        sync()
        if lead:
            commit(tmp, final, recipe)
        sync()
    except BaseException as exc:
        if lead:
            discard(tmp)
        err = write_error(exc, final)
        if err is not None:
            raise err from None
        raise


def write_text_atomic(path, text: str) -> Path:
    """Write a small file through a temp file and ``os.replace`` (a failure leaves the old file)."""
    p = Path(path)
    tmp = p.with_name(f".{p.name}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, p)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        err = write_error(exc, p)
        if err is not None:
            raise err from None
        raise
    return p


# ----------------------------------------------------------------------------- settings records
def first_difference(a, b, at="") -> str | None:
    """``key.path: old -> new`` at the first key (in sorted order) where ``a`` and ``b`` differ, or None."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            d = first_difference(a.get(k), b.get(k), f"{at}.{k}" if at else k)
            if d:
                return d
        return None
    return None if a == b else f"{at}: {a!r} -> {b!r}"


def settings_difference(path, settings: dict) -> str | None:
    """The first difference between the settings recorded in ``path`` and ``settings``; None when they
    agree or nothing is recorded yet. The caller words the refusal ("a re-run with other settings stops")."""
    from minitron_nemo.readers import read_own_record

    p = Path(path)
    if not p.is_file():
        return None
    recorded = read_own_record(p, "recorded settings", f"remove {p.parent} to run it again with these settings")
    return first_difference(recorded, json.loads(json.dumps(settings)))


def record_settings(path, settings: dict) -> None:
    """Record ``settings`` in ``path`` on the first run (rank 0); later runs compare with
    ``settings_difference``."""
    p = Path(path)
    if not p.is_file() and runtime.rank() == 0:
        write_text_atomic(p, json.dumps(settings, indent=1))
