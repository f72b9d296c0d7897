"""Connecting a command to Ray: the ``--address``/``--num-cpus``/per-trial resource flags and one
``ray.init`` for ``ray-metaopt`` and ``ray-metaopt bench``.

Example:
    >>> parser = argparse.ArgumentParser()  # import argparse
    >>> add_ray_arguments(parser)
    >>> args = parser.parse_args(["--num-cpus", "2"])
    >>> started = init_ray(args.address, args.num_cpus)  # a local Ray, unless --address was given
"""

from __future__ import annotations

import os
import socket
from typing import Any

AUTH_HINT = (
    "ray-metaopt: the Ray cluster at {address} refused this driver (Ray 2.60 token authentication: "
    "InvalidAuthToken); connect with the cluster's token: RAY_AUTH_MODE=token and RAY_AUTH_TOKEN=<token> "
    "(or ~/.ray/auth_token); see docker/README.md, 'Token authentication'"
)


def add_ray_arguments(
    parser: Any,
    *,
    address_help: str = "Ray cluster to run on ('auto', 'ray://host:10001', 'host:6379'); default: start a local Ray",
    gpus_default: float | None = 0.0,
    gpus_help: str = "GPUs per trial, whole or fractional (default 0)",
) -> None:
    """Add ``--address``, ``--num-cpus``, ``--cpus-per-trial`` and ``--gpus-per-trial`` to an
    ``argparse`` parser or argument group."""
    parser.add_argument("--address", default=None, help=address_help)
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray (default: all)")
    parser.add_argument("--cpus-per-trial", type=float, default=1.0, help="CPUs per trial (default 1)")
    parser.add_argument("--gpus-per-trial", type=float, default=gpus_default, help=gpus_help)


def is_auth_refusal(error: BaseException, address: str) -> bool:
    """Whether ``ray.init(address=...)`` most likely failed for want of an auth token.

    Ray raises a bare ``ConnectionError`` (its ``InvalidAuthToken`` lines go only to the log), so
    this asks: is token mode off in this driver while something listens at ``address``?
    """
    if "auth" in str(error).lower():
        return True
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "token":
        return False
    host, _, port = address.rpartition(":")
    if address.startswith("ray://") or not host or not port.isdigit():
        # "auto": Ray found a recorded cluster address but could not talk to it.
        return address == "auto" and "failed to connect to ray cluster" in str(error).lower()
    try:
        with socket.create_connection((host, int(port)), timeout=2):
            return True
    except OSError:
        return False


def init_ray(address: str | None, num_cpus: int | None, *, log_to_driver: bool = True) -> bool:
    """Connect to ``address`` or start a local Ray; returns whether this call started it.

    A refusal for want of a token becomes one ``SystemExit`` line naming ``RAY_AUTH_MODE`` /
    ``RAY_AUTH_TOKEN`` and the cluster guide.
    """
    import ray

    if ray.is_initialized():
        return False
    if address:
        try:
            ray.init(address=address, log_to_driver=log_to_driver)
        except ConnectionError as e:
            if is_auth_refusal(e, address):
                raise SystemExit(AUTH_HINT.format(address=address)) from None
            raise
    else:
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=log_to_driver)
    return True
