"""The whole path on a trained Korean chat model: files → profile → int8 graph → decode → text.

`chatbot-tiny-ko` was trained on KoGPT2's `<usr>` question `<sys>` answer `</s>` format; its greedy
answers are known. Getting them back as text proves tokenizer profile, engine and decoding together.
"""

from __future__ import annotations

import json

import pytest

from kolite.config import ModelSettings
from kolite.engine.sampling import SamplingParams
from kolite.service import LoadedModel, load_model
from tests.conftest import fixture_path
from tests.reference_decode import collect, run_sequence


@pytest.fixture(scope="module", params=["int8", "int4", "fp32"])
def chatbot(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    folder = fixture_path("chatbot-tiny-ko")
    home = tmp_path_factory.mktemp("home")
    return load_model(ModelSettings(model=str(folder), precision=request.param, kolite_home=home, threads=2))


def test_greedy_answers_of_the_trained_chat_model(chatbot: LoadedModel) -> None:
    facts = json.loads((fixture_path("chatbot-tiny-ko") / "facts.json").read_text(encoding="utf-8"))
    tok = chatbot.tokenizer
    assert tok.profile.name == "kogpt2" and tok.eos_id == 1 and tok.pad_id == 3
    for fact in facts["greedy_exact_answers"]:
        prompt = [tok.user_id, *tok.encode(fact["q"]), tok.assistant_id]
        assert prompt == fact["prompt_ids"]
        seq = chatbot.new_sequence(prompt, SamplingParams(max_new_tokens=60, do_sample=False))
        events = list(run_sequence(chatbot.runtime, seq))
        finish = events[-1]
        streamed = "".join(e.text for e in events[:-1])
        assert list(finish.token_ids) == fact["answer_ids"], fact["q"]
        assert finish.reason == "stop"  # ended by </s>
        assert finish.text == fact["a"] == streamed


def test_greedy_answers_in_full_batches(chatbot: LoadedModel) -> None:
    """All 30 answers again, 8 at a time through the serving scheduler: every precision gives each
    answer in a batch as alone. (int4's one-row and many-row kernels differ by ~1e-6, README "Many
    users at once"; this trained model's answers have margins far above that.)"""
    from kolite.engine.scheduler import Scheduler, SchedulerOptions
    from kolite.engine.sequence import Finish

    facts = json.loads((fixture_path("chatbot-tiny-ko") / "facts.json").read_text(encoding="utf-8"))
    sched = Scheduler(chatbot.runtime, SchedulerOptions(max_batch=8, max_queue=64, timeout=None))
    try:
        finishes: dict[int, Finish] = {}
        reqs = [sched.submit(chatbot.new_sequence(f["prompt_ids"], SamplingParams(max_new_tokens=60, do_sample=False)),
                             lambda ev, i=i: finishes.__setitem__(i, ev) if isinstance(ev, Finish) else None)
                for i, f in enumerate(facts["greedy_exact_answers"])]
        assert all(r.done.wait(120) for r in reqs)
    finally:
        sched.stop()
    assert sched.steps < sum(len(f["answer_ids"]) for f in facts["greedy_exact_answers"])  # rows shared steps
    for i, fact in enumerate(facts["greedy_exact_answers"]):
        assert list(finishes[i].token_ids) == fact["answer_ids"], fact["q"]


def test_examples_from_the_readme(chatbot: LoadedModel) -> None:
    tok = chatbot.tokenizer
    for q, a in [("12시 땡!", "하루가 또 가네요."), ("오늘 너무 피곤해", "푹 쉬세요.")]:
        seq = chatbot.new_sequence([tok.user_id, *tok.encode(q), tok.assistant_id],
                                   SamplingParams(max_new_tokens=40, do_sample=False))
        assert collect(run_sequence(chatbot.runtime, seq)).text == a




def test_ignore_eos_generates_past_the_end_of_the_answer(chatbot: LoadedModel) -> None:
    """The trained model ends its answer with </s>; with `ignore_eos` it keeps going to the limit,
    and the answer is still the first part of the text."""
    tok = chatbot.tokenizer
    prompt = [tok.user_id, *tok.encode("12시 땡!"), tok.assistant_id]
    ended = collect(run_sequence(chatbot.runtime, chatbot.new_sequence(
        prompt, SamplingParams(max_new_tokens=40, do_sample=False))))
    kept_on = collect(run_sequence(chatbot.runtime, chatbot.new_sequence(
        prompt, SamplingParams(max_new_tokens=40, do_sample=False, ignore_eos=True))))
    assert ended.reason == "stop" and len(ended.token_ids) < 40
    assert kept_on.reason == "length" and len(kept_on.token_ids) == 40
    assert list(kept_on.token_ids[:len(ended.token_ids)]) == list(ended.token_ids)
    assert kept_on.token_ids[len(ended.token_ids)] == tok.eos_id  # it went on through the </s>
