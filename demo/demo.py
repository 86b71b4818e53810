#!/usr/bin/env python
"""Draw Mask R-CNN predictions (and CBAM attention) of a CBAM-HRNet model, like detectron2's demo:

    python demo/demo.py --config-file configs/shapes/mask_rcnn_CBAM_HRNet_W18_FPN_shapes.yaml \
        --input datasets/shapes/val/*.png --output out/ --attention \
        --opts MODEL.WEIGHTS output/quickstart/model_final.pth
"""

import argparse
import glob
import os
import sys
import time
from typing import List, Tuple

import cv2
import numpy as np
import tqdm
from detectron2.utils.logger import setup_logger
from PIL import Image, ImageOps
from predictor import VisualizationDemo

import cbam_hrnet_d2.data  # noqa: F401  (registers shapes_* metadata: class names)
from cbam_hrnet_d2.config import load_config, load_lazy_config
from cbam_hrnet_d2.utils.files import atomic_write

WINDOW_NAME = "CBAM-HRNet detections"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def setup_cfg(args):
    if args.config_file.endswith(".py"):  # a LazyConfig; --opts as key=value
        cfg = load_lazy_config(args.config_file, args.opts)
        cfg.model.roi_heads.box_predictor.test_score_thresh = args.confidence_threshold
        return cfg
    cfg = load_config(args.config_file, args.opts)  # add_cbam_hrnet_config before the YAML
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = args.confidence_threshold
    cfg.MODEL.RETINANET.SCORE_THRESH_TEST = args.confidence_threshold
    cfg.MODEL.PANOPTIC_FPN.COMBINE.INSTANCES_CONFIDENCE_THRESH = args.confidence_threshold
    cfg.freeze()
    return cfg


def get_parser():
    parser = argparse.ArgumentParser(description="Detectron2 demo for CBAM-HRNet models")
    parser.add_argument("--config-file", metavar="FILE", required=True, help="path to config file")
    parser.add_argument("--webcam", action="store_true", help="take inputs from webcam")
    parser.add_argument("--video-input", help="path to video file")
    parser.add_argument(
        "--input", nargs="+", help="image files, directories or a glob like 'dir/*.jpg'"
    )
    parser.add_argument(
        "--output",
        help="a directory for the pictures, or a file for a single image or a video; "
        "without it the pictures are shown in a window",
    )
    parser.add_argument("--confidence-threshold", type=float, default=0.5, help="minimum score")
    parser.add_argument(
        "--attention",
        action="store_true",
        help="also write one spatial-attention heatmap per CBAM site and a channel-attention plot",
    )
    parser.add_argument(
        "--opts",
        default=[],
        nargs=argparse.REMAINDER,
        help="KEY VALUE pairs (YAML configs) or key=value (.py LazyConfigs)",
    )
    return parser


def expand_inputs(patterns: List[str]) -> List[str]:
    """Files, directories (their images) and globs, in order, without duplicates."""
    paths = []
    for p in patterns:
        if os.path.isdir(p):
            paths += sorted(
                os.path.join(p, f) for f in os.listdir(p) if f.lower().endswith(IMAGE_EXTENSIONS)
            )
        elif any(c in p for c in "*?["):
            paths += sorted(glob.glob(os.path.expanduser(p)))
        else:
            paths.append(p)
    return list(dict.fromkeys(paths))


def read_image_any(path: str) -> np.ndarray:
    """Read an image as (H, W, 3) uint8 BGR: grayscale, RGBA, palette and 16-bit PNGs, EXIF-rotated
    JPEGs. Raises ValueError with the reason for empty, truncated or non-image files."""
    if os.path.getsize(path) == 0:
        raise ValueError("empty file")
    try:
        with Image.open(path) as im:
            im.load()
            im = ImageOps.exif_transpose(im)
            if im.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
                arr = np.asarray(im, dtype=np.float64)
                top = 65535.0 if arr.max() > 255 else 255.0
                im = Image.fromarray(np.clip(arr / top * 255.0, 0, 255).astype(np.uint8))
            rgb = np.asarray(im.convert("RGB"))
    except (OSError, SyntaxError) as e:  # PIL: UnidentifiedImageError, truncated data, bad headers
        raise ValueError(f"not a readable image ({e})") from e
    return np.ascontiguousarray(rgb[:, :, ::-1])


