"""``smartsplit reproduce``: the paper's claims beside this project's figures, on one page (``DIR/results.md``).

Four sections, one per claim of the public description of SmartSplit: (1) up to 100-fold less device memory,
(2) up to 94% lower peak round latency than the baselines, (3) +1.49% to +57.18% accuracy over baselines,
(4) adapting to memory budgets that change at run time. Each section runs its experiments (every run folder under
``DIR/runs/``, written as it is produced; a folder that already holds the same finished run is reused), reads
the figures back from the run folders with ``smartsplit.reports`` (``load_run``, ``run_summary``,
``summary_rows``), draws its figures as PNGs in ``DIR`` and says plainly whether the project meets the claim.
The page is rewritten after each section, so an interrupted reproduce leaves the sections it finished.
"""

from __future__ import annotations

import logging
import platform
import shlex
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import yaml
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from smartsplit.api import run_name
from smartsplit.config import Config, load_config
from smartsplit.errors import SmartSplitError
from smartsplit.records import MB
from smartsplit.reports.memory_claim import MemoryClaim, plan_text, zoo_memory_claims
from smartsplit.reports.report import Run, fig_accuracy_round, fig_latency, fig_memory, load_run, run_summary
from smartsplit.reports.summary import SUMMARY_HEADERS, RunSummary, profiles_line, summary_rows
from smartsplit.reports.table import markdown_table

log = logging.getLogger("smartsplit")

CLAIMS = {
    "memory": "up to 100-fold less device memory",
    "latency": "up to 94% lower peak round latency than the baselines",
    "accuracy": "+1.49% to +57.18% accuracy over the baselines",
    "dynamic": "adapts to memory budgets that change at run time",
}
PAPER_LATENCY_PCT = 94.0
PAPER_GAIN_POINTS = (1.49, 57.18)
ALL_STRATEGIES = ("fedavg", "fedavg-ckpt", "splitfed-v1", "splitfed-v2", "latency-only", "oort", "smartsplit",
                  "smartsplit-no-selection", "smartsplit-no-finetuning", "smartsplit-no-ckpt")


@dataclass(frozen=True)
class Preset:
    """What each section runs: models and width for memory; strategies, seeds and config overrides for the rest."""

    name: str
    memory_models: tuple[str, ...] = ("vgg16", "resnet18", "mobilenetv2")
    memory_width: float = 1.0
    memory_divisor: float = 100.0
    latency_configs: tuple[tuple[str, tuple[str, ...]], ...] = (("latency-vgg.yaml", ()), ("fmnist.yaml", ()))  # with overrides
    latency_strategies: tuple[str, ...] = ("fedavg", "fedavg-ckpt", "splitfed-v1", "splitfed-v2", "oort", "smartsplit")
    latency_seeds: tuple[int, ...] = (0, 1, 2)
    accuracy_alphas: tuple[float, ...] = (0.1, 0.5)
    accuracy_strategies: tuple[str, ...] = ALL_STRATEGIES
    accuracy_seeds: tuple[int, ...] = (0, 1, 2)
    accuracy_overrides: tuple[str, ...] = ()
    dynamic_strategies: tuple[str, ...] = ("fedavg", "fedavg-ckpt", "splitfed-v1", "smartsplit")
    dynamic_seeds: tuple[int, ...] = (0, 1, 2)
    dynamic_overrides: tuple[str, ...] = ()
    testbed_overrides: tuple[str, ...] = ()  # for configs/testbed.yaml, measured on the emulated testbed
    reduced: tuple[str, ...] = field(default=())  # what this preset reduces, in words, for the page

    @property
    def quick(self) -> bool:
        return self.name != "full"


BASELINES = ("fedavg", "fedavg-ckpt", "splitfed-v1", "splitfed-v2", "latency-only", "oort")
# the full suite on 2 cores in about an hour: the baselines and SmartSplit (its ablations: `smartsplit compare
# configs/fmnist-noniid.yaml --strategies smartsplit,smartsplit-no-selection,...`), latencies from one seed
FULL = Preset("full", latency_seeds=(0,), accuracy_strategies=(*BASELINES, "smartsplit"),
              reduced=("latency: one seed (0)", "accuracy: the baselines and SmartSplit, not SmartSplit's ablations"))
