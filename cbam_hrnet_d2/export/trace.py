"""Export a trained model by tracing (TorchScript, ONNX); :mod:`.runtime` runs the files
(``tools/export_model.py`` is the command line). Export runs on the CPU: the model is traced there.

The exported model is what detectron2's traced Mask R-CNN is: it takes one image tensor (C, H, W),
float, channels in ``INPUT.FORMAT`` order, already resized for the test (``INPUT.MIN_SIZE_TEST`` /
``MAX_SIZE_TEST``), and returns, for N detections, ``boxes`` (N, 4) in the input's pixels,
``classes`` (N,), ``masks`` (N, 1, M, M) mask-head probabilities (M = 2 x
``ROI_MASK_HEAD.POOLER_RESOLUTION``), ``scores`` (N,) and ``image_size`` (2,). Scaling the boxes to
the original image and pasting the masks (:func:`detectron2.modeling.postprocessing.
detector_postprocess`) stay outside the graph, in fp32, as in detectron2. Any input size and any
number of detections (0 included): everything with data-dependent shapes takes a traceable path
while tracing (``SparseROIAlign`` runs torchvision's RoIAlign; GroupNorm is written with explicit
sizes). The ONNX graph gets one rewrite for OpenVINO (:mod:`.onnx_graph`).

Precision: TorchScript records what the eager model runs, ``TEST.PRECISION``'s autocast casts
included, so the traced model agrees with ``build_model``'s (and with Detectron2's own tracing
check) under every precision ("auto" decides bf16 or fp32 for the sample image's size and keeps
that). ONNX graphs are exported in float32 whatever ``TEST.PRECISION`` says (ONNX Runtime runs no
bf16 convolutions; OpenVINO picks its own precision): they agree with the eager model under
``TEST.PRECISION fp32``, and :func:`export` says so where the config asks for another.
"""

import copy
import io
import logging
import os

import torch
from detectron2.data import DatasetMapper
from detectron2.export import TracingAdapter
from torch import nn

from cbam_hrnet_d2.export.onnx_graph import empty_constants_as_fills
from cbam_hrnet_d2.utils.files import atomic_write

__all__ = ["FORMATS", "OUTPUT_NAMES", "load_sample_image", "export"]

logger = logging.getLogger(__name__)

FORMATS = {"torchscript": "model.ts", "onnx": "model.onnx"}
# the graph's outputs, in detectron2's flattening order of the Instances fields (checked at export)
OUTPUT_NAMES = ["boxes", "classes", "masks", "scores", "image_size"]
_FIELDS = ["pred_boxes", "pred_classes", "pred_masks", "scores"]
ONNX_OPSET = 17


def load_sample_image(cfg, path: str) -> torch.Tensor:
    """The image at ``path`` as detectron2's test-time ``DatasetMapper`` gives it to the model
    (read in ``INPUT.FORMAT``, resized by ``INPUT.MIN_SIZE_TEST`` / ``MAX_SIZE_TEST``): (C, H, W)
    float."""
    return DatasetMapper(cfg, is_train=False)({"file_name": path})["image"].float()


class _ExportableGroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` (same parameters, same function) whose exported graph holds for a batch of
    zero, as in the mask head of an image without detections. torch.onnx writes GroupNorm as a
    reshape to (N, G, -1), and ONNX Runtime's optimizer turns any reshape of the batch into one with
    a -1, which cannot be resolved when N is 0. Here no reshape touches the batch: group statistics
    are per-channel means times a (C, G) group-membership matrix (two passes, as GroupNorm)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        c, g = self.num_channels, self.num_groups
        member = torch.arange(c)[:, None] // (c // g) == torch.arange(g)[None, :]
        self.register_buffer("_member", member.float() / (c // g), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dims = tuple(range(2, x.dim()))
        member = self._member.to(x.dtype)

        def per_channel(group_stat):  # (N, G) -> (N, C, 1, ..., 1)
            t = group_stat @ (member.t() * (self.num_channels // self.num_groups))
            for _ in dims:
                t = t.unsqueeze(-1)
            return t

        centered = x - per_channel(x.mean(dims) @ member)
        var = (centered * centered).mean(dims) @ member
        y = centered * per_channel(torch.rsqrt(var + self.eps))
        if self.affine:
            shape = (1, self.num_channels) + (1,) * len(dims)
            y = y * self.weight.reshape(shape) + self.bias.reshape(shape)
        return y


def _exportable(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every ``nn.GroupNorm`` an :class:`_ExportableGroupNorm`."""
    model = copy.deepcopy(model)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.GroupNorm:
                new = _ExportableGroupNorm(
                    child.num_groups, child.num_channels, child.eps, child.affine
                )
                new.load_state_dict(child.state_dict())
                setattr(parent, name, new)
    return model


def _inference(model, inputs):
    # detectron2's export recipe: the RoI masks, not pasted (that is postprocessing)
    return [{"instances": model.inference(inputs, do_postprocess=False)[0]}]


def _onnx_bytes(adapter, image: torch.Tensor) -> bytes:
    """The ONNX graph of ``adapter`` traced on ``image``, with :func:`empty_constants_as_fills`."""
    try:
        import onnx
    except ImportError as e:
        raise ImportError("ONNX export needs onnx: pip install -e .[deploy]") from e
    buffer = io.BytesIO()
    per_detection = {name: {0: "detections"} for name in OUTPUT_NAMES[:4]}
    torch.onnx.export(
        adapter,
        (image,),
        buffer,
        opset_version=ONNX_OPSET,
        dynamo=False,
        input_names=["image"],
        output_names=OUTPUT_NAMES,
        dynamic_axes={"image": {1: "height", 2: "width"}, **per_detection},
    )
    graph = onnx.load_model_from_string(buffer.getvalue())
    rewritten = empty_constants_as_fills(graph)
    logger.info("ONNX graph: %d empty If-branch constant(s) written as ConstantOfShape", rewritten)
    return graph.SerializeToString()


def export(model, image: torch.Tensor, fmt: str, output_dir: str) -> str:
    """Trace ``model`` (eval mode) on ``image`` and write ``output_dir/model.ts`` or
    ``model.onnx`` (atomically). Returns the path."""
    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r} is not supported; allowed values: {list(FORMATS)}")
    precision = getattr(getattr(model, "backbone", None), "precision", "fp32")
    if fmt == "onnx" and precision != "fp32":
        logger.warning(
            "The ONNX graph runs float32; eager under TEST.PRECISION %r may run bf16 on this CPU, "
            "so the two differ by bf16 rounding: compare with TEST.PRECISION fp32",
            precision,
        )
    model = _exportable(model).eval()
    adapter = TracingAdapter(model, [{"image": image}], _inference).eval()
    path = os.path.join(output_dir, FORMATS[fmt])
    os.makedirs(output_dir, exist_ok=True)
    with torch.no_grad():
        adapter(image)  # fills the adapter's output schema
        keys = adapter.outputs_schema.schemas[0].schemas[0].keys
        assert keys == _FIELDS, f"the model returns {keys}, the exported graph expects {_FIELDS}"
        if fmt == "torchscript":
            traced = torch.jit.trace(adapter, (image,))
            atomic_write(path, lambda f: torch.jit.save(traced, f))
        else:
            data = _onnx_bytes(adapter, image)
            atomic_write(path, lambda f: f.write(data))
    logger.info("Exported %s (inputs: image (C, H, W); outputs: %s)", path, OUTPUT_NAMES)
    return path
