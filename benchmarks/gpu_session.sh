#!/usr/bin/env bash
# Every measurement only a GPU gives, in one run of under 8 minutes (issue 19): the Triton step's correctness on
# CUDA, the step alone at 1M / 10M / 100M parameters against its FLOP and memory floors measured in the same run,
# a GPT-2-small-like decoder's whole training step with LearnedOptimizer against AdamW(fused=True), and
# meta-training throughput. Usage: bash benchmarks/gpu_session.sh OUTDIR; OUTDIR/gpu.md is the section to append
# to results/gpu.md (it names the device), the raw outputs beside it.
set -uo pipefail
out=${1:?output folder}
mkdir -p "$out"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
} > "$out/gpu.txt" 2>&1
timeout 120 python3 -m pytest -q -p no:cacheprovider -o addopts= tests/test_triton_step.py -k cuda > "$out/correctness.txt" 2>&1
timeout 150 python3 benchmarks/step.py --device cuda --sizes 1000000 10000000 100000000 --chunk-size 65536 \
  --state-dtype bfloat16 --repeats 5 > "$out/step.txt" 2>&1
timeout 150 python3 benchmarks/transformer_step.py --device cuda > "$out/transformer.txt" 2>&1
timeout 60 python3 benchmarks/meta_train_cost.py --device cuda --repeats 2 --parts trainer > "$out/meta_train.txt" 2>&1
{ echo "## $(date -u +%F): the Triton step and the transformer's training step on $(head -n 1 "$out/gpu.txt")"
  echo; echo '```bash'; echo "bash benchmarks/gpu_session.sh OUT"; echo '```'
  for part in gpu correctness step transformer meta_train; do
    echo; echo "### $part"; echo; echo '```'; cat "$out/$part.txt"; echo '```'
  done
} > "$out/gpu.md"   # a section to append to results/gpu.md
tail -n 5 "$out"/*.txt
