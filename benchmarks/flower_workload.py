"""benchmarks/throughput.py's FedAvg workload on Flower's simulation engine (Flower 1.42, Ray backend).

Fashion-MNIST (IDX files read with numpy, normalised as SmartSplit does: /255, then (x - 0.2860) / 0.3530), the CNN
of benchmarks/throughput.py (conv 1->32 k5, pool, conv 32->64 k5, pool, fc 1024->512, fc 512->10, ReLUs),
100 clients with a seeded Dirichlet(0.5) label partition (SmartSplit's algorithm, so the same shards for the same
seed), 10 clients a round (FedAvg, fraction_train 0.1, no federated evaluation), 10 rounds of 1 local epoch at batch
32, SGD lr 0.05 without momentum, and a central evaluation of the whole 10k test set after every round (evaluate_fn;
the evaluation Flower makes before round 1 is skipped, so there are 10 as in SmartSplit). Two clients train at once,
one CPU each (client_resources num_cpus 1 on a 2-CPU Ray cluster). It needs a separate environment:

    python3 -m venv /tmp/flwr-venv && /tmp/flwr-venv/bin/pip install torch==2.13.0 "flwr[simulation]==1.42.0"
    /tmp/flwr-venv/bin/python benchmarks/flower_workload.py            # prints its figures
    .venv/bin/python benchmarks/throughput.py --flower /tmp/flwr-venv/bin/python   # runs it beside SmartSplit

It prints the training samples/s over the rounds (samples the clients trained / the rounds' time from sending the
training messages to the end of aggregation), the evaluation samples/s (test examples / the time of evaluate_fn),
the samples/s over the whole process (from this process's start, as close as Python can see it, to the end; the
caller, throughput.py, measures launch to exit itself) and this process's peak RSS, its own and its children's
(resource.getrusage). ``--result PATH`` also writes them as JSON. Batches are taken by indexing tensors held in
memory (no DataLoader), as SmartSplit and the plain PyTorch ceiling do.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import resource
import time
from pathlib import Path

STARTED = time.perf_counter()  # as early as this process can take it

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

FMNIST_MEAN, FMNIST_STD = 0.2860, 0.3530  # SmartSplit's (smartsplit.data.datasets._NORM)
SETTINGS = Path(os.environ.get("FLOWER_WORKLOAD_SETTINGS", "/nonexistent"))  # the run's settings, for the actors


def cnn(in_channels: int = 1, num_classes: int = 10) -> nn.Sequential:
    """The same network as benchmarks/throughput.py's ``cnn`` (that file is not importable here: other venv)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, 32, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * 4 * 4, 512), nn.ReLU(), nn.Linear(512, num_classes),
    )


def read_idx(path: Path) -> np.ndarray:
    raw = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_fmnist(root: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    folder = Path(root)

    def find(stem: str) -> Path:
        for name in (stem + ".gz", stem):
            if (folder / name).exists():
                return folder / name
        raise SystemExit(f"{stem}[.gz] not found in {folder}")

    def images(stem: str) -> torch.Tensor:
        x = torch.tensor(read_idx(find(stem))[:, None]).float()
        return x.div_(255.0).sub_(FMNIST_MEAN).div_(FMNIST_STD)

    def labels(stem: str) -> torch.Tensor:
        return torch.from_numpy(read_idx(find(stem)).astype(np.int64))

    return (images("train-images-idx3-ubyte"), labels("train-labels-idx1-ubyte"),
            images("t10k-images-idx3-ubyte"), labels("t10k-labels-idx1-ubyte"))


def dirichlet(labels: np.ndarray, num_clients: int, alpha: float, seed: int) -> list[np.ndarray]:
    """Per class, its indices split among the clients in Dir(alpha) proportions: SmartSplit's ``dirichlet``
    (smartsplit.data.partition), which with this seed gives the same shards; every client here gets some."""
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for cls in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        props = rng.dirichlet(np.full(num_clients, float(alpha)))
        cuts = (np.cumsum(props)[:-1] * len(idx)).astype(np.int64)
        for client, chunk in enumerate(np.split(idx, cuts)):
            parts[client].append(chunk)
    out = [np.sort(rng.permutation(np.concatenate(p)).astype(np.int64)) for p in parts]
    if min(len(p) for p in out) == 0:
        raise SystemExit("a client got no samples; SmartSplit would top it up: use another seed")
    return out


_CACHE: dict = {}


def client_data(settings: dict) -> tuple[torch.Tensor, torch.Tensor, list[np.ndarray]]:
    """The training set and every client's shard, loaded once per actor process."""
    if "train" not in _CACHE:
        x, y, _, _ = load_fmnist(settings["root"])
        _CACHE["train"] = (x, y, dirichlet(y.numpy(), settings["clients"], settings["alpha"], settings["seed"]))
    return _CACHE["train"]


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int) -> tuple[float, float]:
    correct, loss = 0, 0.0
    with torch.no_grad():
        for start in range(0, len(y), batch):
            logits = model(x[start:start + batch])
            loss += F.cross_entropy(logits, y[start:start + batch], reduction="sum").item()
            correct += (logits.argmax(1) == y[start:start + batch]).sum().item()
    return correct / len(y), loss / len(y)


