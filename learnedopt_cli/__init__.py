"""The ``learnedopt`` command line: meta-train, demo, benchmark, pretrained, maml, protonet, matching.

The top layer: it parses arguments, resolves ``--task`` (a registered family or ``package.module:factory``) and
calls the library (:mod:`learnedopt`) and the experiments (:mod:`learnedopt_experiments`). The flags of
``meta-train`` and ``maml|protonet train`` are generated from :class:`~learnedopt.MetaTrainConfig` and
:class:`~learnedopt_experiments.baselines.FewShotConfig` (:mod:`.configargs`), so their defaults are the library's.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import sys
import threading
from dataclasses import fields
from pathlib import Path

from learnedopt.meta.config import DEFAULT_NET, MetaTrainConfig
from learnedopt_experiments.baselines.train import FewShotConfig

from .configargs import add_config_arguments, config_from_args, positive

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="learnedopt",
        description="Learned optimizers in PyTorch: meta-train an LSTM optimizer, benchmark it, use it anywhere.",
    )
    parser.add_argument("--threads", type=positive, default=None, help="torch CPU threads (default: torch's)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    mt = sub.add_parser("meta-train", help="meta-train an LSTM optimizer on truncated unrolls; writes OUT/net.pt",
                        description="Meta-train an LSTM optimizer. Under torchrun (torchrun --nproc_per_node N -m "
                        "learnedopt_cli meta-train ...) the task batch is split across processes.")
    mt.add_argument("--task", default="quadratic",
                    help="task family: a registered name (quadratic, mnist-mlp, general, ...) or "
                         "package.module:factory returning your own (e.g. a learnedopt.ModuleFamily)")
    mt.add_argument("--out", type=Path, required=True, help="run folder: checkpoints, net.pt, TensorBoard logs")
    mt.add_argument("--data-dir", default=None, help="data root (default: $LEARNEDOPT_DATA, ../shared/data, cache)")
    mt.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt if it exists")
    mt.add_argument("--overwrite", action="store_true", help="replace a run already in OUT")
    mt.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                    help="stop (with a checkpoint) once this much time is spent; --resume continues")
    mt.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    add_config_arguments(mt, MetaTrainConfig, skip=("task",), nested={"net": DEFAULT_NET})

    demo = sub.add_parser("demo", help="meta-train on quadratics (~3 min), compare with tuned Adam/SGD, plot")
    demo.add_argument("--out", type=Path, default=Path("runs/demo"))
    demo.add_argument("--iterations", type=positive, default=200)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--no-progress", action="store_true")

    bench = sub.add_parser("benchmark", help="compare nets with Adam/SGD/RMSprop/NAG at tuned learning rates")
    bench.add_argument("--task", default="quadratic")
    bench.add_argument("--net", action="append", default=None,
                       help="packaged name, net.pt or run folder (repeatable; default: the packaged default)")
    bench.add_argument("--steps", type=positive, default=100)
    bench.add_argument("--tasks", "--seeds", dest="tasks", type=positive, default=1000,
                       help="held-out tasks (seeds: initializations and minibatch orders) to report on")
    bench.add_argument("--baselines", default="Adam,SGD,RMSprop,NAG", help="comma-separated")
    bench.add_argument("--out", type=Path, default=Path("runs/benchmark"))
    bench.add_argument("--name", default=None, help="report file stem (default: TASK-STEPS)")
    bench.add_argument("--plot-only", action="store_true", help="re-render the table and PNG from the JSON")
    bench.add_argument("--split", choices=["test", "tune"], default="test",
                       help="report on held-out test tasks (default) or on the tuning tasks (to select nets)")
    bench.add_argument("--state-dtype", action="append", choices=["float32", "bfloat16"], default=None,
                       help="hidden-state dtype of the nets (repeatable: one row per net and dtype; default float32)")
    bench.add_argument("--device", default="cpu")
    bench.add_argument("--data-dir", default=None, help="data root (default: $LEARNEDOPT_DATA, ../shared/data, cache)")

    sub.add_parser("pretrained", help="list the packaged nets and what they were trained on")

    titles = {"maml": "MAML / first-order MAML", "protonet": "ProtoNet", "matching": "matching networks"}
    for algorithm, title in titles.items():
        fs = sub.add_parser(algorithm, help=f"{title} few-shot learning on the unroll engine")
        fs_sub = fs.add_subparsers(dest="action", required=True, metavar="ACTION")
        tr = fs_sub.add_parser("train", help="meta-train; writes OUT/checkpoint.pt and OUT/tb")
        tr.add_argument("--out", type=Path, required=True, help="run folder: checkpoint.pt and TensorBoard logs")
        tr.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt if it exists")
        tr.add_argument("--overwrite", action="store_true", help="replace a run already in OUT")
        tr.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                        help="stop (with a checkpoint) once this much time is spent; --resume continues")
        tr.add_argument("--no-progress", action="store_true", help="hide the progress bar")
        others = tuple(f.name for f in fields(FewShotConfig)  # the options of the other algorithms
                       if any(f.metadata.get(a) for a in titles if a != algorithm) and not f.metadata.get(algorithm))
        add_config_arguments(tr, FewShotConfig, skip=others)
        ev = fs_sub.add_parser("eval", help="mean test score and 95%% confidence interval over test episodes")
        ev.add_argument("--checkpoint", type=Path, required=True)
        ev.add_argument("--ways", type=positive, default=5)
        ev.add_argument("--shots", type=positive, default=1)
        ev.add_argument("--episodes", type=positive, default=1000)
        ev.add_argument("--inner-steps", type=int, default=None,
                        help="MAML adaptation steps at test time (default: the checkpoint's own)")
        ev.add_argument("--query-batch", type=positive, default=None, metavar="N",
                        help="query images classified at once (BatchNorm statistics; default: all N*15 together; "
                             "Finn et al.'s code used N*K)")
        ev.add_argument("--device", default="cpu")
        ev.add_argument("--data-dir", default=None)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    elif args.command == "demo":
        torch.set_num_threads(1)  # 10-d quadratics are tiny: extra threads only add synchronization
    command = "learnedopt " + shlex.join(sys.argv[1:] if argv is None else argv)
    from learnedopt.meta.runs import MetaTrainingDiverged, RunInterrupted

    stopped_by: list[int] = []

    def stop(signum: int, frame: object) -> None:  # SIGTERM (schedulers, `kill`) stops a run as Ctrl-C does
        stopped_by.append(signum)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop) if threading.current_thread() is threading.main_thread() else None
    try:
        _check_arguments(args)
        return _dispatch(args, command)
    except (ValueError, OSError) as err:  # includes DataNotFoundError, unwritable folders and a full disk
        print(f"learnedopt: error: {err}", file=sys.stderr)
        return 2
    except MetaTrainingDiverged as err:
        print(f"learnedopt: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as err:
        print(f"learnedopt: {err if isinstance(err, RunInterrupted) else 'interrupted'}", file=sys.stderr)
        return 128 + (stopped_by[0] if stopped_by else signal.SIGINT)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _check_arguments(args: argparse.Namespace) -> None:
    """Refuse, with one line each, a device this machine lacks and an --out that would lose or cannot hold a run."""
    device = getattr(args, "device", None)
    if device is not None:
        import torch

        try:
            kind = torch.device(device).type
        except RuntimeError:
            raise ValueError(f"--device {device!r} is not a device; use cpu, cuda or cuda:N") from None
        if kind == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {device}: this machine has no CUDA device (torch {torch.__version__}); use cpu")
    out = getattr(args, "out", None)
    if out is None or getattr(args, "action", "train") != "train" or args.command in ("benchmark", "demo"):
        return
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a folder for the run")
    if (out / "checkpoint.pt").is_file() and not args.resume and not args.overwrite:
        raise ValueError(f"{out} already holds a run: pass --resume, or another --out (--overwrite replaces it)")
    out.mkdir(parents=True, exist_ok=True)
    probe = out / f".write-test-{os.getpid()}"  # one per process: torchrun ranks check the same folder at once
    try:
        probe.touch()
        probe.unlink()
    except OSError as err:
        raise ValueError(f"cannot write to --out {out} ({err.strerror})") from None


def _dispatch(args: argparse.Namespace, command: str) -> int:
    if args.command == "pretrained":
        from learnedopt import list_pretrained, net_info

        for name in list_pretrained():
            info = net_info(name)
            print(f"{name}: trained on {info.get('task', '?')} for {info.get('iteration', '?')} iterations")
        return 0
    if args.command == "meta-train":
        from learnedopt import MetaTrainer
        from learnedopt.meta.distributed import init_from_environment, rank_and_world
        from learnedopt_experiments.meta_train.tasks import get_family

        device = init_from_environment(args.device)
        family = get_family(args.task, args.data_dir, device)

        config = config_from_args(MetaTrainConfig, args, task=args.task, device=device)
        trainer = MetaTrainer(family, config, args.out, resume=args.resume, progress=not args.no_progress)
        trainer.train(time_budget=args.time_budget)
        if rank_and_world()[0] != 0:
            return 0
        print(f"wrote {args.out / 'net.pt'} (use: LearnedOptimizer(params, net={str(args.out / 'net.pt')!r}))")
        return 0
    if args.command == "demo":
        from learnedopt_experiments.meta_train.reports import demo

        print(demo(args.out, args.iterations, args.seed, not args.no_progress, command))
        print(f"\nwrote {args.out / 'demo.png'}, {args.out / 'demo.md'}")
        return 0
    if args.command == "benchmark":
        import torch

        from learnedopt import DEFAULT_NET
        from learnedopt.meta.evaluation import BASELINES
        from learnedopt_experiments.meta_train.reports import benchmark

        baselines = [b for b in args.baselines.split(",") if b]
        unknown = [b for b in baselines if b not in BASELINES]
        if unknown:
            raise ValueError(f"unknown baselines {unknown}; choose from {', '.join(BASELINES)}")
        name = args.name or f"{args.task}-{args.steps}"
        nets = args.net or [DEFAULT_NET]
        print(
            benchmark(
                args.task, nets, args.steps, args.tasks, baselines, args.out, name, command,
                plot_only=args.plot_only, data_dir=args.data_dir, device=args.device, split=args.split,
                state_dtypes=[getattr(torch, d) for d in args.state_dtype or ["float32"]],
            )
        )
        print(f"\nwrote {args.out / (name + '.md')}, .json, .png")
        return 0
    if args.command in ("maml", "protonet", "matching"):
        return _fewshot(args)
    raise AssertionError(args.command)


def _fewshot(args: argparse.Namespace) -> int:
    from learnedopt_experiments.baselines.train import evaluate, train

    if args.action == "eval":
        metric, mean, half_width = evaluate(args.checkpoint, args.ways, args.shots, args.episodes, args.inner_steps,
                                            device=args.device, data_dir=args.data_dir,
                                            query_batch=getattr(args, "query_batch", None))
        task = f"{args.shots}-shot sinusoid" if metric == "mse" else f"{args.ways}-way {args.shots}-shot"
        print(f"{args.command} {task}: query {metric} {mean:.4f} ± {half_width:.4f} (95% CI, "
              f"{args.episodes} test episodes)")
        return 0
    config = config_from_args(FewShotConfig, args, algorithm=args.command)
    train(config, args.out, resume=args.resume, progress=not args.no_progress, time_budget=args.time_budget)
    print(f"wrote {args.out / 'checkpoint.pt'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
