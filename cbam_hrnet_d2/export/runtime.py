"""Run an exported model (``model.ts`` under TorchScript, ``model.onnx`` under ONNX Runtime or
OpenVINO) as a detectron2 model: ``model([{"image", "height", "width"}])`` returns
``[{"instances": Instances}]`` at the original size, masks pasted in fp32 by detectron2's
``detector_postprocess``. The runners run on the CPU (the graph is traced on the CPU; TorchScript
loads it with ``map_location="cpu"``, ONNX Runtime uses its CPU execution provider, OpenVINO its
CPU plugin)."""

import logging
import os
from typing import Dict, List, Sequence

import torch
from detectron2.modeling.postprocessing import detector_postprocess
from detectron2.structures import Boxes, Instances

from cbam_hrnet_d2.device import native_bf16
from cbam_hrnet_d2.export.trace import OUTPUT_NAMES

__all__ = [
    "RUNTIMES",
    "OPENVINO_PRECISIONS",
    "load_exported",
    "TorchScriptModel",
    "OnnxRuntimeModel",
    "OpenVINOModel",
]

logger = logging.getLogger(__name__)

RUNTIMES = ("onnxruntime", "openvino")  # runners of model.onnx
OPENVINO_PRECISIONS = ("auto", "f32", "bf16")  # OpenVINO's INFERENCE_PRECISION_HINT; auto: below


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


class OpenVINOModel(_ExportedModel):
    """``model.onnx`` compiled by OpenVINO for the CPU. ``precision`` is OpenVINO's inference
    precision: "f32", "bf16", or "auto": bf16 where the CPU runs it natively (AVX512-BF16 or AMX,
    as ``TEST.PRECISION auto``), f32 elsewhere. Which one ran is logged."""

    def __init__(self, path: str, precision: str = "auto", threads: int = 0):
        if precision not in OPENVINO_PRECISIONS:
            raise ValueError(
                f"OpenVINO precision {precision!r} is not supported; allowed values: "
                f"{list(OPENVINO_PRECISIONS)}"
            )
        try:
            import openvino as ov
        except ImportError as e:
            raise ImportError(
                "OpenVINO is not installed: pip install -e .[openvino] (make setup does it), or "
                "run model.onnx under ONNX Runtime (--runtime onnxruntime)"
            ) from e
        if precision == "auto":
            precision = "bf16" if native_bf16("cpu") else "f32"
            logger.info(
                "OpenVINO precision auto: %s (%s)",
                precision,
                "this CPU runs bf16 natively" if precision == "bf16" else "no native bf16 here",
            )
        self.precision = precision
        config = {
            "INFERENCE_PRECISION_HINT": precision,
            "INFERENCE_NUM_THREADS": threads or torch.get_num_threads(),
        }
        self.compiled = ov.Core().compile_model(path, "CPU", config)
        self.request = self.compiled.create_infer_request()
        self.outputs = [self.compiled.output(name) for name in OUTPUT_NAMES]

    def run(self, image):
        self.request.infer({0: image.numpy()})
        # copies: the request's output buffers are reused by the next call
        return [torch.from_numpy(self.request.get_tensor(o).data.copy()) for o in self.outputs]


def load_exported(path: str, runtime: str = "onnxruntime", **kwargs) -> _ExportedModel:
    """:class:`TorchScriptModel` for ``*.ts``; for ``*.onnx``, :class:`OnnxRuntimeModel` or
    :class:`OpenVINOModel` (``runtime``); ``kwargs`` go to the runner."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such exported model (tools/export_model.py writes it)")
    if not path.endswith(".onnx"):
        return TorchScriptModel(path)
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime {runtime!r} is not supported; allowed values: {list(RUNTIMES)}")
    if runtime == "openvino":
        return OpenVINOModel(path, **kwargs)
    return OnnxRuntimeModel(path, **kwargs)
