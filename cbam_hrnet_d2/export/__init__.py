"""Deployment: trace to TorchScript / ONNX (:mod:`.trace`) and run the files (:mod:`.runtime`)."""

from cbam_hrnet_d2.export.runtime import OnnxRuntimeModel, TorchScriptModel, load_exported
from cbam_hrnet_d2.export.trace import FORMATS, OUTPUT_NAMES, export, load_sample_image

__all__ = [
    "FORMATS",
    "OUTPUT_NAMES",
    "export",
    "load_sample_image",
    "load_exported",
    "TorchScriptModel",
    "OnnxRuntimeModel",
]
