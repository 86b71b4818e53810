"""Safe and atomic checkpoint I/O.

* Loading never runs code from a file: ``.safetensors`` through safetensors, ``.pth``/``.pt``
  through ``torch.load(weights_only=True)``, and detectron2's pickled ``.pkl`` model-zoo format
  through a restricted unpickler that only rebuilds numpy arrays and plain containers.
* Saving is atomic: a checkpoint is written to a hidden temporary file, flushed to disk and renamed;
  ``last_checkpoint`` is replaced the same way and only after that. A failed write (disk full,
  permission, I/O error) removes its temporary file and names the path and the reason.
"""

import logging
import os
import pickle
from typing import Any, Dict

import torch
from detectron2.checkpoint import DetectionCheckpointer

from cbam_hrnet_d2.utils.files import FileWriteError, atomic_write, atomic_write_text

__all__ = [
    "UnsafeCheckpointError",
    "restricted_pickle_load",
    "load_tensor_file",
    "SafeCheckpointer",
    "FileWriteError",
    "MISSING_WEIGHTS_HINT",
]

logger = logging.getLogger(__name__)

# (module, name) pairs a model-zoo .pkl may reference: numpy arrays and scalars, plain containers.
_PICKLE_ALLOWED = {
    ("collections", "OrderedDict"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "slice"),
    ("builtins", "complex"),
}


class UnsafeCheckpointError(pickle.UnpicklingError):
    """The file would import or call something when unpickled; it was not loaded."""


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _PICKLE_ALLOWED:
            return super().find_class(module, name)
        raise UnsafeCheckpointError(
            f"refusing to unpickle {module}.{name}: only numpy arrays and plain containers are "
            "allowed"
        )


def restricted_pickle_load(f, encoding: str = "latin1", **_: Any) -> Any:
    """``pickle.load`` that refuses every global except numpy arrays and plain containers."""
    return _RestrictedUnpickler(f, encoding=encoding).load()


def load_tensor_file(path: str) -> Dict[str, Any]:
    """Load a checkpoint without running code from it.

    Returns:
        dict: what the file holds (for .safetensors: {name: Tensor}).
    Raises:
        FileNotFoundError, or ValueError naming the file and the reason (truncated, not a
        checkpoint, would run code).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file {path} does not exist")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(path, device="cpu")
        if path.endswith(".pkl"):
            with open(path, "rb") as f:
                return restricted_pickle_load(f)
        return torch.load(path, map_location="cpu", weights_only=True)
    except UnsafeCheckpointError as e:
        raise ValueError(f"{path}: refused, the file would run code when loaded ({e})") from e
    except pickle.UnpicklingError as e:
        if "Weights only load failed" in str(e):
            raise ValueError(
                f"{path}: refused, the file holds Python objects that would run code when loaded "
                "(torch.load weights_only=True). Re-save it as a plain state dict or .safetensors."
            ) from e
        raise ValueError(f"{path}: not a checkpoint or truncated ({e})") from e
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError) as e:
        raise ValueError(f"{path}: not a checkpoint or truncated ({type(e).__name__}: {e})") from e


MISSING_WEIGHTS_HINT = (
    "The COCO configs start from ImageNet HRNet weights, as detectron2's R50 configs do: make the "
    "file with `python tools/convert_hrnet_weights.py --src <timm or official HRNet ImageNet "
    "file> --out <this path> --width <W>` (docs/weights.md), or give the unconverted file as "
    'MODEL.CBAM_HRNET.PRETRAINED with MODEL.WEIGHTS "", or train from random init with '
    'configs/mask_rcnn_CBAM_HRNet_W18_FPN_1x_scratch.yaml (MODEL.WEIGHTS "").'
)


class SafeCheckpointer(DetectionCheckpointer):
    """:class:`DetectionCheckpointer` with safe loading and atomic saving (see module doc)."""

    def load(self, path: str, *args: Any, **kwargs: Any) -> Dict[str, Any]:
        # fvcore's own check is a bare assert; name the key and the ways to get the file instead
        if path and "://" not in path and not os.path.isfile(path.split("?")[0]):
            raise FileNotFoundError(
                f"MODEL.WEIGHTS = {path!r}: the file does not exist. {MISSING_WEIGHTS_HINT}"
            )
        return super().load(path, *args, **kwargs)

    def _torch_load(self, f: str) -> Dict[str, Any]:
        loaded = load_tensor_file(f)
        if f.endswith(".safetensors"):
            loaded = {"model": loaded}
        return loaded

    def _load_file(self, filename: str) -> Dict[str, Any]:
        if not filename.endswith(".pkl"):
            return super()._load_file(filename)  # .pth/.pt/.safetensors: through _torch_load
        # detectron2 reads model-zoo .pkl files with a plain pickle.load; read them with the
        # restricted one and hand detectron2 the dict its own .pkl branch would build
        data = load_tensor_file(filename)
        if "model" in data and "__author__" in data:  # detectron2 model-zoo format
            return data
        # Caffe2 / Detectron1 model zoo: detection files keep their tensors under "blobs"
        blobs = data.get("blobs", data)
        model = {k: v for k, v in blobs.items() if not k.endswith("_momentum")}
        return {"model": model, "__author__": "Caffe2", "matching_heuristics": True}

    def save(self, name: str, **kwargs: Any) -> None:
        """fvcore's ``save`` (model + checkpointables + ``kwargs`` into ``save_dir/<name>.pth``,
        then ``last_checkpoint``), with both files written atomically (:func:`atomic_write`). A
        write that fails raises :class:`FileWriteError` naming the file and why, removes its
        temporary file and leaves the previous checkpoint and ``last_checkpoint`` as they were."""
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        self.logger.info("Saving checkpoint to %s", save_file)
        atomic_write(save_file, lambda f: torch.save(data, f))
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        atomic_write_text(os.path.join(self.save_dir, "last_checkpoint"), last_filename_basename)
