"""Build a GPT-2 ONNX graph with a KV cache straight from numpy weights (no torch, no exporter).

Writing the graph by hand keeps conversion torch-free and lets us shape it for serving:
- attention is onnxruntime's fused `GroupQueryAttention` (com.microsoft). Each row of the batch has
  its own length (`seqlens_k`), so requests of different lengths share a batch without padding, and
  the runtime binds `past_*` and `present_*` to the same preallocated buffers: the cache is updated
  in place instead of being copied at every step;
- inputs `token_embeddings` (the rows of the token table for this step's ids: the table is a file of
  its own beside the graph, read by `kolite.engine.embeddings.TokenTable`, see `_token_table`),
  `position_ids`, `seqlens_k` (per row: tokens in the cache after this step, minus one),
  `total_sequence_length`, and `past_key_i`/`past_value_i` ([batch, heads, capacity, head_dim],
  float32 or, with `kv_cache="fp16"`, float16); outputs `logits` and `present_key_i`/`present_value_i`
  (the same buffers when bound so);
- the attention scale is folded into the query weights, and `logits` covers only the last position
  unless `all_logits` is asked for: generation never needs the others, and the lm_head is the largest
  MatMul of a prefill (51200 x 768 for KoGPT2);
- with `quant="int8"`, every weight MatMul (lm_head included) becomes an int8 MatMulInteger with
  weights quantized per column and activations per token (see `_int8_matmul`); with `"int4"`, an
  onnxruntime MatMulNBits with 4-bit blocks (see `_int4_matmul`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from kolite.engine.cpu import Int8Weights, detect
from kolite.engine.embeddings import TOKEN_TABLE_KEY
from kolite.models.gpt2config import GPT2Config

OPSET = 17
MS_DOMAIN = "com.microsoft"


def input_names(n_layer: int) -> list[str]:
    """Graph input names in the order the runtime feeds them."""
    names = ["token_embeddings", "position_ids", "seqlens_k", "total_sequence_length"]
    for i in range(n_layer):
        names += [f"past_key_{i}", f"past_value_{i}"]
    return names


def output_names(n_layer: int) -> list[str]:
    """Graph output names: logits, then the new cache of every layer."""
    names = ["logits"]
    for i in range(n_layer):
        names += [f"present_key_{i}", f"present_value_{i}"]
    return names


EXTERNAL_MIN_BYTES = 1024  # smaller initializers (scalars, shapes) stay inside the graph, as onnx's size_threshold
EXTERNAL_ALIGN = 4096  # each tensor starts on a page boundary, so it can be mapped where it lies
QUANT_BLOCK = 2**20  # elements per block of rows quantized (or written) at once: small temporaries


class ExternalData:
    """Initializer bytes appended to one external-data file as the graph is built.

    Why: a ModelProto that holds every initializer until it is saved kept the float32 weights, their
    quantized forms and the protobuf's copy all in memory at once (1.2 GB to convert KoGPT2 to int8,
    2.5 GB for fp32). Written as it is produced, each weight lives only until it is in the file, and the
    graph keeps a reference (location, offset, length): the same external-data form `onnx.save_model(...,
    save_as_external_data=True)` writes. onnxruntime maps such a file instead of parsing a protobuf that
    holds the weights, so a session opens with less resident memory and a table read by `Gather` (the
    token embedding) is paged in only where rows are read (KoGPT2 int8, measured: 230 -> 178 MB after
    load, peak 267 -> 215 MB); it also lifts protobuf's 2 GB limit on one file.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.write_bytes(b"")
        self.size = 0

    def add(self, name: str, value: np.ndarray) -> TensorProto:
        """Append `value` (aligned to EXTERNAL_ALIGN) and return the initializer that refers to it.

        A non-contiguous `value` (the lm_head is a transposed view of wte) is written a block of rows
        at a time, never copied whole.
        """
        offset = -(-self.size // EXTERNAL_ALIGN) * EXTERNAL_ALIGN
        rows = value.reshape(value.shape[0], -1) if value.ndim else value.reshape(1, 1)
        step = max(1, QUANT_BLOCK // max(1, rows.shape[1]))
        little = value.dtype.newbyteorder("<")  # ONNX stores tensors little-endian
        with self.path.open("ab") as fh:
            fh.write(bytes(offset - self.size))
            for start in range(0, rows.shape[0], step):
                fh.write(np.ascontiguousarray(rows[start : start + step], dtype=little).reshape(-1).view(np.uint8).data)
        self.size = offset + value.nbytes
        tensor = TensorProto(name=name, dims=value.shape, data_type=helper.np_dtype_to_tensor_dtype(value.dtype),
                             data_location=TensorProto.EXTERNAL)
        for key, text in (("location", self.path.name), ("offset", str(offset)), ("length", str(value.nbytes))):
            tensor.external_data.add(key=key, value=text)
        return tensor


@dataclass
class _Builder:
    """Accumulates nodes and initializers with unique names; with `data`, large initializers go
    straight to that external-data file and the graph holds only references to them."""

    nodes: list[onnx.NodeProto] = field(default_factory=list)
    inits: list[onnx.TensorProto] = field(default_factory=list)
    data: ExternalData | None = None
    _count: int = 0
    _scalars: set[str] = field(default_factory=set)

    def const(self, name: str, value: np.ndarray) -> str:
        if self.data is not None and value.nbytes >= EXTERNAL_MIN_BYTES:
            self.inits.append(self.data.add(name, value))
        else:
            self.inits.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def scalar(self, value: float | int, dtype: type = np.float32) -> str:
        """A scalar constant shared by every node that needs the same value."""
        name = f"const_{np.dtype(dtype).name}_{value}"
        if name not in self._scalars:
            self._scalars.add(name)
            self.const(name, np.array(value, dtype))
        return name

    def op(self, op_type: str, inputs: list[str], name: str | None = None, outputs: int = 1,
           **attrs: object) -> str | list[str]:
        self._count += 1
        base = name or f"{op_type.lower()}_{self._count}"
        outs = [base] if outputs == 1 else [f"{base}_{k}" for k in range(outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=f"n_{base}", **attrs))  # type: ignore[arg-type]
        return outs[0] if outputs == 1 else outs


def _gelu(b: _Builder, x: str, bias: str, activation: str) -> str:
    """gelu(x + bias) in one fused op: FastGelu is GPT-2's tanh form (gelu_new), BiasGelu the erf form."""
    op = "BiasGelu" if activation == "gelu" else "FastGelu"
    return b.op(op, [x, bias], domain=MS_DOMAIN)


def _skip_layer_norm(b: _Builder, hidden: str, branch: str, bias: str, gamma: str, beta: str,
                     eps: float) -> tuple[str, str]:
    """(LayerNorm(hidden + branch + bias), hidden + branch + bias): the residual add, the branch's
    bias and the next layer norm.

    Written as two Adds and a LayerNormalization, not as onnxruntime's fused SkipLayerNormalization
    (which it keeps as written: it does not fuse this pattern back): its CPU kernel is the slower one,
    and the unfused graph prefills a 512-token prompt ~12% faster (KoGPT2 shape, int8: 122-128 ms vs
    138-141 ms, interleaved runs; decode unchanged).
    """
    total = b.op("Add", [b.op("Add", [branch, bias]), hidden])
    return b.op("LayerNormalization", [total, gamma, beta], axis=-1, epsilon=eps), total


WeightFormat = Literal["fp32", "int8", "int4"]
INT4_BLOCK = 32  # weights per int4 scale: the block of llama.cpp's Q4_0


def _linear(b: _Builder, x: str, w: np.ndarray, bias: np.ndarray | None, tag: str, weights: WeightFormat,
            int8_weights: Int8Weights = "s8") -> str:
    """x @ w (+ bias), w in transformers' Conv1D layout ([in, out]), stored as `weights` asks."""
    if weights == "int8":
        y = _int8_matmul(b, x, w, tag, int8_weights)
    elif weights == "int4":
        y = _int4_matmul(b, x, w, tag)
    else:
        y = b.op("MatMul", [x, b.const(f"{tag}.weight", w)], name=f"{tag}_matmul")
    return y if bias is None else b.op("Add", [y, b.const(f"{tag}.bias", bias)])


def _int4_matmul(b: _Builder, x: str, w: np.ndarray, tag: str) -> str:
    """onnxruntime's 4-bit weight-only MatMul (MatMulNBits): symmetric int4 in blocks of 32 along K,
    one float scale per block, as llama.cpp's Q4_0. `accuracy_level=4` lets the kernel quantize each
    row of activations to int8 per block (fast integer dot products; a row's result does not depend
    on the other rows)."""
    k, n = w.shape
    packed, scales = quantize_int4_blocks(w)
    out = f"{tag}_matmul"
    b.nodes.append(helper.make_node(
        "MatMulNBits", [x, b.const(f"{tag}.weight_q4", packed), b.const(f"{tag}.scales", scales)], [out],
        name=f"n_{out}", domain=MS_DOMAIN, K=k, N=n, bits=4, block_size=INT4_BLOCK, accuracy_level=4,
    ))
    return out


def quantize_int4_blocks(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """w [K, N] as MatMulNBits stores it: packed nibbles [N, blocks, 16] and scales [N, blocks].

    onnxruntime's own quantizer does the work, a band of columns at a time (each column is quantized on
    its own, so the bytes are those of one whole-matrix call): the float32 copy it needs, zero-padded to
    whole blocks, is then a band and not the matrix (157 MB for KoGPT2's lm_head).
    """
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits

    k, n = w.shape
    blocks = -(-k // INT4_BLOCK)
    packed = np.empty((n, blocks, INT4_BLOCK // 2), np.uint8)
    scales = np.empty((n, blocks), np.float32)
    step = max(1, QUANT_BLOCK // (blocks * INT4_BLOCK))
    for start in range(0, n, step):
        band = slice(start, min(n, start + step))
        width = band.stop - start
        padded = np.zeros((blocks * INT4_BLOCK, width), np.float32)
        padded[:k] = w[:, band]
        band_packed = np.zeros((width, blocks, INT4_BLOCK // 2), np.uint8)
        band_scales = np.zeros((width, blocks), np.float32)
        zero_points = np.zeros((width, (blocks + 1) // 2), np.uint8)  # unused when symmetric
        quantize_matmul_4bits(band_packed, padded, band_scales, zero_points, INT4_BLOCK, width, blocks * INT4_BLOCK,
                              True)
        packed[band], scales[band] = band_packed, band_scales
    return packed, scales


def quantize_columns(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per output column: one float scale per column, zero point 0.

    Worked through a block of rows at a time, so the float temporaries stay small beside `w` (whole-array
    ones tripled the memory a 157 MB lm_head needs); the values are those of one whole-array pass.
    """
    rows = max(1, QUANT_BLOCK // max(1, w.shape[1]))
    blocks = [slice(start, start + rows) for start in range(0, w.shape[0], rows)]
    amax = np.abs(w[blocks[0]]).max(axis=0)
    for block in blocks[1:]:
        np.maximum(amax, np.abs(w[block]).max(axis=0), out=amax)
    scale = (amax / 127.0).astype(np.float32)
    scale[scale == 0] = 1.0
    q = np.empty(w.shape, np.int8)
    for block in blocks:
        part = w[block] / scale
        np.clip(np.rint(part, out=part), -127, 127, out=part)
        q[block] = part
    return q, scale


def _int8_matmul(b: _Builder, x: str, w: np.ndarray, tag: str, int8_weights: Int8Weights = "s8") -> str:
    """int8 weights (per column) times int8 activations quantized per ROW (per token).

    Each token's activations get their own scale, so a token's result never depends on the other
    rows of the batch: the integer products are exact, and batching changes nothing. (onnxruntime's
    dynamic quantization uses one scale for the whole input tensor, so a request's output would
    change with whatever else shares its batch.) Activations are stored as uint8 with zero point 128.

    `int8_weights="u8"` stores the same weight values shifted by 128 (zero point 128): onnxruntime then
    runs its u8 x u8 kernel, which is exact on x86 CPUs without VNNI, where the u8 x s8 one saturates
    (see `kolite.engine.cpu`). The integer products, and so the results, are identical.
    """
    wq, w_scale = quantize_columns(w)
    if int8_weights == "u8":  # x + 128 as a byte is x's two's-complement bits with the top one flipped
        wq, w_zero = np.bitwise_xor(wq.view(np.uint8), 0x80, out=wq.view(np.uint8)), b.scalar(128, np.uint8)
    else:
        w_zero = b.scalar(0, np.int8)
    amax = b.op("ReduceMax", [b.op("Abs", [x])], axes=[-1], keepdims=1)
    a_scale = b.op("Mul", [b.op("Max", [amax, b.scalar(1e-12)]), b.scalar(1.0 / 127.0)])
    shifted = b.op("Add", [b.op("Round", [b.op("Div", [x, a_scale])]), b.scalar(128.0)])
    xq = b.op("Cast", [shifted], to=TensorProto.UINT8)
    # (MatMulIntegerToFloat would fold the Cast and a Mul, but measured slower on x86 at batch 1)
    acc = b.op("MatMulInteger", [xq, b.const(f"{tag}.weight_q", wq), b.scalar(128, np.uint8), w_zero],
               name=f"{tag}_matmul")
    scaled = b.op("Mul", [b.op("Cast", [acc], to=TensorProto.FLOAT), a_scale])
    return b.op("Mul", [scaled, b.const(f"{tag}.scale", w_scale)])


def token_table_path(graph: Path) -> Path:
    """Where a graph's token table lives: `model.onnx.tokens` beside `model.onnx`."""
    return graph.with_name(graph.name + ".tokens")


def _token_table(model: onnx.ModelProto, wte: np.ndarray, quantized: bool, path: Path) -> None:
    """Write the token embedding table to `path`, outside the graph, and record its layout in the
    graph's metadata (`kolite.token_table`).

    Why not a `Gather` in the graph: onnxruntime maps the table from the data file, so every row a
    prompt touches pulls its pages (64 KB with the kernel's fault-around) into the server's resident set
    for good: 13-22 MB after a few Korean prompts, up to the whole table (39 MB as int8 for KoGPT2, 157 MB
    as float32). Read with `pread`, rows go through the page cache, which the kernel shares and drops
    as it needs, and the server holds only the rows of the step it runs. Quantized graphs store int8
    rows with one float32 scale per row after them (the table is symmetric per row: the lm_head keeps
    its own per-column copy); fp32 graphs store float32 rows.
    """
    if quantized:
        q, scale = quantize_columns(wte.T)  # a row of wte is a column of wte.T
        rows, layout = q.T, {"dtype": "int8", "scales": "float32"}
    else:
        rows, scale, layout = wte, None, {"dtype": "float32", "scales": None}
    with Path(path).open("wb") as fh:
        step = max(1, QUANT_BLOCK // rows.shape[1])
        for start in range(0, rows.shape[0], step):
            fh.write(np.ascontiguousarray(rows[start:start + step], dtype=rows.dtype.newbyteorder("<")).data)
        if scale is not None:
            fh.write(np.ascontiguousarray(scale, dtype="<f4").data)
    layout.update(file=Path(path).name, rows=int(rows.shape[0]), dim=int(rows.shape[1]))
    helper.set_model_props(model, {**{p.key: p.value for p in model.metadata_props},
                                   TOKEN_TABLE_KEY: json.dumps(layout)})


KVCache = Literal["fp32", "fp16"]


def build_gpt2_graph(
    cfg: GPT2Config, weights: Mapping[str, np.ndarray], *, all_logits: bool = False, quant: WeightFormat = "fp32",
    kv_cache: KVCache = "fp32", int8_weights: Int8Weights | None = None, external_data: Path | None = None,
    token_table: Path,
) -> onnx.ModelProto:
    """The GPT-2 graph for `cfg` with `weights` (canonical transformers key names); `quant` says how
    the weight matrices are stored (the embeddings, norms and biases stay float32).

    `kv_cache="fp16"` keeps keys and values as float16, as llama.cpp does by default: attention casts
    q, k and v to float16 and its output back (onnxruntime's CPU GroupQueryAttention computes in
    float32 either way). Half the cache bytes: less memory per token of context and less to read per
    step, so long contexts and batches decode faster (measured on KoGPT2 int8: 8 rows x 144 tokens
    874-887 -> 970-992 tok/s, 46 MB less resident).

    `int8_weights` (int8 only) is how the weights are stored, "s8" or "u8" (see `_int8_matmul`); by
    default the form that is exact on this CPU. The graph records it in its metadata
    (`kolite.int8_weights`), so a runtime can refuse a graph that would compute wrong on its CPU.

    `weights` is read one key at a time, as each is needed (a `kolite.models.gpt2_keys.GPT2Weights` reads
    each from the checkpoint file then). With `external_data` (a file path), every initializer of
    EXTERNAL_MIN_BYTES or more is written there as soon as it is made, so the returned graph holds only
    references: save it in the same folder, and no more than one weight and its quantized form is ever
    in memory. Without it, the graph holds its weights, as `onnx.save` expects.

    `token_table` is the file the token embeddings go to (`token_table_path(graph)`: the runtime looks
    for the name the metadata records in the graph's folder). `write_gpt2_graph` builds and saves both.
    """
    b = _Builder(data=ExternalData(external_data) if external_data is not None else None)
    g = _GPT2(b, cfg, weights, quant, int8_weights or detect().int8_weights, kv_cache)
    hidden = b.op("Add", ["token_embeddings", b.op("Gather", [b.const("wpe", g.w("transformer.wpe.weight")),
                                                              "position_ids"], name="pos_emb")])
    x = b.op("LayerNormalization", [hidden, *g.norm("h.0.ln_1")], axis=-1, epsilon=cfg.layer_norm_epsilon)
    for i in range(cfg.n_layer):  # a block: x is the normed stream, hidden the residual stream
        p = f"transformer.h.{i}."
        x, hidden = g.residual(hidden, g.attention(i, x), p + "attn.c_proj.bias", f"h.{i}.ln_2")
        x, hidden = g.residual(hidden, g.mlp(i, x), p + "mlp.c_proj.bias",
                               f"h.{i + 1}.ln_1" if i + 1 < cfg.n_layer else "ln_f")
    model = g.finish(x, all_logits)  # x: ln_f(final residual stream)
    _token_table(model, g.w("transformer.wte.weight"), quant != "fp32", token_table)
    return model


@dataclass
class _GPT2:
    """The pieces of kolite's GPT-2 graph, one method each, over a `_Builder` (as nanoGPT's `Block`)."""

    b: _Builder
    cfg: GPT2Config
    weights: Mapping[str, np.ndarray]
    quant: WeightFormat
    form: Int8Weights
    kv_cache: KVCache

    def w(self, key: str) -> np.ndarray:
        return np.asarray(self.weights[key], dtype=np.float32)

    def norm(self, name: str) -> tuple[str, str]:
        """A layer norm's gamma and beta (`h.0.ln_1`, `ln_f`, ...)."""
        return (self.b.const(name + ".weight", self.w("transformer." + name + ".weight")),
                self.b.const(name + ".bias", self.w("transformer." + name + ".bias")))

    def linear(self, x: str, w: np.ndarray, tag: str, bias: np.ndarray | None = None) -> str:
        return _linear(self.b, x, w, bias, tag, self.quant, self.form)

    def residual(self, hidden: str, branch: str, bias: str, next_norm: str) -> tuple[str, str]:
        """The branch (with its `bias`, a weight key) joins the residual stream, normed for what comes next."""
        bias_name = self.b.const(bias, self.w(bias))
        return _skip_layer_norm(self.b, hidden, branch, bias_name, *self.norm(next_norm), self.cfg.layer_norm_epsilon)

    def attention(self, i: int, x: str) -> str:
        """Layer `i`'s attention over the in-place KV cache, before c_proj's bias. 1/sqrt(d) (and the
        optional 1/(layer+1)) is folded into the query columns of c_attn."""
        b, e, p = self.b, self.cfg.n_embd, f"transformer.h.{i}."
        scale = 1.0 / math.sqrt(self.cfg.head_dim) if self.cfg.scale_attn_weights else 1.0
        if self.cfg.scale_attn_by_inverse_layer_idx:
            scale /= float(i + 1)
        qkv_w = np.array(self.weights[p + "attn.c_attn.weight"], dtype=np.float32)  # a copy: scaled in place
        qkv_b = np.array(self.weights[p + "attn.c_attn.bias"], dtype=np.float32)
        qkv_w[:, :e] *= scale
        qkv_b[:e] *= scale
        qkv = self.linear(x, qkv_w, f"h{i}.attn.c_attn", qkv_b)
        split = b.const("qkv_split", np.array([e, e, e], np.int64)) if i == 0 else "qkv_split"
        q, k, v = b.op("Split", [qkv, split], outputs=3, axis=-1)
        if self.kv_cache == "fp16":
            q, k, v = (b.op("Cast", [t], to=TensorProto.FLOAT16) for t in (q, k, v))
        ctx = f"h{i}.attn.ctx"
        b.nodes.append(helper.make_node(
            "GroupQueryAttention",
            [q, k, v, f"past_key_{i}", f"past_value_{i}", "seqlens_k", "total_sequence_length"],
            [ctx, f"present_key_{i}", f"present_value_{i}"],
            name=f"n_h{i}_attention", domain=MS_DOMAIN, num_heads=self.cfg.n_head, kv_num_heads=self.cfg.n_head,
            scale=1.0,
        ))
        if self.kv_cache == "fp16":
            ctx = b.op("Cast", [ctx], to=TensorProto.FLOAT)
        return self.linear(ctx, self.w(p + "attn.c_proj.weight"), f"h{i}.attn.c_proj")

    def mlp(self, i: int, x: str) -> str:
        """Layer `i`'s MLP (c_fc, GELU, c_proj), before c_proj's bias."""
        p = f"transformer.h.{i}."
        m = self.linear(x, self.w(p + "mlp.c_fc.weight"), f"h{i}.mlp.c_fc")
        m = _gelu(self.b, m, self.b.const(p + "mlp.c_fc.bias", self.w(p + "mlp.c_fc.bias")),
                  self.cfg.activation_function)
        return self.linear(m, self.w(p + "mlp.c_proj.weight"), f"h{i}.mlp.c_proj")

    def finish(self, x: str, all_logits: bool) -> onnx.ModelProto:
        """The lm_head (on the last position only, unless `all_logits`), the graph's inputs and outputs,
        and the model with its metadata."""
        b = self.b
        if not all_logits:
            x = b.op("Slice", [x, b.const("last_start", np.array([-1], np.int64)),
                               b.const("last_end", np.array([np.iinfo(np.int64).max], np.int64)),
                               b.const("last_axis", np.array([1], np.int64))])
        # wte.T as a view: fp32 copies it into the file once, int8/int4 quantize it without a float32 copy
        logits = self.linear(x, self.w("transformer.wte.weight").T, "lm_head")
        b.nodes.append(helper.make_node("Identity", [logits], ["logits"], name="n_logits"))
        inputs, outputs = _io_spec(self.cfg, all_logits, self.kv_cache)
        graph = helper.make_graph(b.nodes, "kolite_gpt2", inputs, outputs, initializer=b.inits)
        model = helper.make_model(graph, producer_name="kolite",
                                  opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1)])
        model.ir_version = 8  # readable by every onnxruntime that supports opset 17
        if self.quant == "int8":
            set_int8_weights(model, self.form)
        return model


def _io_spec(cfg: GPT2Config, all_logits: bool, kv_cache: KVCache) -> tuple[list, list]:
    """The graph's inputs (in `input_names` order) and outputs (`output_names`)."""
    kv_shape = ["batch", cfg.n_head, "capacity", cfg.head_dim]
    inputs = [
        helper.make_tensor_value_info("token_embeddings", TensorProto.FLOAT, ["batch", "seq", cfg.n_embd]),
        helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch", "seq"]),
        helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["batch"]),
        helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, []),
    ]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT,
                                             ["batch", "seq" if all_logits else 1, cfg.vocab_size])]
    kv_type = TensorProto.FLOAT16 if kv_cache == "fp16" else TensorProto.FLOAT
    for i in range(cfg.n_layer):
        for kind in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past_{kind}_{i}", kv_type, kv_shape))
            outputs.append(helper.make_tensor_value_info(f"present_{kind}_{i}", kv_type, kv_shape))
    return inputs, outputs


def io_spec(model: onnx.ModelProto) -> dict[str, list[list[object]]]:
    """The graph's inputs and outputs as onnxruntime reports them ([name, "tensor(float16)", [dims]],
    a symbolic dim by its name): what the runtime relies on, recorded in the cache's manifest."""
    def values(items: object) -> list[list[object]]:
        out = []
        for v in items:  # type: ignore[attr-defined]
            t = v.type.tensor_type
            dims = [d.dim_param if d.HasField("dim_param") else d.dim_value for d in t.shape.dim]
            out.append([v.name, f"tensor({_ORT_TYPES.get(t.elem_type, 'unknown')})", dims])
        return out

    return {"inputs": values(model.graph.input), "outputs": values(model.graph.output)}


_ORT_TYPES = {TensorProto.FLOAT: "float", TensorProto.FLOAT16: "float16", TensorProto.INT64: "int64",
              TensorProto.INT32: "int32", TensorProto.INT8: "int8", TensorProto.UINT8: "uint8"}


def write_gpt2_graph(cfg: GPT2Config, weights: Mapping[str, np.ndarray], path: Path, **options: object) -> Path:
    """Build the graph (`build_gpt2_graph` with `options`) and save it at `path`, its weights in
    `path.data` and its token table in `path.tokens`, the layout the runtime opens."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = build_gpt2_graph(cfg, weights, external_data=path.with_name(path.name + ".data"),
                             token_table=token_table_path(path), **options)  # type: ignore[arg-type]
    onnx.save_model(model, str(path))
    return path


INT8_WEIGHTS_KEY = "kolite.int8_weights"


def set_int8_weights(model: onnx.ModelProto, form: Int8Weights) -> None:
    """Record in the graph's metadata how its int8 weights are stored (read back by the runtime)."""
    helper.set_model_props(model, {**{p.key: p.value for p in model.metadata_props}, INT8_WEIGHTS_KEY: form})
