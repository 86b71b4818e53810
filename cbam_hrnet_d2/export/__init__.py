"""Deployment: trace to TorchScript / ONNX (:mod:`.trace`) and run the files (:mod:`.runtime`:
TorchScript, ONNX Runtime, OpenVINO)."""

from cbam_hrnet_d2.export.runtime import (
    OPENVINO_PRECISIONS,
    RUNTIMES,
    OnnxRuntimeModel,
    OpenVINOModel,
    TorchScriptModel,
    load_exported,
)
from cbam_hrnet_d2.export.trace import FORMATS, OUTPUT_NAMES, export, load_sample_image

__all__ = [
    "FORMATS",
    "OUTPUT_NAMES",
    "RUNTIMES",
    "OPENVINO_PRECISIONS",
    "export",
    "load_sample_image",
    "load_exported",
    "TorchScriptModel",
    "OnnxRuntimeModel",
    "OpenVINOModel",
]
