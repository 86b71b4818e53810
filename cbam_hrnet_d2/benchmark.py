"""The measuring pieces of ``tools/benchmark.py`` (CPU) and ``tools/gpu_timing.py`` (CUDA): the
reference config, building a model through each of detectron2's doors, fixed work for random-init
models (fixed proposals in training, fixed boxes through the heads in eval), the matmul roof and
interleaved timing. The scripts are thin command lines over these."""

import logging
import statistics
import time
from typing import Callable, Dict, List, Sequence

import torch
from detectron2.config import LazyConfig, instantiate
from detectron2.engine import DefaultPredictor
from detectron2.modeling import Backbone, build_model
from detectron2.structures import Boxes, ImageList, Instances

from cbam_hrnet_d2.config import detectron2_config_file, load_config
from cbam_hrnet_d2.engine import Trainer
from cbam_hrnet_d2.modeling.precision import run_autocast

__all__ = [
    "REFERENCE",
    "REFERENCE_BF16",
    "REFERENCE_CL",
    "TREATED",
    "EMULATED_BF16",
    "DOORS",
    "load_cfg",
    "build_through",
    "fixed_boxes",
    "FixedProposals",
    "FixedWork",
    "matmul_peak_gmacs",
    "time_interleaved",
    "Autocast",
]

logger = logging.getLogger("cbam_hrnet_d2.benchmark")


# detectron2's R50-FPN given our backbone's treatment: channels-last, and bf16 autocast (the fair
# comparison where the default runs bf16) or fp32 (where it runs fp32: a CPU without native bf16)
REFERENCE_BF16 = "R50+cpu_speedups+bf16"
REFERENCE_CL = "R50+cpu_speedups"
TREATED = {REFERENCE_BF16: torch.bfloat16, REFERENCE_CL: None}
# the reason given for rows not measured on a CPU that emulates bf16
EMULATED_BF16 = (
    "skipped: bf16 is emulated on this CPU (no AVX512-BF16 / AMX); --emulated-bf16 runs it"
)


# detectron2's model-zoo config every measurement is compared with
REFERENCE = "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml"


# prefix of a config shipped with detectron2 ("d2:Misc/cascade_mask_rcnn_R_50_FPN_1x.yaml")
DETECTRON2_PREFIX = "d2:"


def load_cfg(config: str, opts: Sequence[str] = ()):
    """``config`` (a file, :data:`REFERENCE`, or "d2:<path>" of a config shipped with detectron2)
    + ``opts`` on the CPU, without weights."""
    if config == REFERENCE:
        path = detectron2_config_file(config)
    elif config.startswith(DETECTRON2_PREFIX):
        path = detectron2_config_file(config[len(DETECTRON2_PREFIX) :])
    else:
        path = config
    cfg = load_config(path, opts)
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    return cfg


def fixed_boxes(h: int, w: int, num: int) -> Boxes:
    """``num`` reproducible random boxes inside an (h, w) image, 8 px to 30% of each side."""
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(num, 2, generator=g) * torch.tensor([w * 0.8, h * 0.8])
    wh = torch.rand(num, 2, generator=g) * torch.tensor([w * 0.3, h * 0.3]) + 8
    return Boxes(torch.cat([xy, xy + wh], 1))


class FixedProposals(torch.nn.Module):
    """A proposal generator whose losses are computed as usual but whose proposals are ``num`` fixed
    boxes per image (:func:`fixed_boxes`), so that the RoI heads of random-init models train on the
    same boxes."""

    def __init__(self, rpn: torch.nn.Module, num: int):
        super().__init__()
        self.rpn = rpn
        self.num = num

    def forward(self, images, features, gt_instances=None):
        _, losses = self.rpn(images, features, gt_instances)
        proposals = []
        for h, w in images.image_sizes:
            inst = Instances((h, w))
            boxes = fixed_boxes(h, w, self.num)
            boxes.clip((h, w))  # as the RPN clips its proposals
            inst.proposal_boxes = boxes.to(images.tensor.device)
            inst.objectness_logits = torch.zeros(self.num, device=images.tensor.device)
            proposals.append(inst)
        return proposals, losses


