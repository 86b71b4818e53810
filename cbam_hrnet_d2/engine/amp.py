"""Mixed-precision training (``SOLVER.AMP.ENABLED``, ``SOLVER.AMP.PRECISION``) on either device.

* **CUDA:** detectron2's ``AMPTrainer`` (autocast + grad scaler) in ``SOLVER.AMP.PRECISION``
  ("auto" = fp16 with the scaler, as detectron2; bf16 has fp32's exponent range and runs without
  one), as
  :class:`ResumableAMPTrainer`: resuming a checkpoint written without AMP (no ``grad_scaler``
  entry) starts a fresh scaler with a warning instead of detectron2's KeyError.
* **CPU:** :class:`CPUAMPTrainer`, every step under ``torch.autocast("cpu", bfloat16)``
  (detectron2's ``AMPTrainer`` stops without CUDA). On a CPU without native bf16 the step is far
  slower than fp32: the builders warn (:func:`~cbam_hrnet_d2.modeling.precision.
  warn_if_emulated_bf16`).
"""

import logging

import torch
from detectron2.engine import AMPTrainer, SimpleTrainer
from torch.amp import GradScaler

from cbam_hrnet_d2.modeling.precision import warn_if_emulated_bf16

__all__ = [
    "AMP_PRECISIONS",
    "CPUAMPTrainer",
    "ResumableAMPTrainer",
    "amp_trainer",
    "trainer_class",
]

logger = logging.getLogger(__name__)

AMP_PRECISIONS = {"fp16": torch.float16, "bf16": torch.bfloat16}


class CPUAMPTrainer(SimpleTrainer):
    """detectron2's :class:`SimpleTrainer` with every step under bf16 autocast on the CPU."""

    def run_step(self):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            super().run_step()


class ResumableAMPTrainer(AMPTrainer):
    """detectron2's :class:`AMPTrainer` that also resumes checkpoints written without AMP."""

    def load_state_dict(self, state_dict):
        if "grad_scaler" not in state_dict:
            logger.warning(
                "The checkpoint was written without SOLVER.AMP (no grad_scaler state): the grad "
                "scaler starts afresh"
            )
            SimpleTrainer.load_state_dict(self, state_dict)
            return
        super().load_state_dict(state_dict)


def _check(precision: str, device: str) -> torch.dtype:
    if precision not in ("auto", *AMP_PRECISIONS):
        raise ValueError(
            f"SOLVER.AMP.PRECISION = {precision!r} is not supported; allowed values: "
            f"{['auto', *AMP_PRECISIONS]}"
        )
    on_cpu = torch.device(device).type == "cpu"
    if precision == "auto":
        precision = "bf16" if on_cpu else "fp16"
    if on_cpu and precision != "bf16":
        raise ValueError(
            "SOLVER.AMP.PRECISION = 'fp16' needs CUDA (MODEL.DEVICE is 'cpu'); AMP on the CPU "
            "runs bf16: set SOLVER.AMP.PRECISION bf16"
        )
    return AMP_PRECISIONS[precision]


def trainer_class(amp_enabled: bool, device, precision: str = "auto"):
    """A callable ``(model, data_loader, optimizer, **kwargs) -> trainer`` for ``device``:
    ``SimpleTrainer`` without AMP; with AMP :class:`CPUAMPTrainer` on the CPU,
    :class:`ResumableAMPTrainer` in ``precision`` elsewhere. Used by ``lazy_train_net.py``
    (``train.amp.enabled``, ``train.amp.precision``) and :func:`amp_trainer`."""
    if not amp_enabled:
        return SimpleTrainer
    dtype = _check(precision, str(device))
    if torch.device(device).type == "cpu":
        warn_if_emulated_bf16("AMP training (SOLVER.AMP.ENABLED / train.amp.enabled)", device)
        return CPUAMPTrainer

    def build(model, data_loader, optimizer, **kwargs):
        # bf16 keeps fp32's exponent range: no loss scaling needed
        scaler = GradScaler("cuda", enabled=dtype == torch.float16)
        return ResumableAMPTrainer(
            model, data_loader, optimizer, grad_scaler=scaler, precision=dtype, **kwargs
        )

    return build


def amp_trainer(cfg, trainer: SimpleTrainer) -> SimpleTrainer:
    """The trainer ``DefaultTrainer`` built, rebuilt for ``SOLVER.AMP`` on ``MODEL.DEVICE`` (see the
    module doc); ``trainer`` itself without AMP."""
    if not cfg.SOLVER.AMP.ENABLED:
        return trainer
    build = trainer_class(True, cfg.MODEL.DEVICE, cfg.SOLVER.AMP.PRECISION)
    return build(
        trainer.model,
        trainer.data_loader,
        trainer.optimizer,
        gather_metric_period=trainer.gather_metric_period,
        zero_grad_before_forward=trainer.zero_grad_before_forward,
        async_write_metrics=trainer.async_write_metrics,
    )
