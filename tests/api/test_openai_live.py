"""The OpenAI-compatible API over a real uvicorn server on 127.0.0.1, driven by the official `openai` SDK.

Unlike `test_simple_api.py` (in-process httpx), these go through TCP, uvicorn, SSE framing and the
SDK's own parsing and exception mapping, so they also prove client disconnects reach the engine.
The tiny random model's outputs are checked against a plain batch-1 decode loop on a second copy of
the model (`reference`), so a parameter that is accepted but not honoured shows up as a mismatch.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import openai
import pytest

from kolite.api.app import create_app
from kolite.config import ModelSettings, ServerSettings
from kolite.engine.sampling import SamplingParams
from kolite.engine.scheduler import SchedulerOptions
from kolite.engine.sequence import Finish
from kolite.service import LoadedModel, ModelService, State, load_model
from tests.api.live_server import (
    LiveServer,
    assert_engine_settles,
    async_openai_client,
    openai_client,
    serve,
    slowed,
    wait_until_async,
)
from tests.conftest import TINY, fixture_path, make_service
from tests.reference_decode import reference as reference_decode

MODEL = "kolite-tiny"
SLOW_STEP = 0.02  # seconds added to every model call where a request must stay in the engine a while
LONG = 100  # new tokens of a "long" request: >= 2 s with SLOW_STEP, so a cancel must cut it short


# --- fixtures ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def service(tiny_loaded: LoadedModel, tiny_model_dir: Path) -> ModelService:
    return make_service(tiny_loaded, tiny_model_dir, SchedulerOptions(max_batch=8, max_queue=32))


@pytest.fixture(scope="module")
def live(service: ModelService) -> Iterator[LiveServer]:
    app = create_app(server_settings=ServerSettings(served_model_name=MODEL), service=service)
    with serve(app) as server:
        assert service.wait_loaded(10) is State.READY
        yield server


@pytest.fixture(scope="module")
def client(live: LiveServer) -> Iterator[openai.OpenAI]:
    with openai_client(live) as c:
        yield c


@pytest.fixture()
async def aclient(live: LiveServer) -> AsyncIterator[openai.AsyncOpenAI]:
    async with async_openai_client(live) as c:
        yield c


@pytest.fixture(scope="module")
def reference(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    """A second copy of the tiny model with its own runtime (a runtime owns its KV cache), for the
    expected outputs: the plain batch-1 decode loop, no scheduler, no HTTP."""
    home = tmp_path_factory.mktemp("reference-home")
    return load_model(ModelSettings(model=str(tiny_model_dir), kolite_home=home, threads=1))


def expected(model: LoadedModel, prompt_ids: list[int], **params: object) -> Finish:
    return reference_decode(model, prompt_ids, SamplingParams(**params))  # type: ignore[arg-type]


def chat_ids(model: LoadedModel, question: str) -> list[int]:
    """KoGPT2's chat format for one user message: <usr> question <sys>."""
    tok = model.tokenizer
    return [tok.user_id, *tok.encode(question), tok.assistant_id]


def sampled(temperature: float, seed: int) -> dict[str, object]:
    """Engine params equal to an OpenAI request's `temperature` and `seed` (defaults elsewhere)."""
    return {"temperature": temperature, "do_sample": temperature > 0, "seed": seed}


def pick_stop(text: str, start: int = 3) -> tuple[str, int]:
    """A 2-character stop string whose first occurrence is at index >= start (and not a U+FFFD)."""
    for i in range(start, len(text) - 2):
        s = text[i:i + 2]
        if "\ufffd" not in s and text.find(s) == i:
            return s, i
    raise AssertionError(f"no usable stop string in {text!r}")


# --- models, completions, chat -------------------------------------------------------------------
def test_models_list_shows_the_served_name(client: openai.OpenAI) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert models.data[0].object == "model" and models.data[0].owned_by == "kolite"