def build_apps(settings: dict):
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg

    client_app = ClientApp()

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:
        started = time.perf_counter()
        torch.set_num_threads(1)
        s = json.loads(SETTINGS.read_text())  # this runs in a Ray actor: settings travel by file
        x, y, shards = client_data(s)
        cid = int(context.node_config["partition-id"])
        model = cnn()
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        optimizer = torch.optim.SGD(model.parameters(), lr=float(msg.content["config"]["lr"]), momentum=0.0)
        rnd = int(msg.content["config"]["server-round"])
        g = torch.Generator().manual_seed(s["seed"] * 1_000_003 + rnd * 1009 + cid)
        shard = torch.from_numpy(shards[cid])
        steps, trained, loss_sum = 0, 0, 0.0
        t0 = time.perf_counter()
        for _ in range(s["epochs"]):
            order = shard[torch.randperm(len(shard), generator=g)]
            for start in range(0, len(order), s["batch"]):
                idx = order[start:start + s["batch"]]
                optimizer.zero_grad()
                loss = F.cross_entropy(model(x[idx]), y[idx])
                loss.backward()
                optimizer.step()
                steps, trained, loss_sum = steps + 1, trained + len(idx), loss_sum + loss.item() * len(idx)
        train_s = time.perf_counter() - t0
        metrics = MetricRecord({"num-examples": trained, "steps": steps, "train_loss": loss_sum / max(trained, 1),
                                "client_train_s": train_s, "client_call_s": time.perf_counter() - started})
        return Message(content=RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics}), reply_to=msg)

    class TimedFedAvg(FedAvg):
        """FedAvg that notes when each round's training starts and its aggregation ends, and what was trained."""

        def __init__(self, **kwargs) -> None:
            super().__init__(**kwargs)
            self.rounds: dict[int, dict] = {}

        def configure_train(self, server_round, arrays, config, grid):
            self.rounds[server_round] = {"round": server_round, "t_start": time.perf_counter()}
            return super().configure_train(server_round, arrays, config, grid)

        def aggregate_train(self, server_round, replies):
            replies = list(replies)
            out = super().aggregate_train(server_round, replies)
            r = self.rounds[server_round]
            r["train_s"] = time.perf_counter() - r.pop("t_start")
            got = [m.content["metrics"] for m in replies if m.has_content()]
            r["clients"] = len(got)
            r["samples"] = int(sum(m["num-examples"] for m in got))
            r["steps"] = int(sum(m["steps"] for m in got))
            r["client_train_s"] = float(sum(m["client_train_s"] for m in got))
            r["client_call_s"] = float(sum(m["client_call_s"] for m in got))
            r["errors"] = len(replies) - len(got)
            return out

    server_app = ServerApp()
    report: dict = {}

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        torch.set_num_threads(settings["server_threads"])
        random.seed(settings["seed"])  # FedAvg samples clients with random.sample
        _, _, x_test, y_test = load_fmnist(settings["root"])
        torch.manual_seed(settings["seed"])
        model = cnn()
        evals: list[dict] = []

        def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
            if server_round == 0:  # Flower's evaluation before any training: not part of the workload
                return None
            t0 = time.perf_counter()
            model.load_state_dict(arrays.to_torch_state_dict())
            accuracy, loss = evaluate(model, x_test, y_test, settings["eval_batch"])
            evals.append({"round": server_round, "eval_s": time.perf_counter() - t0, "accuracy": accuracy, "loss": loss})
            return MetricRecord({"accuracy": accuracy, "loss": loss})

        strategy = TimedFedAvg(fraction_train=settings["per_round"] / settings["clients"], fraction_evaluate=0.0,
                               min_train_nodes=settings["per_round"], min_available_nodes=settings["clients"])
        report["first_round_at_s"] = time.perf_counter() - STARTED
        strategy.start(grid=grid, initial_arrays=ArrayRecord(model.state_dict()), num_rounds=settings["rounds"],
                       train_config=ConfigRecord({"lr": settings["lr"]}), evaluate_fn=evaluate_fn)
        report["rounds"] = [strategy.rounds[r] for r in sorted(strategy.rounds)]
        report["evals"] = evals
        report["test_examples"] = len(y_test)

    return client_app, server_app, report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="/usr/share/datasets/fashion-mnist")
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--per-round", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-batch", type=int, default=1000)
    parser.add_argument("--server-threads", type=int, default=1, help="torch threads of the server (evaluation)")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs Ray may use; each client takes one")
    parser.add_argument("--result", help="also write the figures as JSON here")
    args = parser.parse_args()

    import flwr
    from flwr.simulation import run_simulation

    settings = {"root": args.root, "clients": args.clients, "per_round": args.per_round, "rounds": args.rounds,
                "epochs": args.epochs, "batch": args.batch, "lr": args.lr, "alpha": args.alpha, "seed": args.seed,
                "eval_batch": args.eval_batch, "server_threads": args.server_threads}
    import tempfile
    with tempfile.NamedTemporaryFile("w", suffix=".json", prefix="flower-workload-", delete=False) as f:
        json.dump(settings, f)
    os.environ["FLOWER_WORKLOAD_SETTINGS"] = f.name  # read when the module is imported; Ray's workers inherit it
    # Importing this file as a module (not __main__) lets Ray's workers import the ClientApp's functions by name
    # (Flower puts this process's sys.path on the workers' PYTHONPATH).
    import flower_workload as this

    client_app, server_app, report = this.build_apps(settings)
    try:
        run_simulation(server_app=server_app, client_app=client_app, num_supernodes=args.clients,
                       backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                       "init_args": {"num_cpus": args.cpus, "num_gpus": 0}})
    finally:
        os.unlink(f.name)
    if "rounds" not in report or len(report["evals"]) != args.rounds:
        raise SystemExit("the Flower run did not finish its rounds (see the log above)")
    wall = time.perf_counter() - STARTED
    rounds, evals = report["rounds"], report["evals"]
    samples = sum(r["samples"] for r in rounds)
    train_s = sum(r["train_s"] for r in rounds)
    eval_s = sum(e["eval_s"] for e in evals)
    rss = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
    result = {
        "flwr": flwr.__version__, "torch": torch.__version__, "settings": settings, "rounds": rounds, "evals": evals,
        "samples": samples, "steps": sum(r["steps"] for r in rounds), "train_s": train_s, "eval_s": eval_s,
        "evaluations": len(evals), "test_examples": report["test_examples"],
        "client_train_s": sum(r["client_train_s"] for r in rounds), "first_round_at_s": report["first_round_at_s"],
        "process_s": wall, "peak_rss_mb": rss / 1024, "final_accuracy": evals[-1]["accuracy"],
        "errors": sum(r["errors"] for r in rounds),
    }
    print(f"flower {flwr.__version__}, torch {torch.__version__}: {args.clients} clients, {args.per_round} a round, "
          f"{args.rounds} rounds, 2 at once on {args.cpus} CPUs")
    for r, e in zip(rounds, evals):
        print(f"round {r['round']:>2}: {r['clients']} clients, {r['samples']:>5} samples, train {r['train_s']:6.2f} s "
              f"(clients' own training {r['client_train_s']:6.2f} s in all), eval {e['eval_s']:5.2f} s, "
              f"accuracy {e['accuracy']:.4f}")
    print(f"train: {samples} samples in {train_s:.1f} s = {samples / train_s:.0f} samples/s; eval: "
          f"{len(evals)} x {report['test_examples']} in {eval_s:.1f} s = {len(evals) * report['test_examples'] / eval_s:.0f} "
          f"samples/s; whole process: {wall:.1f} s = {samples / wall:.0f} samples/s; peak RSS {rss / 1024:.0f} MB "
          f"(largest process, children included); first round began {report['first_round_at_s']:.1f} s in")
    if args.result:
        Path(args.result).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
