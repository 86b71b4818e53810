#!/usr/bin/env python
"""Time the model on a CUDA GPU next to detectron2's R50-FPN, with and without each option that
the CPU speed layer or a key offers (part of tools/gpu_check.sh):

    python tools/gpu_timing.py --out output/gpu_check

Per row: eval seconds per image of the whole Mask R-CNN with fixed work (tools/benchmark.py's
FixedWork: 1000 boxes through the box head, 100 through the mask head) at 800x1216, batch 1, and
training seconds per iteration at batch 2 with the RPN's proposals fixed (FixedProposals), each the
median after warm-up calls with the GPU synchronised around every call; peak GPU memory of
training. Random-init weights with calibrated norm statistics, as the CPU benchmark. Writes
gpu_timing.md and gpu_timing.json after every row.
"""

import argparse
import json
import logging
import os
import statistics
import time

import torch
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage
from detectron2.utils.logger import setup_logger
from tabulate import tabulate

from cbam_hrnet_d2.benchmark import REFERENCE, FixedProposals, FixedWork, load_cfg
from cbam_hrnet_d2.cpu import CPU_SPEEDUPS, cpu_speedups
from cbam_hrnet_d2.device import AMP_PRECISIONS
from cbam_hrnet_d2.testing import calibrate_norm_statistics, synthetic_batch
from cbam_hrnet_d2.utils.files import atomic_write_text

logger = logging.getLogger("cbam_hrnet_d2.gpu_timing")

OURS = "configs/mask_rcnn_CBAM_HRNet_W18_FPN_1x.yaml"
# row name -> (config, overrides, CPU-layer switches applied on the GPU, train AMP precision)
ROWS = {
    "R50-FPN (detectron2, as shipped)": (REFERENCE, [], {}, None),
    "CBAM-HRNet-W18 (default on CUDA)": (OURS, [], {}, None),
    "+ channels-last": (OURS, [], {"channels_last": True}, None),
    "+ activation checkpointing (train)": (
        OURS,
        ["MODEL.CBAM_HRNET.ACTIVATION_CHECKPOINTING", "True"],
        {},
        None,
    ),
    # TEST.PRECISION runs backbone + FPN in it; the heads stay fp32 (BF16_HEADS is a CPU switch)
    "TEST.PRECISION bf16 (backbone+FPN) / SOLVER.AMP bf16": (
        OURS,
        ["TEST.PRECISION", "bf16"],
        {},
        "bf16",
    ),
    "TEST.PRECISION fp16 (backbone+FPN) / SOLVER.AMP fp16": (
        OURS,
        ["TEST.PRECISION", "fp16"],
        {},
        "fp16",
    ),
}


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _median_seconds(fn, warmup: int, iters: int, device: str = "cuda") -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def build(config, opts, speedups, device="cuda", size=(800, 1216)):
    torch.manual_seed(0)
    cfg = load_cfg(config, opts)
    cfg.MODEL.DEVICE = device
    model = build_model(cfg)
    calibrate_norm_statistics(model.backbone, torch.rand(1, 3, *size).to(device) * 2 - 1)
    # the CPU speed-ups act on CPU tensors only; a row may put the conv weights channels-last
    all_off = dict.fromkeys(CPU_SPEEDUPS, False)
    return cfg, cpu_speedups(model, **{**all_off, **speedups})


def time_eval(config, opts, speedups, h, w, iters, device="cuda", warmup=3) -> float:
    cfg, model = build(config, opts, speedups, device, (h, w))
    model.eval()
    x = model.preprocess_image([{"image": torch.rand(3, h, w) * 255}]).tensor
    whole = FixedWork(model, h, w)
    with torch.inference_mode():
        return _median_seconds(lambda: whole(x), warmup, iters, device)


def time_train(config, opts, speedups, amp, h, w, iters, device="cuda", warmup=3):
    cfg, model = build(config, opts, speedups, device, (h, w))
    model.proposal_generator = FixedProposals(
        model.proposal_generator, cfg.MODEL.RPN.POST_NMS_TOPK_TRAIN
    )
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0, momentum=0.9)
    data = synthetic_batch(2, h, w)
    dtype = AMP_PRECISIONS.get(amp)

    def step():
        with torch.autocast(device, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            loss = sum(model(data).values())
        opt.zero_grad()
        loss.backward()
        opt.step()

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with EventStorage():
        seconds = _median_seconds(step, warmup, iters, device)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else float("nan")
    return seconds, peak


def write_tables(out: str, meta: dict, rows: list) -> str:
    """gpu_timing.json and gpu_timing.md in ``out``, each replaced whole (atomic write); returns
    the markdown."""
    md = f"{meta}\n\n" + tabulate(rows, headers="keys", tablefmt="pipe", floatfmt=".4f")
    table = json.dumps({"meta": meta, "rows": rows}, indent=2)
    atomic_write_text(os.path.join(out, "gpu_timing.json"), table)
    atomic_write_text(os.path.join(out, "gpu_timing.md"), md + "\n")
    return md


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", nargs=2, type=int, default=[800, 1216])
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--out", default="output/gpu_check")
    parser.add_argument(
        "--device",
        default="cuda",
        choices=["cuda", "cpu"],
        help="cpu: the plumbing only (tools/gpu_check.sh --dry-run); the CPU model has its layer",
    )
    parser.add_argument("--rows", type=int, default=len(ROWS), help="the first N rows only")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls before the timed ones")
    args = parser.parse_args()
    setup_logger(name="cbam_hrnet_d2")
    h, w = args.size
    os.makedirs(args.out, exist_ok=True)
    meta = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "torch": torch.__version__,
        "size": [h, w],
        "iters": args.iters,
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    rows = []
    chosen = list(ROWS.items())[: args.rows]
    for i, (name, (config, opts, speedups, amp)) in enumerate(chosen):
        logger.info("[%d/%d] %s", i + 1, len(chosen), name)
        row = {"row": name}
        try:
            row["eval_s_per_image"] = time_eval(
                config, opts, speedups, h, w, args.iters, args.device, args.warmup
            )
            row["train_s_per_iter"], row["train_peak_gpu_mib"] = time_train(
                config, opts, speedups, amp, h, w, args.iters, args.device, args.warmup
            )
        except Exception as e:  # one failing row must not cost the others: report it
            logger.exception("row %s failed", name)
            row["error"] = f"{type(e).__name__}: {e}"[:300]
        rows.append(row)
        # after every row: a run cut at its limit keeps the rows it finished
        md = write_tables(args.out, {**meta, "rows_done": f"{i + 1}/{len(chosen)}"}, rows)
        if args.device == "cuda":
            torch.cuda.empty_cache()
    logger.info("GPU timing:\n%s", md)
    failed = [r["row"] for r in rows if "error" in r]
    if failed:  # the table is written either way; the step's exit status says it is incomplete
        raise SystemExit(f"{len(failed)} row(s) failed: {failed}")


if __name__ == "__main__":
    main()