def test_completion_text_usage_and_echo(client: openai.OpenAI, reference: LoadedModel) -> None:
    prompt = "안녕하세요 반갑습니다."
    ids = reference.tokenizer.encode(prompt)
    want = expected(reference, ids, max_new_tokens=12, **sampled(0.8, 11))
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0.8, seed=11)
    assert r.object == "text_completion" and r.model == MODEL and r.id.startswith("cmpl-")
    choice = r.choices[0]
    assert len(r.choices) == 1 and choice.index == 0
    assert choice.text == want.text and not choice.text.startswith(prompt)
    assert choice.finish_reason == ("length" if want.reason == "length" else "stop")
    assert r.usage is not None
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), want.completion_tokens)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.usage.completion_tokens <= 12
    assert (choice.finish_reason == "length") == (r.usage.completion_tokens == 12)

    echoed = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0.8, seed=11,
                                       echo=True)
    assert echoed.choices[0].text == prompt + want.text
    assert echoed.usage == r.usage  # echo repeats the prompt's text, it is not generated


def test_completion_of_token_ids(client: openai.OpenAI, reference: LoadedModel) -> None:
    ids = reference.tokenizer.encode("라즈베리 파이")
    want = expected(reference, ids, max_new_tokens=6, **sampled(0.0, 0))
    r = client.completions.create(model=MODEL, prompt=ids, max_tokens=6, temperature=0)
    assert r.choices[0].text == want.text
    assert r.usage is not None and r.usage.prompt_tokens == len(ids)


def test_chat_completion_message_and_usage(client: openai.OpenAI, reference: LoadedModel) -> None:
    question = "오늘 날씨가 좋네요"
    prompt = chat_ids(reference, question)
    want = expected(reference, prompt, max_new_tokens=10, stop_token_ids=reference.chat_template.stop_ids,
                    **sampled(0.9, 5))
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": question}],
                                       max_tokens=10, temperature=0.9, seed=5)
    assert r.object == "chat.completion" and r.model == MODEL and r.id.startswith("chatcmpl-")
    choice = r.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == want.text
    assert choice.finish_reason == ("length" if want.reason == "length" else "stop")
    assert r.usage is not None
    assert r.usage.prompt_tokens == len(prompt)  # <usr> + question + <sys>
    assert r.usage.completion_tokens == want.completion_tokens
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens

    # max_completion_tokens is the newer name for the same limit
    r2 = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": question}],
                                        max_completion_tokens=10, temperature=0.9, seed=5)
    assert r2.choices[0].message.content == want.text


