#!/bin/sh
# Recipe ablation on quadratics: same 240 s budget each, one thread, tune-split selection by the trainer.
set -e
C="--task quadratic --iterations 100000 --horizon 100 --unroll 20 --eval-every 20 --checkpoint-every 20 --time-budget 240 --no-progress --eval-lengths 200,1000"
L=".venv/bin/learnedopt --threads 1 meta-train"
$L $C --out runs/abl/paper --inputs paper --output linear
$L $C --out runs/abl/bounded --output-scale 0.01
$L $C --out runs/abl/bounded-imitation --output-scale 0.01 --imitation 50
$L $C --out runs/abl/bounded-imitation-curriculum --output-scale 0.01 --imitation 50 --curriculum 200,500,1000
$L $C --out runs/abl/bounded-imitation-rescale --output-scale 0.01 --imitation 50 --rescale 1
for s in 200 1000; do
  .venv/bin/learnedopt --threads 1 benchmark --task quadratic --baselines Adam --steps $s --tasks 1000 \
    --net runs/abl/paper --net runs/abl/bounded --net runs/abl/bounded-imitation \
    --net runs/abl/bounded-imitation-curriculum --net runs/abl/bounded-imitation-rescale \
    --out results/ablation --name quadratic-$s
done
