"""Mixed-precision training (``SOLVER.AMP.ENABLED``, ``SOLVER.AMP.PRECISION``) on either device.

* **CUDA:** detectron2's ``AMPTrainer`` (autocast + grad scaler) in ``SOLVER.AMP.PRECISION``
  ("auto" = fp16 with the scaler, as detectron2; bf16 has fp32's exponent range and runs without
  one), as
  :class:`ResumableAMPTrainer`: resuming a checkpoint written without AMP, or by bf16 AMP (an
  empty scaler state), starts a fresh scaler with a warning instead of detectron2's error.
* **CPU:** :class:`CPUAMPTrainer`, every step under ``torch.autocast("cpu", bfloat16)``
  (detectron2's ``AMPTrainer`` stops without CUDA). On a CPU without native bf16 the step is far
  slower than fp32: the builders warn (:func:`~cbam_hrnet_d2.device.warn_if_emulated_bf16`).
"""

import logging

import torch
from detectron2.engine import AMPTrainer, SimpleTrainer
from torch.amp import GradScaler

from cbam_hrnet_d2.device import amp_dtype, is_cpu, warn_if_emulated_bf16

__all__ = [
    "CPUAMPTrainer",
    "ResumableAMPTrainer",
    "build_step_trainer",
    "trainer_class",
]

logger = logging.getLogger(__name__)


class CPUAMPTrainer(SimpleTrainer):
    """detectron2's :class:`SimpleTrainer` with every step under bf16 autocast on the CPU."""

    def run_step(self):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            super().run_step()


class ResumableAMPTrainer(AMPTrainer):
    """detectron2's :class:`AMPTrainer` that also resumes checkpoints written without AMP (no
    ``grad_scaler`` entry) or with a disabled scaler (bf16 AMP saves an empty scaler state, which
    ``GradScaler.load_state_dict`` rejects): the scaler then starts afresh, with a warning."""

    def load_state_dict(self, state_dict):
        if not state_dict.get("grad_scaler"):
            why = "no grad_scaler state" if "grad_scaler" not in state_dict else "an empty one"
            logger.warning(
                "The checkpoint was written without SOLVER.AMP or with bf16 AMP (%s): the grad "
                "scaler starts afresh",
                why,
            )
            SimpleTrainer.load_state_dict(self, state_dict)
            return
        if not self.grad_scaler.is_enabled():
            # an fp16 checkpoint resumed in bf16: this run needs no scaler, and has none to load
            SimpleTrainer.load_state_dict(self, state_dict)
            return
        super().load_state_dict(state_dict)


def trainer_class(amp_enabled: bool, device, precision: str = "auto"):
    """A callable ``(model, data_loader, optimizer, **kwargs) -> trainer`` for ``device``:
    ``SimpleTrainer`` without AMP; with AMP :class:`CPUAMPTrainer` on the CPU,
    :class:`ResumableAMPTrainer` in ``precision`` elsewhere. Used by ``lazy_train_net.py``
    (``train.amp.enabled``, ``train.amp.precision``) and :func:`build_step_trainer`."""
    if not amp_enabled:
        return SimpleTrainer
    dtype = amp_dtype(precision, device)
    if is_cpu(device):
        warn_if_emulated_bf16("AMP training (SOLVER.AMP.ENABLED / train.amp.enabled)", device)
        return CPUAMPTrainer

    def build(model, data_loader, optimizer, **kwargs):
        # bf16 keeps fp32's exponent range: no loss scaling needed
        scaler = GradScaler("cuda", enabled=dtype == torch.float16)
        return ResumableAMPTrainer(
            model, data_loader, optimizer, grad_scaler=scaler, precision=dtype, **kwargs
        )

    return build


def build_step_trainer(cfg, model, data_loader, optimizer) -> SimpleTrainer:
    """The step trainer of a YAML config: :func:`trainer_class` of ``SOLVER.AMP`` on
    ``MODEL.DEVICE`` (see the module doc), built on ``model``, ``data_loader``, ``optimizer``."""
    build = trainer_class(cfg.SOLVER.AMP.ENABLED, cfg.MODEL.DEVICE, cfg.SOLVER.AMP.PRECISION)
    return build(model, data_loader, optimizer)
