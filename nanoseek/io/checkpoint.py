"""Read and write the Hugging Face DeepSeek-V3 checkpoint layout (the official release's layout).

- `config.json` + `model.safetensors`, or shards `model-0000i-of-0000n.safetensors` + `model.safetensors.index.json`;
- routed experts one by one: `model.layers.L.mlp.experts.E.{gate,up,down}_proj.weight`;
- MTP module k at `model.layers.{num_hidden_layers + k}.*`, with its own copies of `embed_tokens` and
  `shared_head.head` (equal to the main embedding and head, which they share here);
- FP8 weights (`float8_e4m3fn`) with `weight_scale_inv` per 128x128 block, dequantised on load, or kept in FP8
  (`keep_fp8=True`: loaded as they are into the FP8 modules of nanoseek.fp8.weights).

Loading checks every shard header first (missing shard, missing/extra key, shape, dtype) and only then streams
tensors one at a time into the model: nothing is half-loaded, and never two full copies are in memory. A checkpoint
with a `manifest.json` (sizes + sha256 of its files, as nanoseek's training checkpoints have) is checked against it
first (`verify=False` skips this), and a weight holding NaN or infinite values is refused, naming the tensor.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..fp8.quant import BLOCK, dequantize_weight_block, quantize_weight_block
from ..model.config import ConfigError, ModelConfig
from ..model.model import Transformer
from .atomic import atomic_path, atomic_write_text

INDEX_NAME = "model.safetensors.index.json"
MANIFEST = "manifest.json"  # sizes and sha256 of a training checkpoint's files (nanoseek.train.checkpoint)
SINGLE_NAME = "model.safetensors"
FP8_QUANT_CONFIG = {
    "quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [BLOCK, BLOCK], "activation_scheme": "dynamic",
}
_FLOAT_DTYPES = {torch.float32, torch.bfloat16, torch.float16, torch.float64}
_FP8_DTYPES = {torch.float8_e4m3fn}
_SAFE_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
    "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}


class CheckpointError(RuntimeError):
    """A checkpoint that does not match the model: the message names the key and the file."""


@dataclass(frozen=True)
class Slot:
    """Where a checkpoint tensor goes: parameter `name`, optionally rows [start, stop) of expert `expert`."""

    name: str
    shape: tuple[int, ...]
    expert: int | None = None
    rows: tuple[int, int] | None = None
    shared_copy: bool = False  # MTP's copy of the embedding / head: checked, not loaded twice
    quantizable: bool = False  # a Linear weight that the FP8 release stores block-scaled


_QUANTIZABLE = re.compile(r"(self_attn\.(q_proj|q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj)"
                          r"|mlp\.(gate_proj|up_proj|down_proj)|shared_experts\.(gate|up|down)_proj"
                          r"|experts\.\d+\.(gate|up|down)_proj)\.weight$")


def checkpoint_layout(model: Transformer) -> dict[str, Slot]:
    """Map every checkpoint key of `model` to the slot it fills."""
    cfg = model.config
    n = cfg.num_hidden_layers
    layout: dict[str, Slot] = {}
    tensors = dict(model.named_parameters())
    tensors.update(model.named_buffers())
    for name, t in tensors.items():
        if _is_fp8_scale(tensors, name):  # an FP8 module's scales travel with their weight
            continue
        m = re.match(r"mtp\.(\d+)\.(.*)", name)
        key = f"model.layers.{n + int(m.group(1))}.{m.group(2)}" if m else name
        if name.endswith("mlp.experts.gate_up_proj"):
            base = key[: -len("gate_up_proj")]
            E, I2, H = t.shape
            inter = I2 // 2
            for e in range(E):
                layout[f"{base}{e}.gate_proj.weight"] = Slot(name, (inter, H), e, (0, inter), quantizable=True)
                layout[f"{base}{e}.up_proj.weight"] = Slot(name, (inter, H), e, (inter, I2), quantizable=True)
        elif name.endswith("mlp.experts.down_proj"):
            base = key[: -len("down_proj")]
            E, H, inter = t.shape
            for e in range(E):
                layout[f"{base}{e}.down_proj.weight"] = Slot(name, (H, inter), e, quantizable=True)
        else:
            layout[key] = Slot(name, tuple(t.shape), quantizable=bool(_QUANTIZABLE.search(key)))
    for k in range(len(model.mtp)):
        emb, head = model.model.embed_tokens.weight, model.lm_head.weight
        layout[f"model.layers.{n + k}.embed_tokens.weight"] = Slot(
            "model.embed_tokens.weight", tuple(emb.shape), shared_copy=True)
        layout[f"model.layers.{n + k}.shared_head.head.weight"] = Slot(
            "lm_head.weight", tuple(head.shape), shared_copy=True)
    return layout


def _is_fp8_scale(tensors: dict[str, torch.Tensor], name: str) -> bool:
    base = tensors.get(name.removesuffix("_scale_inv")) if name.endswith("_scale_inv") else None
    return base is not None and base.dtype in _FP8_DTYPES


def _scale_view(tensors: dict[str, torch.Tensor], slot: Slot) -> torch.Tensor:
    """The block scales of an FP8 module's slot: `<name>_scale_inv`, for an expert its [e] slice and, for gate or
    up rows of gate_up_proj, the gate (first) or up (second) half of the block rows."""
    s = tensors[slot.name + "_scale_inv"]
    if slot.expert is not None:
        s = s[slot.expert]
        if slot.rows is not None:
            start, stop = slot.rows
            n = -(-(stop - start) // BLOCK)
            part = start // (stop - start)  # 0: gate rows [0, I), 1: up rows [I, 2I)
            s = s[part * n : (part + 1) * n]
    return s


def _slot_view(tensors: dict[str, torch.Tensor], slot: Slot) -> torch.Tensor:
    t = tensors[slot.name]
    if slot.expert is not None:
        t = t[slot.expert]
        if slot.rows is not None:
            t = t[slot.rows[0] : slot.rows[1]]
    return t


def _all_tensors(model: Transformer) -> dict[str, torch.Tensor]:
    tensors = dict(model.named_parameters())
    tensors.update(model.named_buffers())
    return tensors


# ------------------------------------------------------------------------------------------------ save
def save(
    model: Transformer, path: str | os.PathLike[str], dtype: torch.dtype | None = None, fp8: bool = False,
    max_shard_bytes: int = 5 * 1024**3,
) -> Path:
    """Write `model` in the Hugging Face layout to directory `path` (created if needed); returns the path.

    `dtype` casts floating weights (the correction bias stays fp32); `fp8=True` stores the attention/MLP/expert
    Linear weights as float8_e4m3fn with `weight_scale_inv` per 128x128 block, as the official FP8 release.
    Every file is written to a temporary name, fsynced and renamed.
    """
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tensors = _all_tensors(model)
    layout = checkpoint_layout(model)
    hp_dtype = model.model.embed_tokens.weight.dtype

    def items() -> Iterator[tuple[str, torch.Tensor]]:
        for key, slot in layout.items():
            t = _slot_view(tensors, slot).detach()
            if t.dtype in _FP8_DTYPES:  # a weight kept in FP8 (nanoseek.fp8.weights): written as it is
                s = _scale_view(tensors, slot).detach()
                if fp8:
                    yield key, t
                    yield key + "_scale_inv", s
                else:
                    yield key, dequantize_weight_block(t, s, dtype or hp_dtype)
                continue
            if t.dtype.is_floating_point and not key.endswith("e_score_correction_bias"):
                if fp8 and slot.quantizable:
                    q, s = quantize_weight_block(t)
                    yield key, q
                    yield key + "_scale_inv", s
                    continue
                if dtype is not None:
                    t = t.to(dtype)
            yield key, t

    def nbytes(key: str, slot: Slot) -> int:
        numel = 1
        for d in slot.shape:
            numel *= d
        if fp8 and slot.quantizable:
            return numel
        t = tensors[slot.name]
        esize = (dtype or (hp_dtype if t.dtype in _FP8_DTYPES else t.dtype)).itemsize
        return numel * (4 if key.endswith("e_score_correction_bias") else esize)

    # plan shards from sizes only (no tensor is materialised yet)
    shards: list[list[str]] = [[]]
    size = 0
    for key, slot in layout.items():
        b = nbytes(key, slot)
        if shards[-1] and size + b > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += b
    n_shards = len(shards)
    names = [SINGLE_NAME] if n_shards == 1 else [
        f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors" for i in range(n_shards)]

    gen = items()
    weight_map: dict[str, str] = {}
    total = 0
    pending: tuple[str, torch.Tensor] | None = None
    for fname, keys in zip(names, shards, strict=True):
        keyset = set(keys)
        shard: dict[str, torch.Tensor] = {}
        while True:
            if pending is None:
                pending = next(gen, None)
                if pending is None:
                    break
            key, t = pending
            base = key[: -len("_scale_inv")] if key.endswith("weight_scale_inv") else key
            if base not in keyset:
                break
            t = t.cpu()
            shard[key] = t.clone() if layout.get(key, Slot("", ())).shared_copy else t.contiguous()
            weight_map[key] = fname
            total += t.numel() * t.element_size()
            pending = None
        with atomic_path(out / fname) as tmp:
            save_file(shard, tmp, metadata={"format": "pt"})
        del shard
    # remove weight files of an earlier save that this one no longer uses
    for old in out.glob("model*.safetensors"):
        if old.name not in names:
            old.unlink()
    if n_shards > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        atomic_write_text(out / INDEX_NAME, json.dumps(index, indent=2) + "\n")
    elif (out / INDEX_NAME).exists():
        (out / INDEX_NAME).unlink()
    extra = {"quantization_config": dict(FP8_QUANT_CONFIG)} if fp8 else {}
    write_config(model.config, out, torch_dtype=str(dtype or hp_dtype).removeprefix("torch."), **extra)
    write_generation_config(model.config, out)
    return out


# R1's recommended sampling (R1 §5 / its model card: temperature 0.6, top-p 0.95), as DeepSeek's releases ship it
GENERATION_DEFAULTS = {"do_sample": True, "temperature": 0.6, "top_p": 0.95}


def write_generation_config(cfg: ModelConfig, directory: str | os.PathLike[str]) -> None:
    """`generation_config.json`: bos / eos ids and R1's sampling defaults (read by transformers' `generate`)."""
    doc = {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, **GENERATION_DEFAULTS}
    atomic_write_text(Path(directory) / "generation_config.json", json.dumps(doc, indent=2) + "\n")


def write_config(cfg: ModelConfig, directory: str | os.PathLike[str], **fields: Any) -> None:
    """`config.json` (the HF layout's, plus `fields`) in `directory`, atomically."""
    doc = {**cfg.to_hf_dict(), **fields}
    atomic_write_text(Path(directory) / "config.json", json.dumps(doc, indent=2, sort_keys=True) + "\n")


# ------------------------------------------------------------------------------------------------ load
def _shard_files(path: Path) -> list[Path]:
    index = path / INDEX_NAME
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: malformed index ({e})") from None
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (path / f).is_file()]
        if missing:
            raise CheckpointError(f"{path}: missing shard file(s) named in {INDEX_NAME}: {', '.join(missing)}")
        return [path / f for f in files]
    if (path / SINGLE_NAME).is_file():
        return [path / SINGLE_NAME]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path}: no safetensors weights (expected {SINGLE_NAME} or {INDEX_NAME})")
    return files


