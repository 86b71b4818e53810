"""Config keys of this project (:func:`add_cbam_hrnet_config`), loading a config file with them,
detectron2's own shipped configs found without ``pkg_resources`` (:func:`detectron2_config`), and
the check of a recipe that would train frozen norms from random init."""

import logging
import os
from typing import Sequence

import detectron2
from detectron2.config import CfgNode as CN
from detectron2.config import LazyConfig, get_cfg

from cbam_hrnet_d2.device import run_device

__all__ = [
    "add_cbam_hrnet_config",
    "default_config",
    "load_config",
    "load_lazy_config",
    "detectron2_config_file",
    "detectron2_config",
    "warn_if_frozen_norms_start_random",
]

logger = logging.getLogger(__name__)


def add_cbam_hrnet_config(cfg: CN) -> None:
    """Add config keys of the CBAM-HRNet backbone and of this project's training/data options. Call
    it after ``get_cfg()`` and before ``merge_from_file``. Defaults describe the reference model:
    HRNet-W18 with CBAM (r=16, k=7) on all four stage-4 branches."""
    _C = cfg

    # Every node below that is not detectron2's is ours alone: MODEL.CBAM_HRNET (DensePose creates
    # MODEL.HRNET for its HRFPN), CBAM_HRNET.EMA (d2go owns MODEL_EMA), CBAM_HRNET.RUN_LOCK, so
    # this function can run before or after another project's add_*_config.
    _C.MODEL.CBAM_HRNET = CN()
    # HRNet width W = channels of the highest-resolution branch. Options: 18, 32, 48 (timm
    # hrnet_w*).
    _C.MODEL.CBAM_HRNET.WIDTH = 18
    # Norm in the trunk. Options: FrozenBN (detectron2's choice for ImageNet-initialised backbones;
    # needs weights), BN, SyncBN, GN (most groups <= 32 dividing C; SyncBN/GN for training from
    # scratch). SyncBN becomes detectron2's naiveSyncBN on CPU (works across gloo processes). Stages
    # frozen by MODEL.BACKBONE.FREEZE_AT (1 = stem, 2 = +stage1, ... 5 = all) become FrozenBN
    # anyway.
    _C.MODEL.CBAM_HRNET.NORM = "FrozenBN"
    # ImageNet HRNet checkpoint (timm .pth/.safetensors, official HRNet .pth, or a converted file)
    # loaded into the trunk at build time; "" = random init. A set MODEL.WEIGHTS wins over it.
    _C.MODEL.CBAM_HRNET.PRETRAINED = ""
    # In training, keep only the inputs of each stage-2..4 HRNet module and recompute it in
    # backward: less peak memory for more time per step (docs/notes/benchmark-runs.md). For a
    # machine too
    # small for the batch; applied with FrozenBN/GN norms only (BatchNorm in training mode would
    # update its statistics twice).
    _C.MODEL.CBAM_HRNET.ACTIVATION_CHECKPOINTING = False

    _C.MODEL.CBAM = CN()
    # Add CBAM blocks at all (False = plain HRNet + FPN, the ablation baseline).
    _C.MODEL.CBAM.ENABLED = True
    # Channel-attention MLP reduction ratio r (hidden = max(1, C // r)); integer >= 1.
    _C.MODEL.CBAM.REDUCTION = 16
    # Spatial-attention conv kernel size k; odd and positive.
    _C.MODEL.CBAM.KERNEL_SIZE = 7
    # With POSITION "branches": which stage-4 branches get a CBAM block; subset of hr2..hr5.
    _C.MODEL.CBAM.BRANCHES = ["hr2", "hr3", "hr4", "hr5"]
    # Where CBAM sits. Options: "branches" (on HRNet outputs hr2..hr5), "fpn" (one per FPN output
    # p2..p6).
    _C.MODEL.CBAM.POSITION = "branches"

    # The CPU speed-ups (cbam_hrnet_d2/cpu), each decided per call from the device of the tensors
    # it gets (no effect on CUDA, and a model moved with .to() follows its new device); same
    # outputs up to float rounding. Read by the narrowest part that owns each: the backbone
    # builders (CHANNELS_LAST), CPUFastRPN and CPUFastROIHeads (SPARSE_ROI_ALIGN,
    # BF16_HEADS; in PROPOSAL_GENERATOR.NAME / ROI_HEADS.NAME of the Base config).
    _C.MODEL.CBAM_HRNET.CPU = CN()
    # Run the trunk (and so the FPN and heads after it) channels-last (NHWC), oneDNN's layout.
    _C.MODEL.CBAM_HRNET.CPU.CHANNELS_LAST = True
    # Run the RoI poolers' RoIAlign as one multi-threaded sparse matrix product (torchvision's CPU
    # kernel runs one thread).
    _C.MODEL.CBAM_HRNET.CPU.SPARSE_ROI_ALIGN = True
    # In eval mode, run the RPN, box and mask heads under bf16 autocast where TEST.PRECISION runs
    # bf16 ("bf16", or "auto" on a CPU with native bf16, any input size); their outputs come back
    # fp32 (box decoding, NMS, RoIAlign sampling, mask pasting stay fp32). No effect under "fp32".
    _C.MODEL.CBAM_HRNET.CPU.BF16_HEADS = True

    # Training only (ROI_HEADS.NAME "CPUFastROIHeads"): the mask head trains on at most this
    # many foreground proposals per image, drawn at random; the box head sees all of them. 0 = all
    # (detectron2's StandardROIHeads).
    _C.MODEL.ROI_MASK_HEAD.POSITIVES_PER_IMAGE = 0

    # Training augmentation for harder images than the data hold (cbam_hrnet_d2/data/augment.py):
    # stretch, occlusion (cuts instance masks: INPUT.MASK_FORMAT "bitmask"), texture, low contrast,
    # blur, sensor noise, JPEG.
    _C.INPUT.HARD_AUG = CN()
    # Turn the seven corruptions on (off: detectron2's resize and flip only).
    _C.INPUT.HARD_AUG.ENABLED = False
    # Probability of each of the seven corruptions, drawn independently per image; in [0, 1].
    _C.INPUT.HARD_AUG.PROB = 0.15
    # Training iteration from which the corruptions apply (0: from the start); counted from the
    # images each data worker maps, within NUM_WORKERS iterations (augment.IterationGate);
    # TEST.PRECISE_BN's statistics follow it (engine.hooks.PreciseBN).
    _C.INPUT.HARD_AUG.START_ITER = 0

    # Extra COCO-format datasets to register before building loaders: list of
    # [name, json_file, image_root]; the names can then be used in DATASETS.TRAIN / DATASETS.TEST.
    _C.DATASETS.REGISTER_COCO = []

    # On --resume, replay the training data stream up to the resumed iteration and restore the RNG
    # states saved in the checkpoint (needs SEED >= 0): the same batches and random draws as a run
    # never stopped; bit-equal weights on the CPU, not on CUDA (non-deterministic kernels;
    # docs/training.md). Costs one pass of data loading over the iterations already done.
    _C.DATALOADER.EXACT_RESUME = False

    # This project's training-run options (not the model's): the run lock and the weight average.
    _C.CBAM_HRNET = CN()
    # The lock of OUTPUT_DIR (cbam_hrnet_d2/engine/lock.py): the holding process renews it every
    # third of this many seconds; a lock not renewed for longer is stale on any host and taken over
    # with a warning (a job killed without cleanup and requeued on another node starts by itself).
    _C.CBAM_HRNET.RUN_LOCK = CN()
    _C.CBAM_HRNET.RUN_LOCK.LEASE_SECONDS = 180.0

    # Exponential moving average of the weights in training (cbam_hrnet_d2/engine/ema.py): every
    # evaluation runs the averaged weights, and model_final.pth holds them; the average is part of
    # each checkpoint, so --resume continues it exactly.
    _C.CBAM_HRNET.EMA = CN()
    # Keep the average at all.
    _C.CBAM_HRNET.EMA.ENABLED = False
    # Its decay per step, in (0, 1) (after a warm-up of (1 + n) / (10 + n) over the first steps):
    # 0.99 averages over about the last 100 steps, 0.999 over about the last 1000.
    _C.CBAM_HRNET.EMA.DECAY = 0.999
    # Move the average every this many steps (by DECAY to that power): an update reads and writes
    # every weight (0.1-0.2 s for the shapes model on 2 cores); 10 brings that to ~1.5% of a step.
    _C.CBAM_HRNET.EMA.PERIOD = 10

    # Mixed precision of SOLVER.AMP.ENABLED training. Options: "auto" (fp16 on CUDA as detectron2,
    # bf16 on the CPU), "fp16" (CUDA only, with detectron2's grad scaler), "bf16" (no scaler).
    _C.SOLVER.AMP.PRECISION = "auto"

    # Optimizer. Options: "SGD" (detectron2's, with SOLVER.MOMENTUM), "AdamW" (betas 0.9/0.999, for
    # training from scratch, e.g. the CPU shapes recipe). Both use SOLVER.BASE_LR and WEIGHT_DECAY*.
    _C.SOLVER.OPTIMIZER = "SGD"

    # Precision of inference (eval mode) of the backbone + FPN: "fp32"; "bf16" (autocast; box
    # decoding, NMS, RoIAlign sampling and mask pasting stay fp32; on the CPU the heads follow,
    # MODEL.CBAM_HRNET.CPU.BF16_HEADS); "fp16" (CUDA only);
    # "auto": bf16 on a CPU with native bf16 (AVX512-BF16 / AMX) for inputs of at least
    # AUTO_BF16_MIN_PIXELS (cbam_hrnet_d2/modeling/precision.py, where it pays), else fp32.
    _C.TEST.PRECISION = "auto"


