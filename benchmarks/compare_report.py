"""benchmarks/compare.py's tables: each engine's figures and their ratios against llama.cpp and
transformers."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from compare_engines import ENGINES  # noqa: E402

COLUMNS: list[tuple[str, str, str, str]] = [
    # (header, short header for the ratio table, key path, format)
    ("decode tok/s, {short}-token prompt", "decode", "decode_tok_s.median", "{:.1f}"),
    ("TTFT, {ttft}-token prompt (s)", "TTFT", "ttft_s.median", "{:.3f}"),
    ("decode tok/s at {long}..{long_end} ctx", "decode@{long}", "decode_long_tok_s.median", "{:.1f}"),
    ("batch-{b} aggregate decode tok/s", "batch-{b}", "batched.aggregate_decode_tok_s.median", "{:.1f}"),
    ("peak RSS (MB)", "RSS", "memory_peak.vmhwm_mb", "{:.0f}"),
    ("model file (MB)", "file", "file_mb", "{:.0f}"),
]

RATIO_REFS = {"llama-Q8_0": "Q8_0", "transformers": "HF"}


def get(d: Any, path: str) -> Any:
    for part in path.split("."):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d


def render_tables(mres: dict, args: argparse.Namespace) -> str:
    n = mres["lengths"]
    fill = {"short": n["short"], "ttft": n["ttft"], "long": n["long"], "long_end": n["long"] + n["long_new"],
            "b": args.batch}
    results = mres["results"]
    names = [e for e in ENGINES if e in results and "error" not in results[e]]
    lines = ["| engine | " + " | ".join(h.format(**fill) for h, *_ in COLUMNS)
             + f" | greedy = fp32 (of {mres['agree_tokens']}) |", "|---|" + "---:|" * (len(COLUMNS) + 1)]
    for e in names:
        cells = []
        for _h, _s, key, fmt in COLUMNS:
            v = get(results[e], key)
            cells.append(fmt.format(v) if isinstance(v, int | float) else "-")
        for i, (_h, _s, key, _f) in enumerate(COLUMNS):  # (c): still contended after the retries
            if get(results[e], "batched.contended" if key.startswith("batched") else "contended") and i < 4:
                cells[i] += " (c)"
        agree = mres["greedy_agreement"].get(e)
        cells.append("ref" if e == "kolite-fp32" else (str(agree) if agree is not None else "-"))
        lines.append(f"| {e} | " + " | ".join(cells) + " |")
    for e, r in results.items():
        if "error" in r:
            lines.append(f"| {e} | " + " | ".join(["n/a"] * len(COLUMNS)) + f" | {r['error']} |")
    refs = [r for r in RATIO_REFS if r in names]
    pairs = [(col, r) for col in COLUMNS for r in refs
             if col[2] != "file_mb" and not (r == "transformers" and col[2].startswith("batched"))]
    if not pairs:
        return "\n".join(lines)
    lines += ["", "Ratios, engine / reference (tok/s: above 1 is faster; TTFT and RSS: below 1 is better):", "",
              "| engine | " + " | ".join(f"{col[1].format(**fill)} vs {RATIO_REFS[r]}" for col, r in pairs) + " |",
              "|---|" + "---:|" * len(pairs)]
    for e in names:
        cells = []
        for col, r in pairs:
            x, y = get(results[e], col[2]), get(results[r], col[2])
            ok = isinstance(x, int | float) and isinstance(y, int | float) and y
            cells.append(f"{x / y:.2f}x" if ok else "-")
        lines.append(f"| {e} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def check_summary(check: dict) -> list[str]:
    out = []
    for label, v in check["variants"].items():
        long_key = next(k for k in v if k.startswith("max_abs_diff_after_"))
        out.append(f"  llama.cpp {label} vs kolite fp32: first-step max|diff| {v['first_step_max_abs_diff']:.2e}, "
                   f"all {check['tokens']} steps {v['max_abs_diff_all_steps']:.2e}, "
                   f"{long_key.split('_')[4]}-token prompt {v[long_key]:.2e}; top-1 teacher-forced "
                   f"{v['teacher_forced_top1_agreement']}/{check['tokens']}, free greedy "
                   f"{v['free_greedy_leading_agreement']}/{check['tokens']}; vs fp64 reference "
                   f"{v['max_abs_diff_vs_fp64_reference']:.1e}")
    out.append(f"  kolite fp32 vs the fp64 reference: {check['kolite_max_abs_diff_vs_fp64_reference']:.1e}; "
               f"kolite fp32 logits: std {check['kolite_logits_std']}, top-1/top-2 margin min "
               f"{check['kolite_top1_top2_margin_min']} (median {check['kolite_top1_top2_margin_median']}); "
               f"Q8_0 blocks equal to gguf-py's quantizer: {check['q8_0_blocks_equal_gguf_py']}; "
               f"{'PASSED' if check['passed'] else 'FAILED'} (tolerance {check['tolerance']:g})")
    return out