def _read_headers(files: list[Path]) -> dict[str, tuple[Path, tuple[int, ...], torch.dtype]]:
    found: dict[str, tuple[Path, tuple[int, ...], torch.dtype]] = {}
    for f in files:
        try:
            with safe_open(f, framework="pt") as sf:
                for key in sf.keys():
                    sl = sf.get_slice(key)
                    dt = _SAFE_DTYPES.get(sl.get_dtype())
                    if dt is None:
                        raise CheckpointError(f"{f.name}: key {key} has unsupported dtype {sl.get_dtype()}")
                    if key in found:
                        raise CheckpointError(f"key {key} appears in both {found[key][0].name} and {f.name}")
                    found[key] = (f, tuple(sl.get_shape()), dt)
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{f}: unreadable, truncated or corrupt safetensors file ({e})") from None
    return found


def _check(layout: dict[str, Slot], found: dict[str, tuple[Path, tuple[int, ...], torch.dtype]]) -> None:
    problems: list[str] = []
    for key, slot in layout.items():
        if key not in found:
            if not slot.shared_copy:
                problems.append(f"missing key {key}")
            continue
        f, shape, dt = found[key]
        if shape != slot.shape:
            problems.append(f"{f.name}: key {key} has shape {list(shape)}, expected {list(slot.shape)}")
        if dt in _FP8_DTYPES:
            sk = key + "_scale_inv"
            if sk not in found:
                problems.append(f"{f.name}: FP8 key {key} has no {sk}")
            else:
                want = tuple(-(-d // BLOCK) for d in shape)
                sf, sshape, sdt = found[sk]
                if sshape != want:
                    problems.append(f"{sf.name}: key {sk} has shape {list(sshape)}, expected {list(want)}")
                if sdt not in _FLOAT_DTYPES:
                    problems.append(f"{sf.name}: key {sk} has dtype {sdt}, expected a float dtype")
        elif dt not in _FLOAT_DTYPES:
            problems.append(f"{f.name}: key {key} has dtype {dt}, expected a float dtype")
    for key, (f, _, _dt) in found.items():
        if key in layout:
            continue
        if key.endswith("_scale_inv") and key[: -len("_scale_inv")] in layout and \
                found.get(key[: -len("_scale_inv")], (None, None, None))[2] in _FP8_DTYPES:
            continue
        problems.append(f"{f.name}: unexpected key {key}")
    if problems:
        head = problems[:20]
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise CheckpointError("checkpoint does not match the model:\n  " + "\n  ".join(head) + more)


def file_sha256(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _model_file(name: str) -> bool:
    """Whether a checkpoint file (relative name) is part of the model: its config and weights."""
    return (name == "config.json" or (name.startswith("model") and name.endswith(".safetensors"))
            or name == INDEX_NAME or name.startswith(f"{SHARDED_DIR}/"))


def verify_manifest(path: str | os.PathLike[str], required: bool = True, model_only: bool = False) -> None:
    """Raise CheckpointError unless every file listed in the checkpoint's manifest.json is present, complete and
    unchanged. Without a manifest: an error when `required` (a training checkpoint is incomplete without one), else
    there is nothing to check (a Hugging Face-layout directory).

    `model_only` (loading the model, not resuming its training): only the model's files (config and weights) must
    be there and match; tokenizer.json is checked when present; the training state (optimizer, RNG, trainer.json,
    ...) is ignored, so a checkpoint stripped of it still loads, and is not read."""
    path = Path(path)
    mf = path / MANIFEST
    if not mf.is_file():
        if required:
            raise CheckpointError(f"{path}: no {MANIFEST} (incomplete checkpoint)")
        return
    try:
        files = json.loads(mf.read_text())["files"]
        listed = {str(name): (int(info["bytes"]), str(info["sha256"])) for name, info in files.items()}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError, ValueError) as e:
        raise CheckpointError(f"{mf}: malformed ({type(e).__name__}: {e})") from None
    for name, (size, digest) in listed.items():
        p = path / name
        if model_only and not _model_file(name) and not (name == "tokenizer.json" and p.is_file()):
            continue
        if not p.is_file():
            raise CheckpointError(f"{path}: missing {name}")
        if p.stat().st_size != size:
            raise CheckpointError(f"{p}: {p.stat().st_size} bytes, manifest says {size} (truncated?)")
        if file_sha256(p) != digest:
            raise CheckpointError(f"{p}: checksum mismatch (corrupt)")


def check_finite(name: str, t: torch.Tensor, where: str | os.PathLike[str]) -> None:
    """CheckpointError naming tensor `name` (of file or checkpoint `where`) if it holds NaN or infinite values."""
    if not t.dtype.is_floating_point:
        return
    values = t.float() if t.dtype.itemsize == 1 else t  # FP8: torch has no isfinite for it
    bad = int((~torch.isfinite(values)).sum())
    if bad:
        raise CheckpointError(f"{where}: tensor {name} holds {bad} non-finite value(s) (NaN or infinity) of "
                              f"{t.numel()}; the checkpoint is unusable (a diverged run, or corrupt)")


# where a distributed run's sharded (torch.distributed.checkpoint) checkpoint keeps its shards (nanoseek.train)
SHARDED_DIR = "dcp"


def is_sharded(path: str | os.PathLike[str]) -> bool:
    """Whether `path` is a sharded checkpoint of a distributed run."""
    return (Path(path) / SHARDED_DIR / ".metadata").is_file()


def read_config(path: str | os.PathLike[str]) -> ModelConfig:
    p = Path(path)
    cfg_file = p / "config.json" if p.is_dir() else p
    if not cfg_file.is_file():
        raise CheckpointError(f"{p}: no config.json")
    return ModelConfig.from_json(cfg_file)


def _cast_model(model: Transformer, dtype: torch.dtype) -> Transformer:
    model.to(dtype)
    for gate in model.moe_gates():
        if gate.e_score_correction_bias is not None:
            gate.e_score_correction_bias.data = gate.e_score_correction_bias.data.float()
    return model


def build(cfg: ModelConfig, dtype: torch.dtype | None = None, device: torch.device | str | None = None,
          init: bool = True) -> Transformer:
    """A model for `cfg` on `device` in `dtype` (fp32 default), randomly initialised when `init`."""
    dtype = dtype or torch.float32
    device = torch.device(device or "cpu")
    with torch.device("meta"):
        model = Transformer(cfg)
    _cast_model(model, dtype)
    if device.type != "meta":
        model.to_empty(device=device)
        if init:
            model.init_weights()
    return model


def load_checkpoint(
    path: str | os.PathLike[str], dtype: torch.dtype | None = None, device: torch.device | str | None = None,
    keep_fp8: bool = False, verify: bool = True,
) -> Transformer:
    """Load an HF-layout directory into a new Transformer. dtype default: float32 (CPU-friendly).

    `verify`: check the files against the directory's manifest.json first, when it has one (a nanoseek training
    checkpoint; reading every byte once more: `verify=False` skips it where the caller has checked already). Weights
    holding NaN or infinite values are refused in any case (CheckpointError naming the tensor).

    FP8 weights are dequantised at load (W = q * weight_scale_inv per 128x128 block) unless `keep_fp8`: then the
    layers the FP8 release quantises are FP8 modules (nanoseek.fp8.weights) that receive q and weight_scale_inv
    as stored and dequantise in each forward; no high-precision copy of those weights is made. A high-precision
    checkpoint loaded with `keep_fp8` is block-quantised tensor by tensor as it streams in."""
    p = Path(path)
    if not p.is_dir():
        raise CheckpointError(f"{p}: not a checkpoint directory")
    if is_sharded(p):
        raise CheckpointError(f"{p}: a sharded checkpoint of a distributed run (its weights are in {SHARDED_DIR}/); "
                              f"gather it into the Hugging Face layout with `nanoseek export {p} --out DIR`")
    try:
        cfg = read_config(p)
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    if verify:
        verify_manifest(p, required=False, model_only=True)
    files = _shard_files(p)
    found = _read_headers(files)
    if cfg.num_nextn_predict_layers:
        # checkpoints written by transformers carry no MTP weights: load the main model only
        first_mtp = f"model.layers.{cfg.num_hidden_layers}."
        if not any(k.startswith(first_mtp) for k in found):
            warnings.warn(f"{p}: no MTP weights (model.layers.{cfg.num_hidden_layers}.*); loading without MTP",
                          stacklevel=2)
            cfg = cfg.replace(num_nextn_predict_layers=0)
    with torch.device("meta"):
        skeleton = Transformer(cfg)
    layout = checkpoint_layout(skeleton)
    _check(layout, found)
    del skeleton
    if keep_fp8:
        from ..fp8.weights import quantize_model_weights

        model = quantize_model_weights(build(cfg, dtype, "meta"))  # structure only: nothing allocated yet
        model.to_empty(device=torch.device(device or "cpu"))
    else:
        model = build(cfg, dtype, device, init=False)
    tensors = _all_tensors(model)
    done: set[str] = set()
    with torch.no_grad():
        for f in files:
            with safe_open(f, framework="pt") as sf:
                for key in sf.keys():
                    slot = layout.get(key)
                    if slot is None or slot.shared_copy:
                        continue
                    t = sf.get_tensor(key)
                    check_finite(key, t, f)
                    dst = _slot_view(tensors, slot)
                    if t.dtype in _FP8_DTYPES:
                        sfile = found[key + "_scale_inv"][0]
                        if sfile == f:
                            s = sf.get_tensor(key + "_scale_inv")
                        else:
                            with safe_open(sfile, framework="pt") as other:
                                s = other.get_tensor(key + "_scale_inv")
                        check_finite(key + "_scale_inv", s, sfile)
                        if dst.dtype in _FP8_DTYPES:  # keep_fp8: codes and scales as stored
                            _scale_view(tensors, slot).copy_(s)
                        else:
                            t = dequantize_weight_block(t, s)
                    elif dst.dtype in _FP8_DTYPES:  # keep_fp8 from a high-precision checkpoint
                        t, s = quantize_weight_block(t)
                        _scale_view(tensors, slot).copy_(s)
                    dst.copy_(t.to(dst.dtype))
                    done.add(key)
    left = [k for k, s in layout.items() if not s.shared_copy and k not in done]
    if left:  # cannot happen after _check; guards against silent partial loads
        raise CheckpointError(f"{p}: keys not loaded: {', '.join(left[:10])}")
    return model.eval()