_QUICK_LATENCY = ("training.rounds=4", "training.eval_every=4")
_SMALL = ("training.rounds=2", "fleet.devices=6", "training.devices_per_round=3", "training.local_steps=2")
QUICK = Preset(
    "quick",
    memory_width=0.5,
    latency_strategies=("fedavg", "splitfed-v1", "smartsplit"),
    latency_configs=(("latency-vgg.yaml", _QUICK_LATENCY), ("fmnist.yaml", _QUICK_LATENCY)),
    latency_seeds=(0,),
    accuracy_strategies=("fedavg", "splitfed-v1", "oort", "smartsplit"),
    accuracy_overrides=("training.rounds=5", "fleet.devices=40", "data.train_limit=8000", "data.test_limit=1000"),
    dynamic_seeds=(0,),
    dynamic_overrides=("training.rounds=8", "data.test_limit=1000"),
    reduced=(
        "memory: models at width 0.5 instead of 1.0 (at width 0.25 no plan fits 1/100 of VGG-16's whole-model peak)",
        "latency: 4 rounds instead of the configs' 10 and 20, test set evaluated after the last round only, one seed "
        "(0), strategies fedavg, splitfed-v1, smartsplit",
        "accuracy: 5 rounds instead of 20, 40 devices instead of 100, 8,000 training and 1,000 test examples, "
        "strategies fedavg, splitfed-v1, oort, smartsplit (three seeds, as in full mode)",
        "dynamic budgets: 8 rounds instead of 15, 1,000 test examples, one seed (0)",
    ),
)
_TINY = Preset(  # for the tests: every section, in seconds
    "tiny",
    memory_models=("cnn",),
    memory_width=0.25,
    memory_divisor=10.0,
    latency_configs=(("latency-vgg.yaml", (*_SMALL, "data.synthetic_train=300", "data.synthetic_test=60")),
                     ("fmnist.yaml", (*_SMALL, "data.train_limit=600", "data.test_limit=100"))),
    latency_strategies=("fedavg", "smartsplit"),
    latency_seeds=(0,),
    accuracy_alphas=(0.1,),
    accuracy_strategies=("fedavg", "smartsplit"),
    accuracy_seeds=(0, 1),
    accuracy_overrides=(*_SMALL, "data.train_limit=600", "data.test_limit=100"),
    dynamic_strategies=("fedavg", "smartsplit"),
    dynamic_seeds=(0,),
    dynamic_overrides=(*_SMALL, "data.train_limit=600", "data.test_limit=100"),
    testbed_overrides=("data.dataset=synthetic", "data.synthetic_train=120", "data.synthetic_test=40", "model.width=0.25",
                       "fleet.devices=3", "fleet.budgets.kind=constant", "training.devices_per_round=2",
                       "training.local_steps=1", "training.rounds=2", "training.batch_size=8"),
    reduced=("tiny: a test preset; every setting reduced",),
)
PRESETS = {"full": FULL, "quick": QUICK}


@dataclass
class Section:
    """One claim's part of the page: its markdown, its headline row and how long it took."""

    key: str
    title: str
    body: str
    verdict: str  # meets / exceeds / falls short / partly meets
    ours: str  # this project's headline figure, in words
    wall_s: float = 0.0


@dataclass(frozen=True)
class Suite:
    """The runs of one ``compare``-like command: a config under strategies and seeds, with overrides."""

    config: Path
    name: str
    strategies: tuple[str, ...]
    seeds: tuple[int, ...]
    overrides: tuple[str, ...]


@dataclass(frozen=True)
class Context:
    """Where a reproduce writes, what it runs and how."""

    out: Path
    runs_dir: Path
    configs: Path
    preset: Preset
    workers: int | None
    progress: bool


@dataclass
class SuiteResult:
    suite: Suite
    summaries: dict[str, list[RunSummary]]  # strategy -> one per seed, in seed order
    run_dirs: list[Path]
    reused: list[str]
    command: str


# ---------------------------------------------------------------- running


def suite_configs(suite: Suite, runs_dir: Path) -> list[tuple[str, Config]]:
    """(strategy, config) of each run, named as ``smartsplit compare`` names them, into ``runs_dir``."""
    several = len(suite.seeds) > 1
    base = [*suite.overrides, f"output_dir={runs_dir}"]
    return [(strategy, load_config(suite.config, [*base, f"strategy.name={strategy}", f"seed={seed}",
                                                  f"name={run_name(suite.name, strategy, seed if several else None)}"]))
            for strategy in suite.strategies for seed in suite.seeds]


def finished(config: Config) -> bool:
    """The run folder holds this config's finished run (summary.json, and the same config.yaml up to the engine)."""
    run_dir = Path(config.output_dir) / config.name
    if not (run_dir / "summary.json").is_file() or not (run_dir / "config.yaml").is_file():
        return False
    try:
        saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return False
    ignore = ("engine", "workers", "ray_address")  # where rounds train changes nothing they compute
    wanted = {k: v for k, v in config.model_dump(mode="json").items() if k not in ignore}
    return isinstance(saved, dict) and {k: v for k, v in saved.items() if k not in ignore} == wanted


