import warnings

import pytest
import torch

from nanoseek.model import ModelConfig, Transformer

YARN = {"type": "yarn", "factor": 8.0, "original_max_position_embeddings": 16, "beta_fast": 32.0,
        "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0}


def tiny_config(**overrides) -> ModelConfig:
    """A few-layer DeepSeek-V3 with every feature on: YaRN, query compression, group-limited sigmoid routing."""
    base = dict(
        vocab_size=97, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
        first_k_dense_replace=1, num_attention_heads=4, q_lora_rank=48, kv_lora_rank=32, qk_nope_head_dim=16,
        qk_rope_head_dim=8, v_head_dim=12, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=3,
        n_group=4, topk_group=2, max_position_embeddings=512, rope_scaling=dict(YARN), initializer_range=0.1,
        num_nextn_predict_layers=1,
    )
    base.update(overrides)
    return ModelConfig(**base)


def train_periodic(steps: int = 80, **overrides) -> tuple[Transformer, torch.Tensor]:
    """(a tiny model trained on a periodic sequence, the 13-token cycle): both the main head and the MTP head learn
    it, so its next-token distributions are peaked, as a trained model's are."""
    torch.manual_seed(1)
    m = Transformer(tiny_config(initializer_range=0.02, **overrides))
    cycle = torch.randperm(m.config.vocab_size)[:13]
    seq = cycle.repeat(8)[:96]
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    for _ in range(steps):
        starts = torch.randint(0, 13, (4,))
        x = torch.stack([seq[s : s + 64] for s in starts])
        y = torch.stack([seq[s + 1 : s + 65] for s in starts])
        loss = m(x, labels=y).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return m.eval(), cycle


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    warnings.filterwarnings("ignore", message=".*RoPE scaling factor.*")
    yield


# ---- shared fixtures of the tests/data suite (its helpers live in tests/data/data_helpers.py; imported lazily
# because that folder is on sys.path only while its tests run)
@pytest.fixture
def tok():
    from data_helpers import small_tokenizer

    return small_tokenizer()


@pytest.fixture(name="stdlib_texts")
def _stdlib_texts() -> list[str]:
    from data_helpers import stdlib_texts

    return list(stdlib_texts())


@pytest.fixture
def unicode_code() -> str:
    from data_helpers import UNICODE_CODE

    return UNICODE_CODE
