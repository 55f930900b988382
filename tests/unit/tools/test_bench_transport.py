"""`pdserve bench transport`: every variant moves the same bytes, whole, in every round (the bench checks them by
hash), whether a round is one message or several, with or without busy threads, at each switch interval."""

from __future__ import annotations

import sys

import pytest

from pdserve_tools.bench.transport import DEFAULT_SWITCH_INTERVAL_S, measure, parse_variant, variant_name


def test_a_round_of_several_messages_per_switch_interval_lands_whole_beside_raw():
    size, repeats = 3 * 100_003, 2
    result = measure(("tcp",), size_bytes=size, repeats=repeats, pieces=2, messages=3, busy=True,
                     switch_intervals_s=(0.005, 0.0002))
    assert [k for k, v in result.items() if isinstance(v, dict)] == ["raw", "tcp@5ms", "tcp@0.2ms"]
    for name in ("raw", "tcp@5ms", "tcp@0.2ms"):
        assert len(result[name]["samples"]) == repeats and min(result[name]["samples"]) > 0
    assert result["tcp@0.2ms"]["ratio"] > 0 and result["messages"] == 3 and result["busy"] is True
    assert sys.getswitchinterval() == DEFAULT_SWITCH_INTERVAL_S  # the measuring process is left as it was


def test_variant_names_carry_the_switch_interval_only_when_several_are_compared():
    assert variant_name("tcp", 0.0002, several=True) == "tcp@0.2ms"
    assert variant_name("tcp", 0.0002, several=False) == "tcp"
    assert parse_variant("tcp@0.2ms") == ("tcp", pytest.approx(0.0002))
    assert parse_variant("shm") == ("shm", DEFAULT_SWITCH_INTERVAL_S)


def test_bad_arguments_are_refused_before_any_process_starts():
    with pytest.raises(ValueError, match="messages \\* pieces"):
        measure(("tcp",), size_bytes=10, messages=4, pieces=4)
    with pytest.raises(ValueError, match="switch intervals"):
        measure(("tcp",), size_bytes=10, switch_intervals_s=(0.0,))