def run_suite(suite: Suite, runs_dir: Path, workers: int | None, progress: bool) -> SuiteResult:
    """Run what is not finished yet (``workers`` processes, as ``compare`` runs them), then read every run back."""
    from smartsplit.runtime.concurrent import run_many

    runs = suite_configs(suite, runs_dir)
    pending = [config for _, config in runs if not finished(config)]
    reused = [config.name for _, config in runs if config not in pending]
    if reused:
        log.info("reusing %d finished run(s) of %s: %s", len(reused), suite.name, ", ".join(reused))
    if pending:
        log.info("%s: running %d run(s)", suite.name, len(pending))
        run_many(pending, workers, progress=progress, overwrite=True,
                 on_done=lambda s: log.info("done: %s: final accuracy %.4f (%.0f s)", s.name, s.final_accuracy or 0.0,
                                            s.wall_s or 0.0))
    summaries: dict[str, list[RunSummary]] = {}
    run_dirs = []
    for strategy, config in runs:
        run_dirs.append(Path(config.output_dir) / config.name)
        summaries.setdefault(strategy, []).append(run_summary(load_run(run_dirs[-1])))
    return SuiteResult(suite, summaries, run_dirs, reused, compare_command(suite, runs_dir, workers))


def compare_command(suite: Suite, runs_dir: Path, workers: int | None) -> str:
    """The ``smartsplit compare`` command that makes the same run folders."""
    parts = ["smartsplit", "compare", str(suite.config), "--strategies", ",".join(suite.strategies),
             "--seeds", ",".join(map(str, suite.seeds))]
    for override in (*suite.overrides, f"output_dir={runs_dir}", f"name={suite.name}"):
        parts += ["--set", override]
    if workers:
        parts += ["--workers", str(workers)]
    return " ".join(shlex.quote(p) for p in parts)


def configs_dir() -> Path:
    """``configs/`` of the working directory, else of the repository this package lives in."""
    for candidate in (Path("configs"), Path(__file__).resolve().parents[2] / "configs"):
        if (candidate / "fmnist.yaml").is_file():
            return candidate
    raise SmartSplitError("reproduce: the shipped configs (configs/fmnist.yaml, ...) are not here; run it from the "
                          "repository's root")


# ---------------------------------------------------------------- figures and numbers


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def pm(values: Sequence[float], scale: float = 1.0, digits: int = 3) -> str:
    mean, std = mean_std([v * scale for v in values])
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def final_accuracies(runs: list[RunSummary]) -> list[float]:
    return [r.final_accuracy for r in runs if r.final_accuracy is not None]


def save_figure(fig: Figure, path: Path) -> str:
    FigureCanvasAgg(fig)  # Agg for this figure only, as reports.report draws
    fig.savefig(path, dpi=110)
    fig.clear()
    return path.name


def report_figure(draw: Callable, run_dirs: list[Path], path: Path) -> str:
    """One of ``reports.report``'s figures for these runs, grouped by strategy."""
    groups: dict[str, list[Run]] = {}
    for run in map(load_run, run_dirs):
        groups.setdefault(run.strategy, []).append(run)
    colours = {name: colormaps["tab10"](i % 10) for i, name in enumerate(groups)}
    return save_figure(draw(groups, colours), path)


def summary_table(result: SuiteResult) -> str:
    """The project's one summary table (``reports.summary``) of a suite's runs."""
    return markdown_table(SUMMARY_HEADERS, summary_rows([s for runs in result.summaries.values() for s in runs]))


def how_it_ran(result: SuiteResult) -> str:
    """The command, its seeds and overrides, and which runs were reused."""
    lines = [f"```\n{result.command}\n```",
             f"Config `{result.suite.config}`, seeds {', '.join(map(str, result.suite.seeds))}, overrides: "
             + (", ".join(f"`{o}`" for o in result.suite.overrides) or "none") + "; run folders "
             f"`{result.run_dirs[0].parent}/{result.suite.name}-<strategy>[-s<seed>]`."]
    lines.append(profiles_line([s.profiles for runs in result.summaries.values() for s in runs]).capitalize() + ".")
    if result.reused:
        lines.append(f"Reused (finished in an earlier reproduce into this folder, same config): {', '.join(result.reused)}.")
    return "\n\n".join(lines)


# ---------------------------------------------------------------- 1. memory


