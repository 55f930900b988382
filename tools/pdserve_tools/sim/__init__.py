"""A discrete-event simulator of a prefill/decode cluster that drives the router's own policy objects.

Pure: no Ray, gRPC or engine. `run(SimConfig, decode_policy, prefill_policy)` returns per-request timings;
`summarize` turns them into a per-policy summary. See `simulator` for the event model, `compare` and `goodput`
for the policy comparison `pdserve sim` prints. One module here is not pure and is not imported by the package:
`calibrate`, the shell of `pdserve calibrate`, which times a vLLM engine to fit the `CostModel` (see `fit`).
"""

from pdserve_tools.sim.cost import CostModel, Links
from pdserve_tools.sim.report import Summary, summarize
from pdserve_tools.sim.simulator import SimConfig, SimResult, run
from pdserve_tools.sim.workload import WorkloadConfig, generate

__all__ = ["CostModel", "Links", "SimConfig", "SimResult", "Summary", "WorkloadConfig", "generate", "run", "summarize"]
