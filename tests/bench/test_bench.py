"""`kolite bench` on tiny models: sane numbers, every JSON field, the weight-bytes sum, the chart.

Speeds are never asserted (shared machines vary); only that numbers are positive and finite and that
every run produced exactly the tokens it asked for.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from kolite import bench
from kolite.cli import main
from kolite.config import ModelSettings
from kolite.models.gpt2config import GPT2Config
from tests.conftest import TINY

# Like TINY but with GPT-2's 1024 positions, so 512- and 900-token contexts really run (it stays tiny).
TINY_1024 = replace(TINY, n_positions=1024)

TOP_KEYS = {"kolite_bench", "quick", "machine", "bandwidth", "setup", "model", "load_seconds", "weights", "decode",
            "ttft", "context", "concurrency", "memory", "roofline", "seconds", "table"}
NESTED = {
    "machine": {"cpu", "board", "arch", "cores", "usable_cores", "threads", "memory_gb", "os", "python",
                "onnxruntime", "numpy", "kolite", "date"},
    "bandwidth": {"bytes_per_s", "gb_s", "buffer_mb", "repeats", "by_kernel_gb_s"},
    "setup": {"random_weights", "converted", "prepare_seconds", "graph", "peak_rss_mb"},
    "model": {"name", "path", "precision", "int8_scheme", "threads", "shape", "parameters", "graph", "graph_mb",
              "tokenizer"},
    "weights": {"bytes_per_token", "matrix_bytes", "other_bytes", "embedding_table_bytes", "embedding_row_bytes",
                "embedding_tables", "graph_file_bytes"},
    "decode": {"prompt_tokens", "new_tokens", "tok_s", "runs_tok_s", "seconds"},
    "memory": {"rss_after_load_mb", "peak_rss_mb", "peak_rss_includes_setup", "rss_end_mb"},
    "roofline": {"bandwidth_gb_s", "weight_mb_per_token", "ceiling_tok_s", "decode_tok_s", "decode_pct_of_ceiling"},
}
TTFT_KEYS = {"requested", "prompt_tokens", "seconds", "runs_s", "prefill_tok_s"}
CONTEXT_KEYS = {"requested", "context", "steps", "tok_s", "runs_tok_s", "kv_bytes_per_token", "ceiling_tok_s"}
CONCURRENCY_KEYS = {"requests", "prompt_tokens", "new_tokens", "tokens", "wall_s", "aggregate_tok_s",
                    "per_request_tok_s", "ttft_s"}


def positive(x: float) -> bool:
    return isinstance(x, int | float) and math.isfinite(x) and x > 0


def check_report(report: dict) -> None:
    """Every field is there and every measured number is positive and finite."""
    assert report.keys() >= TOP_KEYS, TOP_KEYS - report.keys()
    for key, fields in NESTED.items():
        assert fields <= report[key].keys(), (key, fields - report[key].keys())
    assert report["ttft"] and report["context"] and report["concurrency"]
    for entry in report["ttft"]:
        assert entry.keys() >= TTFT_KEYS and positive(entry["seconds"])
    for entry in report["context"]:
        assert entry.keys() >= CONTEXT_KEYS and positive(entry["tok_s"]) and positive(entry["ceiling_tok_s"])
    for entry in report["concurrency"]:
        assert entry.keys() >= CONCURRENCY_KEYS and positive(entry["aggregate_tok_s"])
        assert entry["tokens"] == entry["requests"] * entry["new_tokens"]
    assert [c["requests"] for c in report["concurrency"]] == [1, 4, 8]
    for value in (report["decode"]["tok_s"], report["load_seconds"], report["bandwidth"]["gb_s"],
                  report["memory"]["peak_rss_mb"], report["roofline"]["ceiling_tok_s"],
                  report["roofline"]["decode_pct_of_ceiling"], report["weights"]["bytes_per_token"]):
        assert positive(value), value
    assert "decode, batch 1" in report["table"] and "tok/s" in report["table"]


# ----------------------------------------------------------------------------------------------------
# weight bytes


def test_weight_bytes_of_a_hand_built_graph(tmp_path: Path) -> None:
    table = np.zeros((10, 4), np.float32)  # gathered: one 16-byte row per token
    pos = np.zeros((6, 4), np.float32)  # gathered too
    w1 = np.zeros((4, 6), np.float32)  # 96 bytes
    w2 = np.zeros((6, 3), np.int8)  # 18 bytes
    bias = np.zeros(3, np.float32)  # 12 bytes
    zero = np.array(0, np.int8)  # 1 byte
    inits = [numpy_helper.from_array(a, n) for a, n in
             ((table, "table"), (pos, "pos"), (w1, "w1"), (w2, "w2"), (bias, "bias"), (zero, "zero"))]
    nodes = [
        helper.make_node("Gather", ["table", "ids"], ["emb"]),
        helper.make_node("Gather", ["pos", "ids"], ["pemb"]),
        helper.make_node("Add", ["emb", "pemb"], ["h"]),
        helper.make_node("MatMul", ["h", "w1"], ["a"]),
        helper.make_node("DynamicQuantizeLinear", ["a"], ["aq", "as", "az"]),
        helper.make_node("MatMulInteger", ["aq", "w2", "az", "zero"], ["acc"]),
        helper.make_node("Cast", ["acc"], ["accf"], to=TensorProto.FLOAT),
        helper.make_node("Add", ["accf", "bias"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])], initializer=inits)
    path = tmp_path / "g.onnx"
    onnx.save_model(helper.make_model(graph), str(path))

    w = bench.weight_bytes_per_token(path)
    assert w["embedding_tables"] == ["pos", "table"]
    assert w["embedding_table_bytes"] == 160 + 96
    assert w["embedding_row_bytes"] == 16 + 16
    assert w["matrix_bytes"] == 96 + 18
    assert w["other_bytes"] == 12 + 1
    assert w["bytes_per_token"] == 16 + 16 + 96 + 18 + 12 + 1
    assert w["matrix_bytes_by_dtype"] == {"float32": 96, "int8": 18}


def test_a_table_also_read_whole_counts_whole(tmp_path: Path) -> None:
    """A tied lm_head that multiplies by the embedding table itself reads all of it every step."""
    table = numpy_helper.from_array(np.zeros((10, 4), np.float32), "wte")
    nodes = [helper.make_node("Gather", ["wte", "ids"], ["h"]),
             helper.make_node("MatMul", ["h", "wte_t"], ["y"]),
             helper.make_node("Transpose", ["wte"], ["wte_t"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])], initializer=[table])
    path = tmp_path / "tied.onnx"
    onnx.save_model(helper.make_model(graph), str(path))
    w = bench.weight_bytes_per_token(path)
    assert w["embedding_tables"] == [] and w["bytes_per_token"] == w["matrix_bytes"] == 160


def test_weight_bytes_of_kolite_int8_graph(tiny_loaded) -> None:
    """kolite's int8 graph: every matrix (lm_head too) int8, one byte per weight; wpe and the token table
    (int8 rows and a scale each, in its own file) only read a row at a time."""
    cfg: GPT2Config = tiny_loaded.prepared.config
    e, v = cfg.n_embd, cfg.vocab_size
    w = bench.weight_bytes_per_token(tiny_loaded.prepared.graph)
    tables = w["embedding_tables"]
    assert tables == ["token_table", "wpe"]
    assert w["embedding_table_bytes"] == (e + 4) * v + 4 * e * cfg.n_positions
    assert w["embedding_row_bytes"] == (e + 4) + 4 * e
    form = {"s8": "int8", "u8": "uint8"}[tiny_loaded.prepared.manifest["int8_weights"]]  # the form this CPU runs
    assert w["matrix_bytes_by_dtype"] == {form: cfg.n_layer * 12 * e * e + e * v}
    assert w["matrix_bytes"] == cfg.n_layer * 12 * e * e + e * v
    # biases, norms and per-column scales (fp32): all 1-D, far smaller than the matrices
    assert 0 < w["other_bytes"] < w["matrix_bytes"]
    assert w["bytes_per_token"] == w["matrix_bytes"] + w["other_bytes"] + w["embedding_row_bytes"]


def test_kv_bytes_and_parameters() -> None:
    assert bench.kv_bytes_per_token(TINY, 10) == 2 * TINY.n_layer * 10 * TINY.n_embd * 4
    assert bench.parameter_count(bench.RANDOM_SHAPES["kogpt2"]) == 125_164_032  # KoGPT2's 125M


# ----------------------------------------------------------------------------------------------------
# machine and memory


def test_machine_info_and_bandwidth() -> None:
    info = bench.machine_info(threads=2)
    assert NESTED["machine"] <= info.keys()
    assert info["cpu"] and info["arch"] and info["cores"] >= 1 and info["onnxruntime"]
    bw = bench.memory_read_bandwidth(threads=2, size_bytes=8 * 2**20, repeats=2)
    assert positive(bw["bytes_per_s"]) and bw["buffer_mb"] == 8
    assert set(bw["by_kernel_gb_s"]) == {"sum_1_threads", "max_1_threads", "sum_2_threads", "max_2_threads"}
    assert bw["bytes_per_s"] / 1e9 == pytest.approx(max(bw["by_kernel_gb_s"].values()), abs=0.01)
    assert bench.bandwidth_buffer_bytes() >= 32 * 2**20


def test_peak_rss_reset() -> None:
    before = bench.peak_rss_mb()
    assert positive(before)
    if bench.reset_peak_rss():
        assert bench.peak_rss_mb() <= before


# ----------------------------------------------------------------------------------------------------
# measurements on a tiny model


@pytest.fixture(scope="module")
def tiny_1024_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random checkpoint with 1024 positions and no tokenizer (like --random-weights writes)."""
    from kolite.models.synthetic import write_checkpoint

    return write_checkpoint(tmp_path_factory.mktemp("tiny-1024"), TINY_1024, seed=0)


