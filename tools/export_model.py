#!/usr/bin/env python
"""
Export a trained model to TorchScript or ONNX by tracing, as detectron2's
tools/deploy/export_model.py does:

    python tools/export_model.py \
        --config-file configs/shapes/mask_rcnn_CBAM_HRNet_W18_FPN_shapes.yaml \
        --format onnx --output output/export --run-eval \
        MODEL.WEIGHTS output/quickstart/model_final.pth

Writes OUTPUT/model.ts or OUTPUT/model.onnx. What the exported model takes and returns:
cbam_hrnet_d2/export/. ``--run-eval`` evaluates the exported file (TorchScript, or model.onnx under
``--runtime`` ONNX Runtime or OpenVINO, on the CPU) on the config's first test dataset and prints
COCO AP, as ``train_net.py --eval-only``.
"""

import argparse
import logging
import os
import statistics
import sys
import time

import torch
from detectron2.data import DatasetCatalog
from detectron2.evaluation import COCOEvaluator, inference_on_dataset, print_csv_format
from detectron2.modeling import build_model
from detectron2.utils.logger import setup_logger

from cbam_hrnet_d2.checkpoint import SafeCheckpointer
from cbam_hrnet_d2.config import load_config
from cbam_hrnet_d2.cpu.process import set_cpu_threads
from cbam_hrnet_d2.data import check_datasets, register_from_cfg
from cbam_hrnet_d2.data.build import build_test_loader
from cbam_hrnet_d2.export import (
    FORMATS,
    OPENVINO_PRECISIONS,
    RUNTIMES,
    export,
    load_exported,
    load_sample_image,
)

logger = logging.getLogger("cbam_hrnet_d2.export_model")


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Export a model for deployment.")
    parser.add_argument("--config-file", required=True, metavar="FILE", help="path to config file")
    parser.add_argument("--format", choices=list(FORMATS), default="torchscript")
    parser.add_argument("--export-method", choices=["tracing"], default="tracing")
    parser.add_argument(
        "--sample-image",
        default=None,
        help="image to trace with (default: the first image of the first test dataset)",
    )
    parser.add_argument("--output", required=True, help="output directory")
    parser.add_argument(
        "--runtime",
        choices=list(RUNTIMES),
        default="onnxruntime",
        help="what runs model.onnx for --run-eval / --latency (openvino: pip install .[openvino])",
    )
    parser.add_argument(
        "--ov-precision",
        choices=list(OPENVINO_PRECISIONS),
        default="auto",
        help="OpenVINO's inference precision (auto: bf16 where the CPU runs it natively, else f32)",
    )
    parser.add_argument(
        "--run-eval",
        action="store_true",
        help="evaluate the exported model on DATASETS.TEST[0] and print COCO AP",
    )
    parser.add_argument(
        "--latency",
        type=int,
        default=0,
        metavar="N",
        help="time the eager model and the exported file on the first N test images, interleaved "
        "(median seconds per image, postprocessing included)",
    )
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    return parser


def time_eager_and_exported(model, exported, inputs) -> dict:
    """Median seconds per image of ``model`` and ``exported`` over ``inputs``, alternating per
    image (so that drift of the machine hits both), after one untimed call of each."""
    times = {"eager": [], "exported": []}
    runners = {"eager": model, "exported": exported}
    with torch.no_grad():
        for run in runners.values():
            run(inputs[:1])
        for item in inputs:
            for name, run in runners.items():
                start = time.perf_counter()
                run([item])
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def load_runner(path: str, args):
    """The runner of the exported file at ``path`` that ``args`` ask for."""
    if not path.endswith(".onnx"):
        return load_exported(path)
    if args.runtime == "openvino":
        return load_exported(path, "openvino", precision=args.ov_precision)
    return load_exported(path, args.runtime)


def main(argv=None) -> dict:
    args = get_parser().parse_args(argv)
    if args.format != "onnx" and args.runtime != "onnxruntime":
        raise ValueError(
            f"--runtime {args.runtime} runs model.onnx: add --format onnx (--format {args.format} "
            "runs under TorchScript)"
        )
    if args.sample_image and not os.path.isfile(args.sample_image):
        raise FileNotFoundError(
            f"--sample-image {args.sample_image}: no such file. Give an image the model will see "
            "(any size: the exported model takes every size), e.g. one of the test set's images."
        )
    setup_logger()
    setup_logger(name="cbam_hrnet_d2")
    cfg = load_config(args.config_file, args.opts)
    cfg.MODEL.DEVICE = "cpu"  # exported for the CPU runtimes (TorchScript, ONNX Runtime)
    cfg.freeze()
    if not cfg.MODEL.WEIGHTS:
        raise ValueError(
            "MODEL.WEIGHTS is empty: give the trained checkpoint to export, e.g. "
            "MODEL.WEIGHTS output/quickstart/model_final.pth"
        )
    set_cpu_threads(cfg.MODEL.DEVICE)
    register_from_cfg(cfg)
    # eager as users run it on the CPU (the CPU speed layer traces as detectron2's own ops)
    model = build_model(cfg).eval()  # its CPU speed-ups step aside while exporting
    SafeCheckpointer(model).load(cfg.MODEL.WEIGHTS)

    if not args.sample_image or args.latency or args.run_eval:
        check_datasets(cfg)
        if not cfg.DATASETS.TEST:
            raise ValueError(
                "DATASETS.TEST is empty: give --sample-image (and no --latency/--run-eval)"
            )
        test_dicts = DatasetCatalog.get(cfg.DATASETS.TEST[0])
    image = load_sample_image(cfg, args.sample_image or test_dicts[0]["file_name"])
    path = export(model, image, args.format, args.output)
    runner_name = args.format if args.format != "onnx" else f"onnx under {args.runtime}"
    if args.latency:
        inputs = [
            {
                "image": load_sample_image(cfg, d["file_name"]),
                "height": d["height"],
                "width": d["width"],
            }
            for d in test_dicts[: args.latency]
        ]
        seconds = time_eager_and_exported(model, load_runner(path, args), inputs)
        logger.info(
            "Latency on %d images of %s (HxW %s): eager %.4f s, %s %.4f s (median per image)",
            len(inputs), cfg.DATASETS.TEST[0], "x".join(map(str, inputs[0]["image"].shape[1:])),
            seconds["eager"], runner_name, seconds["exported"],
        )  # fmt: skip

    if not args.run_eval:
        return {}
    dataset = cfg.DATASETS.TEST[0]
    name = args.format if args.format != "onnx" else args.runtime
    evaluator = COCOEvaluator(dataset, output_dir=os.path.join(args.output, "eval_" + name))
    runner = load_runner(path, args)
    results = inference_on_dataset(runner, build_test_loader(cfg, dataset), evaluator)
    logger.info("COCO AP of %s under %s on %s:", path, runner_name, dataset)
    print_csv_format(results)
    return results


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError, KeyError, ImportError) as e:
        logging.getLogger("cbam_hrnet_d2.export_model").error("%s", e)
        sys.exit(f"export_model.py: {e}")
