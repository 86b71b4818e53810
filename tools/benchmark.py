"""Measure models on this machine, always next to detectron2's own R50-FPN Mask R-CNN:

    python tools/benchmark.py --configs configs/mask_rcnn_CBAM_HRNet_W18_FPN_1x.yaml \
        "configs/mask_rcnn_CBAM_HRNet_W18_FPN_1x.yaml MODEL.CBAM_HRNET.CPU.SPARSE_ROI_ALIGN False" \
        --size 800 1216 --iters 5 --train-batch 2 --out output/benchmark

Per config: parameters; GMAC of backbone+FPN and of the whole model (fvcore); batch-1 eval latency
(median of N rounds after a warm-up; every round runs every config once, so drift of the machine
during the run hits all rows alike) of backbone+FPN, of the bare trunk, and of the whole model with
the proposal and detection counts fixed (1000 fixed boxes through the box head, 100 through the mask
head, so that random-init models do the same work); training s/iter (median after --train-warmup
steps, which page the process's memory in) and peak RSS at --train-batch, in a fresh process each,
with the RPN's proposals replaced by the same fixed boxes (its losses kept: a random-init RPN
proposes anything from 0 boxes, as R50 does at 800 px, to its full top-k); achieved GMAC/s of the
trunk as a fraction of the matmul roof of the precision it runs in (fp32 or bf16 4096x4096 matmul,
best of several, measured in the same run). Writes benchmark.md and benchmark.json.

Precision: each row runs its config's TEST.PRECISION (give "cfg.yaml TEST.PRECISION bf16" for a row
per precision) and trains under bf16 autocast with "SOLVER.AMP.ENABLED True" (fp32 otherwise). Our
rows get the CPU speed-ups of their config (``MODEL.CBAM_HRNET.CPU.*``, cbam_hrnet_d2/cpu), as
``build_model`` builds them (``--doors``: also as ``DefaultPredictor`` and the trainer
build it; ``--lazy-config``: as a LazyConfig's ``instantiate(cfg.model)``). detectron2's R50-FPN
runs as shipped, and once more with the treatment our model gets when the spec is
``R50+cpu_speedups+bf16``: the CPU speed layer and the backbone + FPN under bf16 autocast, float32
outputs; ``R50+cpu_speedups`` is the same in fp32 (the fair comparison where ours runs fp32). Rows
that differ from another only in inference-only keys (TEST.*) are not trained again.
``first_calls_s`` is the first call of each timed part together, start-up costs included.

On a CPU without native bf16 (no AVX512-BF16 / AMX) bf16 is emulated, 12-99x slower than fp32
(matmul, conv; docs/notes/precision-runs.md): the bf16 roof is then a 512x512 matmul (4096x4096
would take minutes a call) and rows that run bf16 (inference or AMP training) are listed as
skipped, with the reason, unless --emulated-bf16.
"""

import argparse
import json
import logging
import multiprocessing as mp
import os
import statistics
import time
from typing import Dict, List, Optional, Sequence

import torch
from detectron2.modeling import build_model
from detectron2.structures import Instances
from detectron2.utils.analysis import FlopCountAnalysis
from detectron2.utils.events import EventStorage
from tabulate import tabulate

from cbam_hrnet_d2.benchmark import (
    DOORS,
    EMULATED_BF16,
    REFERENCE,
    REFERENCE_BF16,
    REFERENCE_CL,
    TREATED,
    Autocast,
    FixedProposals,
    FixedWork,
    build_through,
    load_cfg,
    matmul_peak_gmacs,
    time_interleaved,
)
from cbam_hrnet_d2.cpu import cpu_speedups
from cbam_hrnet_d2.cpu.bf16_heads import bf16_heads as run_heads_in_bf16
from cbam_hrnet_d2.cpu.process import keep_large_allocations_in_heap
from cbam_hrnet_d2.device import native_bf16
from cbam_hrnet_d2.export import RUNTIMES, export, load_exported
from cbam_hrnet_d2.modeling.precision import autocast_dtype
from cbam_hrnet_d2.testing import calibrate_norm_statistics, synthetic_batch
from cbam_hrnet_d2.utils.memory import peak_rss_mib

logger = logging.getLogger("cbam_hrnet_d2.benchmark")


