"""Run an exported model (``model.ts`` under TorchScript, ``model.onnx`` under ONNX Runtime) as a
detectron2 model: ``model([{"image", "height", "width"}])`` returns ``[{"instances": Instances}]``
at the original size, masks pasted in fp32 by detectron2's ``detector_postprocess``. The runners
run on the CPU (the graph is traced on the CPU; TorchScript loads it with ``map_location="cpu"``,
ONNX Runtime uses its CPU execution provider)."""

import os
from typing import Dict, List, Sequence

import torch
from detectron2.modeling.postprocessing import detector_postprocess
from detectron2.structures import Boxes, Instances

from cbam_hrnet_d2.export.trace import OUTPUT_NAMES

__all__ = ["load_exported", "TorchScriptModel", "OnnxRuntimeModel"]


class _ExportedModel:
    """A detectron2-style callable over an exported file: ``model([{"image", "height", "width"}])``
    returns ``[{"instances": Instances}]`` at the original size, masks pasted."""

    def run(self, image: torch.Tensor) -> Sequence[torch.Tensor]:
        raise NotImplementedError

    def __call__(self, inputs: List[Dict]) -> List[Dict]:
        outputs = []
        for item in inputs:
            boxes, classes, masks, scores, size = self.run(item["image"].float())
            inst = Instances(tuple(int(s) for s in size))
            inst.pred_boxes, inst.pred_classes = Boxes(boxes), classes.long()
            inst.pred_masks, inst.scores = masks, scores
            h, w = item.get("height", inst.image_size[0]), item.get("width", inst.image_size[1])
            outputs.append({"instances": detector_postprocess(inst, h, w)})
        return outputs


class TorchScriptModel(_ExportedModel):
    def __init__(self, path: str):
        self.module = torch.jit.load(path, map_location="cpu").eval()

    def run(self, image):
        with torch.no_grad():
            return self.module(image)


class OnnxRuntimeModel(_ExportedModel):
    def __init__(self, path: str, threads: int = 0):
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise ImportError(
                "ONNX Runtime is not installed: pip install -e .[deploy] (make setup does it)"
            ) from e
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])

    def run(self, image):
        outputs = self.session.run(OUTPUT_NAMES, {"image": image.numpy()})
        return [torch.from_numpy(o) for o in outputs]


def load_exported(path: str) -> _ExportedModel:
    """:class:`TorchScriptModel` for ``*.ts``, :class:`OnnxRuntimeModel` for ``*.onnx``."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such exported model (tools/export_model.py writes it)")
    if path.endswith(".onnx"):
        return OnnxRuntimeModel(path)
    return TorchScriptModel(path)
