"""The FP8 issue's criterion: `tiny` trained for a few hundred steps on the CPU with FP8 and with BF16 from the same
seed ends with held-out losses less than 0.5% apart.

Both arms run the real trainer with the V3 recipe's defaults (peak lr 3e-3, 12-step warm-up at 250 steps). On the
CPU the FP8 arm emulates E4M3 GEMMs with fine-grained scales exactly and the BF16 arm emulates BF16 GEMMs (bf16
operands and outputs, fp32 accumulation), each in its own process with one thread (~15 minutes: marked slow).
The settings of `benchmarks/fp8_loss_gap.py`, whose multi-seed results are in BENCHMARKS.md: seeds 0-3 end
+0.06% (this pair), +0.32%, +0.34%, -0.28% apart, and a 1e-6 perturbation of the initial weights alone moves the
final loss by up to ~0.3%. (Before `tiny` got its width-scaled init, 0.045 instead of V3's 0.006, loss spikes
made single pairs land up to 1.4% apart.)
"""

import json
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest

from nanoseek.data import prepare_corpus
from nanoseek.model import preset
from nanoseek.train import TrainConfig, Trainer

STEPS, BATCH, SEQ = 250, 16, 256


def _train(arm: str, data: str, out: str, vocab: int) -> tuple[float, float]:
    import torch

    torch.set_num_threads(1)
    t = TrainConfig(steps=STEPS, batch_size=BATCH, micro_batch_size=BATCH, seq_len=SEQ, seed=0,
                    eval_every=STEPS, eval_batches=16, ckpt_every=STEPS, fp8=arm == "fp8", emulate_bf16=arm == "bf16")
    res = Trainer(preset("tiny").replace(vocab_size=vocab), t, Path(data), Path(out) / arm, progress=False).run()
    recs = [json.loads(line) for line in (Path(out) / arm / "metrics.jsonl").read_text().splitlines()]
    first = next(r["main_loss"] for r in recs if r.get("kind") == "train")
    return first, res.final_heldout_loss


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    info = prepare_corpus(None, d, vocab_size=preset("tiny").vocab_size, max_chars=6_000_000, seed=0,
                          progress=False)
    return d, info["vocab_size"]


@pytest.mark.slow
def test_fp8_ends_within_half_a_percent_of_bf16(corpus, tmp_path):
    data, vocab = corpus
    with ProcessPoolExecutor(2) as pool:
        futs = {arm: pool.submit(_train, arm, str(data), str(tmp_path), vocab) for arm in ("fp8", "bf16")}
        (f8, l8), (f16, l16) = futs["fp8"].result(), futs["bf16"].result()
    assert l16 < f16 - 2.0 and l8 < f8 - 2.0  # both learned (a first loss near ln(vocab))
    gap = (l8 - l16) / l16
    assert abs(gap) < 0.005, f"FP8 {l8:.4f} vs BF16 {l16:.4f}: gap {100 * gap:+.3f}%"
