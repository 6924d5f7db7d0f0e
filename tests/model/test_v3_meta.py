"""The full 671B configuration on the meta device: sizes and checkpoint key names."""

import resource

import pytest
import torch

from nanoseek.model import Transformer, preset
from nanoseek.model.stats import model_stats


@pytest.fixture(scope="module")
def v3():
    with torch.device("meta"):
        return Transformer(preset("v3"))


def test_v3_parameter_counts(v3):
    main = sum(p.numel() for n, p in v3.named_parameters() if not n.startswith("mtp."))
    assert abs(main - 671.0e9) / 671.0e9 < 1e-3
    st = model_stats(v3.config)
    assert st.total_params == main
    assert 36e9 < st.active_params < 38.5e9  # "37B activated"
    assert 13e9 < st.mtp_params_on_disk < 15e9  # "about 14B" for the MTP module
    assert st.kv_cache_bytes_latent * 2 // 2 == 61 * 576 * 2
    assert st.kv_cache_bytes_naive / st.kv_cache_bytes_latent > 50


def test_v3_meta_takes_no_memory(v3):
    assert all(p.is_meta for p in v3.parameters())
    # peak RSS of this process stays far below one real layer of V3 (~24 GB)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 < 8 * 1024**3


def test_v3_state_dict_matches_transformers(v3):
    transformers = pytest.importorskip("transformers")
    with torch.device("meta"):
        hf = transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config())
    ours = {k: tuple(v.shape) for k, v in v3.state_dict().items() if not k.startswith("mtp.")}
    theirs = {k: tuple(v.shape) for k, v in hf.state_dict().items()}
    assert ours == theirs
