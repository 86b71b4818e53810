"""The trainer of ``train_net.py``: detectron2's ``DefaultTrainer`` with this project's pieces
plugged in through its classmethods and hooks. The model comes from detectron2's ``build_model``
(detectron2's GeneralizedRCNN with our backbone and heads, which take their CPU speed-ups per call),
so ``build_model``, ``DefaultPredictor`` and this trainer build the same model."""

import logging
import os
import weakref

from detectron2.engine import DefaultTrainer, TrainerBase, create_ddp_model, hooks
from detectron2.evaluation import COCOEvaluator, verify_results
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger
from fvcore.nn.precise_bn import get_bn_modules

from cbam_hrnet_d2.checkpoint.checkpointer import SafeCheckpointer
from cbam_hrnet_d2.data.build import build_test_loader, build_train_loader
from cbam_hrnet_d2.device import ddp_device_ids
from cbam_hrnet_d2.engine.amp import build_step_trainer
from cbam_hrnet_d2.engine.hooks import PreciseBN, build_training_hooks
from cbam_hrnet_d2.engine.optimizer import build_optimizer
from cbam_hrnet_d2.engine.results import write_results
from cbam_hrnet_d2.engine.resume import ResumableLoader

__all__ = ["Trainer", "ddp_model"]

logger = logging.getLogger(__name__)


def ddp_model(model, **kwargs):
    """detectron2's ``create_ddp_model`` with the device ids of the model's device
    (:func:`~cbam_hrnet_d2.device.ddp_device_ids`: none for a CPU model over gloo, where
    detectron2's default ``[local rank]`` is rejected by DistributedDataParallel)."""
    kwargs.setdefault("device_ids", ddp_device_ids(model, comm.get_local_rank()))
    return create_ddp_model(model, **kwargs)


class Trainer(DefaultTrainer):
    """``DefaultTrainer`` plus: ``SOLVER.AMP`` on either device (:mod:`.amp`), ``SOLVER.OPTIMIZER``,
    loaders that skip bad images, the safe atomic checkpointer, exact resume, preemption
    checkpoints, memory and bad-image counts in metrics.json (:func:`build_training_hooks`, shared
    with ``lazy_train_net.py``), and ``results.json`` / ``ap_tables.md`` after evaluation.

    ``__init__`` builds what ``DefaultTrainer.__init__`` builds, in the same order and through the
    same overridable classmethods, in the open (as detectron2's ``tools/plain_train_net.py``
    builds its loop): detectron2's own wraps the model for DDP with ``device_ids=[local rank]``,
    which DDP rejects for a CPU model, always picks its ``AMPTrainer``, which stops without CUDA,
    and builds a checkpointer that unpickles; it offers no seam for any of them. The step trainer
    is the public :attr:`step_trainer`; checkpoints keep detectron2's layout (``"_trainer"``)."""

    def __init__(self, cfg):
        TrainerBase.__init__(self)
        if not logging.getLogger("detectron2").isEnabledFor(logging.INFO):
            setup_logger()  # as DefaultTrainer: detectron2's logger when the caller set none
        cfg = self.auto_scale_workers(cfg, comm.get_world_size())
        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)
        model = ddp_model(model, broadcast_buffers=False)
        self.step_trainer = build_step_trainer(cfg, model, data_loader, optimizer)
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        # ours saves atomically and never runs code from a file
        self.checkpointer = SafeCheckpointer(model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self))
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.last_eval_results = None
        self.register_hooks(self.build_hooks())

    # DefaultTrainer reads these three from its private step trainer; ours is public
    @property
    def model(self):
        return self.step_trainer.model

    @property
    def data_loader(self):
        return self.step_trainer.data_loader

    @property
    def optimizer(self):
        return self.step_trainer.optimizer

    def run_step(self):
        self.step_trainer.iter = self.iter
        try:
            self.step_trainer.run_step()
        except FloatingPointError as e:
            # detectron2 names the iteration and the loss terms when a loss is non-finite, but not
            # when predictions are: say where training stopped either way.
            raise FloatingPointError(
                f"Training stopped at iteration {self.iter}: {e} The last checkpoint in "
                f"{self.cfg.OUTPUT_DIR} is intact; resume with a lower SOLVER.BASE_LR."
            ) from e

    def state_dict(self):
        ret = TrainerBase.state_dict(self)
        ret["_trainer"] = self.step_trainer.state_dict()  # detectron2's key: same checkpoints
        return ret

    def load_state_dict(self, state_dict):
        TrainerBase.load_state_dict(self, state_dict)
        self.step_trainer.load_state_dict(state_dict["_trainer"])

    def train(self):
        """Run training; the results of the last evaluation (verified against
        ``TEST.EXPECTED_RESULTS`` where set), or None."""
        TrainerBase.train(self, self.start_iter, self.max_iter)
        if len(self.cfg.TEST.EXPECTED_RESULTS) and comm.is_main_process():
            assert self.last_eval_results, "No evaluation results obtained during training!"
            verify_results(self.cfg, self.last_eval_results)
        return self.last_eval_results

    def build_hooks(self):
        cfg = self.cfg

        def test_and_save_results():
            self.last_eval_results = self.test(cfg, self.model)
            return self.last_eval_results

        precise_bn = None
        if cfg.TEST.PRECISE_BN.ENABLED and get_bn_modules(self.model):
            bn_cfg = cfg.clone()
            bn_cfg.defrost()
            bn_cfg.DATALOADER.NUM_WORKERS = 0  # as detectron2: less memory and time for PreciseBN
            loader = self.build_train_loader(bn_cfg)
            precise_bn = PreciseBN(
                cfg.TEST.EVAL_PERIOD, self.model, loader, cfg.TEST.PRECISE_BN.NUM_ITER
            )
        return build_training_hooks(
            checkpointer=self.checkpointer,
            loader=self.data_loader,
            lr_scheduler=hooks.LRScheduler(),
            eval_period=cfg.TEST.EVAL_PERIOD,
            eval_function=test_and_save_results,
            writers=self.build_writers(),
            output_dir=cfg.OUTPUT_DIR,
            seed=cfg.SEED,
            exact_resume=cfg.DATALOADER.EXACT_RESUME,
            checkpoint_period=cfg.SOLVER.CHECKPOINT_PERIOD,
            before_checkpoint=[precise_bn],
            ema_decay=cfg.CBAM_HRNET.EMA.DECAY if cfg.CBAM_HRNET.EMA.ENABLED else None,
            ema_period=cfg.CBAM_HRNET.EMA.PERIOD,
        )

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
