"""The meta-architecture of this project's configs (``MODEL.META_ARCHITECTURE
"GeneralizedRCNNWithCPULayer"``): detectron2's ``GeneralizedRCNN`` that decides at build time,
from its config, whether it takes the CPU speed layer (:mod:`cbam_hrnet_d2.cpu`). Registered in
``META_ARCH_REGISTRY``, so every door of detectron2 builds the same model: ``build_model(cfg)``,
``DefaultPredictor(cfg)``, a ``DefaultTrainer`` subclass, and a LazyConfig's
``instantiate(cfg.model)`` (whose ``model.device`` follows ``train.device``, configs/lazy)."""

import logging
from typing import Dict, Optional

from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, GeneralizedRCNN

from cbam_hrnet_d2 import cpu
from cbam_hrnet_d2.device import is_cpu

__all__ = ["GeneralizedRCNNWithCPULayer"]

logger = logging.getLogger(__name__)


@META_ARCH_REGISTRY.register()
class GeneralizedRCNNWithCPULayer(GeneralizedRCNN):
    """detectron2's :class:`GeneralizedRCNN`; where ``device`` is the CPU it applies the CPU speed
    layer (:func:`~cbam_hrnet_d2.cpu.cpu_speedups`) with ``cpu_speedups`` as its switches. Same
    parameters and state_dict keys as ``GeneralizedRCNN``; on any other device it is that model.

    Attributes:
        cpu_layer (dict[str, bool]): the switches applied; empty where the layer was not.
    """

    @configurable
    def __init__(
        self,
        *,
        device: Optional[str] = None,
        cpu_speedups: Optional[Dict[str, bool]] = None,
        **kwargs,
    ):
        """
        Args:
            device (str or None): where the model will run (``MODEL.DEVICE``, a LazyConfig's
                ``train.device``); None = not said: no CPU layer.
            cpu_speedups (dict): switches of :func:`~cbam_hrnet_d2.cpu.cpu_speedups` (keys of
                :data:`~cbam_hrnet_d2.cpu.CPU_SPEEDUPS`), all on where absent.
            kwargs: arguments of :class:`GeneralizedRCNN`.
        """
        super().__init__(**kwargs)
        switches = dict(cpu_speedups or {})
        unknown = sorted(set(switches) - set(cpu.CPU_SPEEDUPS))
        if unknown:
            raise ValueError(
                f"cpu_speedups has unknown switches {unknown}; allowed: {list(cpu.CPU_SPEEDUPS)} "
                "(MODEL.CPU.* in a YAML config, model.cpu_speedups in a LazyConfig)"
            )
        self.cpu_layer: Dict[str, bool] = {}
        if device is not None and is_cpu(device):
            self.cpu_layer = {name: bool(switches.get(name, True)) for name in cpu.CPU_SPEEDUPS}
            logger.info("CPU speed layer: %s", self.cpu_layer)
            cpu.cpu_speedups(self, **self.cpu_layer)

    @classmethod
    def from_config(cls, cfg):
        ret = super().from_config(cfg)
        ret["device"] = cfg.MODEL.DEVICE
        ret["cpu_speedups"] = {name: cfg.MODEL.CPU[name.upper()] for name in cpu.CPU_SPEEDUPS}
        return ret
