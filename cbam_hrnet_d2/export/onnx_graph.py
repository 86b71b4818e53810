"""One rewrite of the exported ONNX graph, so that OpenVINO runs it as ONNX Runtime does.

torchvision's ``batched_nms`` is scripted while tracing (``torch.jit._script_if_tracing``): its
``if boxes.numel() == 0: return torch.empty((0,), dtype=torch.int64)`` becomes an ONNX ``If`` whose
then-branch is a ``Constant`` with zero elements. OpenVINO 2026.4 returns such a branch output as
one element of undefined value (an image without detections got one bogus detection; the bisection
is in docs/deploy.md), while a ``ConstantOfShape`` of the same shape comes back empty.
:func:`empty_constants_as_fills` writes every zero-element ``Constant`` inside an ``If`` branch as
that ``ConstantOfShape``: the same value for every ONNX runtime (tests/test_export.py runs both
on an image without detections).
"""

import numpy as np

__all__ = ["empty_constants_as_fills"]


def _subgraphs(graph):
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == attr.GRAPH:
                yield node, attr.g
            for g in attr.graphs:
                yield node, g


def _rewrite_branch(graph) -> int:
    from onnx import helper, numpy_helper

    count = 0
    for i, node in enumerate(list(graph.node)):
        if node.op_type != "Constant" or len(node.attribute) != 1:
            continue
        attr = node.attribute[0]
        if attr.name != "value" or 0 not in attr.t.dims:
            continue
        value = numpy_helper.to_array(attr.t)
        shape = node.output[0] + "_empty_shape"
        fill = numpy_helper.from_array(np.zeros((1,), dtype=value.dtype))
        new = [
            helper.make_node(
                "Constant", [], [shape], value=numpy_helper.from_array(np.array(value.shape))
            ),
            helper.make_node("ConstantOfShape", [shape], list(node.output), value=fill),
        ]
        graph.node.remove(node)
        for j, n in enumerate(new):
            graph.node.insert(i + j + count, n)
        count += 1
    return count


def empty_constants_as_fills(model) -> int:
    """Rewrite, in place, every zero-element ``Constant`` in the ``If`` branches of ``model`` (an
    ``onnx.ModelProto``) as a ``ConstantOfShape``; returns how many were rewritten."""
    count, todo = 0, [model.graph]
    while todo:
        graph = todo.pop()
        for node, sub in _subgraphs(graph):
            if node.op_type == "If":
                count += _rewrite_branch(sub)
            todo.append(sub)
    return count
