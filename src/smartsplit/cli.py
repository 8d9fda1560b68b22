"""``smartsplit run | check | compare | report | profile | reproduce`` and the deployment: ``certs | server | edge | device | launch``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from smartsplit.errors import SmartSplitError
from smartsplit.records import MB


def _run(args: argparse.Namespace) -> None:
    from smartsplit.config import load_config
    from smartsplit.runtime.folder import check_run_folder, run_folder
    from smartsplit.runtime.pool import WorkerPool

    args.set += _engine_overrides(args)
    if args.resume:
        if args.config or args.out or args.overwrite:
            raise SmartSplitError("run --resume RUN_DIR continues the run in RUN_DIR with its own config.yaml: give no "
                                  "CONFIG, --out or --overwrite with it")
        from smartsplit.runtime.embedded import resume_config

        config, out = resume_config(args.resume, args.set), args.resume
    elif args.config:
        config, out = load_config(args.config, args.set), args.out
    else:
        raise SmartSplitError("run: give a CONFIG file, or --resume RUN_DIR")
    check_run_folder(run_folder(config, out), resume=bool(args.resume), overwrite=args.overwrite)  # before workers
    pool = WorkerPool.for_run(config)  # the parallel engine's workers start while this process imports torch
    from smartsplit.reports.summary import SUMMARY_HEADERS, profiles_line, result_line, summary_rows
    from smartsplit.reports.table import format_table
    from smartsplit.runtime.embedded import run_experiment, start_engine

    engine = start_engine(config, pool=pool)
    try:
        summary = run_experiment(config, out, progress=not args.quiet, resume=bool(args.resume),
                                 overwrite=args.overwrite, executor=engine)
    finally:
        if engine is not None:
            engine.close()
    if not args.quiet:
        print(format_table(SUMMARY_HEADERS, summary_rows([summary])))
    print(profiles_line([summary.profiles]))
    print(result_line(summary))


def _engine_overrides(args: argparse.Namespace) -> list[str]:
    """``--engine``, ``--workers``, ``--ray-address``, ``--calibrate`` as the config fields they set."""
    out = [f"engine={args.engine}"] if args.engine else []
    if getattr(args, "calibrate", False):
        out.append("calibrate=true")
    if getattr(args, "round_workers", None) is not None:
        out.append(f"workers={args.round_workers}")
    if args.ray_address:
        out.append(f"ray_address={args.ray_address}")
    return out


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
    from smartsplit.reports.summary import SUMMARY_HEADERS, profiles_line, summary_rows
    from smartsplit.reports.table import format_table, markdown_table
    from smartsplit.runtime.folder import check_writable

    base = load_config(args.config, args.set + _engine_overrides(args))
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
    print(profiles_line([s.profiles for s in summaries]))
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
    shape = _input_shape(args.input) if args.input else default_input_shape(args.model) if ":" not in args.model else None
    if shape is None:
        raise SmartSplitError(f"--model {args.model}: your own model needs its input shape: --input C,H,W (e.g. --input 1,28,28)")
    model = build_model(args.model, in_channels=shape[0], input_size=shape[1], num_classes=args.classes, width=args.width)
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


def _reproduce(args: argparse.Namespace) -> None:
    import shlex
    import time

    from smartsplit.reproduce import PRESETS, reproduce

    started = time.perf_counter()
    command = "smartsplit " + " ".join(shlex.quote(a) for a in args.argv)
    page = reproduce(args.out, PRESETS["quick" if args.quick else "full"], workers=args.workers,
                     progress=not args.quiet, command=command)
    print(f"results: {page} (figures beside it, runs in {page.parent / 'runs'}); wall time "
          f"{time.perf_counter() - started:.0f} s")


def _input_shape(text: str) -> tuple[int, int, int]:
    """``--input C,H,W`` (square images: the zoo and ``as_chain`` take one side)."""
    try:
        shape = tuple(int(v) for v in text.split(","))
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1 or shape[1] != shape[2]:
        raise SmartSplitError(f"--input must be C,H,W with positive integers and H == W (e.g. 1,28,28), got {text!r}")
    return shape


def _deployment():
    """The deployment's modules need grpcio, protobuf and cryptography (the ``deploy`` extra)."""
    try:
        import cryptography  # noqa: F401
        import grpc  # noqa: F401
        import google.protobuf  # noqa: F401
    except ImportError as exc:
        raise SmartSplitError(f"the deployment commands need the 'deploy' extra ({exc}); install it with: "
                              "pip install 'smartsplit[deploy]'") from None


