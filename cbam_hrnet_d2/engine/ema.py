"""An exponential moving average of the model's weights (``CBAM_HRNET.EMA.ENABLED``,
``CBAM_HRNET.EMA.DECAY``), as a hook in the style of detectron2's: detectron2 has none (the keys
are d2go's ``MODEL_EMA`` ones, in a node of our own so that both can live in one config).

Every ``CBAM_HRNET.EMA.PERIOD`` steps (and after the last) the average moves towards the weights:
``ema = d**k * ema + (1 - d**k) * w`` over the ``k`` steps since the last update, with
``d = min(DECAY, (1 + n) / (10 + n))`` after ``n`` steps (the usual warm-up, so the first steps'
random weights do not linger); a period of 1 is the textbook per-step average. An update reads and
writes every weight, one small tensor at a time: about 0.1-0.2 s for the shapes model on 2 cores
(docs/training.md), which a period of 10 brings to about 1.5% of a step. Float parameters and
buffers are averaged; integer buffers are taken as they are.

* **Evaluated:** every evaluation during training runs the averaged weights (the raw ones are put
  back after it).
* **Saved:** after the last iteration the averaged weights replace the raw ones in the model, so
  ``model_final.pth`` and the final evaluation hold them, and everything downstream
  (``--eval-only``, the demo, export) uses them without a flag.
* **Resumed:** the average, its update count and, after the last iteration, the raw weights are the
  hook's ``state_dict``, which detectron2 keeps in every checkpoint (``trainer.hooks.ModelEMA``): a
  resumed run continues the same average, exactly (docs/training.md).
"""

import contextlib
import logging
from typing import Callable, Dict, Iterator, Optional

import torch
from detectron2.engine import HookBase
from torch import nn

__all__ = ["ModelEMA"]

logger = logging.getLogger(__name__)


def _unwrapped(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


class ModelEMA(HookBase):
    """See the module doc. Register it after the LR scheduler and before the checkpointer and the
    evaluation; wrap the evaluation function with :meth:`evaluating`."""

    def __init__(self, decay: float, period: int = 1):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"CBAM_HRNET.EMA.DECAY = {decay!r} must lie in (0, 1), e.g. 0.999")
        if not isinstance(period, int) or period < 1:
            raise ValueError(f"CBAM_HRNET.EMA.PERIOD = {period!r} must be an integer >= 1, e.g. 10")
        self.decay = decay
        self.period = period
        self.updates = 0  # steps seen
        self._since = 0  # steps since the average last moved
        self.shadow: Dict[str, torch.Tensor] = {}
        # the raw weights while the averaged ones sit in the model (after the last iteration)
        self.raw: Optional[Dict[str, torch.Tensor]] = None

    def _weights(self) -> Dict[str, torch.Tensor]:
        """The model's float parameters and buffers, by state_dict name (tensors of the model)."""
        state = _unwrapped(self.trainer.model).state_dict(keep_vars=True)
        return {k: v for k, v in state.items() if v.dtype.is_floating_point}

    def _load(self, weights: Dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name, tensor in self._weights().items():
                tensor.copy_(weights[name])

    def before_train(self):
        if self.raw is not None:  # resumed from a checkpoint written after the last iteration
            self._load(self.raw)
            self.raw = None
        if not self.shadow:
            self.shadow = {k: v.detach().clone() for k, v in self._weights().items()}

    def after_step(self):
        self.updates += 1
        self._since += 1
        last = self.trainer.iter == self.trainer.max_iter - 1
        if self._since < self.period and not last:
            return
        d = min(self.decay, (1 + self.updates) / (10 + self.updates)) ** self._since
        self._since = 0
        with torch.no_grad():
            for name, tensor in self._weights().items():
                self.shadow[name].lerp_(tensor.detach(), 1.0 - d)
        if last:
            # the final checkpoint and evaluation hold the averaged weights
            self.raw = {k: v.detach().clone() for k, v in self._weights().items()}
            self._load(self.shadow)
            logger.info(
                "CBAM_HRNET.EMA: the model now holds the weights averaged over %d steps (decay %g)",
                self.updates,
                self.decay,
            )

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """Within the block the model holds the averaged weights; the raw ones after it."""
        if self.raw is not None or not self.shadow:  # already in (after the last step), or none
            yield
            return
        raw = {k: v.detach().clone() for k, v in self._weights().items()}
        self._load(self.shadow)
        try:
            yield
        finally:
            self._load(raw)

    def evaluating(self, eval_function: Callable[[], dict]) -> Callable[[], dict]:
        """``eval_function`` run on the averaged weights."""

        def run():
            with self.applied():
                return eval_function()

        return run

    def state_dict(self):
        state = {
            "decay": self.decay,
            "updates": self.updates,
            "since": self._since,
            "shadow": self.shadow,
        }
        if self.raw is not None:
            state["raw"] = self.raw
        return state

    def load_state_dict(self, state_dict):
        self.updates = int(state_dict["updates"])
        self._since = int(state_dict.get("since", 0))
        self.shadow = {k: v.clone() for k, v in state_dict["shadow"].items()}
        self.raw = state_dict.get("raw")
