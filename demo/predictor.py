"""VisualizationDemo: detectron2's DefaultPredictor + Visualizer, plus CBAM attention pictures from
the same forward pass (the CBAM modules hand out their last maps)."""

import contextlib
import logging
from typing import Dict, Iterator, Optional, Tuple

import cv2
import numpy as np
import torch
from detectron2.config import CfgNode, instantiate
from detectron2.data import MetadataCatalog
from detectron2.data.transforms import ResizeShortestEdge
from detectron2.engine.defaults import DefaultPredictor
from detectron2.utils.video_visualizer import VideoVisualizer
from detectron2.utils.visualizer import ColorMode, VisImage, Visualizer

from cbam_hrnet_d2.checkpoint import SafeCheckpointer
from cbam_hrnet_d2.modeling.cbam import record_attention

logger = logging.getLogger(__name__)


class LazyPredictor(DefaultPredictor):
    """detectron2's DefaultPredictor for a LazyConfig (which it does not take, detectron2#3416): the
    model of ``cfg.model`` with the weights of ``cfg.train.init_checkpoint``, the resize of the test
    mapper and the model's input format. ``DefaultPredictor.__call__`` is used as it is; of its cfg
    it reads MODEL.DEVICE only."""

    def __init__(self, cfg):
        # the model of the YAML door: model.device follows train.device (configs/lazy)
        self.model = instantiate(cfg.model).to(cfg.train.device).eval()
        SafeCheckpointer(self.model).load(cfg.train.init_checkpoint)
        resizes = [
            a
            for a in cfg.dataloader.test.mapper.augmentations
            if getattr(a._target_, "__name__", str(a._target_)).endswith("ResizeShortestEdge")
        ]
        if not resizes:
            raise ValueError(
                "dataloader.test.mapper.augmentations has no ResizeShortestEdge: the demo resizes "
                "images as the test loader does"
            )
        self.aug = instantiate(resizes[0])
        self.input_format = cfg.model.input_format
        self.cfg = CfgNode({"MODEL": {"DEVICE": cfg.train.device}})


def _test_dataset(cfg) -> str:
    if isinstance(cfg, CfgNode):
        return cfg.DATASETS.TEST[0] if len(cfg.DATASETS.TEST) else "__unused"
    names = cfg.dataloader.test.dataset.names
    return names if isinstance(names, str) else names[0]


class VisualizationDemo:
    def __init__(self, cfg, instance_mode=ColorMode.IMAGE, parallel=False):
        """
        Args:
            cfg (CfgNode or DictConfig): a YAML config, or a LazyConfig (``.py``)
            instance_mode (ColorMode):
            parallel (bool): not supported on CPU-only machines; kept for detectron2's signature.
        """
        if parallel:
            raise ValueError("parallel=True is not supported by this demo; run one process per GPU")
        self.metadata = MetadataCatalog.get(_test_dataset(cfg))
        self.cpu_device = torch.device("cpu")
        self.instance_mode = instance_mode
        if isinstance(cfg, CfgNode):
            self.predictor = DefaultPredictor(cfg)
        else:
            self.predictor = LazyPredictor(cfg)
        self.strides = {}
        backbone = self.predictor.model.backbone
        for shapes in (
            backbone.output_shape(),
            getattr(backbone, "bottom_up", backbone).output_shape(),
        ):
            self.strides.update({name: s.stride for name, s in shapes.items()})

    def run_on_image(
        self, image: np.ndarray, attention: bool = False
    ) -> Tuple[dict, VisImage, Optional[Dict[str, Dict[str, np.ndarray]]]]:
        """
        Args:
            image (np.ndarray): (H, W, C) uint8 in BGR order.
            attention (bool): also return the CBAM maps of this forward pass.

        Returns:
            predictions (dict): the output of the model.
            vis_output (VisImage): the visualized image output.
            attention (dict or None): site name -> {"spatial": (H, W) in [0, 1] at image size,
                "channel": (C,) weights}.
        """
        recorder = (
            record_attention(self.predictor.model) if attention else contextlib.nullcontext({})
        )
        with recorder as sites:
            predictions = self.predictor(image)
        maps = self._attention_maps(sites, image.shape[:2]) if attention else None
        rgb = image[:, :, ::-1]
        visualizer = Visualizer(rgb, self.metadata, instance_mode=self.instance_mode)
        instances = predictions["instances"].to(self.cpu_device)
        vis_output = visualizer.draw_instance_predictions(predictions=instances)
        return predictions, vis_output, maps

    def _attention_maps(self, sites, image_hw) -> Dict[str, Dict[str, np.ndarray]]:
        h, w = image_hw
        # size of the resized image inside the padded network input
        rh, rw = ResizeShortestEdge.get_output_shape(
            h, w, self.predictor.aug.short_edge_length[0], self.predictor.aug.max_size
        )
        maps = {}
        for name, module in sites.items():
            att = module.last_attention
            site = name.split(".")[-1]  # hr2..hr5 or p2..p6
            stride = self.strides[site]
            spatial = att["spatial"][0, 0].float().cpu().numpy()
            full = cv2.resize(spatial, (spatial.shape[1] * stride, spatial.shape[0] * stride))
            full = full[:rh, :rw]
            maps[site] = {
                "spatial": cv2.resize(full, (w, h), interpolation=cv2.INTER_LINEAR).clip(0, 1),
                "channel": att["channel"][0, :, 0, 0].float().cpu().numpy(),
            }
        return maps

    def run_on_video(self, video: cv2.VideoCapture) -> Iterator[np.ndarray]:
        """Yield visualized BGR frames of ``video``."""
        video_visualizer = VideoVisualizer(self.metadata, self.instance_mode)
        while video.isOpened():
            ok, frame = video.read()
            if not ok:
                break
            predictions = self.predictor(frame)
            rgb = cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
            vis = video_visualizer.draw_instance_predictions(
                rgb, predictions["instances"].to(self.cpu_device)
            )
            yield cv2.cvtColor(vis.get_image(), cv2.COLOR_RGB2BGR)
