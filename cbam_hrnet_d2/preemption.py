"""Preemption: SIGTERM / SIGINT stop training at a step boundary with a checkpoint of that step.

Schedulers send SIGTERM before they preempt a job (Ctrl-C sends SIGINT). During training the
:class:`Preemption` hook lets the current step finish, then every process agrees to stop after it,
the main process writes ``model_<iteration>.pth`` atomically and updates ``last_checkpoint``, and
the run exits with ``128 + signal number`` (143 for SIGTERM, 130 for SIGINT) after one log line that
says where the checkpoint is and how to resume. ``--resume`` continues from the next iteration
(exactly, with ``DATALOADER.EXACT_RESUME``).

With several processes (``--num-gpus N``), :func:`launch` forwards the signal from the launching
process to its workers, so ``kill -TERM <pid of train_net.py>`` stops them all; a signal sent to the
whole process group reaches each of them anyway (repeated signals are ignored).
"""

import logging
import multiprocessing
import os
import shlex
import signal
import sys
from typing import Optional

from detectron2.engine import HookBase
from detectron2.engine import launch as d2_launch
from detectron2.utils import comm
from torch.multiprocessing import ProcessExitedException

__all__ = ["Preemption", "TrainingStopped", "stop_requested", "launch", "STOP_SIGNALS"]

logger = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_received: Optional[int] = None  # the first stop signal this process received during training


class TrainingStopped(SystemExit):
    """Raised (through detectron2's train loop, which lets it pass) once the preemption checkpoint
    is written; exits the process with ``128 + signal``."""


def _on_signal(signum, _frame) -> None:
    global _received
    if _received is None:
        _received = signum
        logger.warning(
            "Received %s: finishing the current iteration, then writing a checkpoint and "
            "stopping (SIGKILL stops at once, losing the iterations since the last checkpoint)",
            signal.Signals(signum).name,
        )


def stop_requested(trainer) -> bool:
    """Whether any process received a stop signal before the end of this iteration. A collective
    with several processes: every process calls it at the same point of an iteration; the answer is
    cached per iteration, so later calls in the same iteration agree with the first."""
    cached = getattr(trainer, "_stop_agreed", None)
    if cached is not None and cached[0] == trainer.iter:
        return cached[1]
    local = _received is not None
    agreed = any(comm.all_gather(local)) if comm.get_world_size() > 1 else local
    trainer._stop_agreed = (trainer.iter, agreed)
    return agreed


def _resume_command() -> str:
    argv = [a for a in sys.argv if a != "--resume"]
    script = argv[0] if argv else "train_net.py"
    return " ".join(shlex.quote(a) for a in [sys.executable, script, "--resume", *argv[1:]])


class Preemption(HookBase):
    """See the module doc. Register it last, after detectron2's checkpointing hook."""

    def __init__(self):
        self._previous = {}
        self._message = None

    def before_train(self):
        global _received
        _received = None
        self._previous = {s: signal.signal(s, _on_signal) for s in STOP_SIGNALS}

    def after_train(self):
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}
        if self._message:  # the last line of the log (this hook's after_train runs last)
            logger.warning(self._message)

    def after_step(self):
        if not stop_requested(self.trainer):
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
        signum = _received or signal.SIGTERM
        code = 128 + int(signum)
        if comm.is_main_process():
            by = signal.Signals(signum).name if _received else "a signal to another process"
            self._message = (
                f"Stopped by {by} after iteration {it}: checkpoint {path} (last_checkpoint "
                f"updated). Resume with: {_resume_command()}"
            )
        raise TrainingStopped(code)


def launch(main_func, num_gpus_per_machine: int, *, num_machines: int = 1, **kwargs) -> None:
    """detectron2's ``launch``; when it starts worker processes, a stop signal to this process is
    forwarded to them, and this process exits with their exit code (143 after SIGTERM)."""
    if num_gpus_per_machine * num_machines <= 1:
        return d2_launch(main_func, num_gpus_per_machine, num_machines=num_machines, **kwargs)
    forwarded = []

    def forward(signum, _frame):
        forwarded.append(signum)
        for child in multiprocessing.active_children():
            try:
                os.kill(child.pid, signum)
            except ProcessLookupError:
                pass

    previous = {s: signal.signal(s, forward) for s in STOP_SIGNALS}
    try:
        d2_launch(main_func, num_gpus_per_machine, num_machines=num_machines, **kwargs)
    except ProcessExitedException as e:
        if forwarded or e.exit_code in tuple(128 + int(s) for s in STOP_SIGNALS):
            raise SystemExit(e.exit_code) from None
        raise
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
