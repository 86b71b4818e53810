"""The CPU recipe of `make quickstart` (configs/shapes/mask_rcnn_CBAM_HRNet_W18_FPN_shapes.yaml)
as a LazyConfig: the same model, data, optimizer and schedule, written over the W18 LazyConfig.

    python lazy_train_net.py --config-file configs/lazy/mask_rcnn_cbam_hrnet_w18_fpn_shapes.py
"""

import detectron2.data.transforms as T
from detectron2.config import LazyCall as L
from detectron2.data import get_detection_dataset_dicts
from detectron2.solver import WarmupParamScheduler
from fvcore.common.param_scheduler import MultiStepParamScheduler

import cbam_hrnet_d2.data  # noqa: F401  (registers shapes_train / shapes_val)
from cbam_hrnet_d2.config import detectron2_config

from .mask_rcnn_cbam_hrnet_w18_fpn import dataloader, model, train

# model: from scratch (nothing frozen), GroupNorm in trunk, FPN and mask head, smaller heads
_bottom_up = model.backbone.bottom_up
_bottom_up.norm = "GN"
_bottom_up.freeze_at = 0
model.backbone.out_channels = 128
model.backbone.norm = "GN"
model.proposal_generator.head.in_channels = 128
model.proposal_generator.anchor_generator.sizes = [[16], [32], [64], [128], [256]]
model.proposal_generator.pre_nms_topk = (500, 300)
model.proposal_generator.post_nms_topk = (200, 100)
model.proposal_generator.batch_size_per_image = 128
_roi = model.roi_heads
_roi.num_classes = 6
_roi.batch_size_per_image = 128
_roi.positive_fraction = 0.25
_roi.box_head.input_shape.channels = 128
_roi.box_head.fc_dims = [256, 256]
_roi.box_predictor.input_shape.channels = 256
_roi.box_predictor.test_topk_per_image = 20
_roi.mask_head.input_shape.channels = 128
_roi.mask_head.conv_dims = [128, 128, 128, 128, 128]
_roi.mask_head.conv_norm = "GN"
_roi.mask_positives_per_image = 12

# data: the shapes set at 128-192 px (the base's RobustDatasetMapper: bad images skipped)
dataloader.train.dataset = L(get_detection_dataset_dicts)(names="shapes_train")
dataloader.train.mapper.augmentations = [
    L(T.ResizeShortestEdge)(short_edge_length=(128,), sample_style="choice", max_size=192),
    L(T.RandomFlip)(horizontal=True),
]
dataloader.train.total_batch_size = 8
dataloader.train.num_workers = 1
dataloader.test.dataset = L(get_detection_dataset_dicts)(names="shapes_val", filter_empty=False)
dataloader.test.mapper.augmentations = [
    L(T.ResizeShortestEdge)(short_edge_length=128, max_size=192)
]
dataloader.test.mapper.image_format = "RGB"
dataloader.test.num_workers = 1
dataloader.evaluator.dataset_name = "shapes_val"
dataloader.evaluator.tasks = ("bbox", "segm")
dataloader.evaluator.output_dir = "${...train.output_dir}/inference/shapes_val"

# AdamW 3e-3, weight decay 1e-4 (none on norms), warm-up 50 iterations, x0.1 at 980 of 1150
optimizer = detectron2_config("common/optim.py").AdamW
optimizer.lr = 0.003
optimizer.weight_decay = 1e-4
train.max_iter = 1150
lr_multiplier = L(WarmupParamScheduler)(
    scheduler=L(MultiStepParamScheduler)(values=[1.0, 0.1], milestones=[980], num_updates=1150),
    warmup_length=50 / 1150,
    warmup_method="linear",
    warmup_factor=0.001,
)
train.init_checkpoint = ""
train.checkpointer = dict(period=400, max_to_keep=100)
train.eval_period = 0
train.seed = 42
train.exact_resume = True  # DATALOADER.EXACT_RESUME of the YAML recipe
train.output_dir = "./output/lazy_shapes"
