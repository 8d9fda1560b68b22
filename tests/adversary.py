"""The project's own adversarial peer: a device client with a valid certificate whose replies can be malformed,
oversized, impersonating or poisoned, one attack per round, and an edge that can lie to its device.

Run as ``python tests/adversary.py device EDGE_ADDRESS CERTS DEVICE_ID ATTACK[,ATTACK...]``: the device plays
honestly except that in round ``r`` (from 0) it makes attack ``ATTACKS[r]`` at the call that attack targets.
"""

from __future__ import annotations

import json
import queue
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

from smartsplit.deploy import device as device_process
from smartsplit.deploy import smartsplit_pb2 as pb
from smartsplit.deploy.wire import decode, encode
from smartsplit.messages import Activation, DeviceResult, Update

# attack -> (the call it answers falsely, what the edge must report)
ATTACKS = {
    "flat-activation": ("forward", "device_malformed"),  # the activation's tensor flattened
    "impersonate": ("forward", "device_impersonation"),  # an activation under another device's id
    "nan-activation": ("forward", "device_malformed"),
    "flat-update": ("finish_round", "device_malformed"),  # a weight flattened: aggregation would fail on it
    "nan-update": ("finish_round", "device_malformed"),  # a non-finite update would poison the global model
    "oversized": ("end_step", "device_malformed"),  # a reply past the message limit the model implies
    "deep-json": ("end_step", "device_malformed"),  # JSON nested 20,000 levels deep
    "lying-tensor": ("end_step", "device_malformed"),  # a tensor whose declared shape does not match its bytes
    "python-type": ("end_step", "device_malformed"),  # a body naming a Python class
    "unasked": ("end_step", "device_malformed"),  # 49 replies nobody asked for after the one due
}


def _flatten_first(state: dict) -> dict:
    name = next(iter(state))
    return {**state, name: state[name].flatten()}


def _poison_first(state: dict) -> dict:
    name = next(iter(state))
    return {**state, name: torch.full_like(state[name], float("nan"))}


def crafted(attack: str, honest: pb.Payload) -> pb.Payload | list[pb.Payload]:
    """The reply the attacker sends instead of ``honest``."""
    if attack == "oversized":
        return encode("reply", {"junk": torch.zeros(8 << 20, dtype=torch.uint8)})
    if attack == "deep-json":
        return pb.Payload(kind="reply", body="[" * 20_000 + "]" * 20_000)
    if attack == "lying-tensor":
        return pb.Payload(kind="reply", body='{"$t":0}',
                          tensors=[pb.Tensor(dtype="float32", shape=[1 << 40, 1 << 40], data=b"1234")])
    if attack == "python-type":
        return pb.Payload(kind="reply", body=json.dumps({"$dc": "Popen", "fields": {"args": ["true"]}}))
    if attack == "unasked":
        return [honest] * 50
    _, reply = decode(honest)
    if attack in ("flat-activation", "impersonate", "nan-activation"):
        a: Activation = reply["activation"]
        tensor = {"flat-activation": a.tensor.flatten(), "nan-activation": a.tensor * float("nan")}.get(attack, a.tensor)
        device_id = a.device_id - 1 if attack == "impersonate" else a.device_id
        forged = Activation(device_id, a.step, a.micro_batch, a.last, tensor, a.labels, a.batch_size)
        return encode("reply", {**reply, "activation": forged})
    result: DeviceResult = reply
    change = _flatten_first if attack == "flat-update" else _poison_first
    units = {i: change(state) if i == 1 else state for i, state in result.update.units.items()}
    return encode("reply", DeviceResult(Update(units, result.update.samples), result.report, result.observations))


def attacking_answer(attacks: list[str]):
    """``deploy.device._answer``, lying once per round as ``attacks`` says."""
    honest_answer = device_process._answer
    state = {"round": -1, "done": set()}

    def answer(me, name, method, args):
        if method == "start_round":
            state["round"] = args["instructions"].round
        reply = honest_answer(me, name, method, args)
        rnd = state["round"]
        if 0 <= rnd < len(attacks) and rnd not in state["done"] and ATTACKS[attacks[rnd]][0] == method:
            state["done"].add(rnd)
            return crafted(attacks[rnd], reply)
        return reply

    return answer


class _FlatteningQueue(queue.Queue):
    """The device's outgoing queue, taking a list of payloads (the ``unasked`` attack) as several."""

    def put(self, item, block=True, timeout=None):
        for payload in item if isinstance(item, list) else [item]:
            super().put(payload, block, timeout)


def main(argv: list[str]) -> None:
    role, edge, certs, device_id, attacks = argv
    assert role == "device"
    device_process._answer = attacking_answer(attacks.split(","))
    device_process.queue = SimpleNamespace(Queue=_FlatteningQueue, Empty=queue.Empty)
    device_process.run_device(edge, int(device_id), Path(certs), device_process.DeviceOptions(retry_s=60))


if __name__ == "__main__":
    main(sys.argv[1:])
