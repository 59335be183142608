"""The checker itself must be able to fail: overlaps and shrinking tokens it is shown are
reported (no servers here, just the sampler's bookkeeping)."""

from __future__ import annotations

import pytest

from tests.backends.conformance import HealthSampler

pytestmark = pytest.mark.chaos


def sampler_with(terms: list[tuple[str, int | None]]) -> HealthSampler:
    sampler = HealthSampler([], tokens=True)
    for at, (agent, token) in enumerate(terms):
        sampler._term(float(at), agent, token)
    return sampler


def test_tokens_that_grow_across_leaders_pass() -> None:
    sampler = sampler_with([("a", 3), ("a", 3), ("b", 4), ("a", 9)])
    assert sampler.token_problems() == []
    assert [t for _, _, t in sampler.terms] == [3, 4, 9]  # one entry per term


@pytest.mark.parametrize(
    "terms",
    [
        [("a", 5), ("b", 4)],  # backwards
        [("a", 5), ("b", 5)],  # two leaders, one token
        [("a", 5), ("b", 6), ("a", 5)],  # an old term back
        [("a", None)],  # a leader without a token
    ],
)
def test_tokens_that_do_not_grow_are_reported(terms: list[tuple[str, int | None]]) -> None:
    assert sampler_with(terms).token_problems() != []


def test_two_200s_in_one_round_are_an_overlap() -> None:
    sampler = HealthSampler([])
    sampler.history = [(0.0, ("a",)), (0.02, ("a", "b")), (0.04, ("a", "b")), (0.06, ("b",))]
    assert sampler.overlaps() == [(0.02, 0.04, ("a", "b"))]
