"""Router weights, the mixture, the balance term, router training, and the distillation loss."""

import numpy as np
import pytest
import scipy.sparse as sp
import torch
import torch.nn.functional as F

from moekd_ray.losses import kd_loss
from moekd_ray.router import balance_loss, gate_logits, mixture_probs, route, train_router, uniform_weights


pytestmark = pytest.mark.usefixtures("one_thread")


gen = torch.Generator().manual_seed(0)
LOGITS = torch.randn(8, 4, generator=gen)  # gate logits, N=8, K=4
EXPERTS = torch.randn(8, 4, 2, generator=gen) * 3  # expert logits [N, K, C]


@pytest.mark.parametrize("temperature, top_k", [(1.0, None), (0.3, None), (5.0, None), (1.0, 2), (2.0, 3)])
def test_route_rows_sum_to_one(temperature, top_k):
    w = route(LOGITS, temperature, top_k)
    assert w.shape == (8, 4) and (w >= 0).all()
    torch.testing.assert_close(w.sum(1), torch.ones(8))


def test_route_temperature_sharpens():
    assert route(LOGITS, 0.1).max(1).values.min() > route(LOGITS, 10.0).max(1).values.max()


def test_route_top1_is_one_hot_on_the_argmax():
    w = route(LOGITS, 1.0, top_k=1)
    torch.testing.assert_close(w, F.one_hot(LOGITS.argmax(1), 4).float())


@pytest.mark.parametrize("top_k", [1, 2, 3, 4])
def test_route_top_k_zeroes_the_rest(top_k):
    w = route(LOGITS, 1.0, top_k)
    assert ((w == 0).sum(1) == 4 - top_k).all()
    kept = w > 0
    assert (kept == (LOGITS >= LOGITS.topk(top_k, 1).values[:, -1:])).all()


def test_uniform_mixture_is_mean_of_expert_softmaxes():
    for t in (1.0, 4.0):
        p = mixture_probs(EXPERTS, uniform_weights(8, 4), temperature=t)
        torch.testing.assert_close(p, torch.softmax(EXPERTS / t, -1).mean(1))


def test_mixture_rows_sum_to_one():
    p = mixture_probs(EXPERTS, route(LOGITS, 1.0, 2), temperature=2.0)
    assert p.shape == (8, 2)
    torch.testing.assert_close(p.sum(1), torch.ones(8))


def test_one_hot_mixture_picks_that_expert():
    p = mixture_probs(EXPERTS, F.one_hot(torch.full((8,), 2), 4).float())
    torch.testing.assert_close(p, torch.softmax(EXPERTS[:, 2], -1))


def test_balance_loss():
    assert balance_loss(uniform_weights(10, 4)).item() == pytest.approx(0.0, abs=1e-6)
    all_to_one = F.one_hot(torch.zeros(10, dtype=torch.long), 4).float()
    assert balance_loss(all_to_one).item() == pytest.approx(3.0)
    # one-hot but spread evenly over experts: balanced on average
    assert balance_loss(F.one_hot(torch.arange(8) % 4, 4).float()).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.filterwarnings("ignore:Sparse invariant checks")
def test_router_learns_which_expert_to_trust():
    # Rows with feature A: expert 0 is right, expert 1 wrong; rows with feature B: the reverse.
    rng = np.random.default_rng(0)
    n = 200
    is_b = np.arange(n) % 2
    labels = rng.integers(0, 2, n)
    dense = np.zeros((n, 16), dtype=np.float32)
    dense[np.arange(n), is_b] = 1.0  # feature A = column 0, B = column 1
    dense[np.arange(n), 2 + rng.integers(0, 14, n)] = 0.5  # noise features
    right = np.where(labels[:, None] == np.arange(2), 3.0, -3.0)  # confident and correct logits [N, 2]
    expert_logits = np.stack([np.where(is_b[:, None] == 0, right, -right),
                              np.where(is_b[:, None] == 1, right, -right)], axis=1).astype(np.float32)
    x = sp.csr_matrix(dense)

    router = train_router(x, expert_logits, labels, hidden=16, temperature=1.0, top_k=None, balance_weight=0.01,
                          epochs=60, lr=0.05, seed=0)

    z, y = torch.from_numpy(expert_logits), torch.from_numpy(labels)

    def nll(w):
        return -torch.log(mixture_probs(z, w).gather(1, y[:, None])).mean().item()

    learned = route(torch.from_numpy(gate_logits(router, x)))
    assert nll(uniform_weights(n, 2)) == pytest.approx(0.69, abs=0.02)
    assert nll(learned) < 0.2
    assert (learned.argmax(1).numpy() == is_b).all()


