"""The report: the table `kolite bench` prints, its JSON and its chart."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    pass
from kolite.bench.machine import MB

PLOT_HINT = "pip install matplotlib  (or: pip install 'kolite[plot]')"




def _num(x: float | None) -> str:
    if x is None or not math.isfinite(x):
        return "-"
    return f"{x:.1f}" if x < 1000 else f"{x:,.0f}"


def _tok(x: float | None) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{_num(x)} tok/s"


def _mb(n_bytes: float) -> str:
    mb = n_bytes / MB
    return f"{mb:.0f} MB" if mb >= 10 else f"{mb:.1f} MB" if mb >= 0.1 else f"{n_bytes / 1024:.0f} KB"


def _count(n: int) -> str:
    return f"{n / 1e6:.0f}M" if n >= 1e6 else f"{n / 1e3:.0f}K"


def short_name(name: str) -> str:
    """A model's name for titles: a folder's last part, a hub id as is."""
    return Path(name).name if name.startswith(("/", ".", "~")) else name


def _clipped(entry: dict[str, Any], key: str) -> str:
    asked = entry["requested"]
    return "" if entry[key] == asked else f" (asked {asked}; the model has fewer positions)"


def table_rows(report: dict[str, Any]) -> list[tuple[str, str]]:
    """(measurement, value) pairs in reading order; an empty value starts a section."""
    d, roof, mem, setup = report["decode"], report["roofline"], report["memory"], report["setup"]
    rows: list[tuple[str, str]] = [("speed, one request", "")]
    rows.append((f"decode, batch 1 ({d['prompt_tokens']}-token prompt, {d['new_tokens']} new tokens)",
                 _tok(d["tok_s"])))
    for t in report["ttft"]:
        rows.append((f"time to first token, {t['prompt_tokens']}-token prompt{_clipped(t, 'prompt_tokens')}",
                     f"{t['seconds']:.3f} s"))
    for c in report["context"]:
        rows.append((f"decode at {c['context']} tokens of context{_clipped(c, 'context')}", _tok(c["tok_s"])))
    rows.append(("continuous batching (scheduler, no HTTP)", ""))
    for c in report["concurrency"]:
        n = c["requests"]
        rows.append((f"{n} concurrent request{'s' if n > 1 else ''}: all together (each)",
                     f"{_tok(c['aggregate_tok_s'])} ({_num(c['per_request_tok_s'])})"))
    rows.append(("memory and load", ""))
    rows.append(("load time, from the converted cache", f"{report['load_seconds']:.2f} s"))
    rows.append(("RSS after load", f"{mem['rss_after_load_mb']:.0f} MB" if mem["rss_after_load_mb"] else "-"))
    peak_note = " (includes setup: no reset here)" if mem["peak_rss_includes_setup"] else ""
    rows.append((f"peak RSS, serving{peak_note}", f"{mem['peak_rss_mb']:.0f} MB" if mem["peak_rss_mb"] else "-"))
    for phase, mb in mem.get("peak_rss_by_phase_mb", {}).items():
        rows.append((f"  peak RSS during {phase}", f"{mb:.0f} MB" if mb else "-"))
    did = [w for w, on in (("random weights written", setup.get("checkpoint_written")),
                           (f"converted in {setup['prepare_seconds']:.0f} s", setup["converted"])) if on]
    if did:
        rows.append((f"peak RSS during setup ({', '.join(did)})", f"{setup['peak_rss_mb']:.0f} MB"))
    else:
        rows.append(("peak RSS during conversion", "- (graph was already converted)"))
    rows.append(("what the memory allows", ""))
    rows.append((f"memory read bandwidth (numpy, {report['bandwidth']['buffer_mb']} MB, best pass)",
                 f"{roof['bandwidth_gb_s']:.1f} GB/s"))
    rows.append(("weights read per decoded token (from the graph)", _mb(report["weights"]["bytes_per_token"])))
    rows.append(("decode ceiling = bandwidth / weight bytes", _tok(roof["ceiling_tok_s"])))
    rows.append(("batch-1 decode as % of that ceiling", f"{roof['decode_pct_of_ceiling']:.0f} %"))
    return rows


def render_table(report: dict[str, Any]) -> str:
    """The header (machine, model) and the table the command prints."""
    m, mod = report["machine"], report["model"]
    shape = mod["shape"]
    board = f" ({m['board']})" if m.get("board") else ""
    header = [
        f"kolite bench {m['date']}{'  [quick]' if report.get('quick') else ''}",
        f"machine:   {m['cpu']}{board} | {m['arch']} | {m['cores']} cores ({m['usable_cores']} usable) | "
        f"{m['memory_gb']} GB | {m['os']} | onnxruntime {m['onnxruntime']} | kolite {m['kolite']}",
        f"cpu:       {' '.join(m['cpu_features']['features']) or '-'} | int8 kernel {m['cpu_features']['int8_kernel']}"
        f" | int4 kernel {'integer' if m['cpu_features']['int4_fast'] else 'fallback'}",
        f"model:     {mod['name']} | {shape['n_layer']} layers x {shape['n_embd']}, vocab {shape['vocab_size']}, "
        f"{_count(mod['parameters'])} params | {mod['precision']}"
        f"{' ' + mod['int8_scheme'] if mod.get('int8_scheme') else ''}"
        f"{' ' + mod['int8_weights'] + ' weights' if mod.get('int8_weights') else ''}"
        f"{' | KV cache ' + mod['kv_cache'] if mod.get('kv_cache') else ''}"
        f" | graph {_mb(mod['graph_mb'] * MB)} | "
        f"{mod['threads']} thread{'s' if mod['threads'] > 1 else ''}",
        f"tokenizer: {mod['tokenizer']}",
    ]
    rows = table_rows(report)
    width = max(len(label) for label, _ in rows) + 2
    vwidth = max(len(value) for _, value in rows)
    lines = [*header, ""]
    for label, value in rows:
        if not value:
            lines.append(f"{label}")
            continue
        lines.append(f"  {label:<{width}}{value:>{vwidth}}")
    lines += ["", "Batch-1 decode reads every weight once per token, so it cannot beat the ceiling; batching "
                  "reads them once per step for all requests, so the total can."]
    return "\n".join(lines)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_json(report: dict[str, Any], path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_jsonable(report), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def plot_available() -> bool:
    """matplotlib is optional (the `plot` extra): `--plot` checks before measuring, not after."""
    import importlib.util

    return importlib.util.find_spec("matplotlib") is not None


def write_plot(report: dict[str, Any], path: Path) -> Path:
    """A PNG with two panels: tokens/s against concurrent requests, and decode tokens/s against context."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = Figure(figsize=(11, 4.6), layout="constrained")
    left, right = fig.subplots(1, 2)

    conc = report["concurrency"]
    xs = [c["requests"] for c in conc]
    agg = [c["aggregate_tok_s"] for c in conc]
    left.plot(xs, agg, "o-", color="tab:blue", label="all requests together")
    left.plot(xs, [c["per_request_tok_s"] for c in conc], "s--", color="tab:orange", label="each request")
    for x, y in zip(xs, agg, strict=True):
        left.annotate(f"{y:.0f}", (x, y), textcoords="offset points", xytext=(0, 7), ha="center", fontsize=9)
    left.set_xticks(xs)
    left.set_xlabel("concurrent requests (continuous batching)")
    left.set_ylabel("tokens/s")
    left.set_title(f"Throughput, {conc[0]['new_tokens']} new tokens per request")
    left.set_ylim(0, max(agg) * 1.18)
    left.grid(alpha=0.3)
    left.legend(loc="upper left")

    ctx = report["context"]
    cx = [c["context"] for c in ctx]
    cy = [c["tok_s"] for c in ctx]
    right.plot(cx, cy, "o-", color="tab:green", label="kolite, batch 1")
    for x, y in zip(cx, cy, strict=True):
        right.annotate(f"{y:.1f}", (x, y), textcoords="offset points", xytext=(0, 7), ha="center", fontsize=9)
    roof = report["roofline"]
    top = max(cy) * 1.25
    ceilings = [c["ceiling_tok_s"] for c in ctx]
    if max(ceilings) <= 3 * max(cy):  # draw the memory ceiling when it fits the scale; else name it in the title
        right.plot(cx, ceilings, ":", color="gray", label="memory ceiling (weights + KV cache)")
        top = max(top, max(ceilings) * 1.1)
    else:
        right.text(0.98, 0.97, f"memory ceiling (weights only): {_tok(roof['ceiling_tok_s'])}, off this scale",
                   transform=right.transAxes, ha="right", va="top", fontsize=9, color="gray")
    right.set_title("Decode speed against context length, batch 1")
    right.set_xlabel("tokens already in context")
    right.set_ylabel("tokens/s")
    right.set_ylim(0, top)
    right.set_xlim(0, max(cx) * 1.05)
    right.grid(alpha=0.3)
    right.legend(loc="lower left")

    m, mod = report["machine"], report["model"]
    board = f" ({m['board']})" if m.get("board") else ""
    fig.suptitle(f"kolite bench: {short_name(mod['name'])}, {mod['precision']}, {mod['threads']} threads, "
                 f"on {m['cpu']}{board}, {m['arch']}", fontsize=11)
    fig.savefig(path, dpi=110)
    return path
