"""Prompt blocks and what the router knows an instance caches of them. Pure code, bounded.

`block_hashes(token_ids, block_tokens)` names each full block of a prompt by a hash chained on the block before
it, as vLLM's prefix cache keys its blocks: `hashes[i]` stands for the prompt's first `(i + 1) * block_tokens`
tokens, so two prompts share exactly their leading equal hashes, up to the first block in which they differ.

`TrackedPrefixes` is one instance's prefix cache as the router learns it from what it places there: every prompt
the instance computes leaves its blocks cached, so `route` adds them and returns how many of its leading blocks
were held already (`PrefixHit`). It keeps at most `capacity_blocks` hashes (the engine's KV blocks), evicting the
least recently used. A prompt's blocks are touched last block first, so a prompt's tail goes before its head, as
the engine's free-block queue evicts them; the held set then stays closed under prefixes. `held` is a live,
read-only view for a policy's pick.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field

from router.placement.query import Placement

_ROOT = 0x7064_7365_7276_6531  # the chain's parent for a prompt's first block


def block_hashes(token_ids: Sequence[int], block_tokens: int) -> tuple[int, ...]:
    """One chained hash per full block of `block_tokens` tokens (the partial last block has none)."""
    out: list[int] = []
    parent = _ROOT
    for start in range(0, len(token_ids) - block_tokens + 1, block_tokens):
        parent = hash((parent, tuple(token_ids[start:start + block_tokens])))
        out.append(parent)
    return tuple(out)


def leading_blocks(hashes: Sequence[int], held: AbstractSet[int]) -> int:
    """How many of the prompt's leading blocks `held` holds: a chain, so a miss ends the match."""
    blocks = 0
    for h in hashes:
        if h not in held:
            break
        blocks += 1
    return blocks


def skipped_tokens(placement: Placement, blocks: int) -> int:
    """Prompt tokens an engine holding the prompt's first `blocks` blocks does not compute again: whole blocks,
    and never the prompt's last token (the engine computes it to sample the first output token)."""
    usable = max(0, placement.prompt_tokens - 1) // placement.block_tokens
    return min(blocks, usable) * placement.block_tokens


@dataclass(frozen=True, slots=True)
class PrefixHit:
    """One prompt placed on an instance that caches prefixes: its full blocks, the leading ones the instance held,
    and the prompt tokens that saves."""

    blocks: int
    hit: int
    saved_tokens: int


@dataclass(slots=True)
class TrackedPrefixes:
    capacity_blocks: int
    _blocks: OrderedDict[int, None] = field(default_factory=OrderedDict)  # least recently used first

    def __post_init__(self) -> None:
        if self.capacity_blocks < 0:
            raise ValueError(f"a prefix cache holds >= 0 blocks, got {self.capacity_blocks}")

    @property
    def held(self) -> AbstractSet[int]:
        return self._blocks.keys()

    def __len__(self) -> int:
        return len(self._blocks)

    def route(self, placement: Placement) -> PrefixHit:
        """The placement's prompt is computed here: what it finds cached, and its blocks cached from now on."""
        hashes = placement.prefix_hashes
        blocks = self._blocks
        hit = leading_blocks(hashes, blocks.keys())
        for h in reversed(hashes[:self.capacity_blocks]):  # a prompt longer than the cache keeps its head
            if h in blocks:
                blocks.move_to_end(h)
            else:
                blocks[h] = None
        while len(blocks) > self.capacity_blocks:
            blocks.popitem(last=False)
        return PrefixHit(len(hashes), hit, skipped_tokens(placement, hit))
