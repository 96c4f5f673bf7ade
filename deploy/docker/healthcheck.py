"""Compose healthchecks, run inside a container (exit 0: healthy).

`head`: the learner container's Ray GCS answers and lists its head node alive.
`worker`: this carla-worker's raylet is registered and alive in the head's GCS, found by the
node-manager port actor-entrypoint.sh fixes (RAY_WORKER_PORT_BASE) and this node's IP.
Token authentication comes from RAY_AUTH_TOKEN in the container's environment, as for `ray start`.
"""

from __future__ import annotations

import os
import sys

from ray._raylet import GcsClient
from ray.core.generated.gcs_pb2 import GcsNodeInfo
from ray.util import get_node_ip_address


def alive_nodes(address: str) -> list:
    nodes = GcsClient(address=address).get_all_node_info(timeout=5).values()
    return [n for n in nodes if n.state == GcsNodeInfo.ALIVE]


def check(role: str) -> str | None:
    """Why `role` is unhealthy, or None."""
    if role == "head":
        address = f"127.0.0.1:{os.environ.get('RAY_PORT', '6380')}"
        if not any(n.is_head_node for n in alive_nodes(address)):
            return f"the GCS at {address} lists no live head node"
        return None
    address = os.environ.get("RAY_HEAD", "learner:6380")
    port = int(os.environ.get("RAY_WORKER_PORT_BASE", "6381"))
    ip = get_node_ip_address()
    if not any(n.node_manager_port == port and n.node_manager_address == ip for n in alive_nodes(address)):
        return f"no live node {ip}:{port} (this worker's raylet) in the cluster at {address}"
    return None


def main(argv: list[str]) -> int:
    if argv[1:] not in (["head"], ["worker"]):
        print("usage: healthcheck.py head|worker", file=sys.stderr)
        return 2
    try:
        reason = check(argv[1])
    except Exception as exc:  # a GCS that cannot be reached (or refuses the token) is unhealthy
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    if reason:
        print(f"unhealthy: {reason}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
