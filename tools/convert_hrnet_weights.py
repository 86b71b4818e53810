#!/usr/bin/env python
"""Convert ImageNet HRNet weights (timm .pth/.safetensors, or the official HRNet-Image-
Classification .pth) into a file ``MODEL.WEIGHTS`` loads, as detectron2's
tools/convert-torchvision-to-d2.py does for torchvision's ResNets:

    python tools/convert_hrnet_weights.py --src hrnet_w18.safetensors \
        --out weights/hrnet_w18_in1k_d2.safetensors --width 18
"""

import argparse
import logging
from typing import Optional, Sequence

from detectron2.utils.logger import setup_logger

from cbam_hrnet_d2.modeling.hrnet import HRNET_WIDTHS
from cbam_hrnet_d2.modeling.hrnet_weights import convert_hrnet_weights, summarise_keys

logger = logging.getLogger("cbam_hrnet_d2.convert_hrnet_weights")


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--src", required=True, help="timm (.pth/.safetensors) or official HRNet .pth"
    )
    parser.add_argument("--out", required=True, help="output file; .safetensors preferred")
    parser.add_argument("--width", type=int, default=18, choices=sorted(HRNET_WIDTHS))
    args = parser.parse_args(argv)
    setup_logger(name="cbam_hrnet_d2")
    report = convert_hrnet_weights(args.src, args.out, args.width)
    logger.info(
        "Wrote %s: %d trunk tensors; trunk tensors not in the source: %s; source tensors "
        "dropped: %s",
        args.out,
        len(report["loaded"]),
        summarise_keys(report["missing"]),
        summarise_keys(report["unused"]),
    )


if __name__ == "__main__":
    main()