def _security(args: argparse.Namespace) -> Path | None:
    """The certificate folder, or None with --insecure (the link then says loudly that it is insecure)."""
    if args.insecure:
        if args.certs:
            raise SmartSplitError("give either --certs DIR or --insecure, not both")
        return None
    if not args.certs:
        raise SmartSplitError("give --certs DIR (made by: smartsplit certs DIR --devices N --edges M), or --insecure "
                              "on a lab network you trust")
    return Path(args.certs)


def _certs(args: argparse.Namespace) -> None:
    _deployment()
    from smartsplit.deploy.certs import write_certs

    hosts = [h.strip() for h in args.hosts.split(",") if h.strip()]
    paths = write_certs(args.dir, devices=args.devices, edges=args.edges, hosts=hosts, days=args.days,
                        overwrite=args.overwrite)
    print(f"wrote {len(paths)} files to {args.dir}: a private authority (ca.pem, ca.key), server, edge-0..edge-"
          f"{args.edges - 1}, device-0..device-{args.devices - 1}; valid {args.days} days for {', '.join(hosts)}")
    print("give each machine ca.pem and its own .pem and .key only; keep ca.key off the machines")


def _server(args: argparse.Namespace) -> None:
    _deployment()
    from smartsplit.config import load_config
    from smartsplit.deploy.server import run_server

    certs = _security(args)
    config = load_config(args.config, args.set)
    run_dir = Path(args.out) if args.out else Path(config.output_dir) / config.name
    resume = args.resume and (run_dir / "state.pt").exists()  # no state yet: no round was trained, start afresh
    from smartsplit.reports.summary import result_line

    summary = run_server(config, args.listen, certs, run_dir, resume=resume,
                         overwrite=(args.overwrite or args.resume) and not resume,
                         progress=not args.quiet and sys.stderr.isatty(), edge_timeout_s=args.edge_timeout)
    print(result_line(summary))


def _edge(args: argparse.Namespace) -> None:
    _deployment()
    from smartsplit.deploy.edge import run_edge

    certs = _security(args)
    name = args.name or _only_identity(certs, "edge")
    run_edge(args.server, args.listen, certs, name, timeout_s=args.timeout, connect_s=args.connect_timeout)


def _only_identity(certs: Path | None, kind: str) -> str:
    found = sorted(p.stem for p in certs.glob(f"{kind}-*.pem")) if certs is not None else []
    if len(found) != 1:
        raise SmartSplitError(f"--name: {certs} holds {len(found)} {kind} certificates; say which one this is "
                              f"(--name {kind}-0)" if certs is not None else f"--name {kind}-N is needed with --insecure")
    return found[0]


def _device(args: argparse.Namespace) -> None:
    _deployment()
    import os

    from smartsplit.deploy.device import DeviceOptions, run_device

    certs = _security(args)
    if args.enforce_budget:
        from smartsplit.deploy.limits import enforcement_unavailable

        reason = enforcement_unavailable()
        if reason is not None:
            raise SmartSplitError(f"--enforce-budget: {reason}")
    if not args.no_meter and "heapmeter" not in os.environ.get("LD_PRELOAD", ""):
        from smartsplit.meter.heap import MeterUnavailable, shim_path

        try:  # run again with the heap meter's counter preloaded, so each real step's peak is measured
            env = dict(os.environ, LD_PRELOAD=str(shim_path()))
            os.execve(sys.executable, [sys.executable, "-m", "smartsplit.cli", *args.argv], env)
        except MeterUnavailable as exc:
            print(f"warning: {exc}; this device's peaks will not be measured", file=sys.stderr)
    options = DeviceOptions(budget=args.budget, enforce_budget=args.enforce_budget)
    run_device(args.edge, args.id, certs, options)


