"""A real two-node SLURM cluster on one machine: nodes ``n1`` and ``n2``, each in its own network namespace.

:class:`TwoNodeSlurmCluster` is :class:`~tests.helpers.slurm_cluster.SlurmCluster` (own munged, config,
ports, temporary folders, daemons stopped by pid) with two nodes instead of one:

* Two network namespaces (``dip-<owner pid>-<tag>-n1`` / ``-n2``) joined by one veth link, whose ends hold
  ``10.250.0.1/24`` (n1) and ``10.250.0.2/24`` (n2). The addresses exist only inside the two namespaces: the
  machine's own network is not touched and nothing leaves it; every cluster has its own pair of namespaces, so
  clusters with equal addresses never meet.
* Every process of a node (its ``slurmd``, the job steps that slurmd starts, and on n1 the controller) runs in
  that node's network namespace and in private UTS and mount namespaces, where the hostname is the node's name
  and ``/etc/hosts`` is the cluster's hosts file (``n1``, ``n2`` and their addresses), bind-mounted. Inside a
  job, ``hostname`` says n1 or n2 and node names resolve as on a real cluster: Lightning's ``MASTER_ADDR``
  (the first host of ``SLURM_NODELIST``) and gloo's choice of address (the one its hostname resolves to) work
  as they would there.
* ``slurmctld`` runs on n1 (a head node that also computes); client commands (``sbatch``, ``scontrol``, ...)
  run in n1's network namespace to reach it. ``munged`` stays in the root namespace: its socket is a file path,
  reachable from every namespace.
* Both nodes see the one filesystem, like a cluster filesystem: a run folder is shared by all ranks.
* :meth:`kill_node` SIGKILLs every process in a node's namespace (a lost node: slurmd, job steps, ranks);
  :meth:`set_link` takes a node's end of the link down first (a power cut: nothing reaches the other node,
  not even a connection reset); :meth:`restore_node` brings the link and the slurmd back (the node returns to
  service on registering).

Teardown kills every process left in the namespaces, by pid, and deletes the namespaces, which removes the veth
link. Namespaces left by a harness that was killed before its teardown (SIGKILL of pytest) are removed when the
next cluster starts. Where namespaces or veth links cannot be made (no ``CAP_NET_ADMIN``/``CAP_SYS_ADMIN``, no
``ip``/``unshare``), :meth:`start` raises :class:`~tests.helpers.slurm_cluster.SlurmUnavailable` with the reason.

Typical use::

    with TwoNodeSlurmCluster() as cluster:
        job = cluster.sbatch(script, tmp_path, "--nodes=2", "--ntasks-per-node=1")
        cluster.wait_for_state(job, "RUNNING", timeout=60)
        cluster.kill_node("n2")
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from tests.helpers.slurm_cluster import SlurmCluster, SlurmError, SlurmUnavailable, _which, pid_alive

NODES = ("n1", "n2")
SUBNET = "10.250.0"  # n1 = .1, n2 = .2; only inside this cluster's namespaces
LINK = "dipnet0"  # the veth end's name inside each namespace (at most 15 characters)
NETNS_DIR = Path("/run/netns")  # where `ip netns add` pins the namespaces
_OUR_NAMESPACE = re.compile(r"^dip-(\d+)-[0-9a-f]{6}-n\d+$")


def _namespace_pids(ns_path: Path) -> list[int]:
    """Pids of the processes whose network namespace is the one pinned at ``ns_path``."""
    try:
        target = ns_path.stat()
    except OSError:
        return []
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            st = (proc / "ns" / "net").stat()
            if (st.st_dev, st.st_ino) == (target.st_dev, target.st_ino):
                pids.append(int(proc.name))
    return pids


def _kill_and_wait(pids: list[int], timeout: float = 10.0) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    while any(pid_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([_which("ip") or "ip", *args], capture_output=True, text=True, timeout=30)
    if check and result.returncode != 0:
        raise SlurmError(f"ip {' '.join(args)} failed (rc={result.returncode}): {result.stderr.strip()}")
    return result


def remove_orphaned_namespaces() -> list[str]:
    """Delete namespaces of this harness whose owning process is gone (it was killed before its teardown).

    Only names of the form ``dip-<pid>-<tag>-nN`` whose ``<pid>`` no longer runs; the processes still inside
    are SIGKILLed first (they belong to that dead cluster). Returns the names removed.
    """
    removed = []
    for ns_path in sorted(NETNS_DIR.glob("dip-*")) if NETNS_DIR.is_dir() else []:
        match = _OUR_NAMESPACE.match(ns_path.name)
        if match is None or pid_alive(int(match.group(1))):
            continue
        _kill_and_wait(_namespace_pids(ns_path))
        if _ip("netns", "delete", ns_path.name, check=False).returncode == 0:
            removed.append(ns_path.name)
    return removed


class TwoNodeSlurmCluster(SlurmCluster):
    """Nodes ``n1`` and ``n2`` in two network namespaces on one machine; see the module docstring.

    Args:
        slurmd_timeout: seconds without an answer from a node's slurmd before the controller sets it DOWN
            and requeues (or ends) its jobs; SLURM's default is 300, a lost node is noticed much sooner here.
        Other arguments as for :class:`~tests.helpers.slurm_cluster.SlurmCluster`.
    """

    def __init__(
        self, root: str | os.PathLike[str] | None = None, *, slurmd_timeout: int = 10, **kwargs: Any
    ) -> None:
        super().__init__(root, **kwargs)
        self.slurmd_timeout = slurmd_timeout
        tag = secrets.token_hex(3)
        self.namespaces = {node: f"dip-{os.getpid()}-{tag}-{node}" for node in NODES}
        self.addresses = {node: f"{SUBNET}.{i}" for i, node in enumerate(NODES, start=1)}
        self.hosts_file = self.root / "hosts"
        self._made_namespaces: list[str] = []

    # ------------------------------------------------------------------ topology
    @property
    def node_names(self) -> tuple[str, ...]:
        return NODES

    def _setup_network(self) -> None:
        missing = [name for name in ("ip", "nsenter", "unshare", "mount") if _which(name) is None]
        if missing:
            raise SlurmUnavailable(f"network namespaces need {', '.join(missing)} (iproute2, util-linux)")
        remove_orphaned_namespaces()
        try:
            for ns in self.namespaces.values():
                _ip("netns", "add", ns)
                self._made_namespaces.append(ns)
            ns1, ns2 = (self.namespaces[node] for node in NODES)
            _ip("link", "add", LINK, "netns", ns1, "type", "veth", "peer", "name", LINK, "netns", ns2)
            for node, ns in self.namespaces.items():
                _ip("-n", ns, "address", "add", f"{self.addresses[node]}/24", "dev", LINK)
                _ip("-n", ns, "link", "set", "lo", "up")
                _ip("-n", ns, "link", "set", LINK, "up")
        except SlurmError as err:
            raise SlurmUnavailable(f"cannot create network namespaces and a veth link here: {err}") from err
        hosts = ["127.0.0.1 localhost", *(f"{addr} {node}" for node, addr in self.addresses.items())]
        self.hosts_file.write_text("\n".join(hosts) + "\n")
        for node in NODES:  # slurmd does not create its spool folder
            (self.root / "spool" / node).mkdir(parents=True, exist_ok=True)

    def _teardown_network(self) -> None:
        while self._made_namespaces:
            ns = self._made_namespaces.pop()
            _kill_and_wait(_namespace_pids(NETNS_DIR / ns))
            _ip("netns", "delete", ns, check=False)

    def _on_node(self, node: str, cmd: list[str]) -> list[str]:
        """``cmd`` as a process of ``node``: its network namespace, its hostname, the cluster's hosts file."""
        # unshare: new UTS and mount namespaces (mount propagation private), so the hostname and the bind mount
        # stay with this process and its children.
        script = 'hostname "$1" && mount --bind "$2" /etc/hosts && shift 2 && exec "$@"'
        return [
            *self._enter_network(node),
            _which("unshare") or "unshare",
            "--uts",
            "--mount",
            "--",
            "/bin/sh",
            "-c",
            script,
            "node-shell",
            node,
            str(self.hosts_file),
            *cmd,
        ]

    def _enter_network(self, node: str) -> list[str]:
        # nsenter, not `ip netns exec`: that one also mounts a fresh /sys, without the cgroup filesystem that
        # slurmd insists on.
        return [_which("nsenter") or "nsenter", f"--net={NETNS_DIR / self.namespaces[node]}", "--"]

    def _client_prefix(self) -> list[str]:
        return self._enter_network("n1")

    def _slurmd_labels(self) -> tuple[str, ...]:
        return tuple(f"slurmd-{node}" for node in reversed(NODES))

    def _log_names(self) -> tuple[str, ...]:
        return ("slurmctld", *(f"slurmd-{node}" for node in NODES))

    def _start_slurm_daemons(self) -> None:
        ctld = [_which("slurmctld") or "slurmctld", "-c", "-f", str(self.conf_path)]
        self._start_daemon("slurmctld", self._on_node("n1", ctld))
        for node in NODES:
            self.start_node(node, wait=False)

    def _topology_conf(self) -> list[str]:
        hardware = self._hardware_fields()  # each node claims this machine's CPUs and memory
        nodes = [
            f"NodeName={node} NodeAddr={addr} {hardware} State=UNKNOWN"
            for node, addr in self.addresses.items()
        ]
        return [
            f"SlurmctldHost=n1({self.addresses['n1']})",
            # %n: the node's name, so that the two slurmd keep separate files on the one filesystem.
            f"SlurmdSpoolDir={self.root / 'spool' / '%n'}",
            f"SlurmdPidFile={self.run_dir / 'slurmd-%n.pid'}",
            f"SlurmdLogFile={self.log_dir / 'slurmd-%n.log'}",
            f"SlurmdTimeout={self.slurmd_timeout}",
            *nodes,
            f"PartitionName=debug Nodes={','.join(NODES)} Default=YES MaxTime=INFINITE State=UP",
        ]

    # ------------------------------------------------------------------ nodes
    def node_pids(self, node: str) -> list[int]:
        """Every process running on ``node`` (in its network namespace): slurmd, job steps, ranks."""
        return _namespace_pids(NETNS_DIR / self.namespaces[node])

    def kill_node(self, node: str) -> list[int]:
        """Lose ``node``: SIGKILL all of its processes at once (no chance to say goodbye); returns their pids.

        On ``n1`` this includes the controller. The link stays up: the kernel closes the dead processes' TCP
        connections, as it does when a node's processes are killed (the OOM killer, a crashed slurmd).
        """
        pids = self.node_pids(node)
        _kill_and_wait(pids)
        self._pids.pop(f"slurmd-{node}", None)
        if node == "n1":
            self._pids.pop("slurmctld", None)
        still = [pid for pid in pids if pid_alive(pid)]
        if still:
            raise SlurmError(f"processes of {node} survived SIGKILL: {still}")
        return pids

    def set_link(self, node: str, up: bool) -> None:
        """Take ``node``'s end of the link down (the other end loses its carrier: packets between the nodes are
        dropped without an answer, as when a node loses power or the network) or up again."""
        _ip("-n", self.namespaces[node], "link", "set", LINK, "up" if up else "down")

    def start_node(self, node: str, *, wait: bool = True) -> None:
        """Start ``node``'s slurmd (again); with ``wait``, until the controller has it ``idle``."""
        slurmd = [_which("slurmd") or "slurmd", "-f", str(self.conf_path), "-N", node]
        self._start_daemon(f"slurmd-{node}", self._on_node(node, slurmd))
        if wait:
            self.wait_for_nodes("idle", [node], timeout=self.start_timeout)

    def restore_node(self, node: str) -> None:
        """Undo :meth:`set_link` down and :meth:`kill_node`: link up, slurmd started again if it is not running
        (then waits until the node is ``idle``). Safe to call on a healthy node."""
        self.set_link(node, up=True)
        if f"slurmd-{node}" not in self._pids:
            self.start_node(node)