def write_image_atomic(path: str, image: np.ndarray) -> None:
    """Encode ``image`` in the format of ``path``'s extension (PNG without one) and write it
    atomically."""
    ok, encoded = cv2.imencode(os.path.splitext(path)[1] or ".png", image)
    if not ok:
        raise OSError(f"could not encode {path}")
    atomic_write(path, lambda f: f.write(encoded.tobytes()), fsync=False)


def _heatmap(image: np.ndarray, spatial: np.ndarray, site: str) -> np.ndarray:
    """Overlay of the map stretched to its own [min, max] (written on the picture: maps of deep
    branches often vary little around a high or low mean)."""
    lo, hi = float(spatial.min()), float(spatial.max())
    norm = (spatial - lo) / max(hi - lo, 1e-6)
    colour = cv2.applyColorMap((norm * 255).astype(np.uint8), cv2.COLORMAP_JET)
    out = cv2.addWeighted(image, 0.45, colour, 0.55, 0)
    label = f"{site} {lo:.2f}-{hi:.2f}"
    scale = max(0.35, image.shape[1] / 600)
    cv2.putText(out, label, (4, int(16 * scale) + 2), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 3)
    cv2.putText(
        out, label, (4, int(16 * scale) + 2), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), 1
    )
    return out


def write_attention(out_stem: str, image: np.ndarray, maps: dict) -> List[str]:
    """One heatmap PNG per CBAM site and one PNG plotting channel weights per site."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for site, m in maps.items():
        path = f"{out_stem}_attention_{site}.png"
        write_image_atomic(path, _heatmap(image, m["spatial"], site))
        written.append(path)
    fig, axes = plt.subplots(len(maps), 1, figsize=(8, 1.6 * len(maps)), squeeze=False)
    for ax, (site, m) in zip(axes[:, 0], maps.items()):
        ax.bar(np.arange(len(m["channel"])), m["channel"], width=1.0, color="tab:blue")
        ax.set_ylim(0, 1)
        ax.set_ylabel(site)
    axes[-1, 0].set_xlabel("channel")
    fig.suptitle("CBAM channel attention per site")
    fig.tight_layout()
    atomic_write(
        f"{out_stem}_channel_attention.png",
        lambda f: fig.savefig(f, format="png", dpi=80),
        fsync=False,
    )
    plt.close(fig)
    return written + [path]


def _many_inputs(args) -> bool:
    """Several images (or a directory or glob of them): --output is then a directory."""
    return bool(args.input) and (
        len(args.input) > 1
        or any(os.path.isdir(p) or any(c in p for c in "*?[") for p in args.input)
    )


def _output_path(args, path: str, many: bool) -> str:
    if many or os.path.isdir(args.output):
        return os.path.join(args.output, os.path.basename(path))
    return args.output


def run_images(demo: VisualizationDemo, args, paths: List[str], logger) -> int:
    many = len(paths) > 1 or _many_inputs(args)
    failed = 0
    for path in tqdm.tqdm(paths, disable=not args.output, unit="img", desc="demo"):
        try:
            img = read_image_any(path)
        except (ValueError, OSError) as e:
            failed += 1
            print(f"error: {path}: {e}", file=sys.stderr, flush=True)
            continue
        start = time.time()
        predictions, vis, maps = demo.run_on_image(img, attention=args.attention)
        logger.info(
            "%s: detected %d instances in %.2fs",
            path,
            len(predictions["instances"]),
            time.time() - start,
        )
        if args.output:
            out = _output_path(args, path, many)
            out = (
                os.path.splitext(out)[0] + ".png"
                if not out.lower().endswith(IMAGE_EXTENSIONS)
                else out
            )
            write_image_atomic(out, vis.get_image()[:, :, ::-1])
            if maps:
                write_attention(os.path.splitext(out)[0], img, maps)
        else:
            cv2.namedWindow(WINDOW_NAME, cv2.WINDOW_NORMAL)
            cv2.imshow(WINDOW_NAME, vis.get_image()[:, :, ::-1])
            if cv2.waitKey(0) == 27:
                break
    return failed


def run_video(demo: VisualizationDemo, args, logger) -> int:
    video = cv2.VideoCapture(args.video_input)
    if not video.isOpened():
        print(f"error: {args.video_input}: cannot open video", file=sys.stderr)
        return 1
    width, height = (
        int(video.get(cv2.CAP_PROP_FRAME_WIDTH)),
        int(video.get(cv2.CAP_PROP_FRAME_HEIGHT)),
    )
    fps = video.get(cv2.CAP_PROP_FPS) or 25.0
    num_frames = int(video.get(cv2.CAP_PROP_FRAME_COUNT))
    writer, out, tmp = None, None, None
    if args.output:
        out = args.output
        if os.path.isdir(out):
            out = os.path.join(
                out, os.path.splitext(os.path.basename(args.video_input))[0] + ".mp4"
            )
        # cv2.VideoWriter writes to a file name, not a file object: a temporary name renamed at the
        # end (the one atomic write that cannot use cbam_hrnet_d2.utils.files.atomic_write)
        root, ext = os.path.splitext(out)
        tmp = f"{root}.tmp{os.getpid()}{ext or '.mp4'}"
        writer = cv2.VideoWriter(tmp, cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
    for frame in tqdm.tqdm(demo.run_on_video(video), total=num_frames, unit="frame"):
        if writer is not None:
            writer.write(frame)
        else:
            cv2.namedWindow(WINDOW_NAME, cv2.WINDOW_NORMAL)
            cv2.imshow(WINDOW_NAME, frame)
            if cv2.waitKey(1) == 27:
                break
    video.release()
    if writer is not None:
        writer.release()
        os.replace(tmp, out)
        logger.info("wrote %s at %.2f fps", out, fps)
    return 0


def _prepare_output(args) -> Tuple[bool, str]:
    """Create the output directory up front; returns (ok, message)."""
    if not args.output:
        return True, ""
    target = (
        args.output
        if _many_inputs(args) or args.output.endswith(os.sep)
        else os.path.dirname(args.output)
    )
    if not target:
        return True, ""
    try:
        os.makedirs(target, exist_ok=True)
    except OSError as e:
        return False, f"error: cannot create output directory {target}: {e.strerror}"
    if not os.access(target, os.W_OK):
        return False, f"error: output directory {target} is not writable"
    return True, ""


def main(argv=None) -> int:
    args = get_parser().parse_args(argv)
    setup_logger(name="fvcore")
    logger = setup_logger()
    logger.info("Arguments: " + str(args))
    if not (args.input or args.webcam or args.video_input):
        print("error: give --input, --video-input or --webcam", file=sys.stderr)
        return 2
    ok, message = _prepare_output(args)
    if not ok:
        print(message, file=sys.stderr)
        return 2
    cfg = setup_cfg(args)
    demo = VisualizationDemo(cfg)
    if args.input:
        paths = expand_inputs(args.input)
        if not paths:
            print(f"error: no input matches {args.input}", file=sys.stderr)
            return 2
        failed = run_images(demo, args, paths, logger)
        if failed:
            logger.warning("%d of %d inputs failed", failed, len(paths))
        return 1 if failed else 0
    if args.webcam:
        cam = cv2.VideoCapture(0)
        for vis in demo.run_on_video(cam):
            cv2.namedWindow(WINDOW_NAME, cv2.WINDOW_NORMAL)
            cv2.imshow(WINDOW_NAME, vis)
            if cv2.waitKey(1) == 27:
                break
        cam.release()
        cv2.destroyAllWindows()
        return 0
    return run_video(demo, args, logger)


if __name__ == "__main__":
    sys.exit(main())  # pragma: no cover
