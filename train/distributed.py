"""How this process was started, and its process group: the one place that knows rank, world and node.

Three ways in, one code path after:
- torchrun (and the launcher's submitit job): RANK, LOCAL_RANK, WORLD_SIZE, GROUP_RANK, MASTER_ADDR/PORT;
- srun without torchrun: SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, SLURM_NODEID; the master is the
  first host of the job's node list, the port derived from the job id;
- neither (or a lone SLURM task): one process and no process group.

`detect()` reads only the environment and imports no torch (the entry points use it to prefix
error lines before torch loads); `Dist` is the live context the rest of the code asks; `setup`
joins and always leaves the process group. torch is imported inside the functions that use it.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import os
import re
import shutil
import socket
import struct
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from train.cli import UserError

if TYPE_CHECKING:
    import torch

T = TypeVar("T")


@dataclass(frozen=True)
class Launch:
    """Where this process sits in the job, read from the environment."""

    launcher: str  # "torchrun" | "slurm" | "single"
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    node: int = 0  # this node's index in the job
    master_addr: str = ""  # torchrun's MASTER_ADDR; under srun empty until master() reads the node list
    master_port: int = 0
    nodelist: str = ""  # srun: the step's node list, the first of which is the master

    @property
    def spans_nodes(self) -> bool:
        return self.world_size > self.local_world_size

    def master(self) -> str:
        """The master's host name (under srun this asks `scontrol`, so only the rendezvous calls it)."""
        return self.master_addr or _first_host(self.nodelist or "127.0.0.1")


def detect(env: os._Environ | dict = os.environ) -> Launch:
    """The launch mode from environment variables; torchrun's win over SLURM's (torchrun inside srun)."""
    if "RANK" in env and "WORLD_SIZE" in env:
        world = int(env["WORLD_SIZE"])
        return Launch(
            launcher="torchrun",
            rank=int(env["RANK"]),
            local_rank=int(env.get("LOCAL_RANK", 0)),
            world_size=world,
            local_world_size=int(env.get("LOCAL_WORLD_SIZE", world)),
            node=int(env.get("GROUP_RANK", 0)),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", 29500)),
        )
    # srun sets SLURM_STEP_NUM_TASKS for its step; SLURM_NTASKS is the allocation's. (A python started
    # directly in an sbatch script with -n 2 would wait for a second task: start it with srun.)
    tasks = env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS")
    if "SLURM_PROCID" in env and tasks is not None and int(tasks) > 1:
        return Launch(
            launcher="slurm",
            rank=int(env["SLURM_PROCID"]),
            local_rank=int(env.get("SLURM_LOCALID", 0)),
            world_size=int(tasks),
            local_world_size=_tasks_on_this_node(env, int(tasks)),
            node=int(env.get("SLURM_NODEID", 0)),
            master_port=_port_from_job_id(env.get("SLURM_JOB_ID", "0")),
            nodelist=env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or "127.0.0.1",
        )
    return Launch(launcher="single")


def _port_from_job_id(job_id: str) -> int:
    # Jobs sharing a node get different ports; the steps of one job run one after another.
    return 15000 + int(re.sub(r"\D", "", job_id) or 0) % 20000