@pytest.mark.parametrize(("temperature", "seed"), [(0.0, None), (1.0, 21)], ids=["greedy", "seeded"])
def test_streamed_chat_equals_the_non_streamed_answer(client: openai.OpenAI, temperature: float,
                                                      seed: int | None) -> None:
    req = {"model": MODEL, "messages": [{"role": "user", "content": "한국어 GPT-2 모델"}], "max_tokens": 24,
           "temperature": temperature, "seed": seed}
    whole = client.chat.completions.create(**req)
    chunks = list(client.chat.completions.create(**req, stream=True, stream_options={"include_usage": True}))

    assert chunks[0].choices[0].delta.role == "assistant"
    assert {c.id for c in chunks} == {chunks[0].id} and chunks[0].object == "chat.completion.chunk"
    with_choices = [c for c in chunks if c.choices]
    assert all(c.choices[0].finish_reason is None for c in with_choices[:-1])
    assert with_choices[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    text = "".join(c.choices[0].delta.content or "" for c in with_choices)
    assert text == whole.choices[0].message.content
    # include_usage: one last chunk without choices carries the usage; the others carry none
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert all(c.usage is None for c in chunks[:-1])

    plain = list(client.chat.completions.create(**req, stream=True))
    assert all(c.usage is None for c in plain) and all(c.choices for c in plain)
    assert "".join(c.choices[0].delta.content or "" for c in plain) == text


def test_streamed_completion_equals_the_non_streamed_one(client: openai.OpenAI) -> None:
    req = {"model": MODEL, "prompt": "Hello world, this is", "max_tokens": 20, "temperature": 1.0, "seed": 8}
    whole = client.completions.create(**req)
    chunks = list(client.completions.create(**req, stream=True, stream_options={"include_usage": True}))
    with_choices = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].text for c in with_choices) == whole.choices[0].text
    assert with_choices[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in with_choices[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage

    echoed = list(client.completions.create(**req, stream=True, echo=True))
    assert echoed[0].choices[0].text == req["prompt"]
    assert "".join(c.choices[0].text for c in echoed) == req["prompt"] + whole.choices[0].text


# --- stop strings, seeds, penalties, extras ------------------------------------------------------
@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_stop_strings_cut_the_output(client: openai.OpenAI, endpoint: str) -> None:
    def run(stop: str | list[str] | None, stream: bool = False) -> tuple[str, str | None]:
        common = {"model": MODEL, "max_tokens": 30, "temperature": 1.0, "seed": 3, "stop": stop,
                  "extra_body": {"ignore_eos": True}}
        if endpoint == "completions":
            if stream:
                chunks = [c for c in client.completions.create(prompt="안녕하세요", stream=True, **common)]
                return "".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason
            r = client.completions.create(prompt="안녕하세요", **common)
            return r.choices[0].text, r.choices[0].finish_reason
        messages = [{"role": "user", "content": "안녕하세요"}]
        if stream:
            chunks = list(client.chat.completions.create(messages=messages, stream=True, **common))
            return "".join(c.choices[0].delta.content or "" for c in chunks), chunks[-1].choices[0].finish_reason
        r = client.chat.completions.create(messages=messages, **common)
        return r.choices[0].message.content or "", r.choices[0].finish_reason

    full, reason = run(None)
    assert reason == "length" and len(full) >= 10, full
    first, i = pick_stop(full)
    second, j = pick_stop(full, i + 3)

    assert run(first) == (full[:i], "stop")
    assert run(first, stream=True) == (full[:i], "stop")  # the stop is withheld, never streamed
    assert run([second, first]) == (full[:i], "stop")  # the earliest match wins
    assert run(["never-in-this-text", second]) == (full[:j], "stop")
    assert run(["never-in-this-text"]) == (full, "length")


def test_seed_makes_sampling_reproducible(client: openai.OpenAI, reference: LoadedModel) -> None:
    req = {"model": MODEL, "prompt": "라즈베리 파이", "max_tokens": 16, "temperature": 1.5}
    a = client.completions.create(**req, seed=1234).choices[0].text
    b = client.completions.create(**req, seed=1234).choices[0].text
    assert a == b == expected(reference, reference.tokenizer.encode("라즈베리 파이"), max_new_tokens=16,
                              **sampled(1.5, 1234)).text
    others = {client.completions.create(**req, seed=s).choices[0].text for s in range(4)}
    assert len(others | {a}) > 1


@pytest.mark.parametrize(("fields", "params"), [
    ({"presence_penalty": 1.5, "frequency_penalty": 0.7}, {"presence_penalty": 1.5, "frequency_penalty": 0.7}),
    ({"extra_body": {"repetition_penalty": 1.8}}, {"repetition_penalty": 1.8}),
    ({"extra_body": {"top_k": 2}, "temperature": 1.0, "seed": 9}, {"top_k": 2, **sampled(1.0, 9)}),
    ({"top_p": 0.3, "temperature": 1.0, "seed": 9}, {"top_p": 0.3, **sampled(1.0, 9)}),
], ids=["openai-penalties", "repetition_penalty", "top_k", "top_p"])
def test_sampling_fields_are_honoured(client: openai.OpenAI, reference: LoadedModel, fields: dict,
                                      params: dict) -> None:
    prompt = "12시 땡! 하루가"
    ids = reference.tokenizer.encode(prompt)
    base = {"max_new_tokens": 20, **sampled(0.0, 0)}
    base.update({k: v for k, v in params.items() if k in ("temperature", "do_sample", "seed")})
    want = expected(reference, ids, **{**base, **params})
    assert want.text != expected(reference, ids, **base).text, "the field changes nothing here: a weak test"
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=20,
                                  **{"temperature": 0.0, **fields})
    assert r.choices[0].text == want.text


# --- errors through the SDK's exception types ----------------------------------------------------
def test_unknown_model_is_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    err = info.value
    assert err.status_code == 404
    assert isinstance(err.body, dict) and "gpt-4o" in err.body["message"] and MODEL in err.body["message"]
    assert (err.code, err.type, err.param) == ("model_not_found", "not_found_error", "model")
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="davinci", prompt="hi")


