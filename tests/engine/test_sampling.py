"""Sampling transforms behave like transformers' and a seed makes sampling reproducible."""

from __future__ import annotations

import numpy as np

from kolite.engine.sampling import Sampler, SamplingParams


def _logits(n: int = 50, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(n).astype(np.float32) * 3


def test_greedy_is_argmax_with_either_switch() -> None:
    lg = _logits()
    assert Sampler(SamplingParams(do_sample=False, temperature=1.0))(lg) == int(np.argmax(lg))
    assert Sampler(SamplingParams(do_sample=True, temperature=0.0))(lg) == int(np.argmax(lg))


def test_seed_reproduces_and_differs() -> None:
    lg = _logits()

    def draw(seed: int) -> list[int]:
        s = Sampler(SamplingParams(seed=seed))
        return [s(lg) for _ in range(30)]

    assert draw(7) == draw(7)
    assert draw(7) != draw(8)


def test_top_k_only_draws_from_k_best() -> None:
    lg = _logits()
    best = set(np.argsort(-lg)[:3].tolist())
    s = Sampler(SamplingParams(top_k=3, seed=1, temperature=2.0))
    draws = {s(lg) for _ in range(300)}
    assert draws <= best and len(draws) == 3


def test_top_p_keeps_smallest_nucleus() -> None:
    lg = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    s = Sampler(SamplingParams(top_p=0.75, seed=2))
    draws = {s(lg) for _ in range(300)}
    assert draws == {0, 1}  # 0.5 + 0.3 is the smallest set with mass >= 0.75


def test_sampling_follows_the_distribution() -> None:
    probs = np.array([0.6, 0.3, 0.1])
    s = Sampler(SamplingParams(seed=3, top_k=0))
    counts = np.bincount([s(np.log(probs)) for _ in range(4000)], minlength=3) / 4000
    np.testing.assert_allclose(counts, probs, atol=0.03)


def test_repetition_penalty_as_in_transformers() -> None:
    lg = np.array([2.0, 1.9, -1.0, -1.2])
    s = Sampler(SamplingParams(do_sample=False, repetition_penalty=2.0))
    assert s(lg, seen=[0]) == 1  # 2.0 / 2 = 1.0 < 1.9
    lg2 = np.array([-1.0, -1.5, -3.0])
    assert Sampler(SamplingParams(do_sample=False, repetition_penalty=2.0))(lg2, seen=[0]) == 1  # -1 * 2 = -2


def test_presence_and_frequency_penalties_as_openai_defines_them() -> None:
    lg = np.array([3.0, 2.5, 2.0, 0.0])
    greedy = {"do_sample": False}
    assert Sampler(SamplingParams(presence_penalty=0.6, **greedy))(lg, generated=[0]) == 1  # 3.0 - 0.6 < 2.5
    assert Sampler(SamplingParams(frequency_penalty=0.3, **greedy))(lg, generated=[0]) == 0  # 2.7 > 2.5
    assert Sampler(SamplingParams(frequency_penalty=0.3, **greedy))(lg, generated=[0, 0, 0]) == 1  # 2.1 < 2.5
    assert Sampler(SamplingParams(presence_penalty=-1.5, **greedy))(lg, generated=[2]) == 2  # negative favours


def test_logit_bias_shifts_the_logits_before_everything_else() -> None:
    logits = np.array([0.0, 5.0, 1.0, 2.0], np.float32)
    assert Sampler(SamplingParams(do_sample=False))(logits) == 1
    assert Sampler(SamplingParams(do_sample=False, logit_bias=((1, -100.0),)))(logits) == 3
    assert Sampler(SamplingParams(do_sample=False, logit_bias=((0, 100.0),)))(logits) == 0
    sampled = {Sampler(SamplingParams(temperature=1.0, seed=s, logit_bias=((2, 100.0),)))(logits) for s in range(20)}
    assert sampled == {2}  # +100 leaves no other choice when sampling either
