"""A real, throw-away single-node SLURM cluster for tests (Debian 12, SLURM 22.05, root, no systemd).

Why a real cluster instead of mocks: preemption and resume depend on details that only the real daemons show
(which processes a signal reaches, requeue latency, ``SLURM_RESTART_COUNT``, output truncated on requeue,
job ids restarting at 1). :class:`SlurmCluster` starts ``munged``, ``slurmctld`` and ``slurmd`` as background
daemons whose config, state, spool, pid and log files all live in temporary folders, and stops them by pid.

Isolation, because other people run tests on the same machine at the same time:

* every cluster has its own ``munged`` (own key, own socket, named in ``AuthInfo=socket=``), its own TCP
  ports for ``slurmctld``/``slurmd`` (picked free at start) and its own ``ClusterName``: clusters never meet;
* client commands get ``SLURM_CONF`` through :attr:`SlurmCluster.env`; ``sbatch`` exports it into the job, so
  ``srun`` and Lightning's ``scontrol requeue`` inside the job talk to this cluster too;
* only processes this cluster started are ever signalled: daemons by the pids in their pid files (after
  checking that the pid still runs what we started), leftover job processes by ``SLURM_CONF=<our conf>`` in
  their environment.

Several nodes on one machine: :class:`tests.helpers.slurm_two_nodes.TwoNodeSlurmCluster` subclasses this one
through the topology hooks (``_setup_network``, ``_topology_conf``, ``_start_slurm_daemons``, ``_client_prefix``).

Typical use::

    with SlurmCluster() as cluster:
        job = cluster.sbatch(script_text, cwd=tmp_path)
        cluster.wait_for_state(job, "RUNNING", timeout=60)
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import secrets
import shutil
import signal as signal_module
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
# Binaries that must exist once the packages above are installed.
REQUIRED_BINARIES = (
    "slurmctld",
    "slurmd",
    "sbatch",
    "srun",
    "scontrol",
    "scancel",
    "squeue",
    "sinfo",
    "munged",
)
# States in which a job will not run again by itself.
TERMINAL_STATES = frozenset(
    {
        "BOOT_FAIL",
        "CANCELLED",
        "COMPLETED",
        "DEADLINE",
        "FAILED",
        "NODE_FAIL",
        "OUT_OF_MEMORY",
        "PREEMPTED",
        "TIMEOUT",
    }
)
_SBIN_DIRS = ("/usr/sbin", "/usr/local/sbin", "/sbin")


class SlurmUnavailable(RuntimeError):
    """SLURM cannot be provided on this machine (not root, no apt, install failed); tests should skip."""


class SlurmError(RuntimeError):
    """The cluster misbehaved (a daemon did not start, a job failed, a wait timed out); tests should fail."""


def _which(name: str) -> str | None:
    """``shutil.which`` that also looks in the sbin folders (a non-login root shell may lack them on PATH)."""
    found = shutil.which(name)
    if found:
        return found
    for folder in _SBIN_DIRS:
        candidate = Path(folder, name)
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def free_port() -> int:
    """A TCP port nobody listens on right now (small race window; good enough for tests)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _tail(path: Path, lines: int = 40) -> str:
    """Last lines of a log file for error messages; never raises."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as err:
        return f"<cannot read {path}: {err}>"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie still answers kill(0); it has exited for our purposes.
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def ensure_slurm_installed(timeout: float = 600.0) -> float:
    """Install the Debian SLURM + munge packages when their binaries are missing; return the seconds spent.

    Only the four packages the cluster needs are installed (``slurm-wlm`` would pull ~40 more). Raises
    :class:`SlurmUnavailable` when installing is impossible, so that callers can skip instead of fail.
    """
    if all(_which(name) for name in REQUIRED_BINARIES):
        return 0.0
    if os.geteuid() != 0:
        raise SlurmUnavailable("SLURM binaries are missing and installing them needs root")
    apt_get = shutil.which("apt-get")
    if apt_get is None:
        raise SlurmUnavailable("SLURM binaries are missing and apt-get is not available")
    start = time.monotonic()
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    # Another process may hold the dpkg lock for a while (others install too): wait instead of failing.
    install = [
        apt_get,
        "-o",
        "DPkg::Lock::Timeout=300",
        "install",
        "-y",
        "--no-install-recommends",
        *PACKAGES,
    ]
    result = subprocess.run(install, env=env, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        # A fresh machine may have empty package lists: update once and retry.
        subprocess.run(
            [apt_get, "-o", "DPkg::Lock::Timeout=300", "update"],
            env=env,
            capture_output=True,
            timeout=timeout,
        )
        result = subprocess.run(install, env=env, capture_output=True, text=True, timeout=timeout)
    missing = [name for name in REQUIRED_BINARIES if not _which(name)]
    if result.returncode != 0 or missing:
        raise SlurmUnavailable(
            f"installing {' '.join(PACKAGES)} failed (rc={result.returncode}, missing {missing}): "
            f"{(result.stderr or result.stdout)[-800:]}"
        )
    return time.monotonic() - start


class SlurmCluster:
    """A single-node SLURM cluster in a temporary folder; a context manager that always cleans up.

    Args:
        root: folder for config, state and logs; default a fresh ``mkdtemp`` that :meth:`stop` removes. The
            munge key and socket live in a separate ``/tmp`` folder: ``munged`` runs as user ``munge`` and
            cannot enter pytest's 0700 temporary folders.
        install: install the Debian packages when missing (see :func:`ensure_slurm_installed`).
        start_timeout: seconds to wait for each daemon and for the node to become ``idle``.
        keep_files: keep ``root`` after :meth:`stop` (for debugging; logs are in ``root/log``).
    """

    def __init__(
        self,
        root: str | os.PathLike[str] | None = None,
        *,
        install: bool = True,
        start_timeout: float = 60.0,
        keep_files: bool = False,
    ) -> None:
        self._own_root = root is None
        self.root = Path(tempfile.mkdtemp(prefix="dip-slurm-")) if root is None else Path(root)
        self.install = install
        self.start_timeout = start_timeout
        self.keep_files = keep_files
        self.hostname = socket.gethostname().split(".")[0]
        self.cluster_name = "dip" + secrets.token_hex(3)
        self.conf_path = self.root / "slurm.conf"
        self.log_dir = self.root / "log"
        self.run_dir = self.root / "run"
        self.munge_dir: Path | None = None
        self.munge_socket: Path | None = None
        self.ctld_port = 0
        self.slurmd_port = 0
        self.timings: dict[str, float] = {}
        self._pids: dict[str, int] = {}
        self._started = False
        self._owner_pid = os.getpid()  # a forked child must never tear down the parent's cluster
        self._script_counter = 0

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> SlurmCluster:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def env(self) -> dict[str, str]:
        """Environment for client commands and jobs: ``SLURM_CONF`` pointing at this cluster.

        The caller's ``SLURM_*``/``SBATCH_*``/``SRUN_*``/``SALLOC_*`` variables are dropped: when the tests
        themselves run inside a job of a real cluster, those would leak into (and confuse) the test jobs.
        """
        prefixes = ("SLURM_", "SBATCH_", "SRUN_", "SALLOC_")
        env = {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}
        env["SLURM_CONF"] = str(self.conf_path)
        return env

    def start(self) -> None:
        """Install if needed, write the config, start munged, slurmctld, slurmd; wait until the node is idle.

        Anything that fails after the first daemon started stops what was started before re-raising.
        """
        if self._started:
            return
        t0 = time.monotonic()
        try:
            if self.install:
                self.timings["install_s"] = ensure_slurm_installed()
            elif not all(_which(name) for name in REQUIRED_BINARIES):
                raise SlurmUnavailable("SLURM binaries are missing and install=False")
            if os.geteuid() != 0:
                raise SlurmUnavailable("the test cluster runs slurmd as root; run the tests as root")
        except SlurmUnavailable:
            if self._own_root:
                shutil.rmtree(self.root, ignore_errors=True)
            raise
        t1 = time.monotonic()
        self._started = True
        atexit.register(self.stop)
        try:
            self._prepare_folders()
            self._setup_network()
            self._start_munged()
            self._write_conf()
            self._start_slurm_daemons()
            self._wait_idle()
        except BaseException:
            self.stop()
            raise
        self.timings["start_s"] = time.monotonic() - t1
        self.timings["total_s"] = time.monotonic() - t0

    def stop(self) -> None:
        """Cancel all jobs, stop the daemons by pid, remove leftovers; safe twice and after a failed start."""
        if not self._started or os.getpid() != self._owner_pid:
            return
        self._started = False
        with contextlib.suppress(Exception):
            atexit.unregister(self.stop)
        if "slurmctld" in self._pids:
            with contextlib.suppress(Exception):
                self._cancel_all_jobs(timeout=30.0)
        # slurmd first (it would otherwise try to reach the controller), then the controller, then munge.
        for name in (*self._slurmd_labels(), "slurmctld", "munged"):
            self._stop_daemon(name)
        self._kill_leftover_job_processes()
        self._teardown_network()
        if self._own_root and not self.keep_files:
            shutil.rmtree(self.root, ignore_errors=True)
        if self.munge_dir is not None:
            shutil.rmtree(self.munge_dir, ignore_errors=True)

    # ------------------------------------------------------------------ topology (overridden for more nodes)
    @property
    def node_names(self) -> tuple[str, ...]:
        """The SLURM names of the cluster's nodes (here: one node named after this machine)."""
        return (self.hostname,)

    def _setup_network(self) -> None:
        """Before any daemon starts: nothing to do for a node on loopback."""

    def _teardown_network(self) -> None:
        """After every daemon stopped: undo :meth:`_setup_network`."""

    def _client_prefix(self) -> list[str]:
        """What client commands (sbatch, scontrol, ...) run under to reach the controller: nothing here."""
        return []

    def _slurmd_labels(self) -> tuple[str, ...]:
        """Keys of the slurmd daemons in the pid table, in stop order."""
        return ("slurmd",)

    def _start_slurm_daemons(self) -> None:
        self._start_daemon("slurmctld", [_which("slurmctld") or "slurmctld", "-c", "-f", str(self.conf_path)])
        self._start_daemon(
            "slurmd", [_which("slurmd") or "slurmd", "-f", str(self.conf_path), "-N", self.hostname]
        )

    def _topology_conf(self) -> list[str]:
        """slurm.conf lines that depend on where the daemons run: controller, slurmd files, nodes, partition."""
        return [
            f"SlurmctldHost={self.hostname}(127.0.0.1)",
            f"SlurmdSpoolDir={self.root / 'spool'}",
            f"SlurmdPidFile={self.run_dir / 'slurmd.pid'}",
            f"SlurmdLogFile={self.log_dir / 'slurmd.log'}",
            "SlurmdTimeout=300",
            self._node_line(),
            f"PartitionName=debug Nodes={self.hostname} Default=YES MaxTime=INFINITE State=UP",
        ]

    def _log_names(self) -> tuple[str, ...]:
        """Daemon logs (under ``log_dir``, without ``.log``) that :meth:`diagnostics` shows."""
        return ("slurmctld", "slurmd")

    # ------------------------------------------------------------------ setup helpers
    def _prepare_folders(self) -> None:
        for sub in ("state", "spool", "run", "log", "scripts"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    def _start_munged(self) -> None:
        """A munged with its own key and socket: no clash with a system munged or another test cluster."""
        import pwd

        try:
            munge_user = pwd.getpwnam("munge")
        except KeyError as err:
            raise SlurmUnavailable("user 'munge' does not exist (munge package broken?)") from err
        self.munge_dir = Path(tempfile.mkdtemp(prefix="dip-munge-"))
        key = self.munge_dir / "munge.key"
        key.write_bytes(secrets.token_bytes(1024))
        key.chmod(0o400)
        for path in (self.munge_dir, key):
            os.chown(path, munge_user.pw_uid, munge_user.pw_gid)
        # munged insists that everyone may traverse its socket folder; the key itself stays 0400.
        self.munge_dir.chmod(0o755)
        self.munge_socket = self.munge_dir / "munge.socket"
        pid_file = self.munge_dir / "munged.pid"  # see _daemon_pid_file
        cmd = [
            _which("runuser") or "runuser",
            "-u",
            "munge",
            "--",
            _which("munged") or "munged",
            f"--socket={self.munge_socket}",
            f"--key-file={key}",
            f"--pid-file={pid_file}",
            f"--log-file={self.munge_dir / 'munged.log'}",
            f"--seed-file={self.munge_dir / 'munged.seed'}",
        ]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=self.start_timeout)
        if result.returncode != 0:
            raise SlurmError(
                f"munged failed to start: {result.stderr.strip()}\n{_tail(self.munge_dir / 'munged.log')}"
            )
        self._pids["munged"] = self._read_pid(pid_file, "munged")
        # Round trip a credential to prove the daemon answers.
        munge, unmunge = _which("munge") or "munge", _which("unmunge") or "unmunge"
        cred = subprocess.run(
            [munge, "-n", "-S", str(self.munge_socket)], capture_output=True, timeout=10, check=False
        )
        check = subprocess.run(
            [unmunge, "-S", str(self.munge_socket)], input=cred.stdout, capture_output=True, timeout=10
        )
        if cred.returncode != 0 or check.returncode != 0:
            raise SlurmError(f"munge round trip failed: {cred.stderr!r} {check.stderr!r}")

    def _hardware_fields(self) -> str:
        """``slurmd -C``'s description of this machine (CPUs, sockets, memory) for a node line."""
        result = subprocess.run(
            [_which("slurmd") or "slurmd", "-C"], capture_output=True, text=True, timeout=30, env=self.env
        )
        line = next((ln for ln in result.stdout.splitlines() if ln.startswith("NodeName=")), None)
        if line is None:
            raise SlurmError(f"slurmd -C printed no node line: {result.stdout!r} {result.stderr!r}")
        return " ".join(f for f in line.split() if not f.startswith("NodeName="))

    def _node_line(self) -> str:
        """The node runs on loopback so it never depends on DNS."""
        return f"NodeName={self.hostname} NodeAddr=127.0.0.1 {self._hardware_fields()} State=UNKNOWN"

    def _write_conf(self) -> None:
        self.ctld_port = free_port()
        self.slurmd_port = free_port()
        while self.slurmd_port == self.ctld_port:
            self.slurmd_port = free_port()
        root = self.root
        lines = [
            f"ClusterName={self.cluster_name}",
            f"SlurmctldPort={self.ctld_port}",
            f"SlurmdPort={self.slurmd_port}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            # cred_expire=10: a requeued job may start again after 10 s instead of 120 s.
            f"AuthInfo=socket={self.munge_socket},cred_expire=10",
            f"StateSaveLocation={root / 'state'}",
            f"SlurmctldPidFile={self.run_dir / 'slurmctld.pid'}",
            f"SlurmctldLogFile={self.log_dir / 'slurmctld.log'}",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/filetxt",
            f"JobCompLoc={self.log_dir / 'jobcomp.txt'}",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "SchedulerType=sched/backfill",
            # Scheduler passes every 2 s instead of 30-60 s: requeued and newly submitted jobs start promptly.
            "SchedulerParameters=bf_interval=2,sched_interval=2",
            "SlurmdParameters=config_overrides",
            "JobRequeue=1",
            "MpiDefault=none",
            "MailProg=/bin/true",
            "ReturnToService=2",
            # Finished jobs stay visible to `scontrol show job` for 10 min (default 5): tests read them.
            "MinJobAge=600",
            # SIGTERM -> SIGKILL grace on cancel/requeue; Lightning exits well within it.
            "KillWait=10",
            "InactiveLimit=0",
            "SlurmctldTimeout=300",
            *self._topology_conf(),
        ]
        self.conf_path.write_text("\n".join(lines) + "\n")

    def _start_daemon(self, name: str, cmd: list[str]) -> None:
        """Start a daemon that forks into the background; ``name`` is ``slurmctld``/``slurmd[-NODE]``, and its
        pid and log files are ``<name>.pid`` and ``<name>.log`` (see :meth:`_topology_conf`)."""
        env = self.env
        log = self.log_dir / f"{name}.log"
        result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=self.start_timeout)
        if result.returncode != 0:
            raise SlurmError(
                f"{name} failed to start (rc={result.returncode}): {result.stderr}\n{_tail(log)}"
            )
        pid_file = self._daemon_pid_file(name)
        assert pid_file is not None
        self._pids[name] = self._read_pid(pid_file, name)

    def _read_pid(self, pid_file: Path, name: str) -> int:
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError, ValueError, IndexError):  # absent, or not yet written
                pid = int(pid_file.read_text().split()[0])
                if pid_alive(pid):
                    return pid
            time.sleep(0.05)
        raise SlurmError(f"{name} wrote no live pid to {pid_file}\n{_tail(self.log_dir / f'{name}.log')}")

    def _wait_idle(self) -> None:
        self.wait_for_nodes("idle", timeout=self.start_timeout)

    def node_states(self) -> dict[str, str]:
        """Each node's state as ``sinfo`` names it: ``idle``, ``allocated``, ``down*`` (``*``: not responding)."""
        out = self._run(["sinfo", "-h", "-N", "-o", "%N %T"], check=False).stdout
        return dict(line.split() for line in out.splitlines() if len(line.split()) == 2)

    def wait_for_nodes(self, state: str, nodes: Iterable[str] | None = None, *, timeout: float) -> None:
        """Wait until every node in ``nodes`` (default: all) is in ``state``, e.g. ``idle``."""
        wanted = tuple(nodes) if nodes is not None else self.node_names
        deadline = time.monotonic() + timeout
        states: dict[str, str] = {}
        while True:
            states = self.node_states()
            if all(states.get(node) == state for node in wanted):
                return
            if time.monotonic() >= deadline:
                raise SlurmError(
                    f"nodes {list(wanted)} not {state} after {timeout:.0f} s (sinfo: {states})\n"
                    f"{self.diagnostics()}"
                )
            time.sleep(0.2)

    # ------------------------------------------------------------------ teardown helpers
    def _cancel_all_jobs(self, timeout: float) -> None:
        """slurmd does not kill running jobs when it stops, so every job is cancelled and awaited first."""
        ids = self._run(["squeue", "-h", "-o", "%i"], check=False).stdout.split()
        if ids:
            self._run(["scancel", *ids], check=False)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self._run(["squeue", "-h", "-o", "%i"], check=False).stdout.strip():
                return
            time.sleep(0.2)

    def _daemon_pid_file(self, name: str) -> Path | None:
        if name == "munged":
            return None if self.munge_dir is None else self.munge_dir / "munged.pid"
        return self.run_dir / f"{name}.pid"

    def _stop_daemon(self, name: str, timeout: float = 10.0) -> None:
        pid = self._pids.pop(name, None)
        pid_file = self._daemon_pid_file(name)
        if pid is None and pid_file is not None:  # started, but stop() came before we read its pid file
            with contextlib.suppress(OSError, ValueError, IndexError):
                pid = int(pid_file.read_text().split()[0])
        if pid is None or not pid_alive(pid):
            return
        # Only signal the pid if it still runs what we started (pids get reused).
        marker = str(self.munge_socket if name == "munged" else self.conf_path)
        binary = name.split("-")[0]  # slurmd-n1 runs slurmd
        if binary not in _cmdline(pid) or marker not in _cmdline(pid):
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal_module.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and pid_alive(pid):
            time.sleep(0.05)
        if pid_alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal_module.SIGKILL)

    def _kill_leftover_job_processes(self) -> None:
        """SIGKILL processes whose environment names our SLURM_CONF (job steps orphaned by a hung cancel)."""
        needle = f"SLURM_CONF={self.conf_path}".encode()
        me = os.getpid()
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit() or int(proc.name) == me:
                continue
            try:
                environ = (proc / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if needle in environ:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(int(proc.name), signal_module.SIGKILL)

    # ------------------------------------------------------------------ client commands
    def _run(
        self, args: list[str], *, check: bool = True, timeout: float = 30.0
    ) -> subprocess.CompletedProcess[str]:
        exe = _which(args[0]) or args[0]
        result = subprocess.run(
            [*self._client_prefix(), exe, *args[1:]],
            capture_output=True,
            text=True,
            env=self.env,
            timeout=timeout,
        )
        if check and result.returncode != 0:
            raise SlurmError(f"{' '.join(args)} failed (rc={result.returncode}): {result.stderr.strip()}")
        return result

    def sbatch(
        self,
        script: str | os.PathLike[str],
        cwd: str | os.PathLike[str],
        *args: str,
        env: Mapping[str, str | None] | None = None,
        script_args: Sequence[str] = (),
    ) -> int:
        """Submit a batch script and return its job id.

        Args:
            script: a path to a script file, or the script text itself (a ``str`` starting with ``#!``).
                Text goes to ``<root>/scripts/job-N.sbatch``, so ``SLURM_JOB_NAME`` is ``job-N.sbatch``
                unless the script sets ``--job-name``.
            cwd: the job's working directory (relative ``--output`` paths resolve there).
            args: extra ``sbatch`` options, placed before the script.
            env: extra environment variables for the submission; ``sbatch`` exports them into the job. A value
                of None removes that variable (e.g. one this process inherited).
            script_args: arguments of the script itself (after its path); a requeued job gets them again.
        """
        if isinstance(script, str) and script.startswith("#!"):
            self._script_counter += 1
            path = self.root / "scripts" / f"job-{self._script_counter}.sbatch"
            path.write_text(script)
        else:
            path = Path(script)
        merged = {**self.env, **(env or {})}
        full_env = {key: value for key, value in merged.items() if value is not None}
        result = subprocess.run(
            [
                *self._client_prefix(),
                _which("sbatch") or "sbatch",
                "--parsable",
                f"--chdir={cwd}",
                *args,
                str(path),
                *script_args,
            ],
            capture_output=True,
            text=True,
            env=full_env,
            cwd=str(cwd),
            timeout=30,
        )
        if result.returncode != 0:
            raise SlurmError(f"sbatch {path} failed (rc={result.returncode}): {result.stderr.strip()}")
        return int(result.stdout.strip().split(";")[0])

    def show_job(self, job_id: int) -> str:
        """``scontrol show job -o`` (one line of Key=Value pairs); :class:`SlurmError` for an unknown job."""
        return self._run(["scontrol", "show", "job", "-o", str(job_id)]).stdout.strip()

    def job_state(self, job_id: int) -> str:
        """The job's current state as ``scontrol`` names it, e.g. ``PENDING``, ``RUNNING``, ``COMPLETED``."""
        match = re.search(r"\bJobState=(\S+)", self.show_job(job_id))
        if match is None:
            raise SlurmError(f"no JobState for job {job_id}")
        return match.group(1)

    def restart_count(self, job_id: int) -> int:
        """How many times the job was requeued (``Restarts=`` in ``scontrol show job``)."""
        match = re.search(r"\bRestarts=(\d+)", self.show_job(job_id))
        if match is None:
            raise SlurmError(f"no Restarts for job {job_id}")
        return int(match.group(1))

    def wait_for_state(
        self, job_id: int, states: str | Iterable[str], timeout: float, *, poll: float = 0.25
    ) -> str:
        """Wait until the job is in one of ``states``; return that state.

        Fails fast with :class:`SlurmError` if the job reaches a terminal state that was not asked for (a
        crashed job should not cost the whole timeout), and on timeout.
        """
        wanted = {states} if isinstance(states, str) else set(states)
        deadline = time.monotonic() + timeout
        state = ""
        while True:
            state = self.job_state(job_id)
            if state in wanted:
                return state
            if state in TERMINAL_STATES:
                raise SlurmError(
                    f"job {job_id} ended {state}, expected {sorted(wanted)}\n{self.diagnostics(job_id)}"
                )
            if time.monotonic() >= deadline:
                raise SlurmError(
                    f"job {job_id} still {state} after {timeout:.0f} s, expected {sorted(wanted)}\n"
                    f"{self.diagnostics(job_id)}"
                )
            time.sleep(poll)

    def wait_for_restart(self, job_id: int, count: int, timeout: float) -> None:
        """Wait until the job has been requeued ``count`` times (``Restarts=count``)."""
        deadline = time.monotonic() + timeout
        while self.restart_count(job_id) < count:
            if time.monotonic() >= deadline:
                raise SlurmError(
                    f"job {job_id} not requeued {count}x after {timeout:.0f} s\n{self.diagnostics(job_id)}"
                )
            time.sleep(0.25)

    def scancel(
        self, job_id: int, signal: str | None = None, *, batch: bool = False, full: bool = False
    ) -> None:
        """Cancel the job, or with ``signal`` (e.g. ``"USR1"``) only signal it.

        Without ``batch``/``full`` the signal reaches only the tasks started by ``srun``, not the batch shell:
        the same as ``#SBATCH --signal=USR1@N``, and the reason training must run under ``srun``.
        """
        args = ["scancel"]
        if signal is not None:
            args.append(f"--signal={signal}")
        if batch:
            args.append("--batch")
        if full:
            args.append("--full")
        self._run([*args, str(job_id)])

    def release_pending_now(self, job_id: int, timeout: float = 60.0) -> None:
        """Once the (requeued) job is PENDING, set its start time to now.

        A requeued job gets a begin time ``cred_expire`` seconds ahead, plus a scheduler pass; this cuts the
        11-13 s wait to 1-4 s. Call it after the requeue (see :meth:`wait_for_restart`). It waits for PENDING
        first (the update is refused while the job is still completing), and returns quietly if the job left
        PENDING on its own in the meantime (a starved test process may miss the ~10 s window).
        """
        deadline = time.monotonic() + timeout
        seen_not_running = False
        while True:
            state = self.job_state(job_id)
            if state == "PENDING":
                # slurmd revokes the old run's credential at the requeue and compares credential times in whole
                # seconds: a restart within the same second was refused ("Job credential revoked", job FAILED;
                # seen once in CI). Let the clock pass the revocation second first.
                time.sleep(2.0)
                result = self._run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=False)
                if result.returncode == 0 or self.job_state(job_id) != "PENDING":
                    return
                raise SlurmError(f"scontrol update StartTime=now failed: {result.stderr.strip()}")
            if state in TERMINAL_STATES:
                raise SlurmError(
                    f"job {job_id} ended {state} while waiting for PENDING\n{self.diagnostics(job_id)}"
                )
            if state == "RUNNING" and seen_not_running:
                return
            seen_not_running = seen_not_running or state != "RUNNING"
            if time.monotonic() >= deadline:
                info = self.diagnostics(job_id)
                raise SlurmError(
                    f"job {job_id} still {state} after {timeout:.0f} s, expected PENDING\n{info}"
                )
            time.sleep(0.1)

    def diagnostics(self, job_id: int | None = None) -> str:
        """Job record and daemon log tails, for assertion messages."""
        parts = []
        if job_id is not None:
            result = self._run(["scontrol", "show", "job", str(job_id)], check=False)
            parts.append(result.stdout or result.stderr)
        for name in self._log_names():
            parts.append(f"--- {name}.log ---\n{_tail(self.log_dir / f'{name}.log', 25)}")
        return "\n".join(parts)

    @staticmethod
    def wait_for_file_text(
        path: str | os.PathLike[str], text: str, timeout: float, *, count: int = 1, poll: float = 0.2
    ) -> str:
        """Wait until ``path`` contains ``text`` at least ``count`` times; return the file's content then."""
        path = Path(path)
        deadline = time.monotonic() + timeout
        content = ""
        while True:
            with contextlib.suppress(OSError):
                content = path.read_text(errors="replace")
            if content.count(text) >= count:
                return content
            if time.monotonic() >= deadline:
                tail = "\n".join(content.splitlines()[-30:])
                raise SlurmError(f"{text!r} x{count} not in {path} after {timeout:.0f} s; tail:\n{tail}")
            time.sleep(poll)
