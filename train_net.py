#!/usr/bin/env python
"""
Train and evaluate Mask R-CNN with the CBAM-HRNet backbone, like detectron2's tools/train_net.py:

    python train_net.py --config-file configs/shapes/mask_rcnn_CBAM_HRNet_W18_FPN_shapes.yaml
    python train_net.py --config-file configs/mask_rcnn_CBAM_HRNet_W18_FPN_1x.yaml --num-gpus 8
    python train_net.py --config-file ... --eval-only MODEL.WEIGHTS output/model_final.pth

Without CUDA it runs on the CPU; ``--num-gpus N`` then starts N CPU processes (gloo). SIGTERM or
SIGINT stops training after the current step with a checkpoint (see cbam_hrnet_d2/preemption.py).
"""

import os
import weakref

from detectron2.engine import DefaultTrainer, default_argument_parser, default_setup
from detectron2.evaluation import COCOEvaluator, verify_results
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from cbam_hrnet_d2.amp import cpu_amp_trainer
from cbam_hrnet_d2.checkpoint import SafeCheckpointer
from cbam_hrnet_d2.config import load_config, warn_if_frozen_norms_start_random
from cbam_hrnet_d2.cpu import cpu_ddp_patch, set_cpu_threads
from cbam_hrnet_d2.data import check_datasets, register_from_cfg
from cbam_hrnet_d2.data_loader import BadImageCounter, build_test_loader, build_train_loader
from cbam_hrnet_d2.memory import MemoryMonitor
from cbam_hrnet_d2.preemption import Preemption, launch
from cbam_hrnet_d2.results import write_results
from cbam_hrnet_d2.resume import ExactResume, ResumableLoader
from cbam_hrnet_d2.solver import build_optimizer


class Trainer(DefaultTrainer):
    def __init__(self, cfg):
        with cpu_ddp_patch():
            super().__init__(cfg)
        # SOLVER.AMP on the CPU: bf16 autocast (detectron2's AMPTrainer is CUDA-only)
        self._trainer = cpu_amp_trainer(cfg, self._trainer)

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


def setup(args):
    cfg = load_config(args.config_file, args.opts)
    cfg.freeze()
    default_setup(cfg, args)
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="cbam_hrnet_d2")
    return cfg


def main(args):
    cfg = setup(args)
    set_cpu_threads(cfg.MODEL.DEVICE)
    register_from_cfg(cfg)
    check_datasets(cfg)

    if args.eval_only:
        model = Trainer.build_model(cfg)
        SafeCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume
        )
        res = Trainer.test(cfg, model)
        if comm.is_main_process():
            verify_results(cfg, res)
        return res

    warn_if_frozen_norms_start_random(cfg)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def invoke_main() -> None:
    args = default_argument_parser().parse_args()
    print("Command Line Args:", args)
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )


if __name__ == "__main__":
    invoke_main()  # pragma: no cover
