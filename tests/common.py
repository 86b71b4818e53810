"""Shared helpers of the test suite."""

import glob
import importlib.util
import os
import unittest

import torch

from cbam_hrnet_d2.config import load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, "configs")
DEFAULT_CONFIG = os.path.join(CONFIGS, "mask_rcnn_CBAM_HRNet_W18_FPN_1x.yaml")
SHAPES_CONFIG = os.path.join(CONFIGS, "shapes", "mask_rcnn_CBAM_HRNet_W18_FPN_shapes.yaml")

# CUDA tests: skipped with this reason where there is no GPU (detectron2's own tests do the same),
# run by `pytest -m cuda` and tools/gpu_check.sh where one is
requires_cuda = unittest.skipIf(not torch.cuda.is_available(), "CUDA not available")


def collect_config_files():
    """Every runnable YAML under configs/ (Base-* are not runnable)."""
    files = glob.glob(os.path.join(CONFIGS, "**", "*.yaml"), recursive=True)
    return sorted(f for f in files if not os.path.basename(f).startswith("Base-"))


def get_config(config_file=DEFAULT_CONFIG, opts=(), device="cpu"):
    """An unfrozen cfg from ``config_file`` with ``opts`` merged, on ``device`` (CPU tests pin the
    CPU, also on a machine with CUDA)."""
    cfg = load_config(config_file, opts)
    cfg.MODEL.DEVICE = device
    return cfg


def load_tool(name):
    """``tools/<name>.py`` as a module: a script, as in detectron2's tools/ (the sal-detectron2
    wheel owns the package name ``tools``)."""
    return load_script(os.path.join("tools", f"{name}.py"))


def load_script(relpath):
    """The script at ``relpath`` (from the repository root) as a module, without running main."""
    name = os.path.splitext(relpath)[0].replace(os.sep, "_")
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, relpath))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
