#!/usr/bin/env python
"""
Train and evaluate from a LazyConfig (configs/lazy/*.py), in the shape of detectron2's
tools/lazyconfig_train_net.py:

    python lazy_train_net.py --config-file configs/lazy/mask_rcnn_cbam_hrnet_w18_fpn_shapes.py
    python lazy_train_net.py --config-file configs/lazy/mask_rcnn_cbam_hrnet_w18_fpn.py --num-gpus 8
    python lazy_train_net.py --config-file ... --eval-only train.init_checkpoint=output/x.pth
    python lazy_train_net.py --config-file ... train.max_iter=100 optimizer.lr=0.001

As train_net.py, with the same hooks (cbam_hrnet_d2.engine.hooks.build_training_hooks): without
CUDA it runs on the CPU (``--num-gpus N`` starts N CPU processes), one run per output folder, saves
with the safe atomic checkpointer, skips and counts bad images, logs RSS, writes results.json /
ap_tables.md, stops on SIGTERM/SIGINT with a checkpoint, and resumes exactly with
``train.exact_resume=True``.
"""

import logging

from detectron2.config import instantiate
from detectron2.engine import default_argument_parser, default_setup, default_writers, hooks
from detectron2.evaluation import inference_on_dataset, print_csv_format
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from cbam_hrnet_d2.checkpoint import SafeCheckpointer
from cbam_hrnet_d2.config import default_config, load_lazy_config
from cbam_hrnet_d2.cpu.process import set_cpu_threads
from cbam_hrnet_d2.engine import launch_run
from cbam_hrnet_d2.engine.amp import trainer_class
from cbam_hrnet_d2.engine.hooks import build_training_hooks
from cbam_hrnet_d2.engine.results import write_results
from cbam_hrnet_d2.engine.resume import ResumableLoader
from cbam_hrnet_d2.engine.trainer import ddp_model

logger = logging.getLogger("cbam_hrnet_d2")


def do_test(cfg, model):
    if "evaluator" not in cfg.dataloader:
        return {}
    results = inference_on_dataset(
        model, instantiate(cfg.dataloader.test), instantiate(cfg.dataloader.evaluator)
    )
    if comm.is_main_process():
        print_csv_format(results)
        write_results({cfg.dataloader.evaluator.dataset_name: results}, cfg.train.output_dir)
    return results


def build_model(cfg):
    """``cfg.model`` on ``cfg.train.device``: the model ``build_model`` gives for the YAML configs
    (configs/lazy: our backbone and heads take their CPU speed-ups per call on CPU tensors)."""
    return instantiate(cfg.model).to(cfg.train.device)


def do_train(args, cfg):
    model = build_model(cfg)
    logger.info("Model:\n%s", model)
    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    loader = ResumableLoader(instantiate(cfg.dataloader.train))
    model = ddp_model(model, **cfg.train.ddp)
    # train.amp.enabled on the CPU: bf16 autocast steps (detectron2's AMPTrainer is CUDA-only)
    amp = cfg.train.amp
    trainer = trainer_class(amp.enabled, cfg.train.device, amp.get("precision", "auto"))(
        model, loader, optimizer
    )
    logger.info("Trainer: %s", type(trainer).__name__)
    checkpointer = SafeCheckpointer(model, cfg.train.output_dir, trainer=trainer)
    # CBAM_HRNET.EMA of the YAML configs (enabled, decay, period); their defaults where it is silent
    ema = {k.lower(): v for k, v in default_config().CBAM_HRNET.EMA.items()}
    ema.update(cfg.train.get("model_ema", {}))
    trainer.register_hooks(
        build_training_hooks(
            checkpointer=checkpointer,
            loader=loader,
            lr_scheduler=hooks.LRScheduler(scheduler=instantiate(cfg.lr_multiplier)),
            eval_period=cfg.train.eval_period,
            eval_function=lambda: do_test(cfg, model),
            writers=default_writers(cfg.train.output_dir, cfg.train.max_iter),
            output_dir=cfg.train.output_dir,
            seed=cfg.train.get("seed", -1),
            exact_resume=cfg.train.get("exact_resume", False),
            checkpoint_period=cfg.train.checkpointer.period,
            max_to_keep=cfg.train.checkpointer.get("max_to_keep"),
            log_period=cfg.train.log_period,
            ema_decay=ema["decay"] if ema["enabled"] else None,
            ema_period=ema["period"],
        )
    )
    checkpointer.resume_or_load(cfg.train.init_checkpoint, resume=args.resume)
    start_iter = trainer.iter + 1 if args.resume and checkpointer.has_checkpoint() else 0
    trainer.train(start_iter, cfg.train.max_iter)


def load(args):
    """The LazyConfig with ``args.opts`` applied; without CUDA, ``train.device`` is "cpu"."""
    return load_lazy_config(args.config_file, args.opts)


def main(args):
    cfg = load(args)
    default_setup(cfg, args)
    # detectron2 sets up its own loggers only: this project's (this file's included) as train_net.py
    setup_logger(cfg.train.output_dir, distributed_rank=comm.get_rank(), name="cbam_hrnet_d2")
    set_cpu_threads(cfg.train.device)
    if args.eval_only:
        model = ddp_model(build_model(cfg))
        SafeCheckpointer(model).load(cfg.train.init_checkpoint)
        return do_test(cfg, model)
    do_train(args, cfg)  # detectron2's EvalHook evaluates after the last iteration


def invoke_main() -> None:
    args = default_argument_parser().parse_args()
    cfg = load(args)  # for the device and the output folder
    launch_run(
        main,
        args,
        device=cfg.train.device,
        output_dir=cfg.train.output_dir,
        output_dir_opts=lambda folder: [f"train.output_dir={folder}"],
        # CBAM_HRNET.RUN_LOCK.LEASE_SECONDS of the YAML configs
        lock_lease_s=cfg.train.get(
            "run_lock_lease_seconds", default_config().CBAM_HRNET.RUN_LOCK.LEASE_SECONDS
        ),
    )


if __name__ == "__main__":
    invoke_main()  # pragma: no cover
