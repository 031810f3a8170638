"""float32 graph → int8 with onnxruntime's dynamic quantization.

Per-channel int8 weights (one scale per output column) are the default: in our measurements they
matched llama.cpp's Q8_0 accuracy, while one scale per tensor did not. Activations stay float and are
quantized on the fly per MatMul, so no calibration data is needed. Weights are s8 where onnxruntime's
u8 x s8 kernel is exact and u8 elsewhere (x86 without VNNI, see `kolite.engine.cpu`); onnxruntime's
documentation offers `reduce_range` (7-bit weights) for the same saturation, which halves the weights'
resolution instead (measured in benchmarks/RESULTS.md).
"""

from __future__ import annotations

import logging
from pathlib import Path

import onnx

from kolite.convert.graph import set_int8_weights
from kolite.engine.cpu import Int8Weights, detect


def _quiet_root(record: logging.LogRecord) -> bool:
    """The quantizer logs chatter (per-tensor notes, a pre-processing hint) straight to the root logger."""
    return record.levelno >= logging.ERROR


def quantize_int8(fp32_path: Path, out_path: Path, *, per_channel: bool = True,
                  int8_weights: Int8Weights | None = None, external_data: bool = False) -> Path:
    """Write an int8 copy of the graph at `fp32_path`; only MatMuls with constant weights change.

    `int8_weights`: "s8" or "u8" weights; by default the form that is exact on this CPU.
    `external_data`: the weights go to `<out_path>.data` beside the graph (onnxruntime's
    `use_external_data_format`) rather than inside it, so the saved graph never holds them in one
    protobuf. The metadata is set without loading them either way.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    form = int8_weights or detect().int8_weights
    root = logging.getLogger()
    root.addFilter(_quiet_root)
    try:
        quantize_dynamic(
            model_input=Path(fp32_path),
            model_output=Path(out_path),
            op_types_to_quantize=["MatMul"],
            per_channel=per_channel,
            reduce_range=False,
            use_external_data_format=external_data,
            weight_type=QuantType.QInt8 if form == "s8" else QuantType.QUInt8,
            # shape inference cannot type GroupQueryAttention (a contrib op): its outputs are float
            extra_options={"MatMulConstBOnly": True, "DefaultTensorType": onnx.TensorProto.FLOAT},
        )
    finally:
        root.removeFilter(_quiet_root)
    model = onnx.load(str(out_path), load_external_data=False)
    set_int8_weights(model, form)
    onnx.save(model, str(out_path))
    return Path(out_path)