def memory_section(ctx: Context) -> Section:
    from smartsplit.meter.heap import HeapMeter, MeterUnavailable

    out, preset = ctx.out, ctx.preset
    try:
        with HeapMeter(1, cache=False) as meter:  # every figure measured in this command
            claims = zoo_memory_claims(list(preset.memory_models), meter, width=preset.memory_width,
                                       divisor=preset.memory_divisor)
    except MeterUnavailable as exc:  # measured means measured: no figure from the memory model instead
        return Section("memory", "1. Device memory", f"**The paper:** {CLAIMS['memory']}.\n\n**Not measured here:** "
                       f"{exc}", "not measured", "-")
    figure = save_figure(memory_figure(claims), out / "memory.png")
    headers = ["model", "width", "(a) whole-model peak MB (meter)", f"budget MB = (a)/{preset.memory_divisor:g}",
               "on-device manager's plan", "(b) device peak MB (meter)", "(a)/(b)", "within budget", "recompute FLOPs"]
    rows = [[c.model, f"{c.width:g}", f"{c.whole_bytes / MB:.3f}", f"{c.budget_bytes / MB:.3f}",
             plan_text(c.plan) if c.plan else "no plan fits", f"{c.device_bytes / MB:.3f}" if c.device_bytes else "-",
             f"{c.ratio:.1f}x" if c.ratio else "-", "yes" if c.fits else "NO",
             f"{c.recompute_flops_pct:.1f}%" if c.plan else "-"] for c in claims]
    verdict, sentence, ours = memory_verdict(claims, preset)
    width_note = (f"**Quick mode: width {preset.memory_width:g}**, not the full models (width 1.0); "
                  "`smartsplit reproduce` without `--quick` measures them at full width." if preset.quick else
                  "Full width (1.0).")
    body = "\n\n".join([
        f"**The paper:** {CLAIMS['memory']}.",
        markdown_table(headers, rows),
        f"![device memory]({figure})",
        f"Both peaks are measured by the heap meter (a malloc counter preloaded into a child process, oneDNN on, 1 "
        f"thread, its disk cache off: every figure measured in this command), never by the memory model. Batch 32 on "
        f"32x32x3 inputs, SGD with momentum, weights from seed 0; budget = (a)/{preset.memory_divisor:g}; the "
        f"on-device manager (10 GFLOP/s, 20 ms per extra round trip) picks the deepest cut and plan whose predicted "
        f"peak fits. {width_note} The same figures, with wall-time overheads: `.venv/bin/python "
        f"benchmarks/device_memory.py --width {preset.memory_width:g} --models {','.join(preset.memory_models)} "
        f"--divisor {preset.memory_divisor:g}`.",
        f"**Verdict:** {sentence}",
    ])
    return Section("memory", "1. Device memory", body, verdict, ours)


def memory_verdict(claims: list[MemoryClaim], preset: Preset) -> tuple[str, str, str]:
    short = [c.model for c in claims if not c.fits]
    ratios = [c.ratio for c in claims if c.fits]
    where = f" at width {preset.memory_width:g} ({preset.name} mode)" if preset.quick else ""
    if short:
        return ("falls short", f"falls short on {', '.join(short)}: no plan whose measured peak fits 1/"
                f"{preset.memory_divisor:g} of the whole-model peak{where}.", "no plan fits on " + ", ".join(short))
    span = f"{min(ratios):.1f}x" if len(ratios) == 1 else f"{min(ratios):.1f}x to {max(ratios):.1f}x"
    ours = f"{span} less, measured{where}"
    if preset.memory_divisor < 100:
        return "falls short", f"only a 1/{preset.memory_divisor:g} budget was tried: {ours}.", ours
    return ("meets", f"meets it: on every model the device trains within 1/{preset.memory_divisor:g} of the "
            f"whole-model peak: {ours}; the paper: up to 100x.", ours)


def memory_figure(claims: list[MemoryClaim]) -> Figure:
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.add_subplot()
    x = range(len(claims))
    ax.bar([i - 0.2 for i in x], [c.whole_bytes / MB for c in claims], 0.4, label="(a) whole model on the device")
    ax.bar([i + 0.2 for i in x], [(c.device_bytes or 0) / MB for c in claims], 0.4, label="(b) SmartSplit's plan")
    ax.scatter([i + 0.2 for i in x], [c.budget_bytes / MB for c in claims], marker="_", s=400, color="red",
               label="budget (a)/divisor", zorder=3)
    ax.set(yscale="log", ylabel="peak device memory, MB (heap meter)", xticks=list(x),
           xticklabels=[f"{c.model} (width {c.width:g})" for c in claims],
           title="Device memory: whole model against SmartSplit's plan")
    ax.grid(alpha=0.3, axis="y", which="both")
    ax.legend(fontsize=8)
    return fig


# ---------------------------------------------------------------- 2. peak round latency


