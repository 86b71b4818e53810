"""Mask R-CNN with CBAM-HRNet-W18 + FPN as a LazyConfig: the model of
configs/mask_rcnn_CBAM_HRNet_W18_FPN_1x.yaml (same parameters and state_dict keys), on detectron2's
common/ pieces (model, COCO data, 1x schedule, SGD, train settings).

    python lazy_train_net.py --config-file configs/lazy/mask_rcnn_cbam_hrnet_w18_fpn.py --num-gpus 8

The model is the YAML configs' model, whichever door builds it: detectron2's ``GeneralizedRCNN``
with our backbone, RPN and RoI heads, whose CPU speed-ups are decided per call from the device of
their inputs, so ``instantiate(cfg.model).to(cfg.train.device)`` runs what that device should.
detectron2's common/ configs are read from the installed package (``detectron2_config``), not
through ``model_zoo.get_config``, which needs ``pkg_resources``.
"""

from detectron2.config import LazyCall as L
from detectron2.modeling.backbone.fpn import LastLevelMaxPool

from cbam_hrnet_d2.config import detectron2_config
from cbam_hrnet_d2.data.build import RobustDatasetMapper
from cbam_hrnet_d2.modeling.backbone import CBAMHRNet, hrnet_fpn
from cbam_hrnet_d2.modeling.heads import CPUFastROIHeads, CPUFastRPN
from cbam_hrnet_d2.modeling.hrnet import HRNET_FEATURES

model = detectron2_config("common/models/mask_rcnn_fpn.py").model
dataloader = detectron2_config("common/data/coco.py").dataloader
lr_multiplier = detectron2_config("common/coco_schedule.py").lr_multiplier_1x
optimizer = detectron2_config("common/optim.py").SGD
train = detectron2_config("common/train.py").train

# detectron2's GeneralizedRCNN (common/models) as it is; the RPN and RoI heads with the head-scoped
# CPU speed-ups, decided per call (MODEL.CBAM_HRNET.CPU of the YAML configs, all on)
model.proposal_generator._target_ = CPUFastRPN
model.proposal_generator.bf16_heads = True
model.proposal_generator.precision = "${..backbone.precision}"  # TEST.PRECISION, as the YAML
model.roi_heads._target_ = CPUFastROIHeads
model.roi_heads.sparse_roi_align = True
model.roi_heads.bf16_heads = True
model.roi_heads.precision = "${..backbone.precision}"

# The backbone: the CBAM-HRNet trunk (the arguments the YAML builder passes for the 1x config)
# under detectron2's FPN with LastLevelMaxPool.
model.backbone = L(hrnet_fpn)(
    bottom_up=L(CBAMHRNet)(
        width=18,
        in_channels=3,
        norm="FrozenBN",
        cbam_branches=list(HRNET_FEATURES),
        cbam_reduction=16,
        cbam_kernel_size=7,
        freeze_at=2,
        cpu_channels_last=True,  # the backbone's CPU speed-ups, per call (MODEL.CBAM_HRNET.CPU)
    ),
    cbam_on_outputs=False,
    in_features=list(HRNET_FEATURES),
    out_channels=256,
    norm="",
    top_block=L(LastLevelMaxPool)(),
    fuse_type="sum",
    precision="auto",  # TEST.PRECISION of the YAML configs (cbam_hrnet_d2/modeling/precision.py)
)
# timm's ImageNet statistics, RGB (as the YAML base)
model.pixel_mean = [123.675, 116.28, 103.53]
model.pixel_std = [58.395, 57.12, 57.375]
model.input_format = "RGB"
dataloader.train.mapper.image_format = "RGB"
# the mapper of train_net.py: a bad image is skipped in training (named in bad_images.tsv and
# counted in metrics.json) and stops evaluation naming its file
dataloader.train.mapper._target_ = RobustDatasetMapper
dataloader.train.mapper.dataset_names = "${..dataset.names}"
dataloader.train.mapper.skip_bad_images = True
dataloader.train.mapper.bad_images_file = "${....train.output_dir}/bad_images.tsv"
dataloader.test.mapper._target_ = RobustDatasetMapper
dataloader.test.mapper.dataset_names = "${..dataset.names}"

# ImageNet weights made by `tools/convert_hrnet_weights.py` (docs/weights.md)
train.init_checkpoint = "weights/hrnet_w18_in1k_d2.safetensors"
train.device = "cuda"  # lazy_train_net.py sets "cpu" where there is no CUDA
