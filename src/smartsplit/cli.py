"""``smartsplit run | compare | profile``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from smartsplit.errors import SmartSplitError

MB = 2**20


def _run(args: argparse.Namespace) -> None:
    from smartsplit.config import load_config
    from smartsplit.runtime.embedded import resume_config, run_experiment

    if args.resume:
        if args.config or args.out or args.overwrite:
            raise SmartSplitError("run --resume RUN_DIR continues the run in RUN_DIR with its own config.yaml: give no "
                                  "CONFIG, --out or --overwrite with it")
        config, out = resume_config(args.resume, args.set), args.resume
    elif args.config:
        config, out = load_config(args.config, args.set), args.out
    else:
        raise SmartSplitError("run: give a CONFIG file, or --resume RUN_DIR")
    from smartsplit.reports.summary import SUMMARY_HEADERS, summary_rows
    from smartsplit.reports.table import format_table

    summary = run_experiment(config, out, progress=not args.quiet, resume=bool(args.resume), overwrite=args.overwrite)
    if not args.quiet:
        print(format_table(SUMMARY_HEADERS, summary_rows([summary])))
    print(f"final accuracy {summary.final_accuracy:.4f} after {summary.rounds} rounds; results in {summary.run_dir}")


def _check(args: argparse.Namespace) -> None:
    from smartsplit.config import load_config
    from smartsplit.engine.experiment import Experiment
    from smartsplit.runtime.folder import check_run_folder

    config = load_config(args.config, args.set)
    check_run_folder(Path(config.output_dir) / config.name, overwrite=True)
    experiment = Experiment(config)
    experiment.close()
    print(f"{args.config}: ok: {config.data.dataset} ({len(experiment.train)} training examples), model "
          f"{config.model.name} ({experiment.num_units} units), {len(experiment.devices)} devices, strategy "
          f"{experiment.strategy.name}; runs into {Path(config.output_dir) / config.name}")


def _compare(args: argparse.Namespace) -> None:
    import shlex

    from smartsplit.api import compare
    from smartsplit.config import load_config
    from smartsplit.reports.summary import SUMMARY_HEADERS, summary_rows
    from smartsplit.reports.table import format_table, markdown_table
    from smartsplit.runtime.folder import check_writable

    base = load_config(args.config, args.set)
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    try:
        seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else [base.seed]
    except ValueError:
        raise SmartSplitError(f"--seeds {args.seeds!r}: expected comma-separated whole numbers, e.g. 0,1,2") from None
    if args.workers is not None and args.workers < 1:
        raise SmartSplitError(f"--workers must be at least 1, got {args.workers}")
    if args.markdown:
        check_writable(Path(args.markdown).parent, "--markdown")
        if Path(args.markdown).is_dir():
            raise SmartSplitError(f"--markdown {args.markdown}: is a folder; give a file path")
    summaries = compare(base, strategies, seeds, workers=args.workers, overwrite=args.overwrite, progress=not args.quiet)
    rows = summary_rows(summaries)
    print(format_table(SUMMARY_HEADERS, rows))
    if base.target_accuracy is None:
        print("(set target_accuracy in the config for rounds and simulated time to a target)")
    print(f"runs in {Path(base.output_dir)}/{base.name}-<strategy>; report: {Path(base.output_dir) / f'{base.name}-report'}/report.md")
    if args.markdown:
        command = "smartsplit " + " ".join(shlex.quote(a) for a in args.argv)
        Path(args.markdown).write_text(
            f"Command: `{command}`\n\nTarget accuracy: {base.target_accuracy}\n\n{markdown_table(SUMMARY_HEADERS, rows)}\n"
        )
        print(f"table written to {args.markdown}")


def _report(args: argparse.Namespace) -> None:
    from smartsplit.reports.report import load_run, run_summary, write_report
    from smartsplit.reports.summary import SUMMARY_HEADERS, summary_rows
    from smartsplit.reports.table import format_table
    from smartsplit.runtime.folder import check_writable

    out = Path(args.out) if args.out else Path(args.runs[0]).parent / "report"
    check_writable(out, "report folder")
    report = write_report(args.runs, out)
    print(format_table(SUMMARY_HEADERS, summary_rows([run_summary(load_run(r)) for r in args.runs])))
    print(f"report: {report}")


def _profile(args: argparse.Namespace) -> None:
    from smartsplit.meter.heap import HeapMeter
    from smartsplit.memory.model import device_memory, optimizer_slots
    from smartsplit.models.profile import profile_chain
    from smartsplit.models.zoo import build_model, default_input_shape
    from smartsplit.reports.table import format_table

    if args.batch < 1:
        raise SmartSplitError(f"--batch must be at least 1, got {args.batch}")
    shape = default_input_shape(args.model)
    model = build_model(args.model, num_classes=args.classes, width=args.width)
    optimizer = (args.optimizer, 0.01, args.momentum)
    slots = optimizer_slots(args.optimizer, args.momentum)
    with HeapMeter() as meter:
        metered = None if args.no_meter else meter
        profile = profile_chain(model, shape, args.batch, meter=metered, optimizer=optimizer)
        rows = [
            [u.index, u.name[:40], u.param_bytes / MB, u.saved_bytes / MB, u.output_bytes / MB, u.flops / 1e6]
            for u in profile.units
        ]
        print(f"{args.model}: {profile.num_units} units, input {shape}, batch {args.batch}")
        print(format_table(["unit", "layers", "params MB", "saved MB", "output MB", "fwd MFLOP"], rows))
        print()
        cuts = []
        for c in range(1, profile.num_units + 1):
            predicted = device_memory(profile, c, slots=slots).total / MB
            measured = "-" if metered is None else meter.step_peak(
                model[:c], shape, args.batch, optimizer=optimizer, num_classes=args.classes, to_edge=c < profile.num_units) / MB
            cuts.append([c, predicted, measured, profile.cut_bytes(c) / MB, profile.flops(1, c) / 1e6])
    print(f"per cut, whole batch, nothing recomputed (optimizer {args.optimizer}, momentum {args.momentum}; "
          "link bytes each way per step):")
    print(format_table(["cut", "predicted peak MB", "measured peak MB", "link MB/step", "device fwd MFLOP"], cuts))
    print(f"measured: {meter.name}" if metered is not None else "predicted from saved-tensor profiles only (--no-meter): no bound")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="smartsplit", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run one experiment from a YAML config")
    run.add_argument("config", nargs="?")
    run.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its last finished round")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config field (with --resume: only training.rounds, to extend the run)")
    run.add_argument("--out", help="run folder (default: <output_dir>/<name>)")
    run.add_argument("--overwrite", action="store_true", help="replace the run already in the run folder")
    run.add_argument("--quiet", action="store_true", help="no progress bar or progress messages")
    run.add_argument("--verbose", action="store_true", help="a line per round, and debug messages")
    run.set_defaults(func=_run)

    check = sub.add_parser("check", help="validate a config and build its experiment (data, model, fleet) without training")
    check.add_argument("config")
    check.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    check.set_defaults(func=_check)

    compare = sub.add_parser("compare", help="run a config under several strategies and print one table")
    compare.add_argument("config")
    compare.add_argument("--strategies", default="fedavg,splitfed,smartsplit")
    compare.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    compare.add_argument("--seeds", help="comma-separated seeds, e.g. 0,1,2 (default: the config's seed)")
    compare.add_argument("--workers", type=int, help="parallel processes (default: one per core)")
    compare.add_argument("--markdown", metavar="PATH", help="also write the table, with this command, to a markdown file")
    compare.add_argument("--overwrite", action="store_true", help="replace runs already in the run folders")
    compare.add_argument("--quiet", action="store_true", help="no progress bar or progress messages")
    compare.add_argument("--verbose", action="store_true", help="a line per round of every run, and debug messages")
    compare.set_defaults(func=_compare)

    report = sub.add_parser("report", help="write report.md and figures for one or more run folders")
    report.add_argument("runs", nargs="+", metavar="RUN_DIR")
    report.add_argument("--out", help="report folder (default: <parent of the first run>/report)")
    report.set_defaults(func=_report)

    profile = sub.add_parser("profile", help="per-unit profile and per-cut device memory of a zoo model")
    profile.add_argument("--model", required=True)
    profile.add_argument("--batch", type=int, default=32)
    profile.add_argument("--width", type=float, default=1.0)
    profile.add_argument("--classes", type=int, default=10)
    profile.add_argument("--optimizer", default="sgd", choices=["sgd", "adam"])
    profile.add_argument("--momentum", type=float, default=0.0)
    profile.add_argument("--no-meter", action="store_true", help="skip the memory meter (faster; the prediction is then no bound)")
    profile.set_defaults(func=_profile)
    return parser


def _logging(verbose: bool, quiet: bool) -> None:
    """Messages of the ``smartsplit`` loggers on stderr: warnings only (--quiet), progress (default) or all."""
    import logging

    logger = logging.getLogger("smartsplit")
    logger.setLevel(logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO)
    handler = next((h for h in logger.handlers if getattr(h, "smartsplit_cli", False)), None)
    if handler is None:
        handler = logging.StreamHandler()
        handler.smartsplit_cli = True
        logger.addHandler(handler)
        logger.propagate = False
    handler.stream = sys.stderr  # this call's (main may run several times in one process; an old one may be closed)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s" if verbose else "%(message)s"))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    _logging(getattr(args, "verbose", False), getattr(args, "quiet", False))
    try:
        args.func(args)
    except SmartSplitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head` and the like
        sys.stderr.close()
        return 141
    except KeyboardInterrupt:
        print("interrupted: rounds finished so far are in metrics.jsonl", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