class FixedWork(torch.nn.Module):
    """The whole Mask R-CNN at test time with the box counts fixed, so that random-init models of
    different backbones do the same work: backbone + FPN, the RPN (its proposals discarded), the box
    head on ``num_proposals`` fixed boxes and the mask head on ``num_detections`` fixed boxes.
    (Final mask pasting into the image is left out.)"""

    def __init__(self, model, h: int, w: int, num_proposals: int = 1000, num_detections: int = 100):
        super().__init__()
        self.model = model
        self.boxes = fixed_boxes(h, w, num_proposals)
        self.num_detections = num_detections
        self.hw = (h, w)

    def forward(self, x: torch.Tensor):
        model, roi = self.model, self.model.roi_heads
        features = model.backbone(x)
        model.proposal_generator(ImageList(x, [self.hw]), features, None)
        boxes = self.boxes.to(x.device)
        box_features = roi.box_pooler([features[f] for f in roi.box_in_features], [boxes])
        scores, _ = roi.box_predictor(roi.box_head(box_features))
        inst = Instances(self.hw)
        inst.pred_boxes = boxes[: self.num_detections]
        inst.pred_classes = torch.zeros(self.num_detections, dtype=torch.long, device=x.device)
        # the mask pooler and head (public attributes) as StandardROIHeads runs them at test time
        mask_features = roi.mask_pooler(
            [features[f] for f in roi.mask_in_features], [inst.pred_boxes]
        )
        masks = roi.mask_head(mask_features, [inst])
        return scores, masks[0].pred_masks


class Autocast(Backbone):
    """A backbone run under bf16 autocast with float32 outputs, as TEST.PRECISION bf16 runs ours."""

    def __init__(self, backbone: Backbone):
        super().__init__()
        self.inner = backbone

    def forward(self, x):
        return run_autocast(self.inner, x, torch.bfloat16)

    def output_shape(self):
        return self.inner.output_shape()

    @property
    def size_divisibility(self):
        return self.inner.size_divisibility

    @property
    def padding_constraints(self):
        return self.inner.padding_constraints


def _seconds(fn: Callable[[], object], iters: int) -> List[float]:
    """Seconds of each of ``iters`` runs of ``fn`` after one untimed warm-up run."""
    fn()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def matmul_peak_gmacs(n: int = 4096, iters: int = 6, dtype=torch.float32) -> float:
    """Best rate of an n x n matmul in ``dtype`` over ``iters`` runs: a roof, so the fastest run,
    which a moment of other load on the machine cannot lower (a median once read 47 instead of 112).
    4096: smaller products do not saturate the cores (2048 fp32 read about half of 4096's rate)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    return n**3 / min(_seconds(lambda: torch.mm(a, b), iters)) / 1e9


# the doors through which a detectron2 user builds a model; a LazyConfig (.py) is built by
# instantiate(cfg.model) on train.device "cpu"
DOORS = ("build_model", "DefaultPredictor", "DefaultTrainer")


def build_through(config: str, opts: Sequence[str] = (), door: str = "build_model"):
    """``config`` built on the CPU without weights as a detectron2 user would: ``build_model``,
    ``DefaultPredictor(cfg).model``, ``Trainer.build_model`` (a ``DefaultTrainer`` subclass), or,
    for a LazyConfig file, ``instantiate(cfg.model).to(cfg.train.device)``."""
    if config.endswith(".py"):
        cfg = LazyConfig.apply_overrides(LazyConfig.load(config), list(opts))
        cfg.train.device = "cpu"
        return instantiate(cfg.model).to(cfg.train.device)
    cfg = load_cfg(config, opts)
    if door == "DefaultPredictor":
        return DefaultPredictor(cfg).model
    if door == "DefaultTrainer":
        return Trainer.build_model(cfg)
    return build_model(cfg)


def time_interleaved(
    timed: Dict[str, Dict[str, Callable[[], object]]], iters: int
) -> Dict[str, Dict[str, float]]:
    """Median seconds of every callable of every config, measured round-robin: each round runs every
    config once, so a machine that drifts during the run (other load, clocks) shifts all rows alike
    instead of whichever rows happened to run then. One untimed warm-up round first, and in every
    round one untimed call of a config's first callable before its timed ones, so that each is timed
    with its weights already in the caches, as when one model serves image after image (timed
    cold, right after 7 other models, every row measured ~8% slower). ``first_calls_s``: the
    warm-up round of a config, all its callables once (start-up costs, e.g. compiling)."""
    timed = {spec: fns for spec, fns in timed.items() if fns}  # skipped rows have none
    samples = {spec: {key: [] for key in fns} for spec, fns in timed.items()}
    first = {}
    with torch.inference_mode():
        for spec, fns in timed.items():
            start = time.perf_counter()
            for fn in fns.values():
                fn()
            first[spec] = time.perf_counter() - start
        for r in range(iters):
            logger.info("inference round %d/%d", r + 1, iters)
            for spec, fns in timed.items():
                next(iter(fns.values()))()
                for key, fn in fns.items():
                    start = time.perf_counter()
                    fn()
                    samples[spec][key].append(time.perf_counter() - start)
    return {
        spec: {"first_calls_s": first[spec], **{k: statistics.median(v) for k, v in keys.items()}}
        for spec, keys in samples.items()
    }
