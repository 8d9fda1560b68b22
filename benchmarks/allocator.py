"""Evaluation time with glibc's default allocator thresholds and with SmartSplit's (``runtime.allocator``), each
in a fresh process: the 10k Fashion-MNIST test images through benchmarks/throughput.py's CNN (seeded weights) at
the default evaluation batch (1,000), one thread, three passes each; the time is ``time.perf_counter`` around
``roles.central.evaluate``.

    .venv/bin/python benchmarks/allocator.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def child(batch: int) -> dict:
    import torch

    from smartsplit.config import load_config
    from smartsplit.data import load_data
    from smartsplit.roles.central import evaluate
    from smartsplit.runtime.allocator import tune_allocator

    sys.path.insert(0, str(HERE))
    from throughput import cnn

    tuned = tune_allocator()  # does nothing under SMARTSPLIT_MALLOC=default
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = cnn()
    _, test = load_data(load_config(str(HERE / "throughput.yaml"), []))
    times, result = [], None
    for _ in range(3):
        started = time.perf_counter()
        result = evaluate(model, test, batch)
        times.append(time.perf_counter() - started)
    return {"tuned": tuned, "times_s": times, "accuracy": result.accuracy, "loss": result.loss, "examples": len(test)}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        print(json.dumps(child(int(sys.argv[2]))))
        return
    batch = 1000
    rows = {}
    for label, setting in (("glibc defaults", "default"), ("smartsplit thresholds", "")):
        env = dict(os.environ, SMARTSPLIT_MALLOC=setting)
        out = subprocess.run([sys.executable, __file__, "--child", str(batch)], env=env, capture_output=True, text=True,
                             check=True)
        rows[label] = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"evaluation of {rows['glibc defaults']['examples']} test images at batch {batch}, 1 thread, 3 passes each:")
    for label, row in rows.items():
        print(f"  {label:<22} applied={row['tuned']!s:<5} " + " ".join(f"{t:.2f}" for t in row["times_s"])
              + f" s; accuracy {row['accuracy']:.4f} loss {row['loss']:.6f}")
    a, b = (min(r["times_s"]) for r in rows.values())
    same = rows["glibc defaults"]["loss"] == rows["smartsplit thresholds"]["loss"]
    print(f"best pass: {a:.2f} s -> {b:.2f} s ({a / b:.2f}x); same accuracy and loss: {same}")


if __name__ == "__main__":
    main()
