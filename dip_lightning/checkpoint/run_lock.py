"""One ``fit`` per run folder: a lock file that one process group (all ranks of one job) holds at a time.

Two jobs training into one folder overwrite each other's checkpoints. Rank 0 creates ``<run>/run.lock`` with
``O_CREAT | O_EXCL`` (atomic on local filesystems, NFSv3+ and Lustre, unlike ``flock``, which network filesystems
may emulate per node or disable) and writes who holds it; a daemon thread touches its mtime as a heartbeat.
The other ranks only check that the file names their job. Who "the job" is: the owner token, the same on
every rank of one job and on its requeued restarts:

* SLURM: ``slurm:<cluster>:<SLURM_JOB_ID>`` (a requeued job keeps its id);
* torchrun: ``torchrun:<run id>`` (or ``torchrun:<MASTER_ADDR>:<MASTER_PORT>`` without ``--rdzv-id``);
* otherwise a new ``<host>:<pid>:<random>`` that rank 0 exports as ``DIP_RUN_TOKEN`` for the duration of the
  hold, so the processes Lightning's launcher starts for the other ranks inherit it.

A hold left behind (killed job) is taken over when its holder is provably gone: the same token (this job's own
earlier run: a requeue), or the same host with the holder's process ended, or no heartbeat for ``stale_after``
seconds. Take-over renames the old file aside (``run.lock.taken-<time>-<pid>``, kept as a record) while it holds
``run.lock.takeover`` (also ``O_EXCL``), after checking that the file is still the one it judged: a contender whose
judgement is out of date then never moves (and so never vacates) a newer hold, so of any number of contenders only
one wins. Details and reasons: docs/design.md.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import threading
import time
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from dip_lightning.checkpoint import run_folder
from dip_lightning.core.errors import ConfigError, KitError

__all__ = ["TOKEN_ENV", "RunFolderBusy", "RunFolderHoldLost", "RunFolderUnwritable", "RunLock", "group_token"]

#: The owner token of a process group that no launcher names (Lightning's own launcher, a single process).
TOKEN_ENV = "DIP_RUN_TOKEN"
#: Seconds without a heartbeat after which another job may take a hold over (``fit --lock_stale_after``).
DEFAULT_STALE_AFTER = 600.0
#: How long ranks other than 0 wait for rank 0 to take the hold.
DEFAULT_RANK_WAIT = 120.0
#: Seconds after which a take-over mutex is taken as left by a contender killed inside its few-syscall section.
TAKEOVER_MUTEX_STALE = 10.0


class RunFolderBusy(KitError, RuntimeError):
    """Another job holds the run folder: a second ``fit`` would overwrite its checkpoints."""


class RunFolderUnwritable(KitError, OSError):
    """The hold file cannot be created in the run folder (permissions, a read-only or full filesystem)."""


class RunFolderHoldLost(UserWarning):
    """The hold of a running ``fit`` was taken over (its heartbeat looked stale, or the file was deleted)."""


# --------------------------------------------------------------------------------------------- who we are
def group_token(environ: Mapping[str, str] = os.environ) -> str | None:
    """The owner token shared by every rank of this job (see the module docstring); None when no launcher names
    one (then rank 0 makes one up)."""
    if environ.get(TOKEN_ENV):
        return environ[TOKEN_ENV]
    if environ.get("SLURM_JOB_ID"):
        return f"slurm:{environ.get('SLURM_CLUSTER_NAME', '')}:{environ['SLURM_JOB_ID']}"
    if "TORCHELASTIC_RUN_ID" in environ:
        run_id = environ["TORCHELASTIC_RUN_ID"]
        if run_id and run_id != "none":
            return f"torchrun:{run_id}"
        return f"torchrun:{environ.get('MASTER_ADDR', '')}:{environ.get('MASTER_PORT', '')}"
    return None


def _job_name(token: str) -> str:
    kind, _, rest = token.partition(":")
    if kind == "slurm":
        return f"SLURM job {rest.rpartition(':')[2]}"
    if kind == "torchrun":
        return f"torchrun run {rest}"
    return "a fit"


def _read_text(path: str) -> str | None:
    try:
        with open(path, encoding="ascii", errors="replace") as handle:
            return handle.read().strip()
    except OSError:
        return None


def _process_start(pid: int) -> int | None:
    """The start time of process ``pid`` in clock ticks since boot (Linux), which tells a reused PID apart."""
    stat = _read_text(f"/proc/{pid}/stat")
    if not stat:
        return None
    fields = stat.rpartition(")")[2].split()  # the command name may hold spaces and ')'
    return int(fields[19]) if len(fields) > 19 else None


def _process_state(pid: int) -> str | None:
    stat = _read_text(f"/proc/{pid}/stat")
    return stat.rpartition(")")[2].split()[0] if stat else None


def _machine() -> tuple[str | None, str | None]:
    """(boot id, PID namespace): a PID means the same process only on the same boot and namespace (containers
    on one host may share a host name)."""
    with contextlib.suppress(OSError):
        namespace = os.readlink("/proc/self/ns/pid")
        return _read_text("/proc/sys/kernel/random/boot_id"), namespace
    return _read_text("/proc/sys/kernel/random/boot_id"), None


@dataclass(frozen=True)
class Holder:
    """What the lock file records about the process that holds it."""

    token: str
    job: str
    host: str
    pid: int
    started: float  # Unix time the hold was taken
    pid_start: int | None = None
    boot_id: str | None = None
    pid_namespace: str | None = None

    @classmethod
    def this_process(cls, token: str) -> Holder:
        boot_id, namespace = _machine()
        pid = os.getpid()
        return cls(
            token,
            _job_name(token),
            socket.gethostname(),
            pid,
            time.time(),
            _process_start(pid),
            boot_id,
            namespace,
        )

    @classmethod
    def parse(cls, text: str) -> Holder | None:
        try:
            record = json.loads(text)
            return cls(**{k: record[k] for k in cls.__dataclass_fields__ if k in record})
        except (ValueError, TypeError, KeyError):
            return None

    def same_machine(self, other: Holder) -> bool:
        return (self.host, self.boot_id, self.pid_namespace) == (
            other.host,
            other.boot_id,
            other.pid_namespace,
        )

    def alive(self) -> bool:
        """Whether the holding process still runs (call only on its machine, :meth:`same_machine`)."""
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass  # another user's process: it exists
        if _process_state(self.pid) in ("Z", "X"):
            return False  # ended, not yet reaped by its parent
        start = _process_start(self.pid)
        return self.pid_start is None or start is None or start == self.pid_start

    def describe(self) -> str:
        since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.started))
        return f"{self.job} (pid {self.pid} on {self.host}, since {since})"


@dataclass(frozen=True)
class _Seen:
    """A lock file as read: its holder (None: empty or unreadable) and its identity."""

    holder: Holder | None
    inode: tuple[int, int]
    mtime_ns: int

    @property
    def age(self) -> float:
        return time.time() - self.mtime_ns / 1e9


def _look(path: Path) -> _Seen | None:
    try:
        with open(path, "rb") as handle:
            stat = os.fstat(handle.fileno())
            text = handle.read(65536).decode("utf-8", errors="replace")
    except FileNotFoundError:
        return None
    return _Seen(Holder.parse(text), (stat.st_dev, stat.st_ino), stat.st_mtime_ns)


def _age(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


# --------------------------------------------------------------------------------------------- the lock
class RunLock:
    """The hold of one run folder by this job.

    Args:
        run_dir: the run folder (``trainer.default_root_dir``); created if missing.
        stale_after: seconds without a heartbeat after which another job may take the hold over.
        rank_wait: seconds ranks other than 0 wait for rank 0's hold to appear.

    Rank 0 calls :meth:`acquire` (raises :class:`RunFolderBusy` when another job holds the folder), the other
    ranks :meth:`verify`; :meth:`release` ends the hold (rank 0; a no-op elsewhere). ``with`` does both on rank 0.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike[str],
        stale_after: float = DEFAULT_STALE_AFTER,
        rank_wait: float = DEFAULT_RANK_WAIT,
    ) -> None:
        if stale_after <= 0:
            raise ConfigError(f"stale_after must be > 0 seconds, got {stale_after}")
        self.run_dir = Path(run_dir)
        self.path = run_folder.lock_path(self.run_dir)
        self.stale_after = float(stale_after)
        self.rank_wait = float(rank_wait)
        self.holder: Holder | None = None
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None
        self._previous_env: str | None = None

    @property
    def heartbeat_interval(self) -> float:
        return min(60.0, self.stale_after / 5)

    # ------------------------------------------------------------------ rank 0
    def acquire(self) -> str:
        """Take the hold for this job; returns one log line saying so (and what it took over)."""
        token = group_token() or f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        me = Holder.this_process(token)
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise self._unwritable(err) from err
        taken_over = ""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self._create(me):
                self._start(me)
                return f"Run folder: held by {me.describe()} in {self.path}.{taken_over}"
            seen = _look(self.path)
            if seen is None:
                continue  # released or taken meanwhile: try again
            if seen.holder is None and seen.age < min(10.0, self.stale_after):
                time.sleep(0.2)  # being written by its creator
                continue
            reason = self._gone(seen, me)
            if reason is None:
                raise RunFolderBusy(self._busy_message(seen, me))
            aside = self._take_over(seen)
            if aside is not None:
                old = seen.holder.describe() if seen.holder else "an unreadable hold"
                taken_over = f" Took over from {old}: {reason}; its file is kept as {aside.name}."
        raise RunFolderBusy(
            f"could not take the hold of {self.run_dir} ({self.path}): other fits keep taking it"
        )

    def _create(self, me: Holder) -> bool:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        except OSError as err:
            raise self._unwritable(err) from err
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump(asdict(me), handle, indent=1, sort_keys=True)
                handle.write("\n")
                handle.flush()
                os.fsync(handle.fileno())
        except OSError as err:
            with contextlib.suppress(OSError):
                self.path.unlink()
            raise self._unwritable(err) from err
        return True

    def _unwritable(self, err: OSError) -> RunFolderUnwritable:
        return RunFolderUnwritable(
            f"cannot write into run folder {self.run_dir}: {err.strerror or err} ({self.path}). fit writes its "
            "checkpoints and logs there: choose a writable --trainer.default_root_dir, or fix the folder."
        )

    def _gone(self, seen: _Seen, me: Holder) -> str | None:
        """Why the hold ``seen`` may be taken over, or None while its holder may still be running."""
        holder = seen.holder
        if holder is None:
            return f"unreadable, no heartbeat for {_age(seen.age)}"
        if holder.token == me.token:
            if holder.same_machine(me) and holder.pid != me.pid and holder.alive():
                return None  # another process of this same job trains in this folder
            return f"this job's own earlier run ({holder.job}, requeued or restarted)"
        if holder.same_machine(me) and not holder.alive():
            return f"process {holder.pid} on {holder.host} has ended"
        if seen.age > self.stale_after:
            return f"no heartbeat for {_age(seen.age)} (stale after {_age(self.stale_after)})"
        return None

    def _take_over(self, seen: _Seen) -> Path | None:
        """Rename the judged file aside; None when it is no longer the judged file (the caller looks again)."""
        mutex = run_folder.takeover_mutex_path(self.run_dir)
        if not self._enter_takeover(mutex):
            return None
        try:
            # Judged before the mutex: another contender may have taken the hold over and created its own since.
            now = _look(self.path)
            if now is None or now.inode != seen.inode or now.mtime_ns != seen.mtime_ns:
                return None
            aside = run_folder.taken_lock_path(self.run_dir)
            try:
                os.rename(self.path, aside)
            except FileNotFoundError:
                return None
            moved = os.stat(aside)
            if (moved.st_dev, moved.st_ino) != seen.inode or moved.st_mtime_ns != seen.mtime_ns:
                # Its holder released it and a new hold came in between the check and the rename. Put it back;
                # link never replaces, so a third contender's file stays too.
                with contextlib.suppress(OSError):
                    os.link(aside, self.path)
                    os.unlink(aside)
                return None
            return aside
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(mutex)

    def _enter_takeover(self, mutex: Path) -> bool:
        """Hold the take-over mutex; False (after a short wait) while another contender holds it."""
        try:
            os.close(os.open(mutex, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
            return True
        except FileExistsError:
            pass
        except OSError as err:
            raise self._unwritable(err) from err
        with contextlib.suppress(FileNotFoundError):
            if time.time() - mutex.stat().st_mtime > TAKEOVER_MUTEX_STALE:
                mutex.unlink()  # its contender died inside the section
        time.sleep(0.01)
        return False

    def _busy_message(self, seen: _Seen, me: Holder) -> str:
        holder = seen.holder
        assert holder is not None
        if holder.token == me.token:
            stop = f"another process of this same job: stop it (kill {holder.pid} on {holder.host})"
        elif holder.token.startswith("slurm:"):
            stop = f"stop it (scancel {holder.job.rpartition(' ')[2]})"
        else:
            stop = f"stop it (kill {holder.pid} on {holder.host})"
        return (
            f"run folder {self.run_dir} is in use: {holder.describe()} holds it, last heartbeat {_age(seen.age)} "
            f"ago ({self.path}). Two fits in one folder overwrite each other's checkpoints. Wait for it to end, "
            f"{stop}, or give this fit another --trainer.default_root_dir. A hold is taken over by itself once its "
            f"process has ended (same host) or its heartbeat is older than {_age(self.stale_after)} "
            f"(--lock_stale_after); delete {self.path.name} only if no job uses the folder."
        )

    def _start(self, me: Holder) -> None:
        self.holder = me
        self._previous_env = os.environ.get(TOKEN_ENV)
        os.environ[TOKEN_ENV] = me.token  # for the rank processes Lightning's launcher starts
        self._stop.clear()
        self._heartbeat = threading.Thread(target=self._beat, name="run-folder-heartbeat", daemon=True)
        self._heartbeat.start()

    def _ours(self) -> bool:
        seen = _look(self.path)
        return bool(
            seen
            and seen.holder
            and self.holder
            and seen.holder.token == self.holder.token
            and seen.holder.pid == self.holder.pid
        )

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_interval):
            if not self._ours():
                seen = _look(self.path)
                now = seen.holder.describe() if seen and seen.holder else "nobody"
                warnings.warn(
                    f"this fit lost its hold of {self.run_dir}: {self.path} now names {now}. Another fit may be "
                    "writing checkpoints into the same folder; stop one of them.",
                    RunFolderHoldLost,
                    stacklevel=1,
                )
                return
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def release(self) -> None:
        """End the hold (the file is removed when it is still ours). Safe to call twice, and on any rank."""
        if self.holder is None:
            return
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join(timeout=5)
        if self._ours():
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        if self._previous_env is None:
            os.environ.pop(TOKEN_ENV, None)
        else:
            os.environ[TOKEN_ENV] = self._previous_env
        self.holder = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    # ------------------------------------------------------------------ other ranks
    def verify(self, rank: int) -> None:
        """On ranks other than 0: wait until the hold names this job (rank 0 takes it); :class:`RunFolderBusy`
        when it does not after ``rank_wait`` seconds."""
        token = group_token()
        if token is None:
            raise RunFolderBusy(
                f"rank {rank} cannot tell which job it belongs to (no SLURM, torchrun or {TOKEN_ENV} variable), so "
                f"it cannot check that rank 0 holds {self.run_dir}: export {TOKEN_ENV} with the same value on every "
                "rank, or launch with srun or torchrun."
            )
        deadline = time.monotonic() + self.rank_wait
        while True:
            seen = _look(self.path)
            if seen is not None and seen.holder is not None and seen.holder.token == token:
                return
            if time.monotonic() > deadline:
                now = seen.holder.describe() if seen and seen.holder else "nobody"
                raise RunFolderBusy(
                    f"rank {rank}: rank 0 of this job ({_job_name(token)}) did not take the hold of {self.run_dir} "
                    f"within {_age(self.rank_wait)}; {self.path} names {now}. See rank 0's error."
                )
            time.sleep(0.2)
