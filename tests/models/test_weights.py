"""Weights to numpy without torch: safetensors (incl. half precision), PyTorch pickles, GPT-2 key checks."""

from __future__ import annotations

import builtins
import collections
import io
import json
import os
import pickle
import struct
import sys
import types
import zipfile
from pathlib import Path

import numpy as np
import pytest

from kolite.errors import ModelFormatError, UnsafeCheckpoint
from kolite.models.gpt2_keys import gpt2_shapes, gpt2_weights
from kolite.models.gpt2config import GPT2Config
from kolite.models.synthetic import random_state_dict, write_checkpoint
from kolite.models.torch_file import read_torch_bin
from kolite.models.weights import load_state_dict

CFG = GPT2Config(vocab_size=64, n_positions=16, n_embd=8, n_layer=2, n_head=2)


def torch_or_skip():
    try:
        import torch
    except ImportError:
        pytest.skip("torch is not installed (optional: only used to write real .bin files)")
    return torch


def assert_same(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert sorted(got) == sorted(want)
    for k, v in want.items():
        assert got[k].dtype == v.dtype, k
        assert got[k].shape == v.shape, k
        np.testing.assert_array_equal(got[k], v, err_msg=k)


def to_bf16_exact(a: np.ndarray) -> np.ndarray:
    """float32 values with the low 16 bits cleared: exactly representable in bfloat16."""
    return (a.astype(np.float32).view(np.uint32) & 0xFFFF0000).view(np.float32)


def write_raw_safetensors(path: Path, tensors: dict[str, tuple[str, np.ndarray]]) -> None:
    """The documented layout by hand, for dtypes numpy's safetensors writer cannot express (BF16)."""
    header, blobs, offset = {}, [], 0
    for name, (dtype, arr) in tensors.items():
        raw = arr.tobytes()
        header[name] = {"dtype": dtype, "shape": list(arr.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    path.write_bytes(struct.pack("<Q", len(head)) + head + b"".join(blobs))


# --------------------------------------------------------------------------------------------------
# safetensors


def test_safetensors_round_trip_from_folder_and_file(tmp_path: Path) -> None:
    write_checkpoint(tmp_path, CFG, seed=3)
    want = random_state_dict(CFG, seed=3)
    assert_same(load_state_dict(tmp_path), want)
    assert_same(load_state_dict(tmp_path / "model.safetensors"), want)


def test_safetensors_fp16_is_widened_to_float32(tmp_path: Path) -> None:
    from safetensors.numpy import save_file

    half = {"w": np.linspace(-2, 2, 12, dtype=np.float16).reshape(3, 4), "ids": np.arange(5, dtype=np.int64)}
    save_file(half, str(tmp_path / "model.safetensors"))
    got = load_state_dict(tmp_path / "model.safetensors")
    assert got["w"].dtype == np.float32
    np.testing.assert_array_equal(got["w"], half["w"].astype(np.float32))
    assert got["ids"].dtype == np.int64  # integers are not floats: left alone


def test_safetensors_bf16_is_widened_to_float32(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    want = to_bf16_exact(rng.standard_normal((4, 6), dtype=np.float32))
    bits = (want.view(np.uint32) >> 16).astype("<u2")
    ids = np.arange(3, dtype="<i8")
    write_raw_safetensors(tmp_path / "model.safetensors", {"w": ("BF16", bits), "ids": ("I64", ids)})
    got = load_state_dict(tmp_path)
    assert got["w"].dtype == np.float32
    np.testing.assert_array_equal(got["w"], want)
    np.testing.assert_array_equal(got["ids"], ids)


def test_corrupt_safetensors_is_a_format_error(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", 10**12) + b"{}")
    with pytest.raises(ModelFormatError):
        load_state_dict(path)


def test_folder_prefers_safetensors_over_bin(tmp_path: Path) -> None:
    write_checkpoint(tmp_path, CFG)
    (tmp_path / "pytorch_model.bin").write_bytes(b"never read")
    assert_same(load_state_dict(tmp_path), random_state_dict(CFG))


@pytest.mark.parametrize(
    ("files", "message"),
    [({}, "neither"), ({"model.safetensors.index.json": "{}"}, "sharded")],
)
def test_folder_without_single_weights_file(tmp_path: Path, files: dict[str, str], message: str) -> None:
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(ModelFormatError, match=message):
        load_state_dict(tmp_path)


def test_unknown_suffix_is_refused(tmp_path: Path) -> None:
    (tmp_path / "weights.npz").write_bytes(b"x")
    with pytest.raises(ModelFormatError, match="unknown weights format"):
        load_state_dict(tmp_path / "weights.npz")


# --------------------------------------------------------------------------------------------------
# PyTorch .bin written by torch itself


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_torch_bin_of_tiny_gpt2_round_trips(tmp_path: Path, legacy: bool) -> None:
    torch = torch_or_skip()
    want = random_state_dict(CFG, seed=1)
    tensors = {k: torch.from_numpy(v.copy()) for k, v in want.items()}
    tensors["lm_head.weight"] = tensors["transformer.wte.weight"]  # tied: same storage, as transformers saves
    for i in range(CFG.n_layer):  # the causal-mask buffer old checkpoints carry
        tensors[f"transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(16, 16)).view(1, 1, 16, 16)
    path = tmp_path / "pytorch_model.bin"
    torch.save(collections.OrderedDict(tensors), path, _use_new_zipfile_serialization=not legacy)

    got = load_state_dict(path)
    np.testing.assert_array_equal(got["lm_head.weight"], want["transformer.wte.weight"])
    assert_same(gpt2_weights(got, CFG), want)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_torch_bin_views_dtypes_and_shared_storage(tmp_path: Path, legacy: bool) -> None:
    torch = torch_or_skip()
    base = torch.randn(5, 7)
    tensors = {
        "base": base,
        "transposed": base.t(),  # non-contiguous: stride (1, 7)
        "offset_rows": base[2:4],  # storage offset 14
        "strided_block": base.t()[1:5, 2:],  # offset and stride
        "shared": base,  # same storage twice
        "param": torch.nn.Parameter(torch.randn(3)),
        "half": torch.randn(4).half(),
        "bf16": torch.randn(2, 3).bfloat16(),
        "long": torch.arange(6).view(2, 3),
        "flags": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 3),
    }
    path = tmp_path / "weights.bin"
    torch.save(tensors, path, _use_new_zipfile_serialization=not legacy)

    got = read_torch_bin(path)
    want = {k: (v.float() if v.dtype == torch.bfloat16 else v).detach().numpy() for k, v in tensors.items()}
    assert_same(got, want)
    assert got["half"].dtype == np.float16  # read_torch_bin keeps the stored dtype (except bf16)
    assert load_state_dict(path)["half"].dtype == np.float32


# --------------------------------------------------------------------------------------------------
# Hand-made pickles: no torch needed, and they can lie


def fake_torch(monkeypatch: pytest.MonkeyPatch) -> types.SimpleNamespace:
    """Stand-ins pickled under `faketorch*`; renaming the bytes to `torch*` gives torch's exact globals."""
    utils = types.ModuleType("faketorch._utils")
    top = types.ModuleType("faketorch")

    def _rebuild_tensor_v2(*args):  # never called: only its pickled name matters
        raise AssertionError

    _rebuild_tensor_v2.__module__ = "faketorch._utils"
    _rebuild_tensor_v2.__qualname__ = "_rebuild_tensor_v2"
    float_storage = type("FloatStorage", (), {"__module__": "faketorch"})
    utils._rebuild_tensor_v2 = _rebuild_tensor_v2
    top.FloatStorage = float_storage
    monkeypatch.setitem(sys.modules, "faketorch", top)
    monkeypatch.setitem(sys.modules, "faketorch._utils", utils)
    return types.SimpleNamespace(rebuild=_rebuild_tensor_v2, FloatStorage=float_storage)


class FakeStorage:
    def __init__(self, key: str, data: np.ndarray) -> None:
        self.key, self.data = key, data.astype("<f4")


class FakeTensor:
    def __init__(self, ft, storage: FakeStorage, offset: int, size: tuple, stride: tuple) -> None:
        self.args = (storage, offset, size, stride, False, collections.OrderedDict())
        self.ft = ft

    def __reduce__(self):
        return self.ft.rebuild, self.args


def write_fake_torch_zip(path: Path, ft, state: dict, storages: list[FakeStorage]) -> None:
    """torch's zip layout: archive/data.pkl, archive/data/<key>, archive/byteorder."""

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            if isinstance(obj, FakeStorage):
                return ("storage", ft.FloatStorage, obj.key, "cpu", obj.data.size)
            return None

    buf = io.BytesIO()
    Pickler(buf, protocol=2).dump(state)
    data = buf.getvalue().replace(b"faketorch", b"torch")
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", data)
        zf.writestr("archive/byteorder", "little")
        for s in storages:
            zf.writestr(f"archive/data/{s.key}", s.data.tobytes())


def test_zip_reader_without_torch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ft = fake_torch(monkeypatch)
    storage = FakeStorage("0", np.arange(12, dtype=np.float32))
    state = {"m": FakeTensor(ft, storage, 0, (3, 4), (4, 1)), "t": FakeTensor(ft, storage, 2, (3, 2), (1, 3))}
    write_fake_torch_zip(tmp_path / "w.bin", ft, state, [storage])
    got = read_torch_bin(tmp_path / "w.bin")
    np.testing.assert_array_equal(got["m"], np.arange(12).reshape(3, 4))
    np.testing.assert_array_equal(got["t"], np.lib.stride_tricks.as_strided(
        np.arange(12, dtype=np.float32)[2:], shape=(3, 2), strides=(4, 12)))


@pytest.mark.parametrize(
    ("size", "stride", "offset"),
    [((4, 4), (4, 1), 0), ((3,), (1,), 11), ((2, 2), (100, 1), 0), ((2,), (-1,), 5)],
    ids=["too-big", "offset-past-end", "stride-past-end", "negative-stride"],
)
def test_forged_geometry_cannot_read_outside_the_storage(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, size: tuple, stride: tuple, offset: int
) -> None:
    ft = fake_torch(monkeypatch)
    storage = FakeStorage("0", np.zeros(12, dtype=np.float32))
    state = {"x": FakeTensor(ft, storage, offset, size, stride)}
    write_fake_torch_zip(tmp_path / "w.bin", ft, state, [storage])
    with pytest.raises(ModelFormatError):
        read_torch_bin(tmp_path / "w.bin")


def test_forged_storage_size_is_refused_before_allocating(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ft = fake_torch(monkeypatch)
    storage = FakeStorage("0", np.zeros(4, dtype=np.float32))
    write_fake_torch_zip(tmp_path / "w.bin", ft, {"x": FakeTensor(ft, storage, 0, (4,), (1,))}, [storage])
    with zipfile.ZipFile(tmp_path / "w.bin") as zf:
        pkl = zf.read("archive/data.pkl")
    with zipfile.ZipFile(tmp_path / "w.bin", "w") as zf:  # claim 2**40 floats in a 16-byte storage
        zf.writestr("archive/data.pkl", pkl.replace(b"K\x04", b"\x8a\x06\x00\x00\x00\x00\x00\x01", 1))
        zf.writestr("archive/data/0", np.zeros(4, dtype=np.float32).tobytes())
    with pytest.raises(ModelFormatError, match="truncated"):
        read_torch_bin(tmp_path / "w.bin")


class Evil:
    """Runs `func(arg)` when unpickled by an unrestricted loader."""

    def __init__(self, func, arg: str) -> None:
        self.func, self.arg = func, arg

    def __reduce__(self):
        return self.func, (self.arg,)


def evil_payloads(marker: Path) -> list[tuple[object, str]]:
    return [
        (Evil(os.system, f"touch {marker}"), r"\.system"),  # pickled as posix.system
        (Evil(builtins.eval, f"open({str(marker)!r}, 'w').close()"), r"builtin__\.eval"),  # protocol 2 name
        (Evil(builtins.exec, f"open({str(marker)!r}, 'w').close()"), r"builtin__\.exec"),
    ]


@pytest.mark.parametrize("index", [0, 1, 2], ids=["os.system", "eval", "exec"])
@pytest.mark.parametrize("container", ["zip", "legacy"])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path: Path, index: int, container: str) -> None:
    marker = tmp_path / "pwned"
    payload, name = evil_payloads(marker)[index]
    data = pickle.dumps({"transformer.wte.weight": payload}, protocol=2)
    path = tmp_path / "pytorch_model.bin"
    if container == "zip":
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr("archive/data.pkl", data)
            zf.writestr("archive/version", "3")
    else:
        path.write_bytes(data)  # a bare pickle where the legacy format's magic number belongs

    with pytest.raises(UnsafeCheckpoint, match=name):
        load_state_dict(path)
    assert not marker.exists()


def test_malicious_pickle_behind_a_valid_legacy_header(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    header = (0x1950A86A20F9469CFC6C, 1001, {"little_endian": True})  # magic, protocol, sys_info
    head = b"".join(pickle.dumps(x, protocol=2) for x in header)
    path = tmp_path / "pytorch_model.bin"
    path.write_bytes(head + pickle.dumps({"w": Evil(os.system, f"touch {marker}")}, protocol=2))
    with pytest.raises(UnsafeCheckpoint, match="system"):
        read_torch_bin(path)
    assert not marker.exists()


def test_garbage_bin_is_a_format_error(tmp_path: Path) -> None:
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x00not a pickle at all")
    with pytest.raises(ModelFormatError):
        load_state_dict(tmp_path)


# --------------------------------------------------------------------------------------------------
# GPT-2 key normalisation


def test_gpt2_shapes_match_the_synthetic_checkpoint() -> None:
    assert {k: v.shape for k, v in random_state_dict(CFG).items()} == gpt2_shapes(CFG)


def test_canonical_names_pass_through_as_float32() -> None:
    sd = random_state_dict(CFG)
    half = {k: v.astype(np.float16) for k, v in sd.items()}
    out = gpt2_weights(half, CFG)
    assert list(out) == list(gpt2_shapes(CFG))
    assert all(v.dtype == np.float32 and v.flags.c_contiguous for v in out.values())
    wte = sd["transformer.wte.weight"]
    np.testing.assert_array_equal(out["transformer.wte.weight"], wte.astype(np.float16).astype(np.float32))


def test_unprefixed_keys_buffers_tied_head_and_extras() -> None:
    sd = random_state_dict(CFG)
    old = {k.removeprefix("transformer."): v for k, v in sd.items()}  # gpt2/distilgpt2 style
    old["h.0.attn.bias"] = np.ones((1, 1, 16, 16), dtype=np.float32)
    old["h.1.attn.masked_bias"] = np.array(-1e4, dtype=np.float32)
    old["lm_head.weight"] = sd["transformer.wte.weight"].copy()
    old["some.extra.thing"] = np.zeros(3, dtype=np.float32)
    assert_same(gpt2_weights(old, CFG), sd)


def test_untied_lm_head_is_rejected() -> None:
    sd = random_state_dict(CFG)
    sd["lm_head.weight"] = sd["transformer.wte.weight"] + 1.0
    with pytest.raises(ModelFormatError, match="lm_head"):
        gpt2_weights(sd, CFG)


def test_wrong_shape_and_missing_keys_are_listed() -> None:
    sd = random_state_dict(CFG)
    sd["transformer.h.1.mlp.c_fc.weight"] = sd["transformer.h.1.mlp.c_fc.weight"].T  # a Linear-style layout
    del sd["transformer.ln_f.bias"]
    with pytest.raises(ModelFormatError) as err:
        gpt2_weights(sd, CFG)
    assert "transformer.ln_f.bias" in str(err.value)
    assert "transformer.h.1.mlp.c_fc.weight: (32, 8) != (8, 32)" in str(err.value)


def test_config_mismatch_is_caught() -> None:
    bigger = GPT2Config(vocab_size=64, n_positions=16, n_embd=8, n_layer=3, n_head=2)
    with pytest.raises(ModelFormatError, match=r"transformer\.h\.2\."):
        gpt2_weights(random_state_dict(CFG), bigger)