def default_config():
    """``get_cfg()`` + :func:`add_cbam_hrnet_config`: every key at its default (also where a
    LazyConfig leaves one of this project's options out)."""
    cfg = get_cfg()
    add_cbam_hrnet_config(cfg)
    return cfg


def load_config(config_file: str, opts: Sequence[str] = ()):
    """:func:`default_config` + the YAML + ``KEY VALUE`` overrides; without CUDA, MODEL.DEVICE
    becomes "cpu". Returned unfrozen."""
    cfg = default_config()
    cfg.merge_from_file(config_file)
    cfg.merge_from_list(list(opts))
    cfg.MODEL.DEVICE = run_device(cfg.MODEL.DEVICE)
    return cfg


def load_lazy_config(config_file: str, overrides: Sequence[str] = ()):
    """A LazyConfig file with ``key=value`` ``overrides`` applied; ``train.device`` as
    :func:`~cbam_hrnet_d2.device.run_device` decides."""
    cfg = LazyConfig.apply_overrides(LazyConfig.load(config_file), list(overrides))
    cfg.train.device = run_device(cfg.train.device)
    return cfg


def detectron2_config_file(path: str) -> str:
    """The file of a config that ships with detectron2 (``path`` relative to its model zoo's
    ``configs/``, e.g. "common/models/mask_rcnn_fpn.py"), found next to the installed package.
    detectron2's ``model_zoo.get_config_file`` asks ``pkg_resources``, which setuptools 81 and
    newer no longer ship: this works in any environment."""
    file = os.path.join(os.path.dirname(detectron2.__file__), "model_zoo", "configs", path)
    if not os.path.isfile(file):
        raise FileNotFoundError(
            f"{path!r} is not one of detectron2's shipped configs (looked for {file}); the "
            "detectron2 installed here may be older or installed without its model zoo configs"
        )
    return file


