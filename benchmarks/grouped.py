"""Clients stepped together against one client at a time, on the CPU and (where torch sees one) a CUDA GPU.

The Flower workload's CNN (benchmarks/throughput.py `cnn`, Fashion-MNIST shapes), batch 32: for 10 and 50 clients,
one SGD step of every client, each with its own weights, three ways on each device: one client at a time (a
plain PyTorch step per client), together (`smartsplit.kernels.grouped.step_together`: `torch.func.vmap` of the
clients' gradients, one update over the stacked weights, kept stacked on the device from step to step: what
SmartSplit's grouped devices run), and the same
samples as one large batch through one model (the arithmetic ceiling: what the samples cost when nothing keeps
the clients apart). Each figure is the best of `--repeats` timings after a warm-up, in clients' steps (samples)
per second; "together / alone" is what `training.grouping: auto` measures to choose (it groups at 1.5x or more).

    .venv/bin/python benchmarks/grouped.py                 # CPU, and CUDA where present
    .venv/bin/python benchmarks/grouped.py --threads 2     # torch threads on the CPU
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import cnn  # noqa: E402  the Flower workload's model

from smartsplit.kernels.grouped import Client, Stacked  # noqa: E402


def best(run, repeats: int, device: str) -> float:
    times = []
    for attempt in range(repeats + 1):
        if device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        run()
        if device == "cuda":
            torch.cuda.synchronize()
        if attempt:
            times.append(time.perf_counter() - started)
    return min(times)


def measure(device: str, clients: int, batch: int, repeats: int) -> dict:
    torch.manual_seed(0)
    model = cnn().to(device)
    xs = torch.randn(clients, batch, 1, 28, 28, device=device)
    ys = torch.randint(0, 10, (clients, batch), device=device)
    alone = [copy.deepcopy(model) for _ in range(clients)]
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.05) for m in alone]

    def one_at_a_time() -> None:
        for m, o, x, y in zip(alone, optimizers, xs, ys):
            o.zero_grad(set_to_none=True)
            F.cross_entropy(m(x), y).backward()
            o.step()

    stacked = Stacked([Client(copy.deepcopy(model).cpu()) for _ in range(clients)], device)
    big = copy.deepcopy(model)
    big_opt = torch.optim.SGD(big.parameters(), lr=0.05)
    flat_x, flat_y = xs.reshape(clients * batch, 1, 28, 28), ys.reshape(-1)

    def large_batch() -> None:
        big_opt.zero_grad(set_to_none=True)
        F.cross_entropy(big(flat_x), flat_y).backward()
        big_opt.step()

    samples = clients * batch
    a = best(one_at_a_time, repeats, device)
    t = best(lambda: stacked.step(xs, ys, 0.05, 0.0), repeats, device)
    c = best(large_batch, repeats, device)
    return {"device": device, "clients": clients, "alone": samples / a, "together": samples / t, "ceiling": samples / c}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", default="10,50")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads on the CPU")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (torch sees no CUDA GPU)"
    print(f"measured on {platform.node()}: {os.cpu_count()} CPUs ({args.threads} torch thread), GPU {gpu}, torch "
          f"{torch.__version__}; batch {args.batch} a client; samples/s, best of {args.repeats}")
    print(f"{'device':>6} {'clients':>7} {'alone':>9} {'together':>9} {'one batch':>10} {'together/alone':>15} "
          f"{'alone/ceiling':>14} {'together/ceiling':>17}")
    for device in devices:
        for clients in [int(c) for c in args.clients.split(",")]:
            r = measure(device, clients, args.batch, args.repeats)
            print(f"{device:>6} {clients:>7} {r['alone']:>9.0f} {r['together']:>9.0f} {r['ceiling']:>10.0f} "
                  f"{r['together'] / r['alone']:>14.2f}x {r['alone'] / r['ceiling']:>13.2f}x "
                  f"{r['together'] / r['ceiling']:>16.2f}x", flush=True)
    if "cuda" not in devices:
        print("cuda: skipped (no CUDA GPU here); the GPU target, together >= 5x alone, is unmeasured")


if __name__ == "__main__":
    main()
