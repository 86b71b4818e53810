"""Exact resume: RNG states in the checkpoint, and the training data stream replayed to where it was.

detectron2 restores the model, optimizer, LR scheduler and iteration on ``--resume``, but its data
loader starts its (seeded) sample stream from the beginning again and the RNGs start from the seed.
With ``DATALOADER.EXACT_RESUME`` and a fixed ``SEED``, the trainer here instead

1. replays the training data stream up to the resumed iteration (indices, augmentations and
   aspect-ratio grouping exactly as in the interrupted run; the batches are thrown away), then
2. restores the python / numpy / torch RNG states saved with the checkpoint,

so that iterations after the resume see the same batches and random draws as an uninterrupted run.
"""
import logging
import random
import time
from typing import Any, Dict

import numpy as np
import torch
from detectron2.utils import comm

__all__ = ["capture_rng_state", "restore_rng_state", "prepare_exact_resume"]

logger = logging.getLogger(__name__)


def capture_rng_state() -> Dict[str, Any]:
    """The RNG states of python, numpy and torch as tensors and plain values (loadable with
    ``torch.load(weights_only=True)``)."""
    version, py_state, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": {"version": version, "state": torch.tensor(py_state, dtype=torch.int64), "gauss": gauss},
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state(
        (npy["name"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"], npy["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def prepare_exact_resume(trainer, cfg, rng_state) -> None:
    """Call before the first step of a resumed ``DefaultTrainer`` (``trainer.start_iter > 0``):
    replay ``start_iter`` batches of the training stream and restore ``rng_state``."""
    start = trainer.start_iter
    if start == 0 or not cfg.DATALOADER.EXACT_RESUME:
        if start:
            logger.info("Resumed at iteration %d; the data stream restarts from its beginning "
                        "(DATALOADER.EXACT_RESUME True replays it instead)", start)
        return
    if cfg.SEED < 0:
        logger.warning("DATALOADER.EXACT_RESUME needs a fixed SEED (SEED = %d): resuming without replay", cfg.SEED)
        return
    if rng_state is None:
        logger.warning("The checkpoint holds no RNG state (written by another trainer): resuming without replay")
        return
    if comm.get_world_size() > 1:
        logger.warning("DATALOADER.EXACT_RESUME is exact for one process only: the checkpoint holds "
                       "the RNG state of rank 0; replaying the data stream, RNG states not restored")
    data_iter = trainer._trainer._data_loader_iter  # detectron2 creates it on first use
    t0 = time.perf_counter()
    for i in range(start):
        next(data_iter)
        if (i + 1) % 100 == 0 or i + 1 == start:
            rate = (i + 1) / (time.perf_counter() - t0)
            logger.info("Exact resume: replayed %d/%d batches of the data stream, ETA %.0f s",
                        i + 1, start, (start - i - 1) / rate)
    if comm.get_world_size() == 1:
        restore_rng_state(rng_state)
    logger.info("Exact resume: data stream and RNG states are where iteration %d left them", start - 1)
