"""Rank -> placement-group bundle mapping (``controller/placement.py``) and the worker environment,
with fake node ids: every TP group lands on one node, whatever order Ray numbers the bundles in."""

from __future__ import annotations

import pytest

from megatron_gad.controller.placement import bundles_by_node, rank_bundles


def _tp_groups_on_one_node(bundles: list[int], nodes, tp: int) -> bool:
    return all(len({nodes[b] for b in bundles[i:i + tp]}) == 1 for i in range(0, len(bundles), tp))


def test_interleaved_bundles_fill_one_node_first():
    nodes = {i: ("10.0.0.1" if i % 2 == 0 else "10.0.0.2") for i in range(8)}  # A B A B ...
    ranks = rank_bundles(nodes, world=8, tp=4)
    assert ranks == [0, 2, 4, 6, 1, 3, 5, 7]
    assert _tp_groups_on_one_node(ranks, nodes, 4)
    # the order Ray used (rank r -> bundle r) would put every TP group across both nodes
    assert not _tp_groups_on_one_node(list(range(8)), nodes, 4)


def test_list_input_and_node_order_by_lowest_bundle():
    nodes = ["b", "a", "b", "a", "a", "b"]
    assert bundles_by_node(nodes) == [0, 2, 5, 1, 3, 4]
    assert _tp_groups_on_one_node(rank_bundles(nodes, 6, 3), nodes, 3)


@pytest.mark.parametrize("colocate", [True, False])
def test_two_roles(colocate):
    nodes = {i: f"node{(i * 5) % 2}" for i in range(16)}  # 8 GPUs per node, interleaved
    if colocate:  # both roles share the bundles: actor TP 4 (8 ranks), critic TP 2 (16 ranks)
        actor, critic = rank_bundles(nodes, 8, 4), rank_bundles(nodes, 16, 2)
        assert actor == critic[:8]
    else:  # split: the actor's 8 GPUs, then the critic's 8
        actor, critic = rank_bundles(nodes, 8, 4), rank_bundles(nodes, 8, 2, start=8)
        assert not set(actor) & set(critic)
    assert _tp_groups_on_one_node(actor, nodes, 4)
    assert _tp_groups_on_one_node(critic, nodes, 2)


def test_refuses_tp_group_across_nodes():
    nodes = {i: ("A" if i < 6 else "B") for i in range(12)}  # 6 GPUs per node, TP 4
    with pytest.raises(ValueError, match=r"critic: .*6 GPU\(s\) on node A.*multiple of TP=4"):
        rank_bundles(nodes, 8, 4, role="critic")
    assert rank_bundles(nodes, 4, 4) == [0, 1, 2, 3]  # a role needing 4 of node A's 6 is fine
    with pytest.raises(ValueError, match="needs bundles"):
        rank_bundles(nodes, 8, 2, start=8)


def test_worker_env_loopback_only_for_single_node_cpu():
    from megatron_gad.controller.worker_group import worker_env

    assert worker_env(use_gpu=False, single_node=True)["GLOO_SOCKET_IFNAME"] == "lo"
    assert "GLOO_SOCKET_IFNAME" not in worker_env(use_gpu=True, single_node=True)
    assert "GLOO_SOCKET_IFNAME" not in worker_env(use_gpu=False, single_node=False)


def test_worker_env_forwards_debug_hooks(monkeypatch):
    """Fault hooks set in the driver reach the workers it starts afterwards (Ray started earlier)."""
    from megatron_gad.controller.worker_group import worker_env

    monkeypatch.setenv("MEGATRON_GAD_KILL_WORKER", "critic:0:save:0")
    monkeypatch.delenv("MEGATRON_GAD_INJECT_NAN", raising=False)
    env = worker_env(use_gpu=False, single_node=True)
    assert env["MEGATRON_GAD_KILL_WORKER"] == "critic:0:save:0" and "MEGATRON_GAD_INJECT_NAN" not in env
