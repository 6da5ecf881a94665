"""Variants of ``examples/meta_train_your_model.py``'s recipe on its CNN family (issue 20, item 5): which one
makes fine-tuning the packaged net improve its held-out score?

    python benchmarks/own_family_variants.py NAME HORIZON UNROLL META_LR EVAL_LENGTHS ['{"second_order": true}']

Meta-trains from ``general-lstm`` on the example's family (20,000 MNIST images, meta-batch 4, held-out score on 4
tuning tasks at EVAL_LENGTHS) for 60 iterations or 900 s (JSON settings override these and any
``learnedopt.meta_train`` setting), in ``runs/own/NAME``, and prints the held-out score at every evaluation.
"""

import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

import learnedopt

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from meta_train_your_model import load_data, small_cnn  # noqa: E402

name, horizon, unroll, meta_lr, lengths = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), \
    tuple(int(x) for x in sys.argv[5].split(","))
extra = json.loads(sys.argv[6]) if len(sys.argv) > 6 else {}
torch.set_num_threads(1)
images, labels, source = load_data(None, 20_000)
family = learnedopt.ModuleFamily(small_cnn, (images, labels), nn.functional.cross_entropy, batch_size=64,
                                 name="my-cnn", eval_examples=5000)
started = time.perf_counter()
out = Path("runs/own") / name
settings = {"iterations": 60, "meta_batch": 4, "eval_every": 15, "time_budget": 900, **extra}
budget = settings.pop("time_budget")
learnedopt.meta_train(family, out, horizon=horizon, unroll=unroll, eval_tasks=4, eval_lengths=lengths,
                      init_net=learnedopt.DEFAULT_NET, meta_lr=meta_lr, overwrite=True, progress=False,
                      time_budget=budget, **settings)
history = torch.load(out / "checkpoint.pt", weights_only=True)["history"]
print(name, source, f"{time.perf_counter() - started:.0f} s",
      [(h["iteration"], round(h["eval/score"], 4)) for h in history], flush=True)