def detectron2_config(path: str):
    """A config shipped with detectron2 (:func:`detectron2_config_file`): a LazyConfig for a .py
    file, a ``CfgNode`` for a .yaml one; ``model_zoo.get_config(path)`` without
    ``pkg_resources``."""
    file = detectron2_config_file(path)
    if file.endswith(".py"):
        return LazyConfig.load(file)
    cfg = get_cfg()
    cfg.merge_from_file(file)
    return cfg


def warn_if_frozen_norms_start_random(cfg) -> bool:
    """Log a warning (and return True) when an HRNet trunk with FrozenBN norms would train from
    random init: its frozen statistics then stay mean 0 / variance 1, so nothing normalises the
    activations."""
    backbone = cfg.MODEL.BACKBONE.NAME
    if not backbone.startswith("build_cbam_hrnet") or cfg.MODEL.CBAM_HRNET.NORM != "FrozenBN":
        return False
    if cfg.MODEL.WEIGHTS or cfg.MODEL.CBAM_HRNET.PRETRAINED:
        return False
    logger.warning(
        "MODEL.CBAM_HRNET.NORM is FrozenBN but neither MODEL.WEIGHTS nor "
        "MODEL.CBAM_HRNET.PRETRAINED is set: the trunk trains from random init without "
        "normalisation. Give ImageNet weights, or set MODEL.CBAM_HRNET.NORM SyncBN (or GN) and "
        "MODEL.BACKBONE.FREEZE_AT 0 "
        "(configs/mask_rcnn_CBAM_HRNet_W18_FPN_1x_scratch.yaml)."
    )
    return True
