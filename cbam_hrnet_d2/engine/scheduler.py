"""The process layout a scheduler gives: SLURM's ``srun`` (one task per GPU, or per CPU process) and
``torchrun`` (a Kubernetes PyTorchJob runs it too) start every process of a run themselves and say
in its environment which one it is. :func:`ranks_from_environment` reads that; :func:`run_as_rank`
joins this process to the run (gloo on CPU nodes, NCCL on GPU nodes, one GPU per local rank) and
calls the main function, with no extra process spawned. Outside a scheduler (or under one that
started a single task) there is no layout here, and ``--num-gpus`` / ``--num-machines`` start the
processes as detectron2's ``launch`` does.

SLURM's requeue (:func:`requeue_slurm_job`) is the other half of a cluster run: a job warned of its
time limit (``#SBATCH --signal=USR1@120``) writes a checkpoint, has itself requeued and exits; the
requeued job resumes through ``--resume`` (docs/cluster.md).
"""

import dataclasses
import logging
import os
import re
import subprocess
from typing import Callable, List, Mapping, Optional

import torch
import torch.distributed as dist
from detectron2.engine.launch import DEFAULT_TIMEOUT
from detectron2.utils import comm

from cbam_hrnet_d2.device import is_cpu

__all__ = [
    "Ranks",
    "ranks_from_environment",
    "expand_slurm_nodelist",
    "run_as_rank",
    "slurm_job_id",
    "requeue_slurm_job",
]

logger = logging.getLogger(__name__)

_TORCHRUN_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclasses.dataclass(frozen=True)
class Ranks:
    """Where this process sits in a run started by a scheduler."""

    source: str  # "SLURM" or "torchrun"
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    node_rank: int
    num_nodes: int
    master_addr: str
    master_port: int

    def describe(self) -> str:
        return (
            f"rank {self.rank} of {self.world_size}, local rank {self.local_rank} of "
            f"{self.local_world_size}, node {self.node_rank} of {self.num_nodes}, rendezvous "
            f"{self.master_addr}:{self.master_port}"
        )


def expand_slurm_nodelist(nodelist: str) -> List[str]:
    """SLURM's compressed host list ("gpu[01-03,07],cpu5") as host names, in order. ``scontrol
    show hostnames`` where it exists (it knows every form), else the bracket ranges here."""
    try:
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout.split()
        if out:
            return out
    except (OSError, subprocess.SubprocessError):
        pass
    hosts = []
    for prefix, ranges, plain in re.findall(r"([^,\[]+)\[([^\]]+)\]|([^,\[\]]+)", nodelist):
        if plain:
            hosts.append(plain)
            continue
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            for i in range(int(lo), int(hi or lo) + 1):
                hosts.append(f"{prefix}{i:0{len(lo)}d}")
    return hosts


def _uniform_tasks_per_node(spec: str, world: int, nodes: int) -> int:
    """Tasks per node from SLURM_STEP_TASKS_PER_NODE ("4" or "4(x2)"); ValueError for a step whose
    nodes run different numbers of tasks (detectron2's local process groups need the same number
    on every node)."""
    counts = []
    for part in spec.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not m:
            break
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    if counts and len(set(counts)) != 1:
        raise ValueError(
            f"SLURM started {spec} tasks per node (SLURM_STEP_TASKS_PER_NODE): every node must run "
            "the same number of tasks; submit with --ntasks-per-node"
        )
    if world % nodes:
        raise ValueError(
            f"SLURM started {world} tasks on {nodes} nodes: every node must run the same number "
            "of tasks; submit with --ntasks-per-node"
        )
    return counts[0] if counts else world // nodes