def _train_worker(
    config: str,
    opts: List[str],
    batch: int,
    h: int,
    w: int,
    iters: int,
    warmup: int,
    threads: int,
    queue,
    heap: bool = True,
):
    torch.set_num_threads(threads)
    if heap:
        keep_large_allocations_in_heap()
    torch.manual_seed(0)
    cfg = load_cfg(config, opts)
    model = build_model(cfg)  # ours: backbone and heads take their CPU speed-ups per call
    calibrate_norm_statistics(model.backbone, torch.rand(1, 3, h, w) * 2 - 1)
    model.proposal_generator = FixedProposals(
        model.proposal_generator, cfg.MODEL.RPN.POST_NMS_TOPK_TRAIN
    )
    model.train()
    # lr 0: the same work per step, and random-init weights cannot diverge between timed steps
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0, momentum=0.9)
    data = synthetic_batch(batch, h, w)
    times = []
    # SOLVER.AMP.ENABLED on the CPU: the whole step under bf16 autocast, as CPUAMPTrainer runs it
    amp = cfg.SOLVER.AMP.ENABLED and cfg.MODEL.DEVICE == "cpu"
    with EventStorage():
        for i in range(warmup + iters):
            start = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                loss = sum(model(data).values())
                opt.zero_grad()
                loss.backward()
                opt.step()
            if i >= warmup:
                times.append(time.perf_counter() - start)
    peak_mib = peak_rss_mib()
    queue.put({"train_s_per_iter": statistics.median(times), "train_peak_rss_mib": peak_mib})


def measure_training(
    config, opts, batch, h, w, iters, warmup, threads, heap: bool = True
) -> Dict[str, float]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(
        target=_train_worker,
        args=(config, list(opts), batch, h, w, iters, warmup, threads, queue, heap),
    )
    proc.start()
    proc.join()
    if proc.exitcode != 0 or queue.empty():
        raise RuntimeError(
            f"training measurement of {config} failed (exit code {proc.exitcode}); see the log "
            "above"
        )
    return queue.get()


def prepare_inference(
    config: str,
    h: int,
    w: int,
    opts: Sequence[str] = (),
    emulated_bf16: bool = True,
    export_to: str = "",
    runtimes: Sequence[str] = (),
    door: str = "build_model",
):
    """Build ``config`` in eval mode with calibrated norm statistics; count its parameters and
    GMACs. Returns (row, {"backbone_fpn_s" / "trunk_s" / "model_s": callable running that part on
    one image}); the callables are ``{}`` (and ``row["skipped"]`` says why) for a bf16 row on a CPU
    that emulates bf16 unless ``emulated_bf16``. With ``export_to``, also :func:`end_to_end_rows`
    (exported there) as a third element. ``door``: :func:`build_through` which door."""
    torch.manual_seed(0)
    treated = config in TREATED
    model = build_through(REFERENCE if treated else config, opts, door).eval()
    if treated:
        cpu_speedups(model)
    image = torch.rand(3, h, w) * 255
    x = model.preprocess_image([{"image": image}]).tensor
    # TEST.PRECISION as the backbone applies it (detectron2's own backbones run fp32)
    dtype = (
        TREATED[config]
        if treated
        else autocast_dtype(getattr(model.backbone, "precision", "fp32"), x)
    )
    row: Dict[str, float] = {"params_M": sum(p.numel() for p in model.parameters()) / 1e6}
    row["precision"] = "bf16" if dtype == torch.bfloat16 else "fp32"
    if dtype == torch.bfloat16 and not emulated_bf16 and not native_bf16(x.device):
        row["skipped"] = EMULATED_BF16  # before any forward pass: emulated bf16 takes minutes
        return (row, {}, {}) if export_to else (row, {})
    calibrate_norm_statistics(model.backbone, x)
    # the bottom-up network as the model runs it (for HRNet: the trunk plus any CBAM on its
    # branches)
    trunk = getattr(model.backbone, "bottom_up", model.backbone)
    if treated and dtype is not None:
        model.backbone = Autocast(model.backbone)
        run_heads_in_bf16(model, "bf16")  # as MODEL.CBAM_HRNET.CPU.BF16_HEADS runs ours
    whole = FixedWork(model, h, w)

    def gmac(module, inputs):
        count = FlopCountAnalysis(module, inputs).unsupported_ops_warnings(False)
        return count.uncalled_modules_warnings(False).total() / 1e9

    # the architecture's count, float32 (FlopCountAnalysis traces)
    row["backbone_fpn_GMAC"] = gmac(model.backbone, x)
    row["trunk_GMAC"] = gmac(trunk, x)
    row["model_GMAC"] = gmac(whole, x)

    def run_trunk():  # in the precision the backbone runs it
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            return trunk(x)

    timed = {
        "backbone_fpn_s": lambda: model.backbone(x),
        "trunk_s": run_trunk,
        "model_s": lambda: whole(x),
    }
    if export_to:
        return row, timed, end_to_end_rows(model, image, export_to, runtimes)
    return row, timed


