"""Optimizer choice (``SOLVER.OPTIMIZER``): detectron2's SGD, or AdamW with the same parameter
groups."""

import torch
from detectron2.solver import build_optimizer as build_sgd_optimizer
from detectron2.solver.build import get_default_optimizer_params, maybe_add_gradient_clipping

__all__ = ["build_optimizer", "OPTIMIZERS"]

OPTIMIZERS = ("SGD", "AdamW")


def build_optimizer(cfg, model: torch.nn.Module) -> torch.optim.Optimizer:
    """detectron2's SGD, or AdamW with the same parameter groups (SOLVER.OPTIMIZER)."""
    name = cfg.SOLVER.OPTIMIZER
    if name == "SGD":
        return build_sgd_optimizer(cfg, model)
    if name != "AdamW":
        raise ValueError(
            f"SOLVER.OPTIMIZER = {name!r} is not supported; allowed values: {list(OPTIMIZERS)}"
        )
    params = get_default_optimizer_params(
        model,
        base_lr=cfg.SOLVER.BASE_LR,
        weight_decay_norm=cfg.SOLVER.WEIGHT_DECAY_NORM,
        bias_lr_factor=cfg.SOLVER.BIAS_LR_FACTOR,
        weight_decay_bias=cfg.SOLVER.WEIGHT_DECAY_BIAS,
    )
    adamw = torch.optim.AdamW(params, lr=cfg.SOLVER.BASE_LR, weight_decay=cfg.SOLVER.WEIGHT_DECAY)
    return maybe_add_gradient_clipping(cfg, adamw)
