"""Redundant experts in expert-parallel training (nanoseek.parallel.redundant): the owner-fixed plan, its errors, and
training with replicas on 2 ranks (gloo, torchrun) against the single process and the unreplicated run: the same
losses, gradients and final weights, more balanced expert rows per rank, the weight bytes of the docstring's formula,
and checkpoints without replicas."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
from dist_worker import redundant_train_configs, skew_router
from test_parallel import WORKER, _sets, records, rel, torchrun

from nanoseek.config import ConfigError
from nanoseek.parallel import ParallelConfig
from nanoseek.parallel.eplb import rebalance_owned, replica_slots, unbalanced_gpu_load
from nanoseek.parallel.redundant import check_redundant


def _peak(rows: list[list[int]], w: np.ndarray) -> float:
    """The heaviest GPU's load when GPU g holds the experts rows[g] (each expert's load split over its copies):
    computed here from the rows alone."""
    cnt = np.bincount([e for r in rows for e in r], minlength=len(w))
    return max(sum(w[e] / cnt[e] for e in r) for r in rows)


def test_owned_plan_keeps_owners_and_balances():
    torch.manual_seed(0)
    E, G, R = 16, 4, 2
    load = (torch.distributions.Pareto(1.0, 1.2).sample((3, E)) * 10).round()
    load[0, :4] += 500  # GPU 0's experts very hot
    for nodes in (1, 2):
        plan = rebalance_owned(load, G, R, num_nodes=nodes)
        slots = plan.phy2log.view(3, G, -1)
        assert slots.shape[-1] == E // G + R
        for i in range(3):
            for g in range(G):
                own = list(range(g * E // G, (g + 1) * E // G))
                assert slots[i, g, : E // G].tolist() == own  # owners keep their experts in their first slots
                reps = slots[i, g, E // G:].tolist()
                assert len(set(reps)) == R and not set(reps) & set(own)  # R distinct replicas of other GPUs' experts
                if nodes == 2:  # ... of the GPU's own node
                    assert all(e // (E // nodes) == g // (G // nodes) for e in reps)
            peak = _peak(slots[i].tolist(), load[i].numpy())
            assert peak == pytest.approx(plan.gpu_load(load, G)[i].max().item())
            assert peak <= unbalanced_gpu_load(load, G)[i].max().item() + 1e-9  # never worse than no replicas
        # (on 2 nodes GPU 0's hot experts can go to GPU 1 only)
        assert plan.gpu_load(load, G)[0].max() < (0.5 if nodes == 1 else 0.75) * unbalanced_gpu_load(load, G)[0].max()
    # against the best placement, by enumeration (2 GPUs of 4 experts, R replicas each)
    ratios = []
    for trial in range(30):
        w = (torch.distributions.Pareto(1.0, 1.2).sample((8,)) * 10).round().numpy()
        r = 1 + trial % 3
        best = min(_peak([[0, 1, 2, 3, *a], [4, 5, 6, 7, *b]], w)
                   for a in itertools.combinations(range(4, 8), r) for b in itertools.combinations(range(4), r))
        ratios.append(_peak(rebalance_owned(torch.tensor(w), 2, r).phy2log.view(2, -1).tolist(), w) / best)
    assert max(ratios) < 1.15 and np.mean(ratios) < 1.02, ratios
    rebalance_owned(load, G, 4, num_nodes=2)  # a node of 2 GPUs x 4 experts: the other GPU's 4 at most
    with pytest.raises(ValueError, match="redundant=5"):
        rebalance_owned(load, G, 5, num_nodes=2)
    with pytest.raises(ValueError, match="redundant=13"):
        rebalance_owned(load, G, 13)


def test_replica_slots_spread_each_experts_pairs_over_senders():
    """Each sender splits its pairs of an expert evenly over the replicas (within one), and with the rank as offset
    the senders' remainders land on different replicas: the replicas' totals differ by at most one as well."""
    log2phy = torch.tensor([[0, 5, 9], [1, -1, -1]])
    logcnt = torch.tensor([3, 1])
    total = torch.zeros(10, dtype=torch.long)
    for rank in range(3):
        idx = torch.tensor([[0, 1]] * 4)  # 4 pairs of expert 0 per sender
        slots = replica_slots(idx, log2phy, logcnt, offset=rank)
        assert (slots[:, 1] == 1).all()
        got = torch.bincount(slots[:, 0], minlength=10)
        assert got[[0, 5, 9]].max() - got[[0, 5, 9]].min() <= 1
        total += got
    assert total[[0, 5, 9]].tolist() == [4, 4, 4]


def test_redundant_errors_name_the_field():
    with pytest.raises(ConfigError, match="redundant=2.*ep > 1"):
        ParallelConfig.parse("redundant=2")
    with pytest.raises(ConfigError, match="redundant"):
        ParallelConfig.parse("ep=2,redundant=-1")
    with pytest.raises(ConfigError, match="replan_every"):
        ParallelConfig.parse("ep=2,redundant=1,replan_every=0")
    pc = ParallelConfig.parse("ep=2,redundant=3,replan_every=10")
    assert (pc.redundant, pc.replan_every, ParallelConfig().redundant) == (3, 10, 0)  # off by default
    check_redundant(8, 2, 1, 4)
    with pytest.raises(ConfigError, match=r"redundant=5: an ep rank can hold at most 4"):
        check_redundant(8, 2, 1, 5)
    with pytest.raises(ConfigError, match=r"redundant=1: .* at most 0 .*nodes=4"):
        check_redundant(8, 4, 4, 1)  # one rank per node: no other rank of its node to replicate


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from nanoseek.data import prepare_corpus

    d = tmp_path_factory.mktemp("data")
    prepare_corpus(None, d, vocab_size=512, max_chars=60_000, seed=0, progress=False)
    return d


def test_redundant_experts_train_like_one_process(data_dir, tmp_path):
    """ep=2 with 2 replica slots per rank, routers skewed towards rank 0's experts: one step against the model in one
    process (loss, every gradient; each layer's rows per rank without and with the plan), then 4 Trainer steps
    (re-planned after steps 1 and 3) against one process and against ep=2 without replicas."""
    from nanoseek.train import Trainer
    from nanoseek.train.checkpoint import list_checkpoints, load_model

    out, runs = tmp_path / "r.json", tmp_path / "runs"
    torchrun(2, WORKER, "redundant", str(out), "ep=2,redundant=2", str(data_dir), str(runs), "ep=2",
             "ep=2,redundant=2,replan_every=2")
    res = json.loads(out.read_text())["ep=2,redundant=2"]
    assert rel(res["loss"], res["ref_loss"]) < 1e-5
    worst = max(res["grad_rel"], key=res["grad_rel"].get)
    assert res["grad_rel"][worst] < 1e-5, (worst, res["grad_rel"][worst])
    before, after = torch.tensor(res["rows_before"]), torch.tensor(res["rows_after"])  # [ranks, MoE layers]
    assert torch.equal(before.sum(0), after.sum(0))  # every (token, expert) pair computed once either way
    imbalance = (before.amax(0) / before.mean(0), after.amax(0) / after.mean(0))
    assert (imbalance[0] > 1.3).all() and (imbalance[1] < imbalance[0] - 0.2).all(), imbalance
    assert res["replica_bytes"] == res["formula_bytes"] and min(res["replica_bytes"]) > 0

    m, t = redundant_train_configs()
    tr = Trainer(m, t, data_dir, tmp_path / "one", progress=False)
    skew_router(tr.model)
    tr.run()
    one, plain, red = records(tmp_path / "one"), records(runs / "0"), records(runs / "1")
    assert [r["step"] for r in red] == [1, 2, 3, 4]
    expert_bytes = 3 * m.hidden_size * m.moe_intermediate_size * 4
    forwards = (m.n_moe_layers + m.num_nextn_predict_layers) * t.batch_size // (2 * t.micro_batch_size)
    for x, y, z in zip(one, plain, red, strict=True):
        for k in ("loss", "main_loss", "mtp_loss", "grad_norm"):
            assert rel(z[k], x[k]) < 1e-5 and rel(z[k], y[k]) < 1e-5, (x["step"], k, x[k], y[k], z[k])
        # no plan before the first step's loads; then 2 ranks x 2 replicas per MoE layer and forward (the formula)
        assert z["ep_replica_bytes"] == (0 if x["step"] == 1 else forwards * 2 * 2 * expert_bytes)
        assert y["ep_replica_bytes"] == 0
        if x["step"] == 1:
            assert z["ep_rows_max_over_mean"] == y["ep_rows_max_over_mean"]
        else:
            assert z["ep_rows_max_over_mean"] < y["ep_rows_max_over_mean"] - 0.2, (z, y)
    assert rel(records(runs / "1", "eval")[-1]["heldout_loss"], records(tmp_path / "one", "eval")[-1]["heldout_loss"]
               ) < 1e-5
    # the checkpoint holds the model's parameters only (no replicas), and they are the single process's
    ref = load_model(list_checkpoints(tmp_path / "one" / "checkpoints")[-1]).state_dict()
    mine = load_model(list_checkpoints(runs / "1" / "checkpoints")[-1]).state_dict()
    assert mine.keys() == ref.keys()
    for k in ref:
        assert mine[k].shape == ref[k].shape
        assert (mine[k] - ref[k]).norm() <= 1e-5 * ref[k].norm() + 1e-12, k


@pytest.mark.slow  # 4 ranks on 2 cores
def test_redundant_experts_dp_x_ep_and_nodes(tmp_path):
    """dp=2 x ep=2 and ep=4 over 2 simulated nodes (replicas stay on their owner's node), one step each: the
    single process's loss and gradients."""
    specs = ("dp=2,ep=2,redundant=1", "ep=4,nodes=2,redundant=1")
    out = tmp_path / "r.json"
    torchrun(4, WORKER, "redundant", str(out), "+".join(specs))
    got = json.loads(out.read_text())
    assert got.keys() == set(specs)
    for spec, res in got.items():
        assert rel(res["loss"], res["ref_loss"]) < 1e-5, spec
        assert max(res["grad_rel"].values()) < 1e-5, spec
        assert res["replica_bytes"] == res["formula_bytes"]
        before, after = torch.tensor(res["rows_before"]), torch.tensor(res["rows_after"])
        assert (after.amax(0) / after.mean(0) < before.amax(0) / before.mean(0)).all(), (spec, before, after)
        if "nodes" in spec:  # 8 experts, 2 per rank, ranks 0-1 on node 0: replicas of experts 0-3 there
            slots = torch.tensor(res["phy2log"]).view(-1, 4, 3)
            assert ((slots[:, :, 2] < 4) == (torch.arange(4) < 2)).all()


@pytest.mark.slow  # 4 ranks on 2 cores
def test_redundant_experts_under_pipeline_parallelism(data_dir, tmp_path):
    """pp=2 x ep=2 with replicas (1F1B; the Trainer feeds the pipeline's gathered loads to each stage's plan): the
    single process's losses and gradient norms, with replica weights sent from the second step on."""
    from dist_worker import train_configs

    from nanoseek.train import Trainer

    torchrun(4, "-m", "nanoseek", "pretrain", "--data", str(data_dir), "--out", str(tmp_path / "pp"), *_sets(4),
             "--parallel", "pp=2,ep=2,redundant=2,replan_every=1")
    m, t = train_configs(4)
    Trainer(m, t, data_dir, tmp_path / "one", progress=False).run()
    one, pp = records(tmp_path / "one"), records(tmp_path / "pp")
    assert [r["step"] for r in pp] == [1, 2, 3, 4]
    for x, y in zip(one, pp, strict=True):
        for k in ("loss", "main_loss", "mtp_loss", "grad_norm"):
            assert rel(y[k], x[k]) < 1e-5, (x["step"], k, y[k], x[k])
        assert (y["ep_replica_bytes"] > 0) == (x["step"] > 1)
