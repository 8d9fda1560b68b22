"""The Ray engine: the same experiment on a Ray cluster (``engine: ray``), with the sequential engine's metrics.

The central role stays in the driver (this process): it selects, plans, aggregates, evaluates and writes the
run folder. Rounds train on actors, each holding a replica of the experiment's roles (``runtime.workers``:
the data loaded once, the fleet, shards and traces rebuilt from the config and seed); a round's independent
parts (an edge server with the devices that train through it, devices that train their whole model alone) are
calls on those actors, so the edge servers' work runs as actors and lone devices anywhere. ``compare`` with
``engine: ray`` runs each (strategy, seed) as one Ray task.

Every node needs the same Python environment (``pip install smartsplit[ray]``, the same torch) and the data
set where the config says (``data.root``), and ``compare``'s run folders must be on storage the nodes share.
"""

from __future__ import annotations

import logging
import os

from smartsplit.config import Config
from smartsplit.runtime.workers import Replica, WorkerRounds, strategy_blob
from smartsplit.errors import SmartSplitError

log = logging.getLogger(__name__)


def import_ray():
    try:
        import ray
    except ImportError:
        raise SmartSplitError("engine: ray needs Ray: pip install 'smartsplit[ray]' (or engine: parallel on one "
                              "machine)") from None
    return ray


def connect(address: str | None, cpus: int | None = None) -> bool:
    """Join the cluster at ``address`` (None: start a local Ray with ``cpus``), unless this process already
    has; True when this call connected (then ``ray.shutdown()`` is the caller's)."""
    ray = import_ray()
    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        if address:
            ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
        else:
            ray.init(num_cpus=cpus, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    except Exception as exc:
        where = f"the Ray cluster at {address}" if address else "a local Ray"
        raise SmartSplitError(f"engine: ray: could not start or join {where} ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''}); check ray_address, or run "
                              "`ray start --head` first") from None
    return True


class RayRounds(WorkerRounds):
    """Trains each round's independent parts on Ray actors (every part, even a round's only one: the driver
    need not hold the devices' roles)."""

    single_part_here = False

    def __init__(self, config: Config, strategy=None, workers: int | None = None) -> None:
        ray = self._ray = import_ray()
        self._owns_ray = connect(config.ray_address, workers * config.threads if workers else None)
        try:
            cpus = int(ray.cluster_resources().get("CPU", 1))
            self.workers = workers or max(1, cpus // config.threads)
            actor = ray.remote(num_cpus=config.threads)(Replica)
            self._actors = [actor.remote(config, strategy_blob(strategy)) for _ in range(self.workers)]
            log.info("ray: %d actors of %d CPU(s) on a cluster of %d CPUs", self.workers, config.threads, cpus)
        except BaseException:
            self.close()
            raise

    def _on_workers(self, method: str, calls: list[tuple], here=None) -> list:  # the driver trains no part
        return self._ray.get([getattr(actor, method).remote(*args) for actor, args in zip(self._actors, calls)])

    def _shared(self, value):
        return self._ray.put(value)

    def close(self) -> None:
        for actor in getattr(self, "_actors", []):
            self._ray.kill(actor)
        self._actors = []
        if self._owns_ray:
            self._ray.shutdown()
            self._owns_ray = False


def run_on_ray(configs: list[Config], overwrite: bool, address: str | None, on_done=None) -> list:
    """Run ``configs`` as Ray tasks (each run sequential inside its task); summaries in the order given."""
    from smartsplit.runtime.embedded import run_experiment

    ray = import_ray()
    threads = max(c.threads for c in configs)
    owns = connect(address, None)
    try:
        task = ray.remote(num_cpus=threads)(lambda c: run_experiment(c, progress=False, overwrite=overwrite))
        pending = {task.remote(c.model_copy(update={"engine": "sequential"})): i for i, c in enumerate(configs)}
        results: list = [None] * len(configs)
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            i = pending.pop(done[0])
            results[i] = ray.get(done[0])
            if on_done:
                on_done(results[i])
        return results
    finally:
        if owns:
            ray.shutdown()
