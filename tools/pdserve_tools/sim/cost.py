"""`CostModel`: how long an instance takes to prefill and to decode, as plain linear coefficients.

Contract: prefill of `n` uncached tokens takes `prefill_base_s + prefill_per_token_s * n
+ prefill_per_token_sq_s * n * n` (the square term is attention); one decode step of a batch of `b`
requests holding `c` KV tokens in all takes `decode_base_s + decode_per_seq_s * b + decode_per_ctx_token_s * c`
(weights read once per step, plus KV read per token); moving a request's KV takes `transfer_per_token_s`
per prompt token.

The defaults are plausible, not measured: an 8B-parameter fp16 model on one 80 GB GPU (about 8 ms to read
the weights per step, ~128 KiB of KV per token read at ~2 TB/s, ~20k prefill tokens/s, ~25 GB/s between
instances). `pdserve calibrate` measures real step times on a vLLM engine and writes fitted coefficients to a
JSON file that `from_json` reads (`pdserve sim --cost FILE`).

`Links` places instances on nodes: within a node a transfer costs the cost model's `transfer_per_token_s`; between
two nodes it costs `kv_bytes_per_token` bytes per prompt token over a link of `link_gbit` Gbit/s.

JSON form (`to_json` / `from_json`): a document whose `"cost"` object holds every field of the dataclass by
name, no more and no fewer; other top-level keys (a calibration's measured points, say) are ignored.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from typing import Any


@dataclass(frozen=True, slots=True)
class CostModel:
    prefill_base_s: float = 0.004
    prefill_per_token_s: float = 5.0e-5
    prefill_per_token_sq_s: float = 2.0e-9
    decode_base_s: float = 0.008
    decode_per_seq_s: float = 2.0e-5
    decode_per_ctx_token_s: float = 6.5e-8
    transfer_per_token_s: float = 5.0e-6
    kv_capacity_tokens: int = 400_000  # per decode instance: (80 GB - weights) / 128 KiB per token

    def __post_init__(self) -> None:
        if min(self.prefill_base_s, self.prefill_per_token_s, self.prefill_per_token_sq_s, self.decode_per_seq_s,
               self.decode_per_ctx_token_s, self.transfer_per_token_s) < 0 or self.decode_base_s <= 0:
            raise ValueError("cost model coefficients must be >= 0, and decode_base_s > 0")
        if self.kv_capacity_tokens < 1:
            raise ValueError(f"kv_capacity_tokens must be >= 1, got {self.kv_capacity_tokens}")

    def to_json(self) -> str:
        return json.dumps({"cost": asdict(self)}, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> CostModel:
        """The cost model in a JSON document's `"cost"` object; ValueError names what is missing or unknown."""
        document = json.loads(text)
        cost = document.get("cost") if isinstance(document, dict) else None
        if not isinstance(cost, dict):
            raise ValueError('a cost file is a JSON object with a "cost" object in it')
        return cls.from_dict(cost)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> CostModel:
        names = {f.name for f in fields(cls)}
        missing, unknown = sorted(names - values.keys()), sorted(values.keys() - names)
        if missing or unknown:
            raise ValueError(f"cost model fields missing: {missing or 'none'}; unknown: {unknown or 'none'}")
        capacity = values["kv_capacity_tokens"]
        if isinstance(capacity, bool) or not isinstance(capacity, int | float) or not math.isfinite(capacity) \
                or capacity != int(capacity):
            raise ValueError(f"kv_capacity_tokens must be a whole number, got {capacity!r}")
        try:
            coefficients = {k: float(v) for k, v in values.items() if k != "kv_capacity_tokens"}
        except (TypeError, ValueError) as e:
            raise ValueError(f"cost model coefficients must be numbers: {e}") from e
        if not all(math.isfinite(v) for v in coefficients.values()):
            raise ValueError(f"cost model coefficients must be finite, got {coefficients}")
        return cls(**coefficients, kv_capacity_tokens=int(capacity))

    def prefill_s(self, tokens: int) -> float:
        return self.prefill_base_s + self.prefill_per_token_s * tokens + self.prefill_per_token_sq_s * tokens * tokens

    def step_s(self, batch: int, context_tokens: int) -> float:
        return self.decode_base_s + self.decode_per_seq_s * batch + self.decode_per_ctx_token_s * context_tokens

    def steps_s(self, batch: int, context_tokens: int, steps: int) -> float:
        """`steps` steps of an unchanged batch: the context grows by `batch` tokens each step (arithmetic sum)."""
        first = self.step_s(batch, context_tokens)
        return steps * first + self.decode_per_ctx_token_s * batch * steps * (steps - 1) / 2

    def steps_done(self, batch: int, context_tokens: int, elapsed_s: float) -> int:
        """How many whole steps of an unchanged batch fit in `elapsed_s` (the inverse of `steps_s`)."""
        a = self.step_s(batch, context_tokens)
        b = self.decode_per_ctx_token_s * batch
        if b == 0:
            n = int(elapsed_s / a)
        else:  # solve b/2 n^2 + (a - b/2) n = elapsed for n, then fix float rounding
            lin = a - b / 2
            n = int((-lin + (lin * lin + 2 * b * elapsed_s) ** 0.5) / b)
        while n > 0 and self.steps_s(batch, context_tokens, n) > elapsed_s:
            n -= 1
        while self.steps_s(batch, context_tokens, n + 1) <= elapsed_s:
            n += 1
        return n


@dataclass(frozen=True, slots=True)
class Links:
    """The nodes the instances run on and the link between any two of them.

    Each pool spreads over the `nodes` nodes in turn (prefill instance i and decode instance i on node i % nodes).
    A transfer between two instances of one node costs the cost model's in-node `transfer_per_token_s` per prompt
    token; between two nodes, the request's KV (`kv_bytes_per_token` per prompt token) over a `link_gbit` Gbit/s
    link. Each transfer has the whole link: concurrent transfers do not share it. The defaults: one node (every
    transfer in-node); a 100 Gbit/s link and the placeholder model's ~128 KiB of KV per token.
    """

    nodes: int = 1
    link_gbit: float = 100.0
    kv_bytes_per_token: int = 131_072

    def __post_init__(self) -> None:
        if self.nodes < 1 or self.kv_bytes_per_token < 1 or not (self.link_gbit > 0 and math.isfinite(self.link_gbit)):
            raise ValueError(f"links need nodes >= 1, kv_bytes_per_token >= 1 and a finite link_gbit > 0, got "
                             f"{self.nodes}, {self.kv_bytes_per_token}, {self.link_gbit}")

    @property
    def link_per_token_s(self) -> float:
        return self.kv_bytes_per_token * 8 / (self.link_gbit * 1e9)

    def transfer_s(self, cost: CostModel, tokens: int, prefill: int, decode: int) -> float:
        """Seconds to move the KV of `tokens` prompt tokens from prefill instance `prefill` to decode `decode`."""
        if prefill % self.nodes == decode % self.nodes:
            return cost.transfer_per_token_s * tokens
        return self.link_per_token_s * tokens