def test_n_above_1_is_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], n=2)
    assert info.value.status_code == 400 and info.value.param == "n"
    assert info.value.type == "invalid_request_error"
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="hi", n=2)


def test_context_overflow_is_400_context_length_exceeded(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt="안녕하세요", max_tokens=TINY.n_positions)
    err = info.value
    assert err.status_code == 400 and err.code == "context_length_exceeded"
    assert str(TINY.n_positions) in err.message
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "안녕하세요"}],
                                       max_tokens=TINY.n_positions)
    assert info.value.code == "context_length_exceeded"
    # exactly at the window is fine
    n_prompt = client.completions.create(model=MODEL, prompt="안녕하세요", max_tokens=1).usage.prompt_tokens
    r = client.completions.create(model=MODEL, prompt="안녕하세요", max_tokens=TINY.n_positions - n_prompt,
                                  temperature=0, extra_body={"ignore_eos": True})
    assert r.usage.total_tokens == TINY.n_positions


@pytest.mark.parametrize("prompt", ["", [], [""]], ids=["empty-string", "empty-list", "list-of-empty"])
def test_empty_prompt_is_400(client: openai.OpenAI, prompt: str | list) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt=prompt)
    assert info.value.param == "prompt" and "empty" in info.value.message


@pytest.mark.parametrize("temperature", [3.0, -0.1])
def test_invalid_temperature_is_400(client: openai.OpenAI, temperature: float) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                       temperature=temperature)
    assert info.value.status_code == 400 and info.value.param == "temperature"


def test_loading_is_503_then_ready(tiny_loaded: LoadedModel, tiny_model_dir: Path) -> None:
    gate = threading.Event()

    def gated_loader(_: ModelSettings) -> LoadedModel:
        if not gate.wait(10):
            raise TimeoutError("the test never opened the gate")
        return tiny_loaded

    svc = make_service(tiny_loaded, tiny_model_dir, SchedulerOptions(max_batch=2, max_queue=4), loader=gated_loader)
    app = create_app(server_settings=ServerSettings(served_model_name=MODEL), service=svc)
    try:
        with serve(app) as server, openai_client(server) as c:
            assert [m.id for m in c.models.list().data] == [MODEL]  # answers while loading
            with pytest.raises(openai.InternalServerError) as info:
                c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
            err = info.value
            assert isinstance(err, openai.APIStatusError) and err.status_code == 503
            assert err.response.headers["retry-after"] == "1"
            assert "loading" in err.message and err.type == "service_unavailable"
            with pytest.raises(openai.InternalServerError):
                list(c.completions.create(model=MODEL, prompt="hi", stream=True))
            gate.set()
            assert svc.wait_loaded(10) is State.READY
            r = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                          extra_body={"ignore_eos": True})  # a random model may end at once
            assert r.usage is not None and r.usage.completion_tokens == 3
    finally:
        gate.set()


