"""Conversion into the cache: converted once, reused, rebuilt when the source changes, never half-written."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest

from kolite.cli import main as cli_main
from kolite.config import ModelSettings
from kolite.convert import prepare as convert
from kolite.convert.prepare import prepare_model
from kolite.engine.cpu import detect
from kolite.models.synthetic import write_checkpoint
from tests.conftest import TINY


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    return write_checkpoint(tmp_path / "ckpt", TINY, seed=2)


def test_converted_once_then_reused(folder: Path, tmp_path: Path) -> None:
    settings = ModelSettings(model=str(folder), kolite_home=tmp_path / "home")
    first = prepare_model(settings)
    assert first.converted and first.graph.is_file()
    manifest = json.loads((first.graph.parent / "manifest.json").read_text())
    assert manifest["precision"] == "int8" and manifest["source"]["revision"] == "local"
    assert manifest["config"]["n_layer"] == TINY.n_layer
    mtime = first.graph.stat().st_mtime_ns
    second = prepare_model(settings)
    assert not second.converted
    assert second.graph == first.graph and second.graph.stat().st_mtime_ns == mtime


def test_precisions_are_separate_entries(folder: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    form = detect().int8_weights  # the int8 weight form exact on this CPU names the folder when it is u8
    suffix = "" if form == "s8" else "-u8"
    q = prepare_model(ModelSettings(model=str(folder), kolite_home=home, precision="int8"))
    o = prepare_model(ModelSettings(model=str(folder), kolite_home=home, precision="int8", int8_scheme="ort-dynamic"))
    f = prepare_model(ModelSettings(model=str(folder), kolite_home=home, precision="fp32"))
    i4 = prepare_model(ModelSettings(model=str(folder), kolite_home=home, precision="int4"))
    assert len({q.graph, o.graph, f.graph, i4.graph}) == 4
    names = [p.graph.parent.name for p in (q, o, f, i4)]
    assert names == [f"int8{suffix}", f"int8-ort-dynamic{suffix}", "fp32", "int4"]
    assert i4.graph_bytes < q.graph_bytes
    assert q.manifest["int8_scheme"] == "per-token" and o.manifest["int8_scheme"] == "ort-dynamic"
    assert q.manifest["int8_weights"] == o.manifest["int8_weights"] == form and f.manifest["int8_weights"] is None
    assert q.graph_bytes < f.graph_bytes and o.graph_bytes < f.graph_bytes
    auto = prepare_model(ModelSettings(model=str(folder), kolite_home=home))  # precision auto is int8 here
    assert not auto.converted and auto.precision == "int8" and auto.graph == q.graph


def test_each_int8_weight_form_is_its_own_entry(folder: Path, tmp_path: Path) -> None:
    """A graph made for one CPU's kernel is never found (or served) as the other form."""
    home = tmp_path / "home"
    s8 = prepare_model(ModelSettings(model=str(folder), kolite_home=home, precision="int8", int8_weights="s8"))
    u8 = prepare_model(ModelSettings(model=str(folder), kolite_home=home, precision="int8", int8_weights="u8"))
    assert (s8.graph.parent.name, u8.graph.parent.name) == ("int8", "int8-u8")
    assert (s8.manifest["int8_weights"], u8.manifest["int8_weights"]) == ("s8", "u8")
    # an s8 entry copied over the u8 one (another machine's cache) is not trusted: its manifest differs
    shutil.rmtree(u8.graph.parent)
    shutil.copytree(s8.graph.parent, u8.graph.parent)
    again = prepare_model(ModelSettings(model=str(folder), kolite_home=home, precision="int8", int8_weights="u8"))
    assert again.converted and again.manifest["int8_weights"] == "u8"


@pytest.mark.parametrize("precision", ["int8", "int4", "fp32"])
def test_an_int8_kv_cache_is_its_own_entry(folder: Path, tmp_path: Path, precision: str) -> None:
    """`--kv-cache int8` converts to a "-kv8" folder whose graph caches int8 (calibrated with the model's
    tokenizer), beside the float-cache entry, and serves: prefill and decode give finite logits."""
    from kolite.engine.runtime import GPT2Runtime

    home = tmp_path / "home"
    plain = prepare_model(ModelSettings(model=str(folder), kolite_home=home, precision=precision))
    kv8 = prepare_model(ModelSettings(model=str(folder), kolite_home=home, precision=precision, kv_cache="int8"))
    assert kv8.graph.parent.name == plain.graph.parent.name + "-kv8"
    assert (plain.manifest["kv_cache"], kv8.manifest["kv_cache"]) == ("float", "int8")
    rt = GPT2Runtime(kv8.graph, kv8.config)
    assert rt.kv_dtype.name == "int8" and GPT2Runtime(plain.graph, plain.config).kv_dtype.name != "int8"
    logits = rt.prefill(0, [1, 2, 3, 4])
    assert logits.shape[-1] == TINY.vocab_size and bool(abs(rt.decode([5], [4])).sum() > 0)
    again = prepare_model(ModelSettings(model=str(folder), kolite_home=home, precision=precision, kv_cache="int8"))
    assert not again.converted and again.graph == kv8.graph


