"""Which placement-group bundle (one GPU) each rank of a role runs on.

Megatron orders ranks tp-cp-ep-dp-pp, so a TP group is ``tp`` consecutive ranks; its all-reduces
run every layer and must stay on one node's NVLink. Ray's PACK strategy may number a placement
group's bundles in any node order (e.g. interleaved across nodes), so ranks are mapped to bundles
node by node: consecutive ranks fill one node before the next. Pure functions, tested with fake
node ids (``tests/unit/test_placement.py``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

BUNDLE = {"GPU": 1, "CPU": 1}  # one placement-group bundle per GPU; strategy PACK


@dataclass(frozen=True)
class PlacementRequest:
    """What the trainer asks Ray for on GPUs (also printed by ``megatron-gad train --dry-run``)."""
    bundles: int  # bundles of BUNDLE in one placement group
    actor_start: int  # the actor's ranks take bundles actor_start .. actor_start + world_actor - 1
    critic_start: int | None  # likewise the critic's (None: no critic, trainer.mode=sft)
    gpu_fraction: float  # GPUs each rank's Ray process asks for


def placement_request(world_actor: int, world_critic: int, colocate: bool, with_critic: bool,
                      with_vllm: bool = False) -> PlacementRequest:
    """Colocated roles share each bundle's GPU (half each); split roles take their own bundles. vLLM
    engines sit on the actor's bundles, so the roles sharing a GPU split its Ray accounting: actor +
    critic (+ engine) when colocated, actor (+ engine) when split."""
    bundles = max(world_actor, world_critic) if colocate else world_actor + world_critic
    critic_start = (0 if colocate else world_actor) if with_critic else None
    sharing = (2 if colocate else 1) + int(with_vllm)
    return PlacementRequest(bundles, 0, critic_start, 1.0 / sharing)


def bundles_by_node(bundle_nodes: Sequence[str] | Mapping[int, str]) -> list[int]:
    """Bundle indices grouped by node (nodes in order of their lowest bundle, bundles ascending).

    ``bundle_nodes``: each bundle's node id, e.g. ``ray.util.placement_group_table(pg)
    ["bundles_to_node_id"]`` ({bundle index: node id}) or a list indexed by bundle."""
    items = sorted(bundle_nodes.items()) if isinstance(bundle_nodes, Mapping) else list(enumerate(bundle_nodes))
    nodes: dict[str, list[int]] = {}
    for index, node in items:
        nodes.setdefault(node, []).append(index)
    return [index for indices in nodes.values() for index in indices]


def rank_bundles(bundle_nodes: Sequence[str] | Mapping[int, str], world: int, tp: int, start: int = 0,
                 role: str = "role") -> list[int]:
    """The bundle of each of a role's ``world`` ranks: positions ``start .. start + world - 1`` of
    the node-grouped bundle order (colocated roles both start at 0 and share bundles; split roles
    take consecutive ranges). Raises ``ValueError`` if a TP group would straddle two nodes, i.e.
    if the role's ranks on some node are not a multiple of ``tp``."""
    order = bundles_by_node(bundle_nodes)
    node_of = dict(bundle_nodes.items()) if isinstance(bundle_nodes, Mapping) else dict(enumerate(bundle_nodes))
    if start + world > len(order):
        raise ValueError(f"{role}: needs bundles {start}..{start + world - 1}, the placement group has {len(order)}")
    chosen = order[start:start + world]
    per_node: dict[str, int] = {}
    for b in chosen:
        per_node[node_of[b]] = per_node.get(node_of[b], 0) + 1
    uneven = {node: n for node, n in per_node.items() if n % tp}
    if uneven:
        raise ValueError(
            f"{role}: tensor parallel groups of {tp} GPUs would span nodes: it gets "
            + ", ".join(f"{n} GPU(s) on node {node}" for node, n in uneven.items())
            + f"; every node must give this role a multiple of TP={tp} GPUs (change TP, or the GPUs per node)")
    return chosen