@pytest.mark.anyio
async def test_full_queue_is_429_with_retry_after(tiny_loaded: LoadedModel, tiny_model_dir: Path) -> None:
    svc = make_service(tiny_loaded, tiny_model_dir, SchedulerOptions(max_batch=1, max_queue=1))
    app = create_app(server_settings=ServerSettings(served_model_name=MODEL), service=svc)
    long = {"model": MODEL, "prompt": "안녕하세요", "max_tokens": LONG, "temperature": 0,
            "extra_body": {"ignore_eos": True}}
    with slowed(tiny_loaded.runtime, SLOW_STEP), serve(app) as server:
        assert svc.wait_loaded(10) is State.READY
        sched = svc.scheduler
        assert sched is not None
        async with async_openai_client(server) as c:
            running = asyncio.create_task(c.completions.create(**long))
            await wait_until_async(lambda: sched.active == 1, what="the first request to run")
            queued = asyncio.create_task(c.completions.create(**long))
            await wait_until_async(lambda: sched.waiting == 1, what="the second request to wait")
            with pytest.raises(openai.RateLimitError) as info:
                await c.completions.create(**{**long, "max_tokens": 1})
            err = info.value
            assert err.status_code == 429 and err.response.headers["retry-after"] == "1"
            assert err.type == "rate_limit_error" and "queue is full" in err.message
            with pytest.raises(openai.RateLimitError):
                await c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
            # both clients give up: the engine drops the running and the queued request
            for task in (running, queued):
                task.cancel()
            await asyncio.gather(running, queued, return_exceptions=True)
            await wait_until_async(lambda: sched.active == 0 and sched.waiting == 0, 3.0,
                                   "the cancelled requests to leave")
            assert sched.steps < LONG
            r = await c.completions.create(**{**long, "max_tokens": 2})  # a slot is free again
            assert r.usage is not None and r.usage.completion_tokens == 2


# --- cancellation --------------------------------------------------------------------------------
@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_closing_a_stream_stops_the_engine(client: openai.OpenAI, service: ModelService,
                                           tiny_loaded: LoadedModel, endpoint: str) -> None:
    sched = service.scheduler
    assert sched is not None
    before = assert_engine_settles(service)
    common = {"model": MODEL, "max_tokens": LONG, "temperature": 0, "stream": True,
              "extra_body": {"ignore_eos": True}}
    pieces: list[str] = []
    with slowed(tiny_loaded.runtime, SLOW_STEP):
        if endpoint == "chat":
            stream = client.chat.completions.create(messages=[{"role": "user", "content": "안녕"}], **common)
        else:
            stream = client.completions.create(prompt="안녕", **common)
        with stream:
            for chunk in stream:
                piece = chunk.choices[0].delta.content if endpoint == "chat" else chunk.choices[0].text
                if piece:
                    pieces.append(piece)
                if len(pieces) == 3:
                    break
            assert sched.active == 1
        # the response is closed: the server sees the disconnect and the engine drops the request
        after = assert_engine_settles(service, timeout=3.0)
    assert len(pieces) == 3
    assert after - before < LONG // 2, f"{after - before} decode steps: the request was not cut short"
    r = client.completions.create(model=MODEL, prompt="안녕", max_tokens=4, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.usage is not None and r.usage.completion_tokens == 4


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/generate"])
def test_disconnecting_a_plain_request_stops_the_engine(live: LiveServer, service: ModelService,
                                                        tiny_loaded: LoadedModel, path: str) -> None:
    sched = service.scheduler
    assert sched is not None
    body: dict[str, object] = {"max_tokens": LONG, "temperature": 0, "model": MODEL, "ignore_eos": True}
    if path == "/v1/chat/completions":
        body["messages"] = [{"role": "user", "content": "안녕"}]
    elif path == "/v1/completions":
        body["prompt"] = "안녕"
    else:
        body = {"prompt": "안녕", "max_new_tokens": LONG, "do_sample": False}
    before = assert_engine_settles(service)
    timeout = httpx.Timeout(5.0, read=0.3)  # the client gives up after 0.3 s without an answer
    with slowed(tiny_loaded.runtime, SLOW_STEP):
        with httpx.Client(base_url=live.url, timeout=timeout, trust_env=False) as http, \
                pytest.raises(httpx.ReadTimeout):
            http.post(path, json=body)
        after = assert_engine_settles(service, timeout=3.0)
    # it was generating (0.3 s at SLOW_STEP a step) and stopped long before its LONG tokens
    assert 5 <= after - before < LONG // 2, f"{after - before} decode steps"


# --- concurrency ---------------------------------------------------------------------------------
CONCURRENT_PROMPTS = ["안녕하세요", "한국어 GPT-2 모델로", "라즈베리 파이에서도", "Hello world", "12시 땡!",
                      "오늘 날씨가", "챗봇 서버입니다", "tiny byte-level"]


def concurrent_requests() -> list[tuple[str, dict]]:
    """16 requests: chat and completions, greedy and seeded sampling, prompts and lengths differ."""
    reqs = []
    for i in range(16):
        fields: dict[str, object] = {"model": MODEL, "max_tokens": 6 + 3 * i}
        if i % 2:
            fields.update(temperature=0.9, seed=100 + i, top_p=0.95)
        else:
            fields.update(temperature=0)
        prompt = CONCURRENT_PROMPTS[i % len(CONCURRENT_PROMPTS)]
        if i % 4 < 2:
            reqs.append(("chat", {**fields, "messages": [{"role": "user", "content": prompt}]}))
        else:
            reqs.append(("completions", {**fields, "prompt": prompt}))
    return reqs


async def _run(c: openai.AsyncOpenAI, kind: str, fields: dict) -> tuple[str, str | None, tuple[int, int]]:
    if kind == "chat":
        r = await c.chat.completions.create(**fields)
        text = r.choices[0].message.content or ""
    else:
        r = await c.completions.create(**fields)
        text = r.choices[0].text
    assert r.usage is not None
    return text, r.choices[0].finish_reason, (r.usage.prompt_tokens, r.usage.completion_tokens)


@pytest.mark.anyio
async def test_concurrent_requests_equal_the_same_requests_alone(aclient: openai.AsyncOpenAI,
                                                                 service: ModelService,
                                                                 tiny_loaded: LoadedModel) -> None:
    sched = service.scheduler
    assert sched is not None
    reqs = concurrent_requests()
    peak = 0
    done = asyncio.Event()

    async def watch() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, sched.active)
            await asyncio.sleep(0.002)

    with slowed(tiny_loaded.runtime, 0.003):  # so the requests overlap in the engine
        watcher = asyncio.create_task(watch())
        try:
            together = await asyncio.wait_for(asyncio.gather(*(_run(aclient, k, f) for k, f in reqs)), 30)
        finally:
            done.set()
            await watcher
    assert peak > 1, "the requests never shared a batch"
    assert peak <= 8  # max_batch
    alone = [await asyncio.wait_for(_run(aclient, k, f), 10) for k, f in reqs]
    for (kind, fields), got, want in zip(reqs, together, alone, strict=True):
        assert got == want, (kind, fields)
        assert got[2][1] <= fields["max_tokens"]
    await wait_until_async(lambda: sched.active == 0 and sched.waiting == 0, 3.0, "the engine to go idle")