def test_an_s8_graph_is_refused_where_u8_x_s8_saturates(folder: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from kolite.engine import runtime
    from kolite.engine.cpu import parse_cpuinfo
    from kolite.errors import ModelFormatError

    s8 = prepare_model(ModelSettings(model=str(folder), kolite_home=tmp_path / "home", precision="int8",
                                     int8_weights="s8"))
    monkeypatch.setattr(runtime, "detect", lambda: parse_cpuinfo("flags : avx2 fma\n", "x86_64"))
    with pytest.raises(ModelFormatError, match="Convert the model on this machine"):
        runtime.GPT2Runtime(s8.graph, s8.config)


def test_changed_source_is_reconverted(folder: Path, tmp_path: Path) -> None:
    settings = ModelSettings(model=str(folder), kolite_home=tmp_path / "home")
    first = prepare_model(settings)
    write_checkpoint(folder, TINY, seed=3)  # new weights in the same folder
    st = (folder / "model.safetensors").stat()
    os.utime(folder / "model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    again = prepare_model(settings)
    assert again.converted
    assert again.graph == first.graph  # same entry, rebuilt in place


def test_weights_live_beside_the_graph_and_a_damaged_entry_is_rebuilt(folder: Path, tmp_path: Path) -> None:
    settings = ModelSettings(model=str(folder), kolite_home=tmp_path / "home")
    first = prepare_model(settings)
    data = first.graph.with_name("model.onnx.data")
    assert data.is_file() and data.stat().st_size > first.graph.stat().st_size  # the weights are external
    assert first.manifest["files"]["model.onnx.data"]["size"] == data.stat().st_size
    with data.open("r+b") as fh:
        fh.truncate(data.stat().st_size // 2)
    again = prepare_model(settings)
    assert again.converted and again.graph_bytes == first.graph_bytes
    data.unlink()
    assert prepare_model(settings).converted


@pytest.mark.parametrize("victim", ["model.onnx.data", "model.onnx", "model.onnx.tokens"])
def test_same_size_corruption_is_found_and_rebuilt(folder: Path, tmp_path: Path, victim: str,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    """A file changed in place without changing its size (zeroed weights, random bytes in the graph) is
    found by its digest, reported, and rebuilt; the rebuilt model answers as the first one did."""
    import numpy as np

    from kolite.engine.runtime import GPT2Runtime

    settings = ModelSettings(model=str(folder), kolite_home=tmp_path / "home")
    first = prepare_model(settings)
    want = GPT2Runtime(first.graph, first.config).prefill(0, [1, 2, 3, 4, 5])
    path = first.graph.with_name(victim)
    size = path.stat().st_size
    path.write_bytes(bytes(size) if victim != "model.onnx" else np.random.default_rng(0).bytes(size))
    with caplog.at_level("WARNING", logger="kolite"):
        again = prepare_model(settings)
    assert again.converted and f"{victim} does not match its manifest" in caplog.text
    np.testing.assert_array_equal(GPT2Runtime(again.graph, again.config).prefill(0, [1, 2, 3, 4, 5]), want)
    assert not prepare_model(settings).converted


def test_a_killed_conversion_leaves_no_temp_folder_behind(folder: Path, tmp_path: Path) -> None:
    """What a conversion killed with -9 left (its temporary folder) is removed at the next start."""
    settings = ModelSettings(model=str(folder), kolite_home=tmp_path / "home")
    entry = prepare_model(settings).graph.parent
    stale = entry.parent / f".{entry.name}.tmp-abc123"
    stale.mkdir()
    (stale / "model.onnx.data").write_bytes(bytes(1024))
    prepare_model(settings)
    assert not stale.exists() and [p.name for p in entry.parent.iterdir() if ".tmp-" in p.name] == []


def test_two_processes_converting_the_same_model_convert_once(folder: Path, tmp_path: Path) -> None:
    """The second `kolite pull` waits for the first one's conversion (a file lock), then reuses it."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "kolite.cli", "pull", str(folder), "--kolite-home", str(tmp_path / "home")]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert outs[0][0] == outs[1][0]  # the same graph
    logs = [err for _out, err in outs]
    converted = [bool(re.search(r"converted .+ to .+ in [0-9.]+s", err)) for err in logs]
    assert sorted(converted) == [False, True] and sum("using converted graph" in err for err in logs) == 1


def test_a_converter_code_change_is_reconverted(folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The cache key holds a digest of the converter's own source: editing one of its modules (here: the
    graph builder, one byte more) rebuilds the graph, with no version number to bump."""
    import importlib.util
    import types

    settings = ModelSettings(model=str(folder), kolite_home=tmp_path / "home")
    first = prepare_model(settings)
    assert not prepare_model(settings).converted
    real = importlib.util.find_spec("kolite.convert.graph")
    assert real is not None and real.origin is not None
    edited = tmp_path / "graph.py"
    edited.write_bytes(Path(real.origin).read_bytes() + b"\n")
    find = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: types.SimpleNamespace(origin=str(edited))
                        if name == "kolite.convert.graph" else find(name, *a))
    convert.converter_digest.cache_clear()
    try:
        again = prepare_model(settings)
    finally:
        monkeypatch.undo()
        convert.converter_digest.cache_clear()
    assert again.converted and again.manifest["converter"] != first.manifest["converter"]
    assert len(first.manifest["converter"]) == 16


def test_failed_conversion_leaves_nothing(folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "home"

    def boom(*_a: object, **_k: object) -> None:
        raise RuntimeError("disk full")

    monkeypatch.setattr("kolite.convert.graph.build_gpt2_graph", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        prepare_model(ModelSettings(model=str(folder), kolite_home=home))
    leftovers = [p for p in home.rglob("*") if p.is_file() and p.suffix != ".lock"]  # the lock file stays, empty
    assert leftovers == []


def test_pull_cli_converts_and_prints_the_graph(folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    home = tmp_path / "home"
    assert cli_main(["pull", str(folder), "--kolite-home", str(home), "--precision", "fp32"]) == 0
    out, err = capsys.readouterr()
    graph = Path(out.strip())
    assert graph.is_file() and graph.is_relative_to(home) and graph.parent.name == "fp32"
    assert "converted" in err


def test_pull_cli_reports_missing_model(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert cli_main(["pull", str(tmp_path / "nope"), "--kolite-home", str(tmp_path / "home")]) == 2
    assert "error" in capsys.readouterr().err


def test_serving_a_model_without_tokenizer_fails_before_converting(folder: Path, tmp_path: Path) -> None:
    from kolite.errors import ModelFormatError
    from kolite.service import load_model

    home = tmp_path / "home"
    with pytest.raises(ModelFormatError, match="no tokenizer"):
        load_model(ModelSettings(model=str(folder), kolite_home=home))
    assert not home.exists() or not any(home.rglob("model.onnx"))
    (folder / "vocab.json").write_text("{}")
    with pytest.raises(ModelFormatError, match=r"vocab\.json and merges\.txt"):
        load_model(ModelSettings(model=str(folder), kolite_home=home))


def test_cpu_and_kernels_are_logged_and_slow_int4_warns(folder: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from kolite.engine.cpu import parse_cpuinfo

    pi4 = parse_cpuinfo("Features : fp asimd evtstrm crc32 cpuid\nCPU implementer : 0x41\nCPU part : 0xd08\n",
                        "aarch64")
    monkeypatch.setattr(convert, "detect", lambda: pi4)
    monkeypatch.setattr(convert, "memory_limit_bytes", lambda: 8 * 2**30)  # an 8 GB Pi 4: a float cache
    home = tmp_path / "home"
    with caplog.at_level("INFO", logger="kolite"):
        auto = prepare_model(ModelSettings(model=str(folder), kolite_home=home))
    assert auto.precision == "int8" and auto.manifest["int8_weights"] == "s8" and auto.manifest["kv_cache"] == "float"
    line = ("CPU ARM Cortex-A72 (aarch64; asimd): int8 kernel NEON (no dot product); memory 8.0 GB; int8 "
            "(precision and kv_cache auto)")
    assert line in caplog.text
    monkeypatch.setattr(convert, "memory_limit_bytes", lambda: 2**30)  # a 1 GB Pi: the int8 cache
    monkeypatch.setattr("kolite.engine.runtime.detect", lambda: pi4)  # calibration runs the Pi's s8 graph here
    caplog.clear()
    with caplog.at_level("INFO", logger="kolite"):
        small = prepare_model(ModelSettings(model=str(folder), kolite_home=home))
    assert small.manifest["kv_cache"] == "int8" and small.graph.parent.name == "int8-kv8"
    assert "memory 1.0 GB; int8-kv8 (precision and kv_cache auto)" in caplog.text
    caplog.clear()
    with caplog.at_level("INFO", logger="kolite"):
        prepare_model(ModelSettings(model=str(folder), kolite_home=home, precision="int4"))
    assert any(r.levelname == "WARNING" and "fallback 4-bit kernel" in r.getMessage() for r in caplog.records)


def test_an_int8_kv_cache_is_not_calibrated_with_weights_this_cpu_computes_wrong() -> None:
    """Calibrating runs the graph: s8 weights for another machine on a CPU where u8 x s8 saturates would
    measure wrong magnitudes, so that combination is refused before anything is read."""
    from kolite.engine.cpu import parse_cpuinfo
    from kolite.errors import ModelFormatError

    avx2 = parse_cpuinfo("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC\nflags\t\t: avx2 fma\n",
                         "x86_64")
    with pytest.raises(ModelFormatError, match="--kv-cache float"):
        convert.choose_kernels(ModelSettings(int8_weights="s8", kv_cache="int8"), avx2)
    assert convert.choose_kernels(ModelSettings(int8_weights="s8", kv_cache="float"), avx2).int8_weights == "s8"
    assert convert.choose_kernels(ModelSettings(kv_cache="int8"), avx2).variant == "int8-u8-kv8"
