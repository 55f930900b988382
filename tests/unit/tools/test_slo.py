import pytest

from pdserve_tools.slo import Slo, tpot


def test_tpot_is_the_mean_gap_after_the_first_token_and_none_for_one_token():
    assert tpot(0.2, 0.6, 5) == pytest.approx(0.1)  # (e2e - ttft) / (5 - 1)
    assert tpot(0.3, 0.3, 1) is None and tpot(0.0, 0.0, 0) is None


def test_met_checks_only_the_objectives_set_and_counts_a_missing_tpot_as_zero():
    slo = Slo(ttft_s=0.5, tpot_s=0.1)
    assert slo.met(0.5, 0.1, 100.0)  # at the objectives is within them; no E2E objective
    assert not slo.met(0.6, 0.05, 1.0) and not slo.met(0.1, 0.2, 1.0)
    assert Slo(tpot_s=0.0).met(9.0, None, 9.0)  # one output token: meets any TPOT objective
    assert not Slo(e2e_s=1.0).met(0.0, None, 1.5)


def test_slo_parse_uses_vllm_syntax_in_milliseconds():
    assert Slo.parse(["ttft:200", "tpot:50", "e2el:1000"]) == Slo(ttft_s=0.2, tpot_s=0.05, e2e_s=1.0)
    with pytest.raises(ValueError, match="KEY one of ttft, tpot, e2el"):
        Slo.parse(["itl:20"])
    with pytest.raises(ValueError, match="not a number"):
        Slo.parse(["ttft:fast"])
    with pytest.raises(ValueError, match="at least one"):
        Slo()
    with pytest.raises(ValueError, match="non-negative"):
        Slo(ttft_s=-1.0)


def test_to_json_is_in_milliseconds_with_vllm_keys():
    assert Slo(ttft_s=0.2).to_json() == {"ttft_ms": pytest.approx(200.0), "tpot_ms": None, "e2el_ms": None}
