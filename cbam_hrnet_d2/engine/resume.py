"""Exact resume: the RNG states of every process in the checkpoint, the data stream replayed.

detectron2 restores the model, optimizer, LR scheduler and iteration on ``--resume``, but its data
loader starts its (seeded) sample stream from the beginning again and the RNGs start from the seed.
With ``DATALOADER.EXACT_RESUME`` and a fixed ``SEED``, the :class:`ExactResume` hook instead

1. saves the python / numpy / torch RNG states of every process with each checkpoint (detectron2
   checkpoints every hook's ``state_dict()``; with several processes they are gathered on the
   iterations that write a checkpoint: periodic, final, preemption),
2. on resume replays the training data stream of each process up to the resumed iteration (indices,
   augmentations and aspect-ratio grouping exactly as in the interrupted run; the batches are thrown
   away) through :class:`ResumableLoader`, then
3. restores each process's own RNG states,

so that iterations after the resume see the same batches and random draws as an uninterrupted run.

What that guarantees: the data stream and every RNG state. On the CPU the resumed run then ends
with the same weights as one never stopped (tested). On CUDA it does not, because several kernels
a Mask R-CNN step uses (RoIAlign backward, max-pool backward, scatter-add) accumulate in a
non-deterministic order: two uninterrupted seeded CUDA runs differ from each other just as much.
Each process saves its own GPU's RNG state, so a run resumes on fewer visible GPUs than it was
saved with.
"""

import logging
import random
import time
from typing import Any, Dict, Iterable, Iterator, Optional

import numpy as np
import torch
from detectron2.engine import HookBase
from detectron2.utils import comm

from cbam_hrnet_d2.engine.preemption import Preemption

__all__ = ["capture_rng_state", "restore_rng_state", "ResumableLoader", "ExactResume"]

logger = logging.getLogger(__name__)


def capture_rng_state() -> Dict[str, Any]:
    """The RNG states of python, numpy and torch as tensors and plain values (loadable with
    ``torch.load(weights_only=True)``)."""
    version, py_state, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": {
            "version": version,
            "state": torch.tensor(py_state, dtype=torch.int64),
            "gauss": gauss,
        },
        "numpy": {
            "name": name,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        # this process's own GPU only: a resume may see fewer GPUs (CUDA_VISIBLE_DEVICES=0 after
        # an 8-GPU run), and every process runs on one
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: Dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state(
        (
            npy["name"],
            npy["keys"].numpy().astype(np.uint32),
            npy["pos"],
            npy["has_gauss"],
            npy["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and not torch.cuda.is_available():
        logger.warning(
            "The checkpoint holds a CUDA RNG state but this process has no GPU: it is not restored"
        )
    elif cuda is not None:
        if isinstance(cuda, (list, tuple)):  # older checkpoints: every GPU's
            cuda = cuda[torch.cuda.current_device()]
        torch.cuda.set_rng_state(cuda)


class ResumableLoader:
    """Wraps a training data loader; :meth:`fast_forward` starts its iterator and consumes ``n``
    batches, and the trainer's first ``iter()`` then continues that iterator."""

    def __init__(self, loader: Iterable):
        self.loader = loader
        self._started: Optional[Iterator] = None

    def fast_forward(self, n: int) -> None:
        it = iter(self.loader)
        t0 = time.perf_counter()
        for i in range(n):
            next(it)
            if (i + 1) % 100 == 0 or i + 1 == n:
                rate = (i + 1) / (time.perf_counter() - t0)
                logger.info(
                    "Exact resume: replayed %d/%d batches of the data stream, ETA %.0f s",
                    i + 1,
                    n,
                    (n - i - 1) / rate,
                )
        self._started = it

    def begin_at(self, iteration: int) -> None:
        """The stream's first batch is training iteration ``iteration`` (a resume without replay):
        the loader's ``iteration_gates`` (``augment.IterationGate``, e.g. ``INPUT.HARD_AUG.
        START_ITER``) count from there. Call before the first ``iter()``: the workers copy them
        (with ``DATALOADER.NUM_WORKERS 0`` they map in this process: a call moves them at once)."""
        for gate in getattr(self.loader, "iteration_gates", ()):
            gate.begin_at(iteration)

    def __iter__(self) -> Iterator:
        it, self._started = self._started, None
        return it if it is not None else iter(self.loader)


class ExactResume(HookBase):
    """See the module doc. Register it before the checkpointing hooks; ``loader`` is the trainer's
    training loader, ``preemption`` the run's :class:`~cbam_hrnet_d2.engine.preemption.Preemption`
    hook (a stop writes a checkpoint, whose RNG states are gathered first)."""

    def __init__(
        self,
        loader: ResumableLoader,
        *,
        enabled: bool,
        seed: int,
        checkpoint_period: int,
        preemption: Optional[Preemption] = None,
    ):
        self._loader = loader
        self._preemption = preemption  # asked whether this iteration ends with a checkpoint
        self._enabled = enabled
        self._seed = seed
        self._period = checkpoint_period
        self._gathered: Optional[Dict[str, Any]] = (
            None  # {"iteration": i, "ranks": [state per rank]}
        )
        self._loaded: Optional[Dict[str, Any]] = None

    def _checkpoint_due(self) -> bool:
        it, trainer = self.trainer.iter, self.trainer
        stopping = self._preemption is not None and self._preemption.stop_requested()
        return (it + 1) % self._period == 0 or it + 1 >= trainer.max_iter or stopping

    def after_step(self):
        # With several processes only the main one writes the checkpoint: gather the others' states
        # (a collective, on the same iterations in every process) before it does.
        if self._enabled and comm.get_world_size() > 1 and self._checkpoint_due():
            self._gathered = {
                "iteration": self.trainer.iter,
                "ranks": comm.all_gather(capture_rng_state()),
            }

    def state_dict(self) -> Dict[str, Any]:
        if not self._enabled:
            return {}
        if comm.get_world_size() == 1:
            return {"iteration": self.trainer.iter, "ranks": [capture_rng_state()]}
        if self._gathered is not None and self._gathered["iteration"] == self.trainer.iter:
            return self._gathered
        return {}  # a save outside the gathering iterations: resume will not restore RNG states

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        self._loaded = state_dict

    def before_train(self):
        start = self.trainer.start_iter
        if start > 0 and not self._replay(start):
            self._loader.begin_at(start)

    def _replay(self, start: int) -> bool:
        """Replays the data stream to ``start`` and restores the RNG states; False where it cannot
        (the reason logged)."""
        if not self._enabled:
            logger.info(
                "Resumed at iteration %d; the data stream restarts from its beginning "
                "(DATALOADER.EXACT_RESUME True replays it instead)",
                start,
            )
            return False
        if self._seed < 0:
            logger.warning(
                "DATALOADER.EXACT_RESUME needs a fixed SEED (SEED = %d): resuming without replay",
                self._seed,
            )
            return False
        ranks = (self._loaded or {}).get("ranks")
        if not ranks:
            logger.warning(
                "The checkpoint holds no RNG states (written without DATALOADER.EXACT_RESUME or "
                "by another trainer): resuming without replay"
            )
            return False
        if len(ranks) != comm.get_world_size():
            logger.warning(
                "The checkpoint holds the RNG states of %d process(es), this run has %d: "
                "resuming without replay",
                len(ranks),
                comm.get_world_size(),
            )
            return False
        self._loader.fast_forward(start)
        restore_rng_state(ranks[comm.get_rank()])
        logger.info(
            "Exact resume: data stream and RNG states of process %d are where iteration %d left "
            "them",
            comm.get_rank(),
            start - 1,
        )
        return True
