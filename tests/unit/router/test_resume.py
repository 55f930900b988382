"""Checks of a resumed request (`resume_token_ids`) and of the client's request key."""

from __future__ import annotations

import pytest

from common.errors import InvalidArgument
from router.request import Request, SamplingSpec
from router.validation import Limits, check_client_request_id, check_request, check_resume

LIMITS = Limits(model_name="m", max_model_len=100, max_tokens_limit=50, vocab_size=1000)


def resumed(max_tokens: int, received: tuple[int, ...]) -> Request:
    return Request("r", SamplingSpec(max_tokens=max_tokens), prompt_token_ids=(1, 2, 3), resume_token_ids=received)


def test_a_resume_short_of_max_tokens_passes():
    check_request(resumed(10, (5,) * 9), LIMITS)
    check_resume([1] * 90, resumed(10, (5,) * 9), LIMITS)  # 99 tokens: one more fits
    check_resume([1] * 99, resumed(10, ()), LIMITS)  # no resume: nothing to check here


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (resumed(10, (5,) * 10), r"resume_token_ids holds 10 tokens.*fewer than sampling.max_tokens \(10\)"),
        (resumed(10, (5, 1000)), r"resume_token_ids holds token id 1000; token ids must be in \[0, 1000\)"),
    ],
)
def test_bad_resumes_are_refused(request_, message):
    with pytest.raises(InvalidArgument, match=message):
        check_request(request_, LIMITS)


def test_a_resume_that_reached_max_model_len_is_refused():
    with pytest.raises(InvalidArgument, match=r"prompt \(91 tokens\) plus resume_token_ids \(9\) reach max_model_len"):
        check_resume([1] * 91, resumed(10, (5,) * 9), LIMITS)


@pytest.mark.parametrize("key", ["", "a", "req-1.2_3:x", "k" * 128])
def test_good_keys_pass(key):
    check_client_request_id(key)


@pytest.mark.parametrize("key", ["k" * 129, "with space", "slash/no", "é"])
def test_bad_keys_are_refused(key):
    with pytest.raises(InvalidArgument, match="request_id must be 1 to 128 characters"):
        check_client_request_id(key)
