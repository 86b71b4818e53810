"""Preemption: SIGTERM / SIGINT stop training at a step boundary with a checkpoint of that step.

Schedulers send SIGTERM before they preempt a job (Ctrl-C sends SIGINT). During training the
:class:`Preemption` hook lets the current step finish, then every process agrees to stop after it,
the main process writes ``model_<iteration>.pth`` atomically and updates ``last_checkpoint``, and
the run exits with ``128 + signal number`` (143 for SIGTERM, 130 for SIGINT) after one log line that
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

__all__ = ["Preemption", "TrainingStopped", "STOP_SIGNALS"]

logger = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class TrainingStopped(SystemExit):
    """Raised (through detectron2's train loop, which lets it pass) once the preemption checkpoint
    is written; exits the process with ``128 + signal``."""


def _any_process(flag: bool, group=None) -> bool:
    """``flag`` OR-ed over all processes: one all-reduce of one integer on the CPU, over ``group``
    (a gloo group in NCCL runs, so that asking costs no CUDA synchronisation)."""
    if comm.get_world_size() == 1:
        return flag
    value = torch.tensor([int(flag)])
    dist.all_reduce(value, op=dist.ReduceOp.MAX, group=group)
    return bool(value.item())


def _resume_command() -> str:
    argv = [a for a in sys.argv if a != "--resume"]
    script = argv[0] if argv else "train_net.py"
    return " ".join(shlex.quote(a) for a in [sys.executable, script, "--resume", *argv[1:]])


class Preemption(HookBase):
    """See the module doc. Register it last, after detectron2's checkpointing hook. The hook owns
    its state: the signal this process received (:attr:`received`) and the agreement of the
    processes on the current iteration (:meth:`stop_requested`, which
    :class:`~cbam_hrnet_d2.engine.resume.ExactResume` asks too)."""

    def __init__(self):
        self._previous: Dict[int, object] = {}
        self._message: Optional[str] = None
        self.received: Optional[int] = None  # the first stop signal received during training
        self._agreed: Optional[Tuple[int, bool]] = None  # (iteration, answer) of the last agreement
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
            self._agreed = (it, _any_process(self.received is not None, self._group))
        return self._agreed[1]

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
        checkpointer = self.trainer.checkpointer
        name = f"model_{it:07d}"
        path = os.path.join(checkpointer.save_dir, f"{name}.pth")
        if comm.is_main_process():
            # detectron2's periodic checkpoint may have written this iteration already
            already = checkpointer.has_checkpoint() and checkpointer.get_checkpoint_file() == path
            if not already:
                checkpointer.save(name, iteration=it)
        comm.synchronize()
        signum = self.received or signal.SIGTERM
        code = 128 + int(signum)
        if comm.is_main_process():
            by = signal.Signals(signum).name if self.received else "a signal to another process"
            self._message = (
                f"Stopped by {by} after iteration {it}: checkpoint {path} (last_checkpoint "
                f"updated). Resume with: {_resume_command()}"
            )
        raise TrainingStopped(code)
