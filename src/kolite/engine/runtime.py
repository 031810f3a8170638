"""An ONNX Runtime session over kolite's GPT-2 graph: one forward step with a KV cache.

The runtime knows tensors and ids only. It owns the session options that matter on a small board:
intra-op threads equal to the cores we may use, one inter-op thread (the graph is a chain), and full
graph optimisation so onnxruntime fuses layer norms, gelu and int8 MatMuls.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from kolite.engine.graph import input_names, output_names
from kolite.models.gpt2config import GPT2Config

KVCache = list[np.ndarray]  # [key_0, value_0, key_1, value_1, ...], each [batch, heads, length, head_dim]


@dataclass(frozen=True)
class RuntimeOptions:
    """How the session runs; the defaults suit a 4-core Pi and a 2-core PC alike."""

    threads: int = 1
    spin: bool = True  # busy-wait between ops: lower latency per token, at the cost of idle CPU

    def session_options(self) -> ort.SessionOptions:
        so = ort.SessionOptions()
        so.intra_op_num_threads = self.threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if self.spin else "0")
        return so


class GPT2Runtime:
    """Runs prefill and decode steps of a kolite GPT-2 graph."""

    def __init__(self, model_path: Path | str, cfg: GPT2Config, options: RuntimeOptions | None = None) -> None:
        self.cfg = cfg
        self.options = options or RuntimeOptions()
        self.session = ort.InferenceSession(
            str(model_path), sess_options=self.options.session_options(), providers=["CPUExecutionProvider"]
        )
        self._inputs = input_names(cfg.n_layer)
        self._outputs = output_names(cfg.n_layer)

    def empty_cache(self, batch: int) -> KVCache:
        """A zero-length cache: the first call is a prefill over the whole prompt."""
        shape = (batch, self.cfg.n_head, 0, self.cfg.head_dim)
        return [np.zeros(shape, np.float32) for _ in range(2 * self.cfg.n_layer)]

    def forward(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        position_ids: np.ndarray,
        past: KVCache,
    ) -> tuple[np.ndarray, KVCache]:
        """One step: logits [batch, 1 (or seq), vocab] and the grown cache.

        `attention_mask` covers past and new tokens ([batch, past + seq]), 0 on left padding.
        """
        feed = {"input_ids": input_ids.astype(np.int64, copy=False),
                "attention_mask": attention_mask.astype(np.int64, copy=False),
                "position_ids": position_ids.astype(np.int64, copy=False)}
        for name, value in zip(self._inputs[3:], past, strict=True):
            feed[name] = value
        out = self.session.run(self._outputs, feed)
        return out[0], out[1:]


def positions_from_mask(attention_mask: np.ndarray, seq: int) -> np.ndarray:
    """Position ids of the last `seq` columns: count of real tokens before each, pads at 0.

    Left padding shifts nothing: the first real token of every row gets position 0.
    """
    pos = np.cumsum(attention_mask, axis=1) - 1
    pos = np.where(attention_mask == 0, 0, pos)
    return pos[:, -seq:].astype(np.int64)