def _launch(args: argparse.Namespace) -> None:
    _deployment()
    from smartsplit.config import load_config
    from smartsplit.deploy.launch import launch_local
    from smartsplit.reports.summary import SUMMARY_HEADERS, result_line, summary_rows
    from smartsplit.reports.table import format_table

    if not args.local:
        raise SmartSplitError("launch starts every role on this machine and needs --local; on real machines start "
                              "`smartsplit server`, `smartsplit edge` and `smartsplit device` on each (README: Deploy "
                              "on real devices)")
    config = load_config(args.config, args.set)
    run_dir = Path(args.out) if args.out else Path(config.output_dir) / config.name
    summary = launch_local(args.config, args.set, config, run_dir, overwrite=args.overwrite, resume=args.resume,
                           insecure=args.insecure, meter=not args.no_meter, timeout_s=args.timeout,
                           budget=args.budget, enforce_budget=args.enforce_budget, progress=not args.quiet)
    if not args.quiet:
        print(format_table(SUMMARY_HEADERS, summary_rows([summary])))
    print(result_line(summary))


def _testbed(args: argparse.Namespace) -> None:
    _deployment()
    from smartsplit.deploy.testbed import run_testbed
    from smartsplit.reports.table import format_table

    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    if not strategies:
        raise SmartSplitError("--strategies: give at least one, e.g. smartsplit,fedavg")
    result = run_testbed(args.config, args.set, args.out, strategies, progress=not args.quiet)
    rows = [[name, len(d["rounds"]), _percent(d["fidelity"]), _percent(d["fidelity_after_round_1"]),
             round(d["peak_measured_s"], 2), d["peak_simulated_s"] and round(d["peak_simulated_s"], 2), d["accuracy"]]
            for name, d in result["strategies"].items()]
    print(f"time scale {result['time_scale']:.3g} wall s per fleet s; " +
          "; ".join(f"{k}: {v}" for k, v in result["emulation"].items()))
    print(format_table(["strategy", "rounds", "median |m/s-1|", "rounds 2+", "peak measured s", "peak simulated s",
                        "accuracy"], rows))
    print(f"results in {Path(args.out) / 'testbed.json'} (page: testbed.md)")


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="smartsplit", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    experiments = (_add_run_command, _add_check_command, _add_compare_command, _add_report_command,
                   _add_profile_command, _add_reproduce_command)
    deployment = (_add_certs_command, _add_server_command, _add_edge_command, _add_device_command, _add_launch_command,
                  _add_testbed_command)
    for add in experiments + deployment:
        add(sub)
    return parser


def _engine_options(command: argparse.ArgumentParser) -> None:
    command.add_argument("--calibrate", action="store_true",
                         help="measure device memory on this machine instead of using the profiles shipped with "
                              "SmartSplit (plans may then differ from other machines')")
    command.add_argument("--engine", choices=["sequential", "parallel", "ray"],
                         help="where rounds train (the config's engine; same results on each)")
    command.add_argument("--ray-address", metavar="ADDRESS",
                         help="ray: the cluster to join, e.g. auto or ray://head:10001 (default: a local Ray)")


def _secured(command: argparse.ArgumentParser) -> None:
    command.add_argument("--certs", metavar="DIR", help="certificate folder (smartsplit certs)")
    command.add_argument("--insecure", action="store_true",
                         help="no TLS, no certificates: for a lab network you trust, never the internet")
    command.add_argument("--quiet", action="store_true", help="warnings only")
    command.add_argument("--verbose", action="store_true", help="debug messages")


