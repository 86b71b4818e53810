"""The trainer of ``train_net.py``: detectron2's ``DefaultTrainer`` with this project's pieces
plugged in through its classmethods and hooks."""

import logging
import os
import weakref

from detectron2.engine import DefaultTrainer
from detectron2.evaluation import COCOEvaluator
from detectron2.utils import comm

from cbam_hrnet_d2.checkpoint.checkpointer import SafeCheckpointer
from cbam_hrnet_d2.cpu import apply_cpu_speedups
from cbam_hrnet_d2.cpu.process import cpu_ddp_patch
from cbam_hrnet_d2.data.build import build_test_loader, build_train_loader
from cbam_hrnet_d2.engine.amp import amp_trainer
from cbam_hrnet_d2.engine.hooks import BadImageCounter, MemoryMonitor
from cbam_hrnet_d2.engine.optimizer import build_optimizer
from cbam_hrnet_d2.engine.preemption import Preemption
from cbam_hrnet_d2.engine.results import write_results
from cbam_hrnet_d2.engine.resume import ExactResume, ResumableLoader

__all__ = ["Trainer"]

logger = logging.getLogger(__name__)


class Trainer(DefaultTrainer):
    """``DefaultTrainer`` plus: the CPU speed layer on a CPU model (:mod:`cbam_hrnet_d2.cpu`),
    ``SOLVER.AMP`` on either device (:mod:`.amp`), ``SOLVER.OPTIMIZER``, loaders that skip bad
    images, the safe atomic checkpointer, exact resume, preemption checkpoints, memory and
    bad-image counts in metrics.json, and ``results.json`` / ``ap_tables.md`` after evaluation."""

    def __init__(self, cfg):
        # the one patch of the package: detectron2 wraps the model for DDP inside __init__ with
        # device_ids=[local rank], which DDP refuses for a CPU model (cpu/process.py)
        with cpu_ddp_patch():
            super().__init__(cfg)
        self._trainer = amp_trainer(cfg, self._trainer)

    def run_step(self):
        try:
            super().run_step()
        except FloatingPointError as e:
            # detectron2 names the iteration and the loss terms when a loss is non-finite, but not
            # when predictions are: say where training stopped either way.
            raise FloatingPointError(
                f"Training stopped at iteration {self.iter}: {e} The last checkpoint in "
                f"{self.cfg.OUTPUT_DIR} is intact; resume with a lower SOLVER.BASE_LR."
            ) from e

    def build_hooks(self):
        # detectron2 builds its DetectionCheckpointer just before calling build_hooks: ours saves
        # atomically and never runs code from a file
        self.checkpointer = SafeCheckpointer(
            self.model, self.cfg.OUTPUT_DIR, trainer=weakref.proxy(self)
        )
        hooks = super().build_hooks()
        cfg = self.cfg
        exact = ExactResume(
            self._trainer.data_loader,
            enabled=cfg.DATALOADER.EXACT_RESUME,
            seed=cfg.SEED,
            checkpoint_period=cfg.SOLVER.CHECKPOINT_PERIOD,
        )
        # ExactResume first (replays data before any step, gathers RNG states before a checkpoint);
        # the RSS and bad-image counts before the PeriodicWriter (last on the main process), so they
        # reach metrics.json; Preemption last (after the periodic checkpoint of the same iteration).
        at = len(hooks) - 1 if comm.is_main_process() else len(hooks)
        hooks[at:at] = [MemoryMonitor(), BadImageCounter(cfg.OUTPUT_DIR)]
        return [exact, *hooks, Preemption()]

    @classmethod
    def build_model(cls, cfg):
        return apply_cpu_speedups(super().build_model(cfg), cfg)

    @classmethod
    def build_train_loader(cls, cfg):
        return ResumableLoader(build_train_loader(cfg))

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        return build_test_loader(cfg, dataset_name)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        tasks = ("bbox", "segm") if cfg.MODEL.MASK_ON else ("bbox",)
        return COCOEvaluator(dataset_name, tasks=tasks, output_dir=output_folder)

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_optimizer(cfg, model)

    @classmethod
    def test(cls, cfg, model, evaluators=None):
        results = super().test(cfg, model, evaluators)
        if comm.is_main_process():
            # DefaultTrainer.test drops the dataset level when there is one dataset
            per_dataset = (
                {cfg.DATASETS.TEST[0]: results} if len(cfg.DATASETS.TEST) == 1 else results
            )
            write_results(per_dataset, cfg.OUTPUT_DIR)
        return results