def prepare_backbone(config: str, opts: Sequence[str], h: int, w: int):
    """The backbone + FPN of ``config`` (any meta-architecture: Cascade, PanopticFPN, ...) in eval
    mode with calibrated norm statistics: (row, {"backbone_fpn_s": callable on one image})."""
    torch.manual_seed(0)
    model = build_through(config, opts).eval()
    x = model.preprocess_image([{"image": torch.rand(3, h, w) * 255}]).tensor
    calibrate_norm_statistics(model.backbone, x)
    row = {
        "meta_architecture": type(model).__name__,
        "precision": getattr(model.backbone, "precision", "fp32"),
    }
    return row, {"backbone_fpn_s": lambda: model.backbone(x)}


def end_to_end_rows(model, image: torch.Tensor, out: str, runtimes: Sequence[str]):
    """The whole model end to end on ``image`` (its real proposals; score threshold 0, so up to
    TEST.DETECTIONS_PER_IMAGE detections; masks not pasted), eager and exported to ONNX under each
    of ``runtimes``: {name: (row, {"end_to_end_s": callable})}, rows with the detection count
    (the same work where it is equal)."""
    model.roi_heads.box_predictor.test_score_thresh = 0.0
    eager = lambda: model.inference([{"image": image}], do_postprocess=False)[0]  # noqa: E731
    runners = {"eager": (eager, model.backbone.precision)}  # name -> (callable, precision)
    path = export(model, image, "onnx", out)
    for runtime in runtimes:
        exported = load_exported(path, runtime)
        precision = getattr(exported, "precision", "fp32")  # OpenVINO's, as it resolved "auto"
        name = f"ONNX under {runtime}" + (f" {precision}" if runtime == "openvino" else "")
        runners[name] = (lambda e=exported: e.run(image), precision)
    rows = {}
    with torch.inference_mode():
        for name, (run, precision) in runners.items():
            out_ = run()
            count = len(out_) if isinstance(out_, Instances) else len(out_[3])
            rows[name] = ({"precision": precision, "detections": count}, {"end_to_end_s": run})
    return rows


# keys that change inference only: rows that differ from another only in these are not trained
INFERENCE_ONLY = ("TEST.", "MODEL.CBAM_HRNET.CPU.BF16_HEADS")


def _split(spec: str):
    """ "A.yaml KEY VALUE ..." -> ("A.yaml", ["KEY", "VALUE", ...])."""
    config, *opts = spec.split()
    return config, opts


def _trains_differently(spec: str) -> bool:
    """False for rows whose training is another row's: inference-only keys (:data:`INFERENCE_ONLY`)
    or the reference's inference treatment."""
    _, opts = _split(spec)
    return spec not in TREATED and not any(k.startswith(INFERENCE_ONLY) for k in opts[::2])