def _add_run_command(sub) -> None:
    run = sub.add_parser("run", help="run one experiment from a YAML config")
    run.add_argument("config", nargs="?")
    run.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its last finished round")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config field (with --resume: only training.rounds, to extend the run)")
    run.add_argument("--out", help="run folder (default: <output_dir>/<name>)")
    run.add_argument("--overwrite", action="store_true", help="replace the run already in the run folder")
    run.add_argument("--quiet", action="store_true", help="no progress bar or progress messages")
    run.add_argument("--verbose", action="store_true", help="a line per round, and debug messages")
    _engine_options(run)
    run.add_argument("--workers", dest="round_workers", type=int, metavar="N",
                     help="parallel/ray: worker processes or actors (default: cores // threads)")
    run.set_defaults(func=_run)


def _add_check_command(sub) -> None:
    check = sub.add_parser("check", help="validate a config and build its experiment (data, model, fleet) without training")
    check.add_argument("config")
    check.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    check.set_defaults(func=_check)


def _add_compare_command(sub) -> None:
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
    _engine_options(compare)
    compare.set_defaults(func=_compare)


def _add_report_command(sub) -> None:
    report = sub.add_parser("report", help="write report.md and figures for one or more run folders")
    report.add_argument("runs", nargs="+", metavar="RUN_DIR")
    report.add_argument("--out", help="report folder (default: <parent of the first run>/report)")
    report.set_defaults(func=_report)


def _add_profile_command(sub) -> None:
    profile = sub.add_parser("profile", help="per-unit profile and per-cut device memory of a zoo model or your own")
    profile.add_argument("--model", required=True, help="a zoo model or your own: package.module:factory")
    profile.add_argument("--input", metavar="C,H,W", help="input shape per example (default: the zoo model's; needed for your own model)")
    profile.add_argument("--batch", type=int, default=32)
    profile.add_argument("--width", type=float, default=1.0)
    profile.add_argument("--classes", type=int, default=10)
    profile.add_argument("--optimizer", default="sgd", choices=["sgd", "adam"])
    profile.add_argument("--momentum", type=float, default=0.0)
    profile.add_argument("--no-meter", action="store_true", help="skip the memory meter (faster; the prediction is then no bound)")
    profile.set_defaults(func=_profile)


def _add_reproduce_command(sub) -> None:
    reproduce = sub.add_parser("reproduce", help="run the paper-claims suite and write DIR/results.md: each claim "
                                                 "beside this project's figure, command, seeds and machine")
    reproduce.add_argument("--out", required=True, metavar="DIR",
                           help="where results.md, its figures and the runs (DIR/runs) go; finished runs there are reused")
    reproduce.add_argument("--quick", action="store_true",
                           help="reduced settings (width, rounds, devices, seeds; the page lists them): minutes, not an hour")
    reproduce.add_argument("--workers", type=int, metavar="N", help="runs at once, each in its own process (default: one per core)")
    reproduce.add_argument("--quiet", action="store_true", help="no progress bar or progress messages")
    reproduce.add_argument("--verbose", action="store_true", help="a line per round of every run, and debug messages")
    reproduce.set_defaults(func=_reproduce)


def _add_certs_command(sub) -> None:
    certs = sub.add_parser("certs", help="write a private certificate authority and a certificate per server, edge and device")
    certs.add_argument("dir")
    certs.add_argument("--devices", type=int, required=True)
    certs.add_argument("--edges", type=int, required=True)
    certs.add_argument("--hosts", default="localhost,127.0.0.1",
                       help="comma-separated names and addresses the server and edges are reached at")
    certs.add_argument("--days", type=int, default=365)
    certs.add_argument("--overwrite", action="store_true", help="replace the authority already in DIR")
    certs.set_defaults(func=_certs)


