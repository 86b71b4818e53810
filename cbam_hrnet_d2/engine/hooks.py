"""Training hooks that put what a long run needs to know into metrics.json: resident memory
(:class:`MemoryMonitor`) and the number of images skipped as unusable (:class:`BadImageCounter`)."""

import logging
import os
from typing import Dict

from detectron2.engine import HookBase

from cbam_hrnet_d2.data.build import BAD_IMAGES_FILE
from cbam_hrnet_d2.utils.memory import rss_mib

__all__ = ["MemoryMonitor", "BadImageCounter"]

logger = logging.getLogger(__name__)


class MemoryMonitor(HookBase):
    """Every ``period`` iterations put the RSS of the trainer (and with its data-loader workers)
    into the event storage (metrics.json); log it at the start and end of training, with the
    peak."""

    def __init__(self, period: int = 20):
        self._period = period
        self._first = None
        self._peak = {}

    def _sample(self) -> Dict[str, float]:
        now = rss_mib()
        for k, v in now.items():
            self._peak[k] = max(self._peak.get(k, 0.0), v)
        return now

    def after_step(self):
        it = self.trainer.iter
        if (
            it == self.trainer.start_iter
            or (it + 1) % self._period == 0
            or it == self.trainer.max_iter - 1
        ):
            now = self._sample()
            if self._first is None:
                self._first = now
                logger.info("RSS after the first iteration: %s", _fmt(now))
            for k, v in now.items():
                self.trainer.storage.put_scalar(k, v, smoothing_hint=False)

    def after_train(self):
        if self._first is not None:
            logger.info(
                "RSS at the end: %s; peak seen: %s; after the first iteration: %s",
                _fmt(self._sample()),
                _fmt(self._peak),
                _fmt(self._first),
            )


class BadImageCounter(HookBase):
    """Puts the number of distinct images skipped so far (``OUTPUT_DIR/bad_images.tsv``) into the
    event storage every ``period`` iterations, as ``data/bad_images``."""

    def __init__(self, output_dir: str, period: int = 20):
        self._file = os.path.join(output_dir, BAD_IMAGES_FILE)
        self._period = period

    def count(self) -> int:
        try:
            with open(self._file) as f:
                return len({tuple(line.split("\t")[:2]) for line in f if line.strip()})
        except FileNotFoundError:
            return 0

    def after_step(self):
        it = self.trainer.iter
        if (it + 1) % self._period == 0 or it == self.trainer.max_iter - 1:
            self.trainer.storage.put_scalar("data/bad_images", self.count(), smoothing_hint=False)

    def after_train(self):
        n = self.count()
        if n:
            logger.warning(
                "%d image(s) were skipped as unusable; they are listed in %s", n, self._file
            )


def _fmt(sample: Dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.0f}" for k, v in sample.items())
