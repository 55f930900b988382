"""The SDK refuses what the wire cannot carry before anything is sent: a pdserve error naming the field and the
accepted range, never a raw protobuf error."""

from __future__ import annotations

import pytest

from pdserve_client import InvalidArgument
from pdserve_client._wire import Sampling, build_request


@pytest.mark.parametrize(("prompt", "sampling", "message"), [
    ("hi", Sampling(max_tokens=-5), r"max_tokens must be a whole number in \[0, 4294967295\], got -5"),
    ("hi", Sampling(max_tokens=2.5), r"max_tokens must be a whole number"),  # type: ignore[arg-type]
    ("hi", Sampling(temperature=float("nan")), "temperature must be a finite number, got nan"),
    ("hi", Sampling(top_p="high"), "top_p must be a finite number, got 'high'"),  # type: ignore[arg-type]
    ("hi", Sampling(top_k=-1), r"top_k must be a whole number in \[0, 4294967295\], got -1"),
    ("hi", Sampling(seed=-3), r"seed must be a whole number in \[0, 18446744073709551615\], got -3"),
    ("hi", Sampling(stop_token_ids=[1, -2]), r"stop_token_ids\[1\] must be a whole number"),
    ([5, 2**32], Sampling(), r"prompt\[1\] must be a whole number in \[0, 4294967295\], got 4294967296"),
])
def test_bad_arguments_are_a_pdserve_error_naming_the_field(prompt, sampling, message) -> None:
    with pytest.raises(InvalidArgument, match=message) as e:
        build_request(prompt, sampling)
    assert e.value.code.name == "INVALID_ARGUMENT"


def test_what_the_wire_carries_is_left_to_the_server_to_judge() -> None:
    assert build_request("hi", Sampling(max_tokens=0)).sampling.max_tokens == 0  # the server's error names its range


def test_good_arguments_reach_the_message() -> None:
    request = build_request([1, 2], Sampling(max_tokens=3, temperature=0.0, top_k=5, seed=2**64 - 1))
    assert list(request.prompt_token_ids.ids) == [1, 2] and request.sampling.max_tokens == 3
    assert request.sampling.seed == 2**64 - 1 and request.sampling.top_k == 5
