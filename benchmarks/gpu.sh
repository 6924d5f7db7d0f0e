#!/bin/sh
# Everything that needs a GPU, in one command (for a session that is lent one; ~10 minutes on an H100):
#   the CUDA tests (FP8 backend probe vs the emulation, grouped experts under autocast), the FP8 GEMM benchmark at
#   DeepSeek-V3 shapes (eager and compiled), the `small` training step with BF16 autocast vs FP8, and the same step
#   under FSDP2 at world size 1 (BF16 and FP8: tokens/s, MFU, peak memory).
# Results go to $OUT (default runs/gpu).    Usage:  OUT=runs/gpu PY=python3 sh benchmarks/gpu.sh
OUT=${OUT:-runs/gpu}
PY=${PY:-python3}
export PYTHONPATH=.
mkdir -p "$OUT"
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  $PY -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(), torch.cuda.get_device_capability())"
  $PY -c "from nanoseek.fp8 import resolve_backend; print('fp8 backend (auto):', resolve_backend('cuda'))"
} > "$OUT/gpu.txt" 2>&1
$PY -m pytest -q -p no:cacheprovider tests/fp8 tests/model/test_router.py > "$OUT/pytest.txt" 2>&1
$PY benchmarks/bench_fp8_gemm.py --json "$OUT/fp8_gemm.json" > "$OUT/fp8_gemm.txt" 2>&1
$PY benchmarks/bench_fp8_gemm.py --compile --json "$OUT/fp8_gemm_compiled.json" > "$OUT/fp8_gemm_compiled.txt" 2>&1
$PY benchmarks/bench_pretrain.py --presets small --steps 10 --data "$OUT/data" --json "$OUT/pretrain_bf16.json" \
  > "$OUT/pretrain.txt" 2>&1
$PY benchmarks/bench_pretrain.py --presets small --steps 10 --data "$OUT/data" --fp8 --json "$OUT/pretrain_fp8.json" \
  >> "$OUT/pretrain.txt" 2>&1
# FSDP2 at world size 1 (nanoseek.parallel): the `small` step in BF16 and FP8, tokens/s, MFU, peak memory
$PY benchmarks/bench_parallel.py --presets small --meshes 1:dp=1 --steps 5 --batch 16 --seq 1024 --data "$OUT/data" \
  --json "$OUT/fsdp_bf16.json" > "$OUT/fsdp.txt" 2>&1
$PY benchmarks/bench_parallel.py --presets small --meshes 1:dp=1 --steps 5 --batch 16 --seq 1024 --data "$OUT/data" \
  --fp8 --json "$OUT/fsdp_fp8.json" >> "$OUT/fsdp.txt" 2>&1
tail -n 3 "$OUT"/*.txt