def latency_section(ctx: Context) -> Section:
    results = [run_suite(Suite(ctx.configs / name, "latency-" + Path(name).stem.removeprefix("latency-"),
                               ctx.preset.latency_strategies, ctx.preset.latency_seeds, overrides),
                         ctx.runs_dir, ctx.workers, ctx.progress) for name, overrides in ctx.preset.latency_configs]
    headers = ["config", "strategy", "seeds", "peak round latency s (simulated)", "mean round latency s (simulated)",
               "SmartSplit's peak latency vs this strategy"]
    rows, reductions = [], {}
    for result in results:
        ours = max(r.peak_round_latency_s for r in result.summaries["smartsplit"])
        for strategy, runs in result.summaries.items():
            peak = max(r.peak_round_latency_s for r in runs)
            cut = 100 * (1 - ours / peak)
            if strategy != "smartsplit":
                reductions[result.suite.config.name, strategy] = cut
            rows.append([result.suite.config.name, strategy, len(runs), f"{peak:.3f}",
                         pm([r.mean_round_latency_s for r in runs], digits=1),
                         "-" if strategy == "smartsplit" else lower_or_higher(cut)])
    verdict, sentence, ours = latency_verdict(reductions)
    parts = [f"**The paper:** {CLAIMS['latency']}.", markdown_table(headers, rows),
             "Peak round latency: the slowest round of a run (a round lasts as long as its slowest participant), the "
             "largest over seeds; the reduction is 100 x (1 - SmartSplit's peak / the strategy's peak). **These "
             "latencies are simulated** (the simulator's clock: device compute from FLOPs and each device class's "
             "sustained speed, links from bytes and bandwidth, a shared edge server that queues); the last part "
             "measures them on an emulated testbed."]
    for result in results:
        figure = report_figure(fig_latency, result.run_dirs, ctx.out / f"{result.suite.name}.png")
        parts += [f"### `{result.suite.config.name}`", how_it_ran(result), summary_table(result),
                  f"![round latency, {result.suite.config.name}]({figure})"]
    measured, said = testbed_part(ctx)
    parts += ["### Measured on an emulated testbed (`testbed.yaml`)", measured]
    parts.append(f"**Verdict:** {sentence}{said}")
    return Section("latency", "2. Peak round latency", "\n\n".join(parts), verdict, ours)


def testbed_part(ctx: Context) -> tuple[str, str]:
    """SmartSplit and FedAvg on ``testbed.yaml`` as an emulated testbed (``smartsplit testbed``): the text, and a
    sentence for the verdict."""
    try:
        from smartsplit.deploy.testbed import run_testbed
    except ImportError as exc:
        return (f"Not run: the testbed is a deployment and needs the deploy extra (`pip install -e .[deploy]`; "
                f"{exc}).", "")
    result = run_testbed(str(ctx.configs / "testbed.yaml"), list(ctx.preset.testbed_overrides), ctx.out / "testbed",
                         ["smartsplit", "fedavg"])
    rows, peaks = [], {}
    for name, data in result["strategies"].items():
        later = [r for r in data["rounds"][1:] if r["measured_s"] is not None]
        peaks[name] = (data["peak_measured_s"], max((r["measured_s"] for r in later), default=None),
                       data["peak_simulated_s"])
        rows.append([name, len(data["rounds"]), f"{peaks[name][0]:.2f}", _figure(peaks[name][1]),
                     _figure(peaks[name][2]), _percent(data["fidelity_after_round_1"])])
    ours, theirs = peaks["smartsplit"], peaks["fedavg"]
    cuts = [None if a is None or b is None else 100 * (1 - a / b) for a, b in zip(ours, theirs)]
    said = (f" Measured on this machine's emulated testbed: SmartSplit's peak round latency is "
            f"{_lower(cuts[0])} than FedAvg's ({_lower(cuts[1])} without round 1, which carries each device's first "
            f"steps under its CPU quota); the clock model says {_lower(cuts[2])} for the same plans.")
    emulation = "; ".join(f"{k}: {v}" for k, v in result["emulation"].items())
    text = "\n\n".join([
        f"Each device a process under its class's resources ({emulation}); time scale {result['time_scale']:.3g} "
        "wall seconds per second of the fleet's time; latencies in the fleet's seconds. *Simulated*: the clock "
        "model's prediction for the same plans (largest `predicted_round_s` of each round's decisions).",
        markdown_table(["strategy", "rounds", "peak measured s", "peak measured s, rounds 2+", "peak simulated s",
                        "median abs(measured/simulated - 1), rounds 2+"], rows),
        "![measured against simulated round latency](testbed/testbed.png)", f"In words:{said}"])
    return text, said


