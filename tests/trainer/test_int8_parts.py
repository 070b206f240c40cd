"""Which image-tower nodes the int8 export keeps in float (`trainer.export.int8.float_nodes`), on a hand-built graph."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from trainer.export.int8 import float_nodes


def _tower() -> onnx.ModelProto:
    """pixels -> Pad -> stem conv -> depthwise conv -> projection conv -> expand conv -> depthwise conv -> pool ->
    MatMul (the head): the shape of an EfficientNet-Lite tower, 4 channels."""

    def weight(name: str, out: int, inp: int) -> onnx.TensorProto:
        return numpy_helper.from_array(np.ones((out, inp, 1, 1), np.float32), name)

    nodes = [
        helper.make_node("Pad", ["pixels", "pads"], ["padded"], name="pad"),
        helper.make_node("Conv", ["padded", "w_stem"], ["s"], name="stem"),
        helper.make_node("Conv", ["s", "w_dw1"], ["d1"], name="dw1", group=4),
        helper.make_node("Conv", ["d1", "w_pw1"], ["p1"], name="project1"),
        helper.make_node("Conv", ["p1", "w_ex2"], ["e2"], name="expand2"),
        helper.make_node("Conv", ["e2", "w_dw2"], ["d2"], name="dw2", group=4),
        helper.make_node("GlobalAveragePool", ["d2"], ["pooled"], name="pool"),
        helper.make_node("Flatten", ["pooled"], ["flat"], name="flatten"),
        helper.make_node("MatMul", ["flat", "w_head"], ["embedding"], name="head"),
    ]
    inits = [
        numpy_helper.from_array(np.zeros(8, np.int64), "pads"),
        weight("w_stem", 4, 3),
        weight("w_dw1", 4, 1),
        weight("w_pw1", 4, 4),
        weight("w_ex2", 4, 4),
        weight("w_dw2", 4, 1),
        numpy_helper.from_array(np.ones((4, 2), np.float32), "w_head"),
    ]
    graph = helper.make_graph(
        nodes,
        "tower",
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, [1, 2])],
        inits,
    )
    return helper.make_model(graph)


@pytest.mark.parametrize(
    ("parts", "expected"),
    [
        (("stem",), ["stem"]),
        (("first_block",), ["dw1", "project1"]),
        (("head",), ["pool", "flatten", "head"]),
        (("stem", "first_block", "head"), ["stem", "dw1", "project1", "pool", "flatten", "head"]),
        ((), []),
    ],
)
def test_float_nodes_picks_the_parts_by_graph_structure(parts: tuple[str, ...], expected: list[str]) -> None:
    assert float_nodes(_tower(), parts) == expected


def test_the_export_keeps_stem_first_block_and_head_in_float_by_default() -> None:
    assert float_nodes(_tower()) == ["stem", "dw1", "project1", "pool", "flatten", "head"]


def test_an_unknown_part_is_refused_naming_the_known_ones() -> None:
    with pytest.raises(ValueError, match="known: stem, first_block, head"):
        float_nodes(_tower(), ("neck",))
