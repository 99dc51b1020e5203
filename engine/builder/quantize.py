"""int8 by post-training quantization (NNCF on the ONNX maps graph): the build side's lowest rung.

NNCF inserts QuantizeLinear/DequantizeLinear pairs around the graph's convolutions, their ranges taken
from the check images (`engine.build --calib`); OpenVINO and ONNX Runtime run such a graph in int8 where
the pairs are, fp32 elsewhere. What stays fp32 is chosen per layer group by name (the names are the
inference graph's module paths, engine/builder/graph.py), and the builder's accuracy check decides which
rung an engine keeps (engine/builder/builder.py).
"""

from __future__ import annotations

import logging

import numpy as np

from engine.header import INT8_PRECISIONS

__all__ = ["quantize_int8", "KEEP_FP32"]

# ONNX node-name patterns kept in fp32, per int8 precision: the stem (the first convolution, on raw pixels),
# and for "int8-backbone" the whole flow (its couplings exponentiate conv outputs: errors grow with depth)
_STEM, _FLOW = r"/backbone/net/_conv_stem/.*", r"/scales\..*"
KEEP_FP32 = {"int8": [_STEM], "int8-backbone": [_STEM, _FLOW]}
assert set(KEEP_FP32) == set(INT8_PRECISIONS)


def quantize_int8(onnx_bytes: bytes, precision: str, images: np.ndarray) -> bytes:
    """The maps graph with int8 quantize/dequantize pairs, ranges from `images` (N, 3, H, W) float32 in [0, 1]."""
    import nncf  # build side only: NNCF imports much of the ONNX and OpenVINO tool chains
    import onnx

    nncf.set_log_level(logging.ERROR)  # its INFO lines list every node it leaves alone (hundreds)

    dataset = nncf.Dataset([images[i:i + 1] for i in range(len(images))], lambda x: {"images": x})
    quantized = nncf.quantize(onnx.load_from_string(onnx_bytes), dataset, subset_size=len(images),
                              ignored_scope=nncf.IgnoredScope(patterns=KEEP_FP32[precision], validate=False))
    return quantized.SerializeToString()