@pytest.mark.anyio
async def test_cancelled_rows_leave_the_rest_of_the_batch_intact(aclient: openai.AsyncOpenAI,
                                                                service: ModelService,
                                                                tiny_loaded: LoadedModel) -> None:
    """Streams closed mid-batch free their rows (the engine moves other rows' caches into the freed
    slots); the requests that keep running must still give exactly their solo answers."""
    sched = service.scheduler
    assert sched is not None
    keep = [r for r in concurrent_requests() if r[1]["max_tokens"] >= 20][:5]
    dropped = 0

    async def drop_early(i: int) -> None:
        nonlocal dropped
        stream = await aclient.completions.create(model=MODEL, prompt=CONCURRENT_PROMPTS[i], max_tokens=LONG,
                                                  temperature=0, stream=True, extra_body={"ignore_eos": True})
        async with stream:
            n = 0
            async for chunk in stream:
                n += bool(chunk.choices and chunk.choices[0].text)
                if n == 2 + 3 * i:  # leave at different steps
                    break
        dropped += 1

    with slowed(tiny_loaded.runtime, 0.003):
        results = await asyncio.wait_for(asyncio.gather(
            *(_run(aclient, k, f) for k, f in keep), *(drop_early(i) for i in range(3))), 30)
    assert dropped == 3
    await wait_until_async(lambda: sched.active == 0 and sched.waiting == 0, 3.0, "the engine to go idle")
    alone = [await asyncio.wait_for(_run(aclient, k, f), 10) for k, f in keep]
    assert results[:len(keep)] == alone