def _add_server_command(sub) -> None:
    server = sub.add_parser("server", help="run the central server of a deployment (edges and devices in other processes)")
    server.add_argument("config")
    server.add_argument("--listen", required=True, metavar="HOST:PORT")
    server.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    server.add_argument("--out", help="run folder (default: <output_dir>/<name>)")
    server.add_argument("--resume", action="store_true", help="continue the run in the run folder after its last saved round")
    server.add_argument("--overwrite", action="store_true", help="replace the run already in the run folder")
    server.add_argument("--edge-timeout", type=float, default=900.0, metavar="SECONDS",
                        help="an edge with no result this long after a round starts loses its part of the round")
    _secured(server)
    server.set_defaults(func=_server)


def _add_edge_command(sub) -> None:
    edge = sub.add_parser("edge", help="run an edge server of a deployment")
    edge.add_argument("--server", required=True, metavar="HOST:PORT")
    edge.add_argument("--listen", required=True, metavar="HOST:PORT", help="where its devices connect")
    edge.add_argument("--name", help="its identity, edge-<index> (default: the one edge certificate in --certs)")
    edge.add_argument("--timeout", type=float, default=60.0, help="seconds a device may take to answer before it is dropped")
    edge.add_argument("--connect-timeout", type=float, default=120.0,
                      help="seconds to wait for a round's device to connect before it is dropped for the round")
    _secured(edge)
    edge.set_defaults(func=_edge)


def _add_device_command(sub) -> None:
    device = sub.add_parser("device", help="run one device of a deployment")
    device.add_argument("--edge", required=True, metavar="HOST:PORT")
    device.add_argument("--id", type=int, required=True, help="its device id (its certificate is device-<id>)")
    device.add_argument("--budget", default="trace",
                        help="memory budget: 'trace' (the run's, from the server), 'available' (what the OS says), or bytes")
    device.add_argument("--enforce-budget", action="store_true",
                        help="run under a kernel memory limit (cgroup) of the idle footprint plus the budget (root)")
    device.add_argument("--no-meter", action="store_true", help="do not measure the real steps' peaks")
    _secured(device)
    device.set_defaults(func=_device)


def _add_launch_command(sub) -> None:
    launch = sub.add_parser("launch", help="run a config as a deployment: server, edges and devices as processes")
    launch.add_argument("config")
    launch.add_argument("--local", action="store_true", help="every process on this machine, on loopback")
    launch.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    launch.add_argument("--out", help="run folder (default: <output_dir>/<name>)")
    launch.add_argument("--overwrite", action="store_true")
    launch.add_argument("--resume", action="store_true")
    launch.add_argument("--insecure", action="store_true", help="no TLS (a lab only)")
    launch.add_argument("--no-meter", action="store_true", help="devices do not measure their real steps' peaks")
    launch.add_argument("--timeout", type=float, default=60.0, help="seconds a device may take to answer")
    launch.add_argument("--budget", default="trace", help="every device's budget (as for `smartsplit device`)")
    launch.add_argument("--enforce-budget", action="store_true", help="devices under kernel memory limits (root)")
    launch.add_argument("--quiet", action="store_true")
    launch.add_argument("--verbose", action="store_true")
    launch.set_defaults(func=_launch)


def _add_testbed_command(sub) -> None:
    testbed = sub.add_parser("testbed", help="run a config's fleet as an emulated testbed on this machine: each device "
                                             "a process under its class's CPU, memory and link; latency measured")
    testbed.add_argument("config")
    testbed.add_argument("--out", required=True, help="folder for testbed.json, the page, and one run per strategy")
    testbed.add_argument("--strategies", default="smartsplit,fedavg", help="comma-separated (default: smartsplit,fedavg)")
    testbed.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    testbed.add_argument("--quiet", action="store_true")
    testbed.add_argument("--verbose", action="store_true")
    testbed.set_defaults(func=_testbed)


def _logging(verbose: bool, quiet: bool, stamped: bool = False) -> None:
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
    form = "%(levelname)s %(message)s" if verbose else "%(message)s"
    handler.setFormatter(logging.Formatter(f"%(asctime)s {form}" if stamped else form))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    _logging(getattr(args, "verbose", False), getattr(args, "quiet", False),
             stamped=args.command in ("server", "edge", "device"))  # a deployment's logs are read side by side
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
