"""The model splits into pipeline stages (embedding + layers[i:j] + output stage) without copying code: run in
sequence they give the whole model's losses and gradients exactly; and the one forward serves inference too."""

import pytest
import torch
from conftest import tiny_config

from nanoseek.model import Transformer


def _grads(model: Transformer) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _model() -> Transformer:
    # 4 main layers (dense, MoE, MoE, MoE) and 2 MTP modules, so every split point separates MoE layers
    return Transformer(tiny_config(num_hidden_layers=4, num_nextn_predict_layers=2, mtp_loss_weight=0.3))


@pytest.mark.parametrize("bounds", [[1], [2], [3], [1, 3], [1, 2, 3]])
def test_stages_in_sequence_equal_the_whole_model(bounds):
    model = _model()
    ids = torch.randint(0, 97, (2, 12))
    labels = torch.randint(0, 97, (2, 12))
    labels[0, 5] = -100
    whole = model(ids, labels=labels, return_logits=False)
    whole.loss.backward()
    ref = _grads(model)
    model.zero_grad(set_to_none=True)

    stages = model.stages(bounds)
    assert len(stages) == len(bounds) + 1 and stages[0].first and stages[-1].last
    x, stats = ids, []
    for st in stages[:-1]:
        x, stats = st(x, stats)
    out = stages[-1](x, stats, labels=labels, inputs=ids, return_logits=False)
    out.loss.backward()
    got = _grads(model)

    assert torch.equal(out.loss, whole.loss) and torch.equal(out.main_loss, whole.main_loss)
    assert len(out.mtp_losses) == 2
    assert all(torch.equal(a, b) for a, b in zip(out.mtp_losses, whole.mtp_losses, strict=True))
    assert torch.equal(out.balance_loss, whole.balance_loss) and torch.equal(out.expert_load, whole.expert_load)
    assert ref.keys() == got.keys() and len(ref) == len(list(model.parameters()))
    for n in ref:
        assert torch.equal(ref[n], got[n]), n


def test_stages_own_only_their_layers():
    model = _model()
    a, b = model.stages([2])
    names_a = {n for n, _ in a.named_parameters()}
    names_b = {n for n, _ in b.named_parameters()}
    assert any(n.startswith("embed_tokens") for n in names_a) and not any("lm_head" in n for n in names_a)
    assert any(n.startswith("lm_head") for n in names_b) and any(n.startswith("mtp.") for n in names_b)
    assert len(a.layers) == 2 and len(b.layers) == 2 and a.layers[0] is model.model.layers[0]
    # together they hold every parameter exactly once, except the embedding that MTP shares on the last stage
    shared = {id(p) for p in a.parameters()} & {id(p) for p in b.parameters()}
    assert shared == set()
    n_model = sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for p in a.parameters()) + sum(p.numel() for p in b.parameters()) == n_model
    with pytest.raises(ValueError, match="bounds"):
        model.stages([2, 2])
    with pytest.raises(ValueError, match="bounds"):
        model.stages([0])


def test_mtp_forward_is_the_training_chain():
    """`mtp_forward(k, ...)` + `logits(h, k)` reproduce the MTP logits of the training forward."""
    model = _model().eval()
    ids = torch.randint(0, 97, (2, 10))
    labels = torch.randint(0, 97, (2, 10))
    out = model(ids, labels=labels)
    h = out.hidden
    for k in (1, 2):
        n = 10 - k
        h, _ = model.mtp_forward(k, h[:, :n], ids[:, k : k + n])  # the true next tokens
        assert torch.allclose(model.logits(h, k), out.mtp_logits[k - 1], atol=1e-6, rtol=0)
    assert torch.allclose(model.logits(out.hidden), out.logits, atol=1e-6, rtol=0)
