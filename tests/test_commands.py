"""Commands as a user types them, in a fresh process, that no other test starts that way (`moekd run`, `tune`,
`predict`, `registry`, `attack` and `benchmark --resume` are started so in their own modules)."""

import os
import re
import subprocess
import sys

from conftest import wait_until_idle


def test_python_m_moekd_ray_bench_prints_its_results(ray_cluster):
    """`python -m moekd_ray.bench` at a tiny size, joining the session's cluster through RAY_ADDRESS (as a user on a
    cluster node would): it fits the experts concurrently, sequentially and in a plain loop, and prints a figure for
    each."""
    wait_until_idle(ray_cluster)  # the bench fits K experts at 1 CPU each at once: the cluster's 2 CPUs
    args = ["--train-rows", "64", "--eval-rows", "16", "--epochs", "1", "--max-length", "32", "--hidden", "32",
            "--layers", "1", "--heads", "2", "--ffn", "64", "--vocab", "300"]
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}
    done = subprocess.run([sys.executable, "-m", "moekd_ray.bench", *args], capture_output=True, text=True,
                          timeout=800, env=env)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-4000:]
    assert "RESULTS" in out and "data:    " in out, out[-4000:]
    for stage in ("concurrent", "sequential expert_0", "sequential expert_1", "plain expert_0", "plain expert_1"):
        found = re.search(rf"== {stage}: (\d+\.\d) s", out) or re.search(rf"== {stage}: ([\d.]+) samples/s", out)
        assert found and float(found.group(1)) > 0, (stage, out[-4000:])