def _figure(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _lower(reduction_pct: float | None) -> str:
    return "not measured" if reduction_pct is None else lower_or_higher(reduction_pct)


def lower_or_higher(reduction_pct: float) -> str:
    return f"{reduction_pct:.1f}% lower" if reduction_pct >= 0 else f"{-reduction_pct:.1f}% higher"


def latency_verdict(reductions: dict[tuple[str, str], float]) -> tuple[str, str, str]:
    """From SmartSplit's peak-latency reduction against each (config, baseline)."""
    (config, strategy), best = max(reductions.items(), key=lambda kv: kv[1])
    fedavg = ", ".join(f"{lower_or_higher(v)} on {c}" for (c, s), v in reductions.items() if s == "fedavg")
    ours = f"vs FedAvg: {fedavg}; largest: {best:.1f}% vs {strategy} on {config} (simulated)"
    worse = [f"{s} on {c}" for (c, s), v in reductions.items() if v < 0]
    tail = f" SmartSplit's peak is higher than {', '.join(worse)}'s." if worse else ""
    if best >= PAPER_LATENCY_PCT:
        word = "exceeds" if best > PAPER_LATENCY_PCT + 1 else "meets"
        return word, f"{word} it: up to {best:.1f}% lower peak round latency (vs {strategy} on {config}); against " \
                     f"FedAvg: {fedavg}. Simulated latencies.{tail}", ours
    return ("falls short", f"falls short: SmartSplit's peak round latency is at most {best:.1f}% lower than a "
            f"baseline's (vs {strategy} on {config}), against the paper's up to {PAPER_LATENCY_PCT:g}%; against "
            f"FedAvg: {fedavg}. Simulated latencies.{tail}", ours)


# ---------------------------------------------------------------- 3. accuracy


def accuracy_section(ctx: Context) -> Section:
    results = [run_suite(Suite(ctx.configs / "fmnist-noniid.yaml", f"accuracy-alpha{alpha:g}",
                               ctx.preset.accuracy_strategies, ctx.preset.accuracy_seeds,
                               (f"data.alpha={alpha:g}", *ctx.preset.accuracy_overrides)),
                         ctx.runs_dir, ctx.workers, ctx.progress) for alpha in ctx.preset.accuracy_alphas]
    headers = ["alpha", "strategy", "seeds", "final accuracy, % (mean ± sample std)", "SmartSplit's gain, points"]
    rows, gains = [], {}
    for alpha, result in zip(ctx.preset.accuracy_alphas, results):
        ours, ours_std = mean_std(final_accuracies(result.summaries["smartsplit"]))
        for strategy, runs in result.summaries.items():
            mean, std = mean_std(final_accuracies(runs))
            gain = 100 * (ours - mean)
            noise = " (within the spread)" if abs(gain) < 100 * max(std, ours_std) else ""
            if not strategy.startswith("smartsplit"):
                gains[alpha, strategy] = gain
            rows.append([f"{alpha:g}", strategy, len(runs), pm(final_accuracies(runs), 100, 2),
                         "-" if strategy == "smartsplit" else f"{gain:+.2f}{noise}"])
    verdict, sentence, ours = accuracy_verdict(gains)
    figure = save_figure(accuracy_figure(ctx.preset.accuracy_alphas, results), ctx.out / "accuracy.png")
    parts = [f"**The paper:** {CLAIMS['accuracy']}.", markdown_table(headers, rows), f"![final accuracy]({figure})",
             "Final test accuracy after the last round on `configs/fmnist-noniid.yaml` (Fashion-MNIST, Dirichlet label "
             "skew, a memory-poor fleet); gain = SmartSplit's mean minus the strategy's mean, in percentage points; "
             "\"within the spread\": smaller than the larger of the two sample standard deviations. Strategies named "
             "smartsplit-* are ablations of SmartSplit, not baselines, and are left out of the verdict."]
    if ctx.preset.quick:
        parts.append("**Quick mode:** overrides " + ", ".join(f"`{o}`" for o in ctx.preset.accuracy_overrides)
                     + " (the full suite runs the config as it is, 20 rounds, 100 devices, every strategy).")
    for alpha, result in zip(ctx.preset.accuracy_alphas, results):
        parts += [f"### alpha {alpha:g}", how_it_ran(result), summary_table(result)]
    parts.append(f"**Verdict:** {sentence}")
    return Section("accuracy", "3. Accuracy over the baselines", "\n\n".join(parts), verdict, ours)


def accuracy_verdict(gains: dict[tuple[float, str], float]) -> tuple[str, str, str]:
    """From SmartSplit's gain in points over each (alpha, baseline)."""
    low, high = min(gains.values()), max(gains.values())
    ours = f"{low:+.2f} to {high:+.2f} points"
    behind = [f"{s} at alpha {a:g} ({g:+.2f})" for (a, s), g in gains.items() if g < 0]
    if behind:
        return ("falls short", f"falls short: SmartSplit is behind {', '.join(behind)}; its gains range from {ours} "
                f"against the paper's +{PAPER_GAIN_POINTS[0]} to +{PAPER_GAIN_POINTS[1]}.", ours)
    if high < PAPER_GAIN_POINTS[1]:
        floor = "above" if low >= PAPER_GAIN_POINTS[0] else "partly below"
        return ("partly meets", f"partly meets it: SmartSplit beats every baseline, by {ours} ({floor} the paper's "
                f"low end, +{PAPER_GAIN_POINTS[0]}), but falls short of the paper's high end: its largest gain, "
                f"{high:+.2f}, is far from +{PAPER_GAIN_POINTS[1]}.", ours)
    return ("meets", f"meets it: SmartSplit beats every baseline, by {ours} (the paper: +{PAPER_GAIN_POINTS[0]} to "
            f"+{PAPER_GAIN_POINTS[1]}).", ours)


def accuracy_figure(alphas: Sequence[float], results: list[SuiteResult]) -> Figure:
    fig = Figure(figsize=(5 + 3 * len(alphas), 4.5), layout="constrained")
    axes = fig.subplots(1, len(alphas), squeeze=False)[0]
    for ax, alpha, result in zip(axes, alphas, results):
        names = list(result.summaries)
        stats = [mean_std([100 * a for a in final_accuracies(result.summaries[n])]) for n in names]
        for i, (name, (mean, std)) in enumerate(zip(names, stats)):  # points, not bars: the axis does not start at 0
            ax.errorbar([i], [mean], yerr=[std], fmt="o", capsize=4, markersize=7,
                        color="tab:green" if name == "smartsplit" else "tab:gray")
        ax.set(title=f"Dirichlet alpha {alpha:g}", ylabel="final test accuracy, % (mean ± sample std over seeds)",
               xticks=list(range(len(names))))
        ax.set_xticklabels(names, rotation=45, ha="right", fontsize=8)
        ax.set_ylim(bottom=max(0.0, min(m - s for m, s in stats) - 10))
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle("Final accuracy on configs/fmnist-noniid.yaml")
    return fig


# ---------------------------------------------------------------- 4. budgets that change at run time


def dynamic_section(ctx: Context) -> Section:
    result = run_suite(Suite(ctx.configs / "fmnist-dynamic.yaml", "dynamic", ctx.preset.dynamic_strategies,
                             ctx.preset.dynamic_seeds, ctx.preset.dynamic_overrides), ctx.runs_dir, ctx.workers,
                       ctx.progress)
    headers = ["strategy", "seeds", "out-of-memory events", "pauses", "cut moves", "re-plans",
               "final accuracy, % (mean ± sample std)", "participation"]
    rows = [[strategy, len(runs), sum(r.oom_events for r in runs), sum(r.pauses for r in runs),
             sum(r.cut_moves for r in runs), sum(r.replans for r in runs), pm(final_accuracies(runs), 100, 2),
             f"{100 * statistics.fmean(r.participation_rate or 0.0 for r in runs):.0f}%"]
            for strategy, runs in result.summaries.items()]
    verdict, sentence, ours = dynamic_verdict(result.summaries)
    memory = report_figure(fig_memory, result.run_dirs, ctx.out / "dynamic-memory.png")
    accuracy = report_figure(fig_accuracy_round, result.run_dirs, ctx.out / "dynamic-accuracy.png")
    parts = [f"**The paper:** {CLAIMS['dynamic']}.", markdown_table(headers, rows),
             "`configs/fmnist-dynamic.yaml`: every device's budget follows a seeded trace of other apps taking up to "
             "80% of its memory and releasing it, so budgets drop and recover while devices train. Counts are summed "
             "over seeds, read from the runs' metrics.jsonl (`smartsplit.reports`): an out-of-memory event is a "
             "step whose plan no longer fits the budget when it starts, a forward the guard stops for saving more "
             "than its plan allows, or a measured peak above the budget at that moment; a pause is a device "
             "waiting because no plan fits its budget even at cut 1; a cut move is a device handing its deepest units to "
             "the edge mid-round because its budget shrank; a re-plan is the on-device manager choosing a new plan "
             "(micro-batch, recomputation, cut) for a new budget.",
             how_it_ran(result), summary_table(result),
             f"![peak memory against budget]({memory})", f"![accuracy per round]({accuracy})",
             f"**Verdict:** {sentence}"]
    return Section("dynamic", "4. Budgets that change at run time", "\n\n".join(parts), verdict, ours)


def counted(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def dynamic_verdict(summaries: dict[str, list[RunSummary]]) -> tuple[str, str, str]:
    ours = summaries["smartsplit"]
    oom, pauses, moves = (sum(getattr(r, k) for r in ours) for k in ("oom_events", "pauses", "cut_moves"))
    accuracy = statistics.fmean(final_accuracies(ours))
    others = {s: runs for s, runs in summaries.items() if s != "smartsplit"}
    baseline_text = "; ".join(f"{s}: {sum(r.oom_events for r in runs)} OOM, {sum(r.pauses for r in runs)} pauses, "
                              f"{100 * statistics.fmean(final_accuracies(runs)):.1f}%" for s, runs in others.items())
    figure = (f"{counted(oom, 'OOM event')}, {counted(pauses, 'pause')}, {counted(moves, 'cut move')}, "
              f"{100 * accuracy:.1f}% accuracy")
    if oom:
        return ("falls short", f"falls short: SmartSplit ran out of memory {oom} times ({figure}; {baseline_text}).",
                figure)
    ahead = [s for s, runs in others.items() if statistics.fmean(final_accuracies(runs)) > accuracy]
    if ahead:
        return ("partly meets", f"partly meets it: SmartSplit never ran out of memory ({figure}) but its accuracy is "
                f"below {', '.join(ahead)}'s ({baseline_text}).", figure)
    return ("meets", f"meets it: SmartSplit trained through the budget changes with no out-of-memory event ({figure}), "
            f"with accuracy at or above every baseline's ({baseline_text}).", figure)


# ---------------------------------------------------------------- the page


def machine_rows() -> list[list[str]]:
    """The machine, for the page: CPU, cores, torch, its CPU capability, platform, and this checkout's commit."""
    import os

    from smartsplit.machine import describe

    info = describe()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else info["cores"]
    return [["CPU", info["cpu"] or "unknown"], ["cores", f"{info['cores']} ({usable} usable by this process)"],
            ["torch", info["torch"]], ["torch.backends.cpu.get_cpu_capability()", info["cpu_capability"]],
            ["numpy", info["numpy"]], ["platform", platform.platform()], ["Python", info["python"]],
            ["commit", checkout_commit()]]


def checkout_commit() -> str:
    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown (not a git checkout)"
    return head + (" (with uncommitted changes)" if dirty else "")


def page(ctx: Context, sections: list[Section], machine: list[list[str]], command: str, wall_s: float,
         complete: bool) -> str:
    mode = f"**Mode: {ctx.preset.name}.**" + (" Reduced settings:\n\n" + "\n".join(f"- {r}" for r in ctx.preset.reduced)
                                              if ctx.preset.quick else " Every config as shipped, three seeds, except:\n\n"
                                              + "\n".join(f"- {r}" for r in ctx.preset.reduced))
    status = (f"**Total wall time: {wall_s:.0f} s ({wall_s / 60:.1f} min)**, finished "
              f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}" if complete else
              f"**Incomplete:** {len(sections)} of 4 sections after {wall_s:.0f} s (still running, or interrupted)")
    headline = [[s.title, CLAIMS[s.key], s.ours, s.verdict, f"{s.wall_s:.0f}"] for s in sections]
    lines = ["# SmartSplit: the paper's claims against this project's figures", "",
             f"Command: `{command}`", "", status, "", mode, "",
             markdown_table(["claim", "the paper", "this project", "verdict", "section wall s"], headline), "",
             "## Machine", "", markdown_table(["", ""], machine), ""]
    for s in sections:
        lines += [f"## {s.title}", "", s.body, "", f"Section wall time: {s.wall_s:.0f} s.", ""]
    return "\n".join(lines)


def reproduce(out: str | Path, preset: Preset = QUICK, *, workers: int | None = None, progress: bool = False,
              command: str = "smartsplit reproduce") -> Path:
    """Run every section into ``out`` and write ``out/results.md`` (rewritten after each section)."""
    from smartsplit.runtime.folder import check_writable

    if workers is not None and workers < 1:
        raise SmartSplitError(f"--workers must be at least 1, got {workers}")
    out = Path(out).resolve()
    check_writable(out, "--out")
    ctx = Context(out, out / "runs", configs_dir(), preset, workers, progress)
    started, machine, sections = time.perf_counter(), machine_rows(), []
    for step in (memory_section, latency_section, accuracy_section, dynamic_section):
        section_started = time.perf_counter()
        section = step(ctx)
        section.wall_s = time.perf_counter() - section_started
        sections.append(section)
        log.info("%s: %s (%.0f s)", section.title, section.verdict, section.wall_s)
        text = page(ctx, sections, machine, command, time.perf_counter() - started, complete=len(sections) == 4)
        (out / "results.md").write_text(text + "\n")
    return out / "results.md"
