"""Redundant experts (EPLB): the plan's invariants, never worse than no replicas, and at least as balanced as the
official algorithm on its own example."""

import pytest
import torch

from nanoseek.parallel.eplb import balanced_packing, rebalance, unbalanced_gpu_load

# the example of github.com/deepseek-ai/EPLB (README): 2 layers x 12 experts, 4 groups, 16 replicas, 2 nodes x 4 GPUs,
# and the plan the official `rebalance_experts` prints for it
EXAMPLE = torch.tensor([[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
                        [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27]])
OFFICIAL_PHY2LOG = torch.tensor([[5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
                                 [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1]])


def _check(plan, load, num_groups, num_nodes, num_gpus, hierarchical):
    L, E = load.shape
    R = plan.phy2log.shape[1]
    assert plan.logcnt.min() >= 1 and (plan.logcnt.sum(1) == R).all()  # every expert placed, every slot used
    for i in range(L):
        for e in range(E):  # log2phy and phy2log agree
            slots = plan.log2phy[i, e][plan.log2phy[i, e] >= 0]
            assert len(slots) == plan.logcnt[i, e] and (plan.phy2log[i, slots] == e).all()
    gpu_load = plan.gpu_load(load, num_gpus)
    assert torch.allclose(gpu_load.sum(1), load.double().sum(1))  # the load is conserved
    if hierarchical:  # every replica of a group's experts on the group's node
        node = torch.arange(R) // (R // num_nodes)
        group = plan.phy2log // (E // num_groups)
        for i in range(L):
            for g in range(num_groups):
                assert len(set(node[group[i] == g].tolist())) == 1


def test_official_example_at_least_as_balanced():
    plan = rebalance(EXAMPLE, 16, 4, 2, 8)
    _check(plan, EXAMPLE, 4, 2, 8, hierarchical=True)
    ours = plan.gpu_load(EXAMPLE, 8).amax(1)
    cnt = torch.zeros(2, 12).scatter_add_(1, OFFICIAL_PHY2LOG, torch.ones(2, 16))
    official = (EXAMPLE.double().gather(1, OFFICIAL_PHY2LOG) / cnt.double().gather(1, OFFICIAL_PHY2LOG)).view(
        2, 8, 2).sum(-1).amax(1)
    assert official.tolist() == [156.0, 179.5]  # the official plan's heaviest GPU per layer
    assert (ours <= official + 1e-9).all(), (ours, official)
    assert (ours < unbalanced_gpu_load(EXAMPLE, 8).amax(1)).all()


@pytest.mark.parametrize("nodes,hierarchical", [(4, True), (3, False)])
def test_v3_prefill_sized_plans_never_worse_than_no_replicas(nodes, hierarchical):
    # V3's prefill deployment: 256 routed experts in 8 groups, 32 redundant, 9 slots per GPU (V3 §3.4); 3 nodes do not
    # divide 8 groups: the global policy
    gpus = 32 if nodes == 4 else 48
    replicas = 288
    torch.manual_seed(nodes)
    load = (torch.distributions.Pareto(1.0, 1.5).sample((3, 256)) * 100).round()  # skewed, as real loads are
    plan = rebalance(load, replicas, 8, nodes, gpus)
    _check(plan, load, 8, nodes, gpus, hierarchical)
    before, after = unbalanced_gpu_load(load, gpus), plan.gpu_load(load, gpus)
    assert (after.amax(1) <= before.amax(1)).all()
    mean = load.double().sum(1) / gpus
    assert (after.amax(1) / mean < before.amax(1) / mean).all()


def test_packing_equal_counts_and_errors():
    w = torch.tensor([9.0, 8, 7, 1, 1, 1]).numpy()
    bins = balanced_packing(w, 3)
    assert sorted((bins == b).sum() for b in range(3)) == [2, 2, 2]
    loads = sorted(w[bins == b].sum() for b in range(3))
    assert loads == [8.0, 9.0, 10.0]  # each heavy item with a light one: the best there is
    with pytest.raises(ValueError, match="equal bins"):
        balanced_packing(w, 4)
    with pytest.raises(ValueError, match="split"):
        rebalance(EXAMPLE, 15, 4, 2, 8)


def test_replicas_give_the_same_outputs_and_split_each_experts_tokens():
    """A plan installed on a model: every (token, expert) pair goes to one of the expert's replicas, the replicas of
    an expert receive its pairs in equal shares (within one), and the logits are the model's without replicas."""
    from conftest import tiny_config

    from nanoseek.model import Transformer
    from nanoseek.parallel.eplb import install_plan, remove_plan

    torch.manual_seed(0)
    model = Transformer(tiny_config()).eval()
    x = torch.randint(0, 97, (3, 40))
    with torch.no_grad():
        ref = model(x).logits
    E, L = model.config.n_routed_experts, model.config.n_moe_layers
    load = torch.tensor([[400, 20, 10, 5, 90, 3, 1, 1]] * L)  # skewed: expert 0 gets replicas
    plan = rebalance(load, E + 4, num_groups=4, num_nodes=1, num_gpus=4)
    assert (plan.logcnt[:, 0] > 1).all()
    dispatches = install_plan(model, plan)
    with torch.no_grad():
        got = model(x).logits
    torch.testing.assert_close(got, ref, rtol=0, atol=2e-5)
    for d, cnt, table in zip(dispatches, plan.logcnt, plan.log2phy, strict=True):
        assert int(d.slot_load.sum()) == x.numel() * model.config.num_experts_per_tok
        for e in range(E):
            shares = d.slot_load[table[e, : cnt[e]]]
            assert int(shares.max() - shares.min()) <= 1, (e, shares)
    remove_plan(model)
    with torch.no_grad():
        assert torch.equal(model(x).logits, ref)
