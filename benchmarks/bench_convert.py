"""Peak memory and time of converting a KoGPT2-shaped checkpoint (`kolite pull`), per precision and format.

Conversion runs once per model, but on a Pi with 1 GB it is the most memory kolite ever needs: more
than serving. This script writes a random checkpoint of KoGPT2's exact shape (vocab 51200, 12 x 768,
1024 positions; ~500 MB of float32) twice, as `model.safetensors` and as the `pytorch_model.bin` the
hub's KoGPT2 ships, and converts each to every precision in a fresh subprocess (so no run inherits
another's memory), the way `kolite pull` does (`kolite.convert.prepare.prepare_model`). Reported per
run: the process's resident high-water mark (VmHWM; imports included), the resident memory after the
imports alone, and seconds.

torch is used only to write the `.bin` fixture (in its own subprocess): the conversion never imports it.
Everything is written under `--work` (default /tmp/kolite-bench-convert), nothing in the repository.

    python benchmarks/bench_convert.py                               # int8, int4, fp32 x safetensors, bin
    python benchmarks/bench_convert.py --precisions int8 --formats bin --json /tmp/convert.json
    python benchmarks/bench_convert.py --precisions int8-ort-dynamic   # onnxruntime's quantize_dynamic
    python benchmarks/bench_convert.py --precisions int8 --int8-weights s8   # the other int8 weight form
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

DEFAULT_WORK = Path("/tmp/kolite-bench-convert")
PRECISIONS = ("int8", "int4", "fp32")
FORMATS = ("safetensors", "bin")
# "bin-own-head": lm_head saved as a storage of its own (equal values), so the tie is checked by reading both
EXTRA_FORMATS = ("bin-own-head",)
SEED = 0


def _checkpoint(work: Path, fmt: str) -> Path:
    """The random KoGPT2-shaped checkpoint in `fmt`, written once and reused."""
    from kolite.models.synthetic import KOGPT2_SHAPE, ensure_checkpoint

    st = work / "ckpt-safetensors"
    ensure_checkpoint(st, KOGPT2_SHAPE, seed=SEED, stamp={"shape": KOGPT2_SHAPE.to_dict(), "seed": SEED})
    if fmt == "safetensors":
        return st
    folder = work / f"ckpt-{fmt}"
    source = st / "model.safetensors"
    stamp = {"from": str(source), "size": source.stat().st_size, "mtime_ns": source.stat().st_mtime_ns,
             "format": fmt}
    stamp_file = folder / "bench-stamp.json"
    if stamp_file.is_file() and json.loads(stamp_file.read_text()) == stamp:
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    shutil.copyfile(st / "config.json", folder / "config.json")
    # A subprocess, so torch's memory (and import) never touches this process or the measured ones.
    subprocess.run([sys.executable, __file__, "--write-bin", str(source), str(folder / "pytorch_model.bin"), fmt],
                   check=True)
    stamp_file.write_text(json.dumps(stamp))
    return folder


def _write_bin(source: Path, target: Path, fmt: str) -> None:
    """`pytorch_model.bin` as transformers saves GPT2LMHeadModel: zip format, lm_head tied to wte (the
    same storage; "bin-own-head": a copy in a storage of its own)."""
    import collections

    import torch
    from safetensors.torch import load_file

    sd = collections.OrderedDict(load_file(str(source)))
    wte = sd["transformer.wte.weight"]
    sd["lm_head.weight"] = wte.clone() if fmt == "bin-own-head" else wte  # the same storage, as a tied model saves it
    torch.save(sd, target)


def _child(folder: Path, precision: str, home: Path, int8_weights: str) -> dict[str, Any]:
    """One conversion in this (fresh) process; returns what was measured."""
    import onnx  # noqa: F401  (conversion imports it lazily: counted in the imports, not the conversion)

    from kolite.bench import peak_rss_mb, reset_peak_rss
    from kolite.config import ModelSettings
    from kolite.convert import prepare as convert

    scheme = "per-token"
    if precision == "int8-ort-dynamic":
        precision, scheme = "int8", "ort-dynamic"

    reset_peak_rss()
    baseline = peak_rss_mb()
    started = time.perf_counter()
    prepared = convert.prepare_model(ModelSettings(model=str(folder), kolite_home=home, precision=precision,
                                                   int8_scheme=scheme, int8_weights=int8_weights))
    seconds = time.perf_counter() - started
    assert prepared.converted, "the home was not empty: nothing was converted"
    return {"peak_rss_mb": peak_rss_mb(), "imports_rss_mb": baseline, "seconds": round(seconds, 1),
            "graph_mb": round(prepared.graph_bytes / 2**20, 1), "variant": prepared.graph.parent.name}


def _run(folder: Path, precision: str, work: Path, int8_weights: str) -> dict[str, Any]:
    home = work / "home"
    shutil.rmtree(home, ignore_errors=True)
    try:
        out = subprocess.run([sys.executable, __file__, "--child", str(folder), precision, str(home), int8_weights],
                             check=True, capture_output=True, text=True)
    finally:
        shutil.rmtree(home, ignore_errors=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _table(rows: list[dict[str, Any]]) -> str:
    lines = ["| format | precision (cache folder) | peak RSS MB | after imports MB | seconds | graph MB |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]
    lines += [f"| {r['format']} | {r['variant']} | {r['peak_rss_mb']:.0f} | {r['imports_rss_mb']:.0f} | "
              f"{r['seconds']:.1f} | {r['graph_mb']:.0f} |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=DEFAULT_WORK, help="checkpoints and converted graphs go here")
    ap.add_argument("--precisions", nargs="+", default=list(PRECISIONS),
                    choices=[*PRECISIONS, "int8-ort-dynamic"])
    ap.add_argument("--formats", nargs="+", default=list(FORMATS), choices=[*FORMATS, *EXTRA_FORMATS])
    ap.add_argument("--int8-weights", default="auto", choices=["auto", "s8", "u8"],
                    help="int8 weight form (auto: the one exact on this CPU)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--child", nargs=4, metavar=("FOLDER", "PRECISION", "HOME", "INT8_WEIGHTS"), help=argparse.SUPPRESS)
    ap.add_argument("--write-bin", nargs=3, metavar=("SAFETENSORS", "BIN", "FORMAT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.write_bin:
        _write_bin(Path(args.write_bin[0]), Path(args.write_bin[1]), args.write_bin[2])
        return 0
    if args.child:
        folder, precision, home, int8_weights = args.child
        print(json.dumps(_child(Path(folder), precision, Path(home), int8_weights)))
        return 0

    rows = []
    for fmt in args.formats:
        folder = _checkpoint(args.work, fmt)
        for precision in args.precisions:
            row = {"format": fmt, "precision": precision, **_run(folder, precision, args.work, args.int8_weights)}
            print(f"{fmt:12} {row['variant']:20} peak {row['peak_rss_mb']:7.1f} MB  "
                  f"(imports {row['imports_rss_mb']:.0f})  {row['seconds']:6.1f} s", flush=True)
            rows.append(row)
    print()
    print(_table(rows))
    if args.json:
        from kolite.bench import write_json
        from kolite.engine.cpu import detect

        write_json({"when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "machine": platform.machine(),
                    "cpu": detect().to_dict(), "python": platform.python_version(), "shape": "kogpt2", "runs": rows},
                   args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
