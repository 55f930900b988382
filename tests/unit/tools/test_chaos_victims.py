"""Whom `pdserve chaos` may kill: an instance of the role asked for, only while another instance stays healthy to
finish its requests (in 1P1D the prefill instance decodes whole), and which layout it loads without a config."""

import argparse
from types import SimpleNamespace

from pdserve.config import load_config
from pdserve_tools.chaos import pick_victim
from pdserve_tools.chaos_command import LAYOUTS, add_parser


def pool(*specs: tuple[str, str, bool]) -> list[SimpleNamespace]:
    return [SimpleNamespace(instance_id=i, role=role, healthy=healthy) for i, role, healthy in specs]


def test_in_1p1d_either_worker_may_die_while_the_other_is_healthy():
    both = pool(("prefill-0", "prefill", True), ("decode-0", "decode", True))
    assert pick_victim(both, "decode").instance_id == "decode-0"
    assert pick_victim(both, "prefill").instance_id == "prefill-0"


def test_the_last_healthy_instance_is_never_killed():
    decode_down = pool(("prefill-0", "prefill", True), ("decode-0", "decode", False))
    assert pick_victim(decode_down, "prefill") is None
    assert pick_victim(decode_down, "decode") is None  # no healthy decode instance to kill


def test_without_a_config_chaos_loads_the_default_layout_unless_told_1p2d():
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(), func=None)
    default, other = parser.parse_args(["chaos"]).layout, parser.parse_args(["chaos", "--layout", "1p2d"]).layout
    shipped = load_config().workers
    assert LAYOUTS[default]["prefill"]["instances"] == shipped.prefill.instances
    assert LAYOUTS[default]["decode"]["instances"] == shipped.decode.instances
    assert LAYOUTS[other]["decode"]["instances"] == 2
