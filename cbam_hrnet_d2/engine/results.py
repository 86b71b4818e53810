"""Result files of an evaluation: ``results.json`` and ``ap_tables.md`` in ``OUTPUT_DIR``."""

import json
import logging
import os
from typing import Dict

from tabulate import tabulate

from cbam_hrnet_d2.utils.files import atomic_write_text

__all__ = ["write_results"]

logger = logging.getLogger(__name__)


def write_results(results: Dict[str, Dict[str, Dict[str, float]]], output_dir: str) -> None:
    """Write ``results.json`` and ``ap_tables.md`` (one table per dataset and task) atomically."""
    os.makedirs(output_dir, exist_ok=True)
    lines = []
    for dataset, tasks in results.items():
        for task, metrics in tasks.items():
            lines.append(f"### {dataset} — {task}\n")
            lines.append(tabulate([metrics], headers="keys", tablefmt="pipe", floatfmt=".2f"))
            lines.append("")
    for name, text in (
        ("results.json", json.dumps(results, indent=2)),
        ("ap_tables.md", "\n".join(lines) + "\n"),
    ):
        atomic_write_text(os.path.join(output_dir, name), text)
    logger.info("AP tables written to %s", os.path.join(output_dir, "ap_tables.md"))
