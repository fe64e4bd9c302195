"""Input-space partitions: K non-empty, deterministic parts per strategy."""

import numpy as np
import pytest

from moekd_ray.partition import STRATEGIES, code_features, partition, partition_table

# Three kinds of C function of varied length, from three projects.
FUNCS = (
    [f"int add{i}(int a, int b) {{ return a + b * {i}; }}" + " " * (i % 7) for i in range(20)]
    + [f"void copy{i}(char *d, const char *s) {{ while (*s) *d++ = *s++; *d = 0; /* {'x' * i} */ }}" for i in range(20)]
    + [f"static void loop{i}(void) {{ for (int j = 0; j < {i}; j++) {{ if (j > 3) break; }} }}" * 3 for i in range(20)]
)
PROJECTS = ["FFmpeg"] * 25 + ["qemu"] * 20 + ["libav"] * 15
LABELS = np.array([i % 2 for i in range(len(FUNCS))])


def run(strategy, k=3, seed=0, funcs=FUNCS, projects=PROJECTS):
    return partition(funcs, projects, strategy, k=k, seed=seed, n_features=256)


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_k_nonempty_deterministic_parts(strategy):
    parts = run(strategy)
    assert parts.shape == (len(FUNCS),)
    assert sorted(set(parts.tolist())) == [0, 1, 2]
    np.testing.assert_array_equal(parts, run(strategy))


def test_the_config_accepts_exactly_the_strategies_there_are():
    from moekd_ray.config import PartitionStrategy

    assert set(STRATEGIES) == {s.value for s in PartitionStrategy}


def test_random_parts_are_balanced_and_seeded():
    parts = run("random")
    assert np.bincount(parts).tolist() == [20, 20, 20]
    assert not np.array_equal(parts, run("random", seed=1))


def test_kmeans_finds_the_three_kinds():
    parts = run("kmeans")
    for start in (0, 20, 40):
        assert len(set(parts[start:start + 20].tolist())) == 1
    assert len({parts[0], parts[20], parts[40]}) == 3


def test_length_parts_are_ordered_by_length():
    lengths = np.array([len(f) for f in FUNCS])
    parts = run("length", k=4)
    for j in range(3):
        assert lengths[parts == j].max() <= lengths[parts == j + 1].min()


def test_project_keeps_each_project_in_one_part():
    parts = run("project", k=2)
    for proj in set(PROJECTS):
        assert len({parts[i] for i, p in enumerate(PROJECTS) if p == proj}) == 1
    assert sorted(set(parts.tolist())) == [0, 1]


def test_project_needs_k_projects():
    with pytest.raises(ValueError, match="distinct projects"):
        run("project", k=4)


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_k_above_rows(strategy):
    with pytest.raises(ValueError, match="exceeds"):
        run(strategy, k=4, funcs=FUNCS[:3], projects=PROJECTS[:3])


def test_length_with_ties_reports_empty_part():
    with pytest.raises(ValueError, match="empty"):
        run("length", k=3, funcs=["int x;"] * 10, projects=[""] * 10)


def test_partition_table():
    parts = run("random")
    table = partition_table(parts, LABELS, 3)
    assert [row["part"] for row in table] == [0, 1, 2]
    assert sum(row["rows"] for row in table) == len(FUNCS)
    for row in table:
        assert row["vulnerable_share"] == pytest.approx(LABELS[parts == row["part"]].mean())


def test_code_features_are_unit_rows():
    x = code_features(FUNCS[:5], 64)
    assert x.shape == (5, 64)
    np.testing.assert_allclose(np.sqrt(x.multiply(x).sum(1)).A1, 1.0, rtol=1e-6)
