"""An app over the tiny model, driven in-process through httpx (the engine thread is real)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import pytest

from kolite.api.app import create_app
from kolite.config import ServerSettings
from kolite.service import LoadedModel, ModelService
from tests.conftest import make_service


def make_client(service: ModelService, **server: object) -> httpx.AsyncClient:
    app = create_app(server_settings=ServerSettings(**server), service=service)
    service.start_loading()
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://localhost", timeout=30)


@pytest.fixture()
def ready_service(tiny_loaded: LoadedModel, tiny_model_dir: Path) -> ModelService:
    svc = make_service(tiny_loaded, tiny_model_dir)
    svc.start_loading()
    svc.wait_loaded(10)
    return svc


@pytest.fixture()
async def client(ready_service: ModelService) -> AsyncIterator[httpx.AsyncClient]:
    async with make_client(ready_service) as c:
        yield c


ServiceFactory = Callable[..., ModelService]