def main(argv: Optional[Sequence[str]] = None) -> None:
    from detectron2.utils.logger import setup_logger

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--configs",
        nargs="+",
        default=["configs/mask_rcnn_CBAM_HRNet_W18_FPN_1x.yaml"],
        help='config files; one may carry overrides in the same argument: "A.yaml KEY VALUE"',
    )
    parser.add_argument("--size", nargs=2, type=int, default=[800, 1216], metavar=("H", "W"))
    parser.add_argument(
        "--iters",
        type=int,
        default=5,
        help="timed inference rounds (median); each round runs every config once",
    )
    parser.add_argument("--train-batch", type=int, default=2)
    parser.add_argument(
        "--train-iters",
        type=int,
        default=3,
        help="timed training iterations (median); 0: inference only, no training rows",
    )
    parser.add_argument(
        "--train-warmup",
        type=int,
        default=2,
        help="untimed training iterations first (the first two page in the memory)",
    )
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", default="output/benchmark")
    parser.add_argument(
        "--emulated-bf16",
        action="store_true",
        help="measure bf16 rows even on a CPU without native bf16 (slow: minutes a row at 800 px)",
    )
    parser.add_argument(
        "--export-runtimes",
        nargs="*",
        default=[],
        choices=list(RUNTIMES),
        help="also time the first config end to end, eager and exported to ONNX under these "
        "runtimes (score threshold 0; the same image and model)",
    )
    parser.add_argument(
        "--doors",
        action="store_true",
        help="also time the first config's model as DefaultPredictor and DefaultTrainer build it "
        "(its own row is build_model's)",
    )
    parser.add_argument(
        "--lazy-config",
        default="",
        help="also time this LazyConfig's model (instantiate(cfg.model) on train.device cpu)",
    )
    parser.add_argument(
        "--backbone-of",
        nargs="*",
        default=[],
        help="also time the backbone + FPN of these models beside the first config's, e.g. "
        '"d2:Misc/cascade_mask_rcnn_R_50_FPN_1x.yaml MODEL.BACKBONE.NAME '
        "build_cbam_hrnet_fpn_backbone MODEL.FPN.IN_FEATURES ['hr2','hr3','hr4','hr5']\" "
        "(detectron2's own meta-architectures with our backbone)",
    )
    parser.add_argument(
        "--mmap-large-allocations",
        action="store_true",
        help="keep glibc's default of mmap() for large blocks (train_net.py turns it off on CPU)",
    )
    args = parser.parse_args(argv)
    setup_logger(name=logger.name)
    torch.set_num_threads(args.threads)
    heap = not args.mmap_large_allocations and keep_large_allocations_in_heap()
    h, w = args.size
    peak = matmul_peak_gmacs()
    bf16_native = native_bf16("cpu")
    # emulated bf16: a 4096x4096 product would take minutes; 512 reads the same rate
    bf16_n = 4096 if bf16_native else 512
    peak_bf16 = matmul_peak_gmacs(n=bf16_n, iters=6 if bf16_native else 2, dtype=torch.bfloat16)
    logger.info(
        "matmul roof on %d threads: fp32 %.1f, bf16 %.1f GMAC/s (%s)",
        args.threads,
        peak,
        peak_bf16,
        "native" if bf16_native else f"emulated: no AVX512-BF16 / AMX, {bf16_n}x{bf16_n}",
    )
    configs = [REFERENCE] + [c for c in args.configs if c != REFERENCE]
    rows, timed = {}, {}
    for i, spec in enumerate(configs):
        logger.info("[%d/%d] building %s", i + 1, len(configs), spec)
        config, opts = _split(spec)
        if i == 1 and args.export_runtimes:
            export_to = os.path.join(args.out, "export")
            rows[spec], timed[spec], e2e = prepare_inference(
                config, h, w, opts, args.emulated_bf16, export_to, args.export_runtimes
            )
            for name, (row, fns) in e2e.items():
                key = f"{spec} end to end: {name}"
                rows[key], timed[key] = row, fns
        else:
            rows[spec], timed[spec] = prepare_inference(config, h, w, opts, args.emulated_bf16)
        if i == 1:
            doors = [(d, config) for d in DOORS[1:] if args.doors]
            doors += [("LazyConfig", args.lazy_config)] if args.lazy_config else []
            for door, source in doors:
                key = f"{spec} via {door}" if door != "LazyConfig" else f"{source} via LazyConfig"
                logger.info("building %s", key)
                lazy_opts = [] if door == "LazyConfig" else opts
                rows[key], timed[key] = prepare_inference(
                    source, h, w, lazy_opts, args.emulated_bf16, door=door
                )
    for spec in args.backbone_of:
        logger.info("building %s (backbone + FPN only)", spec)
        rows[spec], timed[spec] = prepare_backbone(*_split(spec), h, w)
    for spec, seconds in time_interleaved(timed, args.iters).items():
        rows[spec].update(seconds)
        logger.info("  %s: %s", spec, {k: round(v, 3) for k, v in seconds.items()})
    del timed  # free the models before the training processes start
    start = time.time()
    trained = [s for s in configs if _trains_differently(s) and "skipped" not in rows[s]]
    if args.train_iters == 0:
        logger.info("--train-iters 0: inference only")
        trained = []
    if not bf16_native and not args.emulated_bf16:
        for spec in [s for s in trained if load_cfg(*_split(s)).SOLVER.AMP.ENABLED]:
            rows[spec]["train_skipped"] = EMULATED_BF16
            trained.remove(spec)
    for i, spec in enumerate(trained):
        eta = (time.time() - start) / i * (len(trained) - i) if i else float("nan")
        logger.info("[%d/%d] training %s (ETA %.0f s)", i + 1, len(trained), spec, eta)
        config, opts = _split(spec)
        rows[spec].update(
            measure_training(
                config,
                opts,
                args.train_batch,
                h,
                w,
                args.train_iters,
                args.train_warmup,
                args.threads,
                heap,
            )
        )
    measured = [row for row in rows.values() if "skipped" not in row and "trunk_s" in row]
    for row in measured:
        roof = peak_bf16 if row["precision"] == "bf16" else peak
        row["trunk_peak_fraction"] = row["trunk_GMAC"] / row["trunk_s"] / roof
    ref = rows[REFERENCE]
    for row in measured:
        row["backbone_fpn_speedup_vs_R50"] = ref["backbone_fpn_s"] / row["backbone_fpn_s"]
        row["model_speedup_vs_R50"] = ref["model_s"] / row["model_s"]
        # against R50 given the same channels-last (+ bf16) treatment
        for spec, key in ((REFERENCE_BF16, "_bf16"), (REFERENCE_CL, "_cpu_speedups")):
            if "backbone_fpn_s" in rows.get(spec, {}):
                treated = rows[spec]["backbone_fpn_s"]
                row["backbone_fpn_speedup_vs_R50" + key] = treated / row["backbone_fpn_s"]
    ours = rows[configs[1]] if len(configs) > 1 else ref
    for spec in args.backbone_of:
        rows[spec]["backbone_fpn_vs_first_config"] = (
            ours["backbone_fpn_s"] / rows[spec]["backbone_fpn_s"]
        )
    e2e = {k: r for k, r in rows.items() if "end_to_end_s" in r}
    eager = next((r for k, r in e2e.items() if k.endswith(": eager")), None)
    for row in e2e.values():
        row["end_to_end_speedup_vs_eager"] = eager["end_to_end_s"] / row["end_to_end_s"]
    os.makedirs(args.out, exist_ok=True)
    meta = {
        "size": [h, w],
        "threads": args.threads,
        "matmul_peak_GMACs": peak,
        "matmul_peak_GMACs_bf16": peak_bf16,
        "bf16_native": bf16_native,
        "bf16_roof_size": bf16_n,
        "iters": args.iters,
        "train_batch": args.train_batch,
        "train_iters": args.train_iters,
        "train_warmup": args.train_warmup,
        "torch": torch.__version__,
        "large_allocations_in_heap": heap,
    }
    with open(os.path.join(args.out, "benchmark.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=2)
    table = [
        {
            "config": os.path.basename(c),
            **{k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()},
        }
        for c, r in rows.items()
    ]
    for row in table:  # "a/b.yaml KEY VALUE" -> "b.yaml KEY VALUE"
        row["config"] = " ".join(part.split("/")[-1] for part in row["config"].split())
    bf16_roof = (
        f"bf16 {peak_bf16:.1f}"
        if bf16_native
        else (f"bf16 {peak_bf16:.2f} (emulated: no AVX512-BF16 / AMX; {bf16_n}x{bf16_n})")
    )
    md = (
        f"Size {h}x{w}, {args.threads} threads, CPU {torch.backends.cpu.get_cpu_capability()}, "
        f"4096x4096 matmul roof fp32 {peak:.1f} / {bf16_roof} GMAC/s, large blocks "
        f"{'in the heap' if heap else 'mmap()ed (glibc default)'}, train batch {args.train_batch} "
        f"({args.train_iters} timed steps after {args.train_warmup}, MODEL.RPN.POST_NMS_TOPK_TRAIN "
        "fixed proposals per image)\n\n" + tabulate(table, headers="keys", tablefmt="pipe")
    )
    with open(os.path.join(args.out, "benchmark.md"), "w") as f:
        f.write(md + "\n")
    logger.info("wrote %s\n%s", os.path.join(args.out, "benchmark.md"), md)


if __name__ == "__main__":
    main()
