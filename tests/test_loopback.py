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