def _tasks_on_this_node(env, tasks: int) -> int:
    """This node's entry of SLURM_STEP_TASKS_PER_NODE, a list like '2(x3),1'."""
    nodes = int(env.get("SLURM_STEP_NUM_NODES") or env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES") or 1)
    spec = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or str(max(1, tasks // nodes))
    counts: list[int] = []
    for part in spec.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if m:
            counts += [int(m.group(1))] * int(m.group(2) or 1)
    node = int(env.get("SLURM_NODEID", 0))
    return counts[node] if node < len(counts) else 1


def _first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: `scontrol show hostnames` where it exists, else parsed here."""
    if shutil.which("scontrol"):
        try:
            out = subprocess.run(
                ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30, check=True
            ).stdout
            if out.split():
                return out.split()[0]
        except (subprocess.SubprocessError, OSError):
            pass
    # Forms: "node1", "node[1-3,7]", "a[01-02],b3": take the first name with its first index.
    m = re.match(r"([^,\[]+)(?:\[([^\],\-]+))?", nodelist)
    return m.group(1) + (m.group(2) or "") if m else nodelist


@dataclass
class Dist:
    """The live distributed context: this rank, its device, and collectives over all ranks."""

    launch: Launch
    device: torch.device
    backend: str | None  # None: one process, no process group
    control: object = None  # a gloo group for CPU-side agreement (flags, objects) when the main backend is NCCL
    interface: str | None = None  # the network interface the ranks talk over when they span nodes

    @property
    def rank(self) -> int:
        return self.launch.rank

    @property
    def local_rank(self) -> int:
        return self.launch.local_rank

    @property
    def world_size(self) -> int:
        return self.launch.world_size

    @property
    def is_main(self) -> bool:
        return self.launch.rank == 0

    @property
    def spans_nodes(self) -> bool:
        return self.launch.spans_nodes

    @property
    def active(self) -> bool:
        return self.backend is not None

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, in place; metrics are sums so that N ranks count exactly what 1 counts."""
        if self.active:
            import torch.distributed as tdist

            tdist.all_reduce(tensor, op=tdist.ReduceOp.SUM)
        return tensor

    def all_gather(self, tensor: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Every rank's `tensor` into `out` (world_size, *tensor.shape), in rank order, bit for bit."""
        if not self.active:
            out[0].copy_(tensor)
            return out
        import torch.distributed as tdist

        tdist.all_gather(list(out.unbind(0)), tensor)
        return out

    def any(self, flag: bool) -> bool:
        """True on every rank when it is true on any rank (a CPU collective: no device sync)."""
        if not self.active:
            return flag
        import torch
        import torch.distributed as tdist

        t = torch.tensor([1 if flag else 0], dtype=torch.int32)
        tdist.all_reduce(t, op=tdist.ReduceOp.MAX, group=self.control)
        return bool(t.item())

    def gather(self, obj) -> list | None:
        """Every rank's `obj`, as a list on rank 0 (None elsewhere)."""
        if not self.active:
            return [obj]
        import torch.distributed as tdist

        out = [None] * self.world_size if self.is_main else None
        tdist.gather_object(obj, out, dst=0, group=self.control)
        return out

    def broadcast(self, obj):
        """Rank 0's `obj` on every rank."""
        if not self.active:
            return obj
        import torch.distributed as tdist

        box = [obj]
        tdist.broadcast_object_list(box, src=0, group=self.control)
        return box[0]

    def network_line(self) -> str:
        """Where every rank talks across nodes, for the log: `network: rank 0 node1 eth0 10.77.0.11, ...`. A collective."""
        where = self.gather(f"{socket.gethostname()} {self.interface} {ipv4_of(self.interface) if self.interface else None}")
        return "network: " + ", ".join(f"rank {r} {w}" for r, w in enumerate(where or []))

    def once_per_node(self, fn: Callable[[], T]) -> T:
        """`fn()` on each node's local rank 0 first (preparing files the node shares), then on the others.

        Every rank gets the result or the same UserError: no rank is left waiting for one that failed.
        """
        result, error = None, None
        if self.local_rank == 0:
            try:
                result = fn()
            except UserError as e:
                error = str(e)
        if self.any(error is not None):
            raise UserError(error or "the dataset could not be prepared on this node's first rank (see its error)")
        if self.local_rank != 0:
            result = fn()  # what local rank 0 prepared exists now: this only finds it
        return result


def peer_failure(exc: BaseException, launch: Launch | None = None) -> str | None:
    """One line for an error that means another rank is gone or unreachable, else None."""
    launch = launch or detect()
    if launch.world_size == 1:
        return None
    import torch.distributed as tdist

    text = str(exc)
    markers = (
        "gloo",
        "NCCL",
        "Connection reset",
        "Connection closed",
        "Connection refused",
        "timed out",
        "Timed out",
        "Socket Timeout",
        "Broken pipe",
    )
    if not isinstance(exc, tdist.DistError) and not any(m in text for m in markers):
        return None
    first = next((line.strip() for line in text.splitlines() if line.strip()), type(exc).__name__)
    first = first.split(" This is typically caused")[0][:200]
    return (
        f"rank {launch.rank} of {launch.world_size} lost contact with the other ranks ({first}); "
        f"one of them failed or was killed (see its log). Rerun the same command to resume from the last checkpoint"
    )


def _store(launch: Launch, timeout: datetime.timedelta):
    """The rendezvous store: torchrun's agent serves one; otherwise rank 0 serves it at the master's port."""
    import torch.distributed as tdist

    if launch.master_port == 0:  # torchrun --master_port=0 passes 0 on, not the port its store took
        raise UserError(
            "MASTER_PORT is 0, so the ranks cannot find the rendezvous store; give torchrun "
            "--master_port=<a free port> (or use --rdzv-backend=c10d --rdzv-endpoint=HOST:PORT)"
        )
    if launch.launcher == "torchrun" and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        # The agent's store outlives a restart of the workers. Without a prefix per attempt, the
        # restarted ranks read the dead ranks' gloo addresses and fail with "Connection refused".
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        agent = tdist.TCPStore(launch.master(), launch.master_port, launch.world_size, is_master=False, timeout=timeout)
        return tdist.PrefixStore(f"/scaffold/attempt_{attempt}", agent)
    return tdist.TCPStore(
        launch.master(),
        launch.master_port,
        launch.world_size,
        is_master=launch.rank == 0,
        timeout=timeout,
        wait_for_workers=False,
    )


def ipv4_of(interface: str) -> str | None:
    """The IPv4 address of a network interface (Linux SIOCGIFADDR), or None."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            packed = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", interface[:15].encode()))
        except OSError:
            return None
    return socket.inet_ntoa(packed[20:24])


def _default_route_interface() -> str | None:
    try:
        for line in open("/proc/net/route").read().splitlines()[1:]:
            fields = line.split()
            if fields[1] == "00000000":
                return fields[0]
    except OSError:
        pass
    return None


def interface_towards(host: str) -> tuple[str, str] | None:
    """(interface, address) this machine uses to reach `host`, never the loopback one.

    When `host` is this machine under a loopback name (Debian maps the own hostname to
    127.0.1.1), the interface of the default route stands in, else the first one with an address.
    """
    try:
        target = socket.gethostbyname(host)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((target, 9))  # a UDP connect sends nothing; it only picks the route
            local = s.getsockname()[0]
    except OSError:
        return None
    names = [name for _, name in socket.if_nameindex() if name != "lo"]
    if not local.startswith("127."):
        for name in names:
            if ipv4_of(name) == local:
                return name, local
    for name in [_default_route_interface(), *names]:
        address = ipv4_of(name) if name else None
        if address and not address.startswith("127."):
            return name, address
    return None


def _bind_to_network(launch: Launch) -> str | None:
    """Across nodes, make gloo and NCCL use the interface that reaches the master, not loopback.

    Gloo otherwise binds to what this host's name resolves to, which is 127.0.x.x on many
    machines; the other nodes then cannot connect ("connectFullMesh failed"). A variable the
    user set wins. Returns the interface used, for the log.
    """
    if not launch.spans_nodes:
        return None  # one node: loopback is right
    if "GLOO_SOCKET_IFNAME" in os.environ:
        return os.environ["GLOO_SOCKET_IFNAME"]
    found = interface_towards(launch.master())
    if found is None:
        return None
    os.environ["GLOO_SOCKET_IFNAME"] = found[0]
    os.environ.setdefault("NCCL_SOCKET_IFNAME", found[0])
    return found[0]


@contextlib.contextmanager
def setup(launch: Launch, device: torch.device, backend: str | None, timeout_s: float = 300.0) -> Iterator[Dist]:
    """Join the process group (when `backend` is set, i.e. several processes); always leave it on exit."""
    if backend is None:
        yield Dist(launch, device, None)
        return
    import torch
    import torch.distributed as tdist

    if device.type == "cuda":
        torch.cuda.set_device(device)
    interface = _bind_to_network(launch)
    timeout = datetime.timedelta(seconds=timeout_s)
    tdist.init_process_group(
        backend=backend,
        store=_store(launch, timeout),
        rank=launch.rank,
        world_size=launch.world_size,
        timeout=timeout,
        device_id=device if backend == "nccl" else None,
    )
    try:
        control = tdist.new_group(backend="gloo", timeout=timeout) if backend != "gloo" else None
        yield Dist(launch, device, backend, control, interface)
        # leave together: a rank that tears down while another still sends can abort in gloo's destructors
        tdist.barrier(group=control)
    finally:
        tdist.destroy_process_group()
