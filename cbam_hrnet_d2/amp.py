"""``SOLVER.AMP.ENABLED`` on the CPU: bfloat16 mixed-precision training.

detectron2's ``AMPTrainer`` runs CUDA autocast with a float16 grad scaler and stops on a machine
without CUDA. :class:`CPUAMPTrainer` runs each step under ``torch.autocast("cpu", bfloat16)``:
convolutions and matrix products in bf16, losses, norms and softmax in fp32 (autocast's CPU op
lists); bf16 has fp32's exponent range, so gradients need no scaling. On a CPU without native bf16
the step is far slower than fp32: both trainers' builders warn (:func:`warn_if_emulated_bf16`).
"""

import torch
from detectron2.engine import AMPTrainer, SimpleTrainer

from .precision import warn_if_emulated_bf16

__all__ = ["CPUAMPTrainer", "cpu_amp_trainer", "trainer_class"]


class CPUAMPTrainer(SimpleTrainer):
    """detectron2's :class:`SimpleTrainer` with every step under bf16 autocast on the CPU."""

    def run_step(self):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            super().run_step()


def cpu_amp_trainer(cfg, trainer: SimpleTrainer) -> SimpleTrainer:
    """``trainer`` (the one ``DefaultTrainer`` built) as a :class:`CPUAMPTrainer` when
    ``SOLVER.AMP.ENABLED`` and the model is on the CPU; else ``trainer`` itself."""
    if not cfg.SOLVER.AMP.ENABLED or cfg.MODEL.DEVICE != "cpu":
        return trainer
    warn_if_emulated_bf16("SOLVER.AMP.ENABLED = True", cfg.MODEL.DEVICE)
    return CPUAMPTrainer(
        trainer.model,
        trainer.data_loader,
        trainer.optimizer,
        gather_metric_period=trainer.gather_metric_period,
        zero_grad_before_forward=trainer.zero_grad_before_forward,
        async_write_metrics=trainer.async_write_metrics,
    )


def trainer_class(amp_enabled: bool, device) -> type:
    """The trainer for a LazyConfig's ``train.amp.enabled`` and ``train.device``:
    :class:`CPUAMPTrainer` with AMP on the CPU, detectron2's ``AMPTrainer`` with AMP elsewhere,
    ``SimpleTrainer`` without AMP."""
    if not amp_enabled:
        return SimpleTrainer
    if torch.device(device).type != "cpu":
        return AMPTrainer
    warn_if_emulated_bf16("train.amp.enabled = True", device)
    return CPUAMPTrainer