@pytest.fixture(scope="module")
def ids_only_model(tiny_1024_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> bench.BenchModel:
    from kolite.convert.prepare import prepare_model

    settings = ModelSettings(model=str(tiny_1024_dir), kolite_home=tmp_path_factory.mktemp("home"), threads=1)
    prepared = prepare_model(settings)
    assert not prepared.files.has_tokenizer
    return bench.open_model(settings, with_tokenizer=False)


def test_ids_only_model_measures(ids_only_model: bench.BenchModel) -> None:
    model = ids_only_model
    assert isinstance(model.tokenizer, bench.IdsOnlyTokenizer) and model.tokenizer_kind.startswith("none")
    assert model.load_seconds > 0 and not model.prepared.converted

    d = bench.measure_decode(model, 16, 12, repeats=2)
    assert (d["prompt_tokens"], d["new_tokens"]) == (16, 12) and positive(d["tok_s"]) and len(d["runs_tok_s"]) == 2

    t = bench.measure_ttft(model, 512, repeats=2)
    assert t["prompt_tokens"] == 512 and positive(t["seconds"]) and positive(t["prefill_tok_s"])

    c = bench.measure_context(model, 900, steps=4, repeats=1)
    assert (c["context"], c["steps"]) == (900, 4) and positive(c["tok_s"])

    levels = bench.measure_concurrency(model, (1, 3), prompt_tokens=8, new_tokens=6)
    assert [x["requests"] for x in levels] == [1, 3]
    assert [x["tokens"] for x in levels] == [6, 18]
    assert all(positive(x["aggregate_tok_s"]) and positive(x["ttft_s"]["max"]) for x in levels)


def test_lengths_are_clipped_to_a_small_model(tiny_loaded) -> None:
    """TINY has 128 positions: a 512-token TTFT prompt becomes 127 tokens and says what was asked."""
    model = bench.BenchModel(tiny_loaded.prepared, tiny_loaded.runtime, tiny_loaded.tokenizer, "tiny", 0.1)
    t = bench.measure_ttft(model, 512, repeats=1)
    assert (t["requested"], t["prompt_tokens"]) == (512, 127)
    c = bench.measure_context(model, 900, steps=4, repeats=1)
    assert c["context"] == 128 - 5 and positive(c["tok_s"])
    assert bench.distinct_lengths((16, 128, 512, 900), 128, 5) == [16, 128]


def test_timed_generation_yields_every_token(ids_only_model: bench.BenchModel) -> None:
    timed = bench.timed_generation(ids_only_model, bench.prompt_ids(5, ids_only_model.id_limit), 7)
    assert len(timed.stamps) == 7 and timed.start <= timed.stamps[0] <= timed.stamps[-1] <= timed.end
    assert bench.decode_rate([1.0]) != bench.decode_rate([1.0])  # nan: no rate from one token
    assert bench.decode_rate([1.0, 1.5, 2.0]) == pytest.approx(2.0)


def test_random_checkpoint_is_written_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(bench.RANDOM_SHAPES, "tiny", TINY_1024)
    first = bench.ensure_random_checkpoint(tmp_path, "tiny")
    assert first.written and first.folder == tmp_path / "random-weights" / "tiny"
    assert (first.folder / "model.safetensors").is_file() and first.tokenizer is None
    mtime = (first.folder / "model.safetensors").stat().st_mtime_ns
    second = bench.ensure_random_checkpoint(tmp_path, "tiny")
    assert not second.written and (second.folder / "model.safetensors").stat().st_mtime_ns == mtime
    with pytest.raises(ValueError, match="unknown shape"):
        bench.ensure_random_checkpoint(tmp_path, "gpt5")


def test_options() -> None:
    full, quick = bench.BenchOptions.make(), bench.BenchOptions.make(quick=True)
    assert full.new_tokens == 128 and full.concurrency == (1, 4, 8) and full.contexts == (16, 128, 512, 900)
    assert quick.repeats < full.repeats and quick.new_tokens < full.new_tokens
    assert bench.BenchOptions.make(quick=True, new_tokens=64).new_tokens == 64
    with pytest.raises(ValueError):
        bench.BenchOptions.make(new_tokens=1)


# ----------------------------------------------------------------------------------------------------
# the command


@pytest.fixture(scope="module")
def cli_report(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """`kolite bench --quick --json` end to end on the tiny model (it has a tokenizer)."""
    out = tmp_path_factory.mktemp("bench-out") / "out.json"
    home = tmp_path_factory.mktemp("bench-home")
    assert main(["bench", "--quick", "--model", str(tiny_model_dir), "--kolite-home", str(home),
                 "--threads", "1", "--json", str(out)]) == 0
    return json.loads(out.read_text(encoding="utf-8"))


def test_cli_bench_json_has_every_field(cli_report: dict) -> None:
    check_report(cli_report)
    assert cli_report["quick"] is True and cli_report["setup"]["converted"] is True
    assert cli_report["model"]["precision"] == "int8" and cli_report["model"]["threads"] == 1
    assert cli_report["model"]["tokenizer"] == "kogpt2 tokenizer"
    assert cli_report["decode"]["new_tokens"] == 32


def test_cli_bench_prints_the_table(tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["bench", "--quick", "--model", str(tiny_model_dir), "--kolite-home", str(tmp_path),
                 "--threads", "1", "--new-tokens", "8", "--precision", "fp32"]) == 0
    out = capsys.readouterr().out
    for text in ("machine:", "onnxruntime", "decode, batch 1 (16-token prompt, 8 new tokens)", "time to first token",
                 "8 concurrent requests", "load time", "peak RSS, serving", "memory read bandwidth",
                 "decode ceiling", "% of that ceiling", "fp32"):
        assert text in out, text


def test_cli_bench_random_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--random-weights writes the checkpoint into the kolite home and benches it without a tokenizer."""
    monkeypatch.setitem(bench.RANDOM_SHAPES, "tiny", TINY_1024)
    out = tmp_path / "r.json"
    assert main(["bench", "--quick", "--random-weights", "tiny", "--kolite-home", str(tmp_path / "home"),
                 "--threads", "1", "--new-tokens", "4", "--json", str(out)]) == 0
    report = json.loads(out.read_text(encoding="utf-8"))
    check_report(report)
    assert report["setup"]["random_weights"] == "tiny" and report["setup"]["checkpoint_written"] is True
    assert report["model"]["tokenizer"].startswith("none")
    assert [c["context"] for c in report["context"]] == [16, 128, 512, 900]
    assert [t["prompt_tokens"] for t in report["ttft"]] == [128, 512]
    assert Path(report["setup"]["checkpoint"]) == tmp_path / "home" / "random-weights" / "tiny"


def test_cli_refuses_model_and_random_weights(capsys: pytest.CaptureFixture) -> None:
    assert main(["bench", "--model", "distilgpt2", "--random-weights", "kogpt2"]) == 2
    assert "either --model or --random-weights" in capsys.readouterr().err


def test_plot_without_matplotlib_says_how_to_get_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setattr("kolite.bench.run.plot_available", lambda: False)
    assert main(["bench", "--random-weights", "kogpt2", "--kolite-home", str(tmp_path),
                 "--plot", str(tmp_path / "p.png")]) == 2
    assert "pip install matplotlib" in capsys.readouterr().err
    assert not (tmp_path / "random-weights").exists()  # refused before any work


def test_plot_is_written(cli_report: dict, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    path = bench.write_plot(cli_report, tmp_path / "chart" / "bench.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
