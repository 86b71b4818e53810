"""The hooks of a training run, and the one function that lists them for both entry points.

* :func:`build_training_hooks`: the hook list of ``train_net.py`` (``Trainer.build_hooks``) and
  ``lazy_train_net.py`` alike: exact resume, detectron2's timer, LR scheduler, checkpointer,
  evaluation and writers, the two hooks below, and preemption.
* :class:`MemoryMonitor` and :class:`BadImageCounter` put what a long run needs to know into
  metrics.json: resident memory and the number of images skipped as unusable.
* :class:`PreciseBN`: detectron2's, its statistics from the images training maps at that
  iteration (``INPUT.HARD_AUG.START_ITER``).
"""

import logging
import os
from typing import Callable, Dict, List, Optional, Sequence

from detectron2.engine import HookBase, hooks
from detectron2.utils import comm
from detectron2.utils.events import EventWriter

from cbam_hrnet_d2.data.build import BAD_IMAGES_FILE
from cbam_hrnet_d2.engine.ema import ModelEMA
from cbam_hrnet_d2.engine.preemption import Preemption
from cbam_hrnet_d2.engine.resume import ExactResume, ResumableLoader
from cbam_hrnet_d2.utils.memory import rss_mib

__all__ = ["MemoryMonitor", "BadImageCounter", "PreciseBN", "build_training_hooks"]

logger = logging.getLogger(__name__)


class PreciseBN(hooks.PreciseBN):
    """detectron2's ``PreciseBN`` whose loader (a :class:`ResumableLoader` mapping in this process:
    ``DATALOADER.NUM_WORKERS 0``) is put at the trainer's iteration before each update, so that
    iteration gates such as ``INPUT.HARD_AUG.START_ITER`` give the statistics the images training
    sees then, not those of iteration 0."""

    def __init__(self, period, model, data_loader: ResumableLoader, num_iter=200):
        super().__init__(period, model, data_loader, num_iter)
        self.loader = data_loader  # ours to move; detectron2's hook reads its own copy

    def update_stats(self):
        self.loader.begin_at(self.trainer.iter)
        super().update_stats()


class MemoryMonitor(HookBase):
    """Every ``period`` iterations put the RSS of the trainer (and with its data-loader workers)
    into the event storage (metrics.json); log it at the start and end of training, with the
    peak."""

    def __init__(self, period: int = 20):
        self._period = period
        self._first = None
        self._peak = {}

    def _sample(self) -> Dict[str, float]:
        now = rss_mib()
        for k, v in now.items():
            self._peak[k] = max(self._peak.get(k, 0.0), v)
        return now

    def after_step(self):
        it = self.trainer.iter
        if (
            it == self.trainer.start_iter
            or (it + 1) % self._period == 0
            or it == self.trainer.max_iter - 1
        ):
            now = self._sample()
            if self._first is None:
                self._first = now
                logger.info("RSS after the first iteration: %s", _fmt(now))
            for k, v in now.items():
                self.trainer.storage.put_scalar(k, v, smoothing_hint=False)

    def after_train(self):
        if self._first is not None:
            logger.info(
                "RSS at the end: %s; peak seen: %s; after the first iteration: %s",
                _fmt(self._sample()),
                _fmt(self._peak),
                _fmt(self._first),
            )


class BadImageCounter(HookBase):
    """Puts the number of distinct images skipped so far (``OUTPUT_DIR/bad_images.tsv``) into the
    event storage every ``period`` iterations, as ``data/bad_images``."""

    def __init__(self, output_dir: str, period: int = 20):
        self._file = os.path.join(output_dir, BAD_IMAGES_FILE)
        self._period = period

    def count(self) -> int:
        try:
            with open(self._file) as f:
                return len({tuple(line.split("\t")[:2]) for line in f if line.strip()})
        except FileNotFoundError:
            return 0

    def after_step(self):
        it = self.trainer.iter
        if (it + 1) % self._period == 0 or it == self.trainer.max_iter - 1:
            self.trainer.storage.put_scalar("data/bad_images", self.count(), smoothing_hint=False)

    def after_train(self):
        n = self.count()
        if n:
            logger.warning(
                "%d image(s) were skipped as unusable; they are listed in %s", n, self._file
            )


def _fmt(sample: Dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.0f}" for k, v in sample.items())


def build_training_hooks(
    *,
    checkpointer,
    loader: ResumableLoader,
    lr_scheduler: hooks.LRScheduler,
    eval_period: int,
    eval_function: Callable[[], dict],
    writers: List[EventWriter],
    output_dir: str,
    seed: int,
    exact_resume: bool,
    checkpoint_period: int,
    max_to_keep: Optional[int] = None,
    log_period: int = 20,
    before_checkpoint: Sequence[Optional[HookBase]] = (),
    ema_decay: Optional[float] = None,
    ema_period: int = 1,
) -> List[HookBase]:
    """The hooks of a training run, in order:

    1. :class:`~cbam_hrnet_d2.engine.resume.ExactResume` (replays data before any step, gathers RNG
       states before a checkpoint; ``exact_resume``, ``seed``),
    2. detectron2's ``IterationTimer``, ``lr_scheduler``, ``before_checkpoint`` (e.g. PreciseBN),
       with ``ema_decay`` a :class:`~cbam_hrnet_d2.engine.ema.ModelEMA` moved every ``ema_period``
       steps (the evaluation then runs the averaged weights), ``PeriodicCheckpointer`` (main
       process) and ``EvalHook(eval_period, eval_function)``,
    3. :class:`MemoryMonitor` and :class:`BadImageCounter` (``output_dir/bad_images.tsv``), before
       the writers so that their values reach metrics.json,
    4. ``PeriodicWriter(writers)`` (main process),
    5. :class:`~cbam_hrnet_d2.engine.preemption.Preemption`, last (after the periodic checkpoint of
       the same iteration).
    """
    main = comm.is_main_process()
    preemption = Preemption(checkpointer)
    ema = ModelEMA(ema_decay, ema_period) if ema_decay is not None else None
    if ema is not None:
        eval_function = ema.evaluating(eval_function)
    listed = [
        ExactResume(
            loader,
            enabled=exact_resume,
            seed=seed,
            checkpoint_period=checkpoint_period,
            preemption=preemption,
        ),
        hooks.IterationTimer(),
        lr_scheduler,
        *before_checkpoint,
        ema,
        hooks.PeriodicCheckpointer(checkpointer, checkpoint_period, max_to_keep=max_to_keep)
        if main
        else None,
        hooks.EvalHook(eval_period, eval_function),
        MemoryMonitor(),
        BadImageCounter(output_dir),
        hooks.PeriodicWriter(writers, period=log_period) if main else None,
        preemption,
    ]
    return [h for h in listed if h is not None]
