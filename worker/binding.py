"""Which cores each engine of one node gets (pure).

Every engine's OpenMP threads are bound to cores of its own (`VLLM_CPU_OMP_THREADS_BIND`), so engines never
oversubscribe a core; the actors' own threads (request channel, engine client) go to the node's cores that no
engine has, when there are any, so that they never take an engine's core between its steps. Each node is laid out
on its own: the instances Ray placed on it, in order, take its cores one after another (wrapping around when they
ask for more cores than the node has).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Binding:
    engine_cores: tuple[int, ...]  # the engine's OpenMP threads
    spare_cores: tuple[int, ...]  # the actor's own threads; empty: they float

    def omp_bind(self) -> str:
        """`VLLM_CPU_OMP_THREADS_BIND`'s value."""
        return ",".join(str(core) for core in self.engine_cores)


def bind_node(cpus: Sequence[int], node_cpus: int) -> list[Binding]:
    """The bindings of the instances placed on one node of `node_cpus` cores, the i-th asking for `cpus[i]` cores."""
    if node_cpus < 1 or any(c < 1 for c in cpus):
        raise ValueError(f"a node needs >= 1 core and every instance >= 1, got {node_cpus} and {list(cpus)}")
    engines: list[tuple[int, ...]] = []
    start = 0
    for c in cpus:
        engines.append(tuple(sorted({(start + k) % node_cpus for k in range(c)})))
        start += c
    taken = {core for cores in engines for core in cores}
    spare = tuple(core for core in range(node_cpus) if core not in taken)
    return [Binding(cores, spare) for cores in engines]
