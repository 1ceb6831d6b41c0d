"""Starting or joining Ray for a command, and leaving it as it was found."""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

from radiodiff.config import RayConfig


@contextlib.contextmanager
def ray_session(cfg: RayConfig) -> Iterator[None]:
    """Start a local Ray instance (``address=None``) or join a cluster (``address=auto`` or host:port).

    An already initialised Ray (a caller running several stages) is reused and left running.
    """
    import ray

    if ray.is_initialized():
        yield
        return
    if cfg.address:
        if os.environ.get("RAY_AUTH_MODE") == "token" and not (
            os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.exists(os.path.expanduser("~/.ray/auth_token"))
        ):
            raise FileNotFoundError(
                "RAY_AUTH_MODE=token but no token found: set RAY_AUTH_TOKEN_PATH to the cluster's token file"
            )
        ray.init(address=cfg.address, log_to_driver=False)
    else:
        # "local": a new instance of our own, even where another user's Ray runs on this machine
        # (ray.init() without an address would join that one).
        ray.init(address="local", num_cpus=cfg.num_cpus, include_dashboard=False, log_to_driver=False)
    nodes = [node for node in ray.nodes() if node.get("Alive")]
    cpus = sum(node.get("Resources", {}).get("CPU", 0) for node in nodes)
    print(f"Ray: {len(nodes)} node{'s' if len(nodes) != 1 else ''}, {cpus:g} CPUs", flush=True)
    try:
        yield
    finally:
        ray.shutdown()