# --- the simple API's stream through the live server ---------------------------------------------
def test_generate_stream_over_tcp(live: LiveServer) -> None:
    body = {"prompt": "안녕하세요", "max_new_tokens": 20, "temperature": 1.0, "top_k": 0, "seed": 5}
    datas: list[str] = []
    with httpx.Client(base_url=live.url, timeout=10, trust_env=False) as http:
        with http.stream("POST", "/generate", json={**body, "stream": True}) as resp:
            assert resp.status_code == 200
            assert resp.headers["content-type"].startswith("text/event-stream")
            datas += [line[len("data: "):] for line in resp.iter_lines() if line.startswith("data: ")]
        plain = http.post("/generate", json=body).json()
    assert datas[-1] == "[DONE]"
    final = json.loads(datas[-2])
    pieces = [json.loads(d) for d in datas[:-2]]
    assert pieces and all(set(p) == {"text"} and p["text"] for p in pieces)
    assert "".join(p["text"] for p in pieces) == final["generated_text"] == plain["generated_text"]
    assert final["finish_reason"] == plain["finish_reason"]
    assert final["usage"] == plain["usage"]
    assert final["usage"]["total_tokens"] == final["usage"]["prompt_tokens"] + final["usage"]["completion_tokens"]
    assert final["input_prompt"] == body["prompt"]


# --- the trained Korean chat model (real fixture) ------------------------------------------------
@pytest.fixture(scope="module")
def chatbot_live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    folder = fixture_path("chatbot-tiny-ko")
    home = tmp_path_factory.mktemp("chatbot-home")
    loaded = load_model(ModelSettings(model=str(folder), kolite_home=home, threads=2))
    svc = make_service(loaded, folder, SchedulerOptions(max_batch=2, max_queue=4))
    app = create_app(server_settings=ServerSettings(served_model_name="chatbot-tiny-ko"), service=svc)
    with serve(app) as server:
        assert svc.wait_loaded(30) is State.READY
        yield server


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
@pytest.mark.parametrize(("question", "answer"), [("12시 땡!", "하루가 또 가네요."),
                                                  ("오늘 너무 피곤해", "푹 쉬세요.")], ids=["midnight", "tired"])
def test_trained_chat_model_answers(chatbot_live: LiveServer, question: str, answer: str, stream: bool) -> None:
    with openai_client(chatbot_live) as c:
        req = {"model": "chatbot-tiny-ko", "messages": [{"role": "user", "content": question}], "temperature": 0}
        if stream:
            chunks = list(c.chat.completions.create(**req, stream=True))
            assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == answer
            assert chunks[-1].choices[0].finish_reason == "stop"
        else:
            r = c.chat.completions.create(**req)
            assert r.choices[0].message.content == answer
            assert r.choices[0].finish_reason == "stop"


def test_server_stops_promptly_with_a_stream_open(tiny_loaded: LoadedModel, tiny_model_dir: Path) -> None:
    """Stopping the server with a long stream open cuts the stream (an SDK connection error, not a
    silently complete answer), stops the engine, and takes about uvicorn's graceful timeout (1 s)."""
    svc = make_service(tiny_loaded, tiny_model_dir, SchedulerOptions(max_batch=1, max_queue=1))
    app = create_app(server_settings=ServerSettings(served_model_name=MODEL), service=svc)
    with slowed(tiny_loaded.runtime, SLOW_STEP):
        server = LiveServer(app).start()
        try:
            assert svc.wait_loaded(10) is State.READY
            with openai_client(server) as c:
                stream = c.completions.create(model=MODEL, prompt="안녕", max_tokens=LONG, temperature=0,
                                              stream=True, extra_body={"ignore_eos": True})
                with stream:
                    first = next(stream)
                    assert first.choices[0].text
                    t0 = time.monotonic()
                    server.stop()
                    assert time.monotonic() - t0 < 4
                    with pytest.raises(openai.APIConnectionError):
                        for _ in stream:
                            pass
        finally:
            server.stop()
        sched = svc.scheduler
        assert sched is not None
        steps = sched.steps
        time.sleep(0.2)
        assert sched.steps == steps < LONG  # the engine stopped with the server, long before LONG tokens