def ranks_from_environment(env: Optional[Mapping[str, str]] = None) -> Optional[Ranks]:
    """The layout torchrun or SLURM's srun gave this process, or None (not started by one, or
    one process only). torchrun wins where both are present (torchrun run by srun: torchrun
    started this process)."""
    env = os.environ if env is None else env
    if all(k in env for k in _TORCHRUN_KEYS):
        world, rank = int(env["WORLD_SIZE"]), int(env["RANK"])
        local_world = int(env.get("LOCAL_WORLD_SIZE", world))
        ranks = Ranks(
            source="torchrun",
            rank=rank,
            world_size=world,
            local_rank=int(env["LOCAL_RANK"]),
            local_world_size=local_world,
            node_rank=int(env.get("GROUP_RANK", rank // local_world)),
            num_nodes=max(1, world // local_world),
            master_addr=env["MASTER_ADDR"],
            master_port=int(env["MASTER_PORT"]),
        )
    elif "SLURM_PROCID" in env and "SLURM_STEP_ID" in env:  # a task of srun, not the batch shell
        world = int(env.get("SLURM_STEP_NUM_TASKS", env.get("SLURM_NTASKS", "1")))
        nodes = int(env.get("SLURM_STEP_NUM_NODES", env.get("SLURM_NNODES", "1")))
        per_node = _uniform_tasks_per_node(env.get("SLURM_STEP_TASKS_PER_NODE", ""), world, nodes)
        nodelist = env.get("SLURM_STEP_NODELIST", env.get("SLURM_JOB_NODELIST", "127.0.0.1"))
        job = int(env.get("SLURM_JOB_ID", "0"))
        ranks = Ranks(
            source="SLURM",
            rank=int(env["SLURM_PROCID"]),
            world_size=world,
            local_rank=int(env.get("SLURM_LOCALID", "0")),
            local_world_size=per_node,
            node_rank=int(env.get("SLURM_NODEID", "0")),
            num_nodes=nodes,
            # the first node of the step hosts the rendezvous; a port of the job's own, so that
            # two jobs sharing a node do not meet (MASTER_ADDR / MASTER_PORT override either)
            master_addr=env.get("MASTER_ADDR") or expand_slurm_nodelist(nodelist)[0],
            master_port=int(env.get("MASTER_PORT") or 15000 + job % 20000),
        )
    else:
        return None
    return ranks if ranks.world_size > 1 else None


def _log_every_rank(msg: str, *args) -> None:
    """An INFO line from every rank, before the run's own loggers exist (detectron2's loggers
    print from rank 0 only, and are set up by the main function)."""
    project = logging.getLogger("cbam_hrnet_d2")
    handler = None
    if not project.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(
            logging.Formatter("[%(asctime)s %(name)s]: %(message)s", "%m/%d %H:%M:%S")
        )
        project.addHandler(handler)
    level = project.level
    project.setLevel(min(level or logging.INFO, logging.INFO))
    try:
        logger.info(msg, *args)
    finally:
        project.setLevel(level)
        if handler is not None:
            project.removeHandler(handler)


def run_as_rank(main_func: Callable, ranks: Ranks, device: str, args=()) -> None:
    """Join the run ``ranks`` describes (gloo for a CPU ``device``, NCCL with one GPU per local
    rank for CUDA) and call ``main_func(*args)``; the process group is left after it returns."""
    backend = "gloo" if is_cpu(device) else "nccl"
    if backend == "nccl":
        visible = torch.cuda.device_count()
        if ranks.local_rank >= visible:
            raise ValueError(
                f"{ranks.source} started {ranks.local_world_size} tasks on this node but it has "
                f"{visible} visible GPU(s): start one task per GPU (--ntasks-per-node / "
                "--nproc-per-node), or MODEL.DEVICE cpu for CPU processes"
            )
        torch.cuda.set_device(ranks.local_rank)
    _log_every_rank("Ranks from %s: %s, backend %s", ranks.source, ranks.describe(), backend)
    dist.init_process_group(
        backend=backend,
        init_method=f"tcp://{ranks.master_addr}:{ranks.master_port}",
        world_size=ranks.world_size,
        rank=ranks.rank,
        timeout=DEFAULT_TIMEOUT,
    )
    try:
        comm.create_local_process_group(ranks.local_world_size)
        comm.synchronize()
        main_func(*args)
    finally:
        dist.destroy_process_group()


def slurm_job_id(env: Optional[Mapping[str, str]] = None) -> Optional[str]:
    """The SLURM job this process belongs to, or None."""
    env = os.environ if env is None else env
    return env.get("SLURM_JOB_ID") or None


def requeue_slurm_job(job_id: str) -> bool:
    """``scontrol requeue <job_id>``: the job goes back to the queue (same id, its restart count
    one up) and SLURM stops what runs of it now. True where scontrol accepted it; a warning saying
    what to do by hand where not."""
    try:
        proc = subprocess.run(
            ["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60
        )
    except (OSError, subprocess.SubprocessError) as e:
        logger.warning("scontrol requeue %s failed (%s): requeue the job by hand", job_id, e)
        return False
    if proc.returncode != 0:
        logger.warning(
            "scontrol requeue %s failed: %s (the job needs --requeue and JobRequeue=1); requeue "
            "it by hand",
            job_id,
            proc.stderr.strip(),
        )
        return False
    logger.info("SLURM job %s requeued: it resumes from this checkpoint when it runs again", job_id)
    return True
