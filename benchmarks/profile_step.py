"""Where a prefill and a decode step spend their time, by ONNX Runtime node type, on this CPU.

Why: RESULTS.md explains each missed speed target with a profile. This opens a converted kolite graph
with ONNX Runtime's profiler on and runs a 512-token prefill (two 256-token chunks), 32 batch-1
decode steps and 32 batch-8 decode steps, then sums each phase's node time by op type. The
profiler's own overhead inflates the many small nodes, so compare shares, not absolute times, with
unprofiled runs (bench_int8.py, kolite bench).

Usage: python benchmarks/profile_step.py GRAPH_FOLDER [--threads N] [--json PATH]
(GRAPH_FOLDER holds model.onnx and manifest.json, e.g. one that `kolite pull` or bench_core converted).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from kolite.bench import write_json
from kolite.config import default_threads
from kolite.engine.runtime import GPT2Runtime, RuntimeOptions
from kolite.models.gpt2config import GPT2Config


@dataclass(frozen=True)
class ProfilingOptions(RuntimeOptions):
    """kolite's session options with ONNX Runtime's profiler writing into `folder`."""

    folder: str = ""

    def session_options(self) -> ort.SessionOptions:
        so = super().session_options()
        so.enable_profiling = True
        so.profile_file_prefix = str(Path(self.folder) / "kolite")
        return so


def _by_op(events: list[dict[str, Any]], start_us: float, end_us: float) -> dict[str, float]:
    """Milliseconds per op type for the node events between two profiler timestamps (µs)."""
    total: dict[str, float] = defaultdict(float)
    for ev in events:
        if ev.get("cat") == "Node" and ev["name"].endswith("_kernel_time") and start_us <= ev["ts"] < end_us:
            total[ev["args"]["op_name"]] += ev["dur"] / 1e3
    return dict(sorted(total.items(), key=lambda kv: -kv[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("graph_folder", type=Path)
    ap.add_argument("--threads", type=int, default=default_threads())
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    manifest = json.loads((args.graph_folder / "manifest.json").read_text())
    cfg = GPT2Config(**{k: v for k, v in manifest["config"].items() if k in GPT2Config.__dataclass_fields__})
    prompt = np.random.default_rng(2).integers(16, cfg.vocab_size, 512).tolist()
    with tempfile.TemporaryDirectory() as tmp:
        rt = GPT2Runtime(args.graph_folder / "model.onnx", cfg, ProfilingOptions(threads=args.threads, folder=tmp),
                         slots=8)
        runs: list[tuple[str, int]] = []  # (phase, session runs it made), in order

        def phase(name: str, fn: Callable[[], object], count: int) -> None:
            fn()
            runs.append((name, count))

        phase("warm-up", lambda: rt.prefill(0, prompt), 2)
        phase("prefill 512 (2 chunks)", lambda: rt.prefill(0, prompt), 2)
        phase("seven 100-token prompts", lambda: [rt.prefill(slot, prompt[:100]) for slot in range(1, 8)], 7)
        phase("decode batch 1 (32 steps)", lambda: [rt.decode([100], [512 + s]) for s in range(32)], 32)
        phase("decode batch 8 (32 steps)",
              lambda: [rt.decode([100] * 8, [512 + s] + [100 + s] * 7) for s in range(32)], 32)
        events = json.loads(Path(rt.session.end_profiling()).read_text())
    model_runs = sorted((ev for ev in events if ev.get("name") == "model_run"), key=lambda ev: ev["ts"])
    marks: dict[str, tuple[float, float]] = {}
    i = 0
    for name, count in runs:
        first, last = model_runs[i], model_runs[i + count - 1]
        marks[name] = (first["ts"], last["ts"] + last["dur"])
        i += count
    report: dict[str, Any] = {"graph": str(args.graph_folder), "threads": args.threads,
                              "int8_weights": manifest.get("int8_weights"), "phases": {}}
    for phase_name, (a, b) in marks.items():
        if phase_name in ("warm-up", "seven 100-token prompts"):
            continue
        ops = _by_op(events, a, b)
        total = sum(ops.values())
        report["phases"][phase_name] = {"wall_ms": round((b - a) / 1e3, 2), "node_ms": round(total, 2),
                                   "by_op_ms": {k: round(v, 2) for k, v in ops.items()}}
        top = ", ".join(f"{k} {v:.1f} ms ({100 * v / total:.0f}%)" for k, v in list(ops.items())[:6])
        print(f"{phase_name}: wall {(b - a) / 1e3:.1f} ms, nodes {total:.1f} ms: {top}")
    if args.json:
        write_json(report, args.json)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
