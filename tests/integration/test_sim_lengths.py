"""ShareGPT-derived lengths for the simulator, from the real ShareGPT file and a real tokenizer."""

from pdserve_tools.sim import WorkloadConfig, generate
from pdserve_tools.sim.lengths import sharegpt_lengths


def test_sharegpt_lengths_are_filtered_deterministic_and_drive_a_workload(tiny_model):
    table = sharegpt_lengths(60, model=str(tiny_model), max_total_tokens=1024)
    assert len(table) == 60
    assert table == sharegpt_lengths(60, model=str(tiny_model), max_total_tokens=1024)
    assert all(p >= 4 and o >= 4 and p + o <= 1024 for p, o in table)  # vLLM's ShareGPT filter
    assert len({o for _, o in table}) > 20  # real answers vary in length
    requests = generate(WorkloadConfig(requests=200, lengths=table, prefix_groups=0, seed=1))
    assert {(r.prompt_tokens, r.output_tokens) for r in requests} <= set(table)
