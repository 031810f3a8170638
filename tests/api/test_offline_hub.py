"""`skt/kogpt2-base-v2` from a fake offline hub cache: resolved, converted and served with HF_HUB_OFFLINE=1."""

from __future__ import annotations

from pathlib import Path

import pytest
from huggingface_hub import constants

from kolite.config import ModelSettings
from kolite.models.synthetic import random_state_dict, write_checkpoint
from kolite.service import ModelService
from tests.api.conftest import make_client
from tests.conftest import TINY, build_tiny_tokenizer
from tests.models.test_resolve import MAIN, have_torch, put_in_hub_cache

pytestmark = pytest.mark.anyio


def _kogpt2_like_files(tmp: Path) -> dict[str, bytes]:
    """config + tokenizer.json + weights, as the KoGPT2 repo ships them (pytorch_model.bin when torch can
    write one, so the restricted unpickler is on the path; safetensors otherwise)."""
    src = write_checkpoint(tmp / "src", TINY, seed=4)
    build_tiny_tokenizer(src / "tokenizer.json")
    if have_torch():
        import torch

        torch.save({k: torch.from_numpy(v) for k, v in random_state_dict(TINY, seed=4).items()},
                   src / "pytorch_model.bin")
        (src / "model.safetensors").unlink()
    return {p.name: p.read_bytes() for p in src.iterdir()}


async def test_offline_hub_cache_serves_kogpt2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "hub"
    put_in_hub_cache(cache, "skt/kogpt2-base-v2", _kogpt2_like_files(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))

    settings = ModelSettings(kolite_home=tmp_path / "kolite", threads=1)  # default model: skt/kogpt2-base-v2
    assert settings.model == "skt/kogpt2-base-v2"
    svc = ModelService(settings)
    async with make_client(svc) as c:
        svc.wait_loaded(60)
        status = (await c.get("/")).json()
        assert status == {"service_status": "READY", "model": "skt/kogpt2-base-v2"}, status
        r = await c.post("/generate", json={"prompt": "안녕하세요", "max_new_tokens": 5, "do_sample": False,
                                                 "ignore_eos": True})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 5
    assert svc.model is not None
    prepared = svc.model.prepared
    assert prepared.files.revision == MAIN
    assert prepared.files.weights.name == ("pytorch_model.bin" if have_torch() else "model.safetensors")
    assert svc.model.tokenizer.profile.name == "kogpt2"
    assert prepared.graph.is_relative_to(tmp_path / "kolite")


async def test_offline_without_cache_is_error_with_reason(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    svc = ModelService(ModelSettings(model="distilgpt2", kolite_home=tmp_path / "kolite", threads=1))
    async with make_client(svc) as c:
        svc.wait_loaded(30)
        body = (await c.get("/")).json()
    assert body["service_status"] == "ERROR"
    assert "distilgpt2" in body["error"] and "kolite pull" in body["error"]