@pytest.mark.filterwarnings("ignore:Sparse invariant checks")
def test_part_loss_teaches_the_gate_the_parts_the_label_likelihood_cannot():
    # Two experts with the same outputs: the mixture's likelihood is the same whatever the gate does, so it cannot
    # tell the gate which part a row is from; the part term can (part = feature column 0 or 1, plus noise).
    rng = np.random.default_rng(1)
    n = 300
    parts = np.arange(n) % 2
    dense = np.zeros((n, 16), dtype=np.float32)
    dense[np.arange(n), parts] = 1.0
    dense[np.arange(n), 2 + rng.integers(0, 14, n)] = 0.5
    logits = rng.normal(size=(n, 1, 2)).astype(np.float32).repeat(2, axis=1)  # [N, 2 experts, 2], identical experts
    labels = rng.integers(0, 2, n)
    x = sp.csr_matrix(dense)
    kwargs = dict(hidden=16, temperature=1.0, top_k=None, balance_weight=0.0, epochs=60, lr=0.05, seed=0)

    def follows_parts(router):
        return float((gate_logits(router, x).argmax(1) == parts).mean())

    rows = []
    taught = train_router(x, logits, labels, parts=parts, part_weight=1.0, on_epoch=rows.append, **kwargs)
    untaught = train_router(x, logits, labels, **kwargs)
    assert follows_parts(taught) == 1.0 and rows[-1]["part_accuracy"] == 1.0
    assert 0.2 < follows_parts(untaught) < 0.8  # its initialisation's guess: no signal moved it to the parts
    with pytest.raises(ValueError, match="part"):
        train_router(x, logits, labels, part_weight=1.0, **kwargs)


# ----------------------------------------------------------------------------------------------- kd_loss
S = torch.randn(6, 2, generator=gen) * 2  # student logits
P_T = torch.softmax(torch.randn(6, 2, generator=gen), -1)  # teacher probabilities (already at T)
Y = torch.tensor([0, 1, 1, 0, 1, 0])


def soft_reference(s, p_t, t):
    return t**2 * (p_t * (p_t.log() - torch.log_softmax(s / t, -1))).sum() / len(s)


def hard_reference(s, y):
    return -torch.log_softmax(s, -1)[torch.arange(len(y)), y].mean()


@pytest.mark.parametrize("t", [1.0, 10.0])
def test_kd_soft_only(t):
    torch.testing.assert_close(kd_loss(S, P_T, Y, t, alpha=0.0), soft_reference(S, P_T, t))


@pytest.mark.parametrize("t", [1.0, 10.0])
def test_kd_hard_only(t):
    torch.testing.assert_close(kd_loss(S, P_T, Y, t, alpha=1.0), hard_reference(S, Y))


@pytest.mark.parametrize("t, alpha", [(1.0, 0.3), (10.0, 0.5), (4.0, 0.9)])
def test_kd_mix(t, alpha):
    expected = alpha * hard_reference(S, Y) + (1 - alpha) * soft_reference(S, P_T, t)
    torch.testing.assert_close(kd_loss(S, P_T, Y, t, alpha), expected)


def test_kd_zero_when_student_matches_teacher():
    t = 10.0
    s = torch.log(P_T) * t  # softmax(s / T) == P_T
    assert kd_loss(s, P_T, Y, t, 0.0).item() == pytest.approx(0.0, abs=1e-5)
    assert kd_loss(S, P_T, Y, t, 0.0).item() > 1e-3
