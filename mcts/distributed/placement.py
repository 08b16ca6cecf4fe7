"""Where workers can go: the cluster's address and each node's room for one more worker.

Pure functions over `ray.nodes()` records (no Ray import), so the rules are testable alone:
- a worker needs all of its reservation on ONE node (Ray never splits an actor), so room is
  counted per node, not from the cluster's totals;
- the check runs on the driver before any worker starts, so a request no node can meet
  (num_gpus=1 on a CPU-only cluster, a custom resource nobody advertises) is one clear error
  naming the setting, instead of actors that wait forever;
- after a loss, a replacement is started only where a node still has room; when none has,
  the run stops (everything finished is on disk) rather than waiting on a pending actor.
"""

from __future__ import annotations

import math
import socket
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

_EPS = 1e-9


def setting_name(resource: str) -> str:
    """The DistributedConfig key that asks for `resource`."""
    if resource == "CPU":
        return "distributed.worker_cpus"
    if resource == "GPU":
        return "distributed.worker_gpus"
    return f"distributed.worker_resources.{resource}"


def alive_nodes(nodes: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return [n for n in nodes if n.get("Alive")]


def node_capacity(resources: Mapping[str, float], request: Mapping[str, float]) -> int:
    """How many workers asking for `request` fit on a node with `resources` in total."""
    if not request:
        return 1 << 30  # asks for nothing: unbounded (the caller caps it)
    return min(int(math.floor(resources.get(k, 0.0) / v + _EPS)) for k, v in request.items())


def capacity_by_node(
    nodes: Iterable[Mapping[str, Any]], request: Mapping[str, float]
) -> dict[str, int]:
    """NodeID -> workers that fit there, for alive nodes only."""
    return {n["NodeID"]: node_capacity(n.get("Resources", {}), request) for n in alive_nodes(nodes)}


def free_slots(
    nodes: Iterable[Mapping[str, Any]],
    request: Mapping[str, float],
    ours: Sequence[str | None],
) -> int:
    """Workers that could still be placed, given the node ids of the ones we already hold.

    `ours` may contain None (a worker not placed yet): it is assumed to take a slot somewhere.
    Resources held by others are not seen (Ray's totals only), so this is an upper bound.
    """
    cap = capacity_by_node(nodes, request)
    used = Counter(n for n in ours if n is not None)
    free = sum(max(0, c - used.get(node, 0)) for node, c in cap.items())
    return max(0, free - sum(1 for n in ours if n is None))


def raylet_reachable(node: Mapping[str, Any], timeout_s: float = 2.0) -> bool:
    """Whether the node's raylet still accepts connections.

    Why: when a node crashes (power, kernel, network) rather than shutting down, Ray's GCS
    marks it dead only after its health checks fail (about 15 s by default), and meanwhile
    its actors' calls fail as "unavailable", like a crashed worker. A refused (or timed-out)
    connection to the raylet tells the two apart at once.
    """
    host, port = node.get("NodeManagerAddress"), node.get("NodeManagerPort")
    if not host or not port:
        return True  # nothing to probe: assume alive (the GCS will say otherwise)
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            return True
    except OSError:
        return False


def _fmt(request: Mapping[str, float]) -> str:
    return ", ".join(f"{k}={v:g}" for k, v in request.items()) or "nothing"


def explain_no_room(nodes: Iterable[Mapping[str, Any]], request: Mapping[str, float]) -> str:
    """Why no node can host a worker: the settings whose demand no node meets, with the fix."""
    alive = alive_nodes(nodes)
    if not alive:
        return "the Ray cluster has no alive node"
    short = []
    for k, v in request.items():
        best = max(n.get("Resources", {}).get(k, 0.0) for n in alive)
        if best + _EPS < v:
            fix = {
                "CPU": f"lower {setting_name(k)} (fractions are fine)",
                "GPU": f"set {setting_name(k)}=0 on a CPU-only cluster, or add GPU nodes "
                "(`ray start --num-gpus=N`)",
            }.get(
                k,
                f"start the nodes with `ray start --resources='{{\"{k}\": 1}}'` or drop "
                f"{setting_name(k)}",
            )
            short.append(
                f"{setting_name(k)}={v:g} asks for {v:g} {k} per worker, the largest of "
                f"{len(alive)} alive node(s) has {best:g}: {fix}"
            )
    if not short:  # each resource exists somewhere, but never all on one node
        short.append(
            f"no single node has all of {_fmt(request)} (a worker cannot span nodes): "
            "lower distributed.worker_cpus / worker_gpus / worker_resources"
        )
    return "; ".join(short)


def parse_address(address: str) -> tuple[str, int] | None:
    """(host, port) to probe for `address`, None for "auto"/"local" (Ray resolves those)."""
    if address in ("auto", "local"):
        return None
    rest = address.removeprefix("ray://")
    host, sep, port = rest.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(
            f"distributed.address={address!r}: expected 'auto', '<host>:<port>' (the head "
            "node's GCS, e.g. 10.0.0.1:6379) or 'ray://<host>:10001' (a remote client)"
        )
    return host.strip("[]"), int(port)


def check_address(address: str | None, timeout_s: float = 5.0) -> None:
    """Fail fast, before Ray starts, when nothing listens at `address`.

    ray.init on a dead address retries for a minute and then reports a GCS timeout; a TCP
    probe answers in milliseconds (refused) or `timeout_s` (unroutable) and names the fix.
    """
    if address is None:
        return
    target = parse_address(address)
    if target is None:
        return
    try:
        with socket.create_connection(target, timeout=timeout_s):
            pass
    except OSError as e:
        raise ConnectionError(
            f"distributed.address={address!r}: no Ray cluster answers at "
            f"{target[0]}:{target[1]} ({e.strerror or e}). Start one with `ray start --head "
            "--port=6379` (other nodes: `ray start --address=<head-ip>:6379`) and pass that "
            "address, or set distributed.address=null for a private Ray instance on this machine"
        ) from e
