#!/usr/bin/env python
"""
Train and evaluate Mask R-CNN with the CBAM-HRNet backbone, like detectron2's tools/train_net.py:

    python train_net.py --config-file configs/mask_rcnn_CBAM_HRNet_W18_FPN_1x.yaml --num-gpus 8
    python train_net.py --config-file ... --eval-only MODEL.WEIGHTS output/model_final.pth
    python train_net.py --config-file configs/shapes/mask_rcnn_CBAM_HRNet_W18_FPN_shapes.yaml

Without CUDA (or with MODEL.DEVICE cpu) it runs on the CPU; ``--num-gpus N`` then starts N CPU
processes (gloo). One run per OUTPUT_DIR (cbam_hrnet_d2/engine/lock.py); SIGTERM or SIGINT stops
training after the current step with a checkpoint (cbam_hrnet_d2/engine/preemption.py).
"""

from detectron2.engine import default_argument_parser, default_setup
from detectron2.evaluation import verify_results
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from cbam_hrnet_d2.checkpoint import SafeCheckpointer
from cbam_hrnet_d2.config import load_config, warn_if_frozen_norms_start_random
from cbam_hrnet_d2.cpu.process import set_cpu_threads
from cbam_hrnet_d2.data import check_datasets, register_from_cfg
from cbam_hrnet_d2.engine import Trainer, launch_run


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
    cfg = load_config(args.config_file, args.opts)  # for the device and the output folder
    launch_run(
        main,
        args,
        device=cfg.MODEL.DEVICE,
        output_dir=cfg.OUTPUT_DIR,
        output_dir_opts=lambda folder: ["OUTPUT_DIR", folder],
        lock_lease_s=cfg.CBAM_HRNET.RUN_LOCK.LEASE_SECONDS,
    )


if __name__ == "__main__":
    invoke_main()  # pragma: no cover
