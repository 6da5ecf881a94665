#!/usr/bin/env bash
# What the first two lent GPU sessions ran (results/gpu.md, sessions 1-2): CUDA correctness of the optimizer, the
# step benchmark on CUDA, and MNIST meta-training runs side by side on one GPU.
# Usage: bash benchmarks/gpu_meta_train_session.sh OUTDIR DATA
# (DATA holds MNIST/raw/). Each run's net.pt comes back as OUTDIR/<run>_net.pt, with its held-out history inside.
set -uo pipefail
out=${1:?output folder}; data=${2:?data root}; budget=${BUDGET:-360}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$out/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" >> "$out/gpu.txt"
[ -n "${CONTINUE_FROM:-}" ] || { python3 -m pytest -q -p no:cacheprovider tests/test_optimizer.py 2>&1 | tail -5
  python3 benchmarks/step.py --device cuda --chunk-size 65536; } > "$out/cuda.txt" 2>&1
train() {  # name, then meta-train arguments
  local name=$1; shift
  python3 -m learnedopt_cli meta-train --out "/tmp/runs/$name" --device cuda --data-dir "$data" --no-progress \
    --time-budget "$budget" --eval-every 40 --checkpoint-every 40 --iterations 100000 "$@" > "/tmp/runs/$name.log" 2>&1
  cp "/tmp/runs/$name/net.pt" "$out/${name}_net.pt"
}
mkdir -p /tmp/runs
if [ -n "${CONTINUE_FROM:-}" ]; then  # second session: continue the first session's nets (results/gpu.md)
  train mlp_sum2 --task mnist-mlp --objective sum --meta-batch 32 --init-net "$CONTINUE_FROM/mlp_sum_net.pt" &
  train mix_sum2 --task mnist-mix --objective sum --meta-batch 16 --init-net "$CONTINUE_FROM/mlp_sum_net.pt" &
else
  train mlp_sum --task mnist-mlp --objective sum --meta-batch 32 &
  train all_sum --task mnist-all --objective sum --meta-batch 32 &
  train all_log200 --task mnist-all --objective log --meta-batch 32 --horizon 200 &  # ran out of GPU memory
fi
wait
tail -n 3 /tmp/runs/*.log > "$out/train_logs.txt"
