"""Preemption: SIGTERM / SIGINT / SIGUSR1 stop training at a step boundary with a checkpoint of that
step.

Schedulers send SIGTERM before they preempt a job (Ctrl-C sends SIGINT); SLURM sends the signal a
job asks for before its time limit (``#SBATCH --signal=USR1@120``). After a SIGUSR1 in a SLURM job,
the main process also has the job requeued (``scontrol requeue``, once; the requeued job resumes
through ``--resume``); after SIGTERM the scheduler decides (a preempted job with ``--requeue`` is
requeued by SLURM itself). During training the
:class:`Preemption` hook lets the current step finish, then every process agrees to stop after it,
the main process writes ``model_<iteration>.pth`` atomically and updates ``last_checkpoint``, and
the run exits with ``128 + signal number`` (143 for SIGTERM, 130 for SIGINT, 138 for SIGUSR1) after
one log line that
says where the checkpoint is and how to resume. ``--resume`` continues from the next iteration
(exactly, with ``DATALOADER.EXACT_RESUME``).

With several processes (``--num-gpus N``), :func:`cbam_hrnet_d2.engine.launch.launch` forwards the
signal from the launching process to its workers, so ``kill -TERM <pid of train_net.py>`` stops
them all; a signal sent to the whole process group reaches each of them anyway (repeated signals
are ignored).
"""

import logging
import os
import shlex
import signal
import sys
from typing import Dict, Optional, Tuple

import torch
import torch.distributed as dist
from detectron2.engine import HookBase
from detectron2.utils import comm

from cbam_hrnet_d2.engine.scheduler import requeue_slurm_job, slurm_job_id

__all__ = ["Preemption", "TrainingStopped", "STOP_SIGNALS"]

logger = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
# the signals that warn of a time limit: the job is requeued by us, not by the scheduler
WARNING_SIGNALS = (signal.SIGUSR1,)


class TrainingStopped(SystemExit):
    """Raised (through detectron2's train loop, which lets it pass) once the preemption checkpoint
    is written; exits the process with ``128 + signal``."""


def _any_process(signum: int, group=None) -> int:
    """The largest of the processes' ``signum`` (0: none received): one all-reduce of one integer
    on the CPU, over ``group`` (a gloo group in NCCL runs, so that asking costs no CUDA
    synchronisation). SIGTERM (15) outranks SIGUSR1 (10): a preempted job is not requeued twice."""
    if comm.get_world_size() == 1:
        return signum
    value = torch.tensor([signum])
    dist.all_reduce(value, op=dist.ReduceOp.MAX, group=group)
    return int(value.item())


def _resume_command() -> str:
    argv = [a for a in sys.argv if a != "--resume"]
    script = argv[0] if argv else "train_net.py"
    return " ".join(shlex.quote(a) for a in [sys.executable, script, "--resume", *argv[1:]])


class Preemption(HookBase):
    """See the module doc. Register it last, after detectron2's checkpointing hook. The hook owns
    its state: the signal this process received (:attr:`received`) and the agreement of the
    processes on the current iteration (:meth:`stop_requested`, which
    :class:`~cbam_hrnet_d2.engine.resume.ExactResume` asks too)."""

    def __init__(self, checkpointer=None):
        """
        Args:
            checkpointer: the run's checkpointer (detectron2's ``Checkpointer`` interface: ``save``,
                ``save_dir``, ``has_checkpoint``, ``get_checkpoint_file``): the stop checkpoint is
                written through it. None: only agreeing to stop is used (tests of that part).
        """
        self.checkpointer = checkpointer
        self._previous: Dict[int, object] = {}
        self._message: Optional[str] = None
        self.received: Optional[int] = None  # the first stop signal received during training
        # (iteration, signal any process received or 0) of the last agreement
        self._agreed: Optional[Tuple[int, int]] = None
        self._group = None  # the gloo group of the agreement in an NCCL run

    def _on_signal(self, signum, _frame) -> None:
        if self.received is None:
            self.received = signum
            logger.warning(
                "Received %s: finishing the current iteration, then writing a checkpoint and "
                "stopping (SIGKILL stops at once, losing the iterations since the last checkpoint)",
                signal.Signals(signum).name,
            )

    def stop_requested(self) -> bool:
        """Whether any process received a stop signal before the end of this iteration. With
        several processes a collective (one all-reduce of one integer per iteration, on the CPU
        over gloo: no CUDA synchronisation in an NCCL run): every process calls it at the same
        point of an iteration; the answer is kept for the iteration, so later
        calls in the same iteration (ExactResume's, this hook's) agree with the first and cost
        nothing."""
        it = self.trainer.iter
        if self._agreed is None or self._agreed[0] != it:
            self._agreed = (it, _any_process(int(self.received or 0), self._group))
        return self._agreed[1] != 0

    def before_train(self):
        self.received, self._agreed = None, None
        if comm.get_world_size() > 1 and dist.get_backend() == "nccl" and self._group is None:
            # every process runs before_train: the group is created collectively, once
            self._group = dist.new_group(backend="gloo")
        self._previous = {s: signal.signal(s, self._on_signal) for s in STOP_SIGNALS}

    def after_train(self):
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}
        if self._message:  # the last line of the log (this hook's after_train runs last)
            logger.warning(self._message)

    def after_step(self):
        if not self.stop_requested():
            return
        it = self.trainer.iter
        checkpointer = self.checkpointer
        name = f"model_{it:07d}"
        path = os.path.join(checkpointer.save_dir, f"{name}.pth")
        if comm.is_main_process():
            # detectron2's periodic checkpoint may have written this iteration already
            already = checkpointer.has_checkpoint() and checkpointer.get_checkpoint_file() == path
            if not already:
                checkpointer.save(name, iteration=it)
        comm.synchronize()
        signum = signal.Signals(self._agreed[1])
        code = 128 + int(signum)
        job = slurm_job_id()
        requeued = False
        if comm.is_main_process() and job and signum in WARNING_SIGNALS:
            requeued = requeue_slurm_job(job)
        if comm.is_main_process():
            by = signal.Signals(signum).name if self.received else "a signal to another process"
            then = (
                f"SLURM job {job} requeued: it resumes from there by itself"
                if requeued
                else f"Resume with: {_resume_command()}"
            )
            self._message = (
                f"Stopped by {by} after iteration {it}: checkpoint {path} (last_checkpoint "
                f"updated). {then}"
            )
        raise TrainingStopped(code)
