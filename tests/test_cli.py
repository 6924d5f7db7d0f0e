import json

from nanoseek.cli import main


def test_info_json(capsys):
    assert main(["info", "v3", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert abs(d["total_params"] - 671.0e9) / 671e9 < 1e-3
    assert d["kv_cache_bytes_latent"] == 61 * 576 * 2
    assert d["kv_cache_bytes_naive"] == 61 * 128 * (192 + 128) * 2


def test_info_checkpoint_and_text(tmp_path, capsys):
    import nanoseek

    nanoseek.save(nanoseek.load("tiny"), tmp_path)
    assert main(["info", str(tmp_path), "small"]) == 0
    out = capsys.readouterr().out
    assert "KV cache / token" in out and "small" in out


def test_demo_runs_and_reloads(tmp_path, capsys):
    assert main(["demo", "--steps", "2", "--seq-len", "32", "--out", str(tmp_path / "d")]) == 0
    assert "reloaded logits max |diff| = 0.00e+00" in capsys.readouterr().out
