"""The local Ray cluster, started as `moekd` starts it (ray_runtime.init_ray: the session's `ray_cluster`), serves
its dashboard and Jobs API, which run arbitrary code for whoever reaches them (CVE-2023-48022, "ShadowRay"), on
127.0.0.1 only: read from the listening sockets, as for the MLflow server in test_cluster_files.py."""

import socket
from pathlib import Path

import pytest

from servers import LOOPBACK, listening_addresses, other_address


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads listening sockets from /proc/net")
def test_local_ray_dashboard_listens_on_loopback_only(ray_cluster):
    host, port = ray_cluster._private.worker.get_dashboard_url().rsplit(":", 1)  # what ray.init() reports
    assert host == LOOPBACK
    assert listening_addresses(int(port)) == {LOOPBACK}
    socket.create_connection((LOOPBACK, int(port)), timeout=5).close()
    if (address := other_address()) is not None:
        with pytest.raises(OSError):
            socket.create_connection((address, int(port)), timeout=2).close()


def test_a_second_cluster_address_is_refused_not_ignored(ray_cluster):
    from moekd_ray.config import load_config
    from moekd_ray.errors import ConfigError
    from moekd_ray.ray_runtime import init_ray

    joined = ray_cluster.get_runtime_context().gcs_address
    init_ray(load_config(None, [f"ray.address={joined}"]))  # the cluster this process is in: fine
    with pytest.raises(ConfigError, match=f"ray.address=127.0.0.1:1, but this process is already connected to the "
                                          f"Ray cluster at {joined}"):
        init_ray(load_config(None, ["ray.address=127.0.0.1:1"]))
