"""Attacks on one function: identifier renaming (mhm, wir-random, alert) and structural edits (structural). Each
takes the same arguments and returns an `Outcome`:

  victim   BudgetedVictim: P(true class) per candidate function, never more than its query budget
  ids      Identifiers of the function (parsed once; `rename(mapping)` is cheap)
  p0       P(true class) of the original (already known: it is not charged to the budget)
  pool     substitute names (the training split's identifier vocabulary), rng: this example's generator

The attack succeeds when P(true class) drops below 0.5 (the predicted label flips).

mhm         Metropolis-Hastings renaming (Zhang et al., AAAI'20): pick an identifier, sample `candidates` names
            from the pool, propose one with probability proportional to 1 - P(true), accept it with probability
            min(1, (1 - P'(true)) / (1 - P(true))). The proposal-ratio term is taken as 1 (it would cost one more
            query per step), which makes this a greedy-leaning MH chain.
wir-random  Word-importance ranking then random substitution (the WIR-Random baseline): rank identifiers by the
            drop in P(true) when each is renamed to a random name, then, in that order, try `candidates` random
            pool names and keep the best if it lowers P(true).
structural  Semantics-preserving structural edits (attacks/structural.py), searched as MHM searches names: each step
            proposes `candidates` random edits of the current code (one batched query), picks one with probability
            proportional to 1 - P(true), accepts it with probability min(1, (1 - P'(true)) / (1 - P(true))). It
            renames nothing, so identifier canonicalisation cannot sidestep it. `ids` is used only for its code.
alert       ALERT-style (Yang et al., ICSE'22): "natural" substitutes are the pool names nearest to the identifier
            in the victim's own input-embedding space (cosine; ALERT uses CodeBERT's masked LM, which needs a
            pretrained MLM this machine does not have). A greedy pass over identifiers in importance order, then,
            if that fails, a genetic search over substitution maps with the remaining budget.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from moekd_ray.identifiers import Identifiers
from moekd_ray.attacks.structural import Structure
from moekd_ray.attacks.victim import BudgetedVictim

FLIP = 0.5


@dataclass
class Outcome:
    success: bool
    p_true: float                     # P(true class) of the returned code
    mapping: dict[str, str] = field(default_factory=dict)
    code: str = ""
    edits: list[str] = field(default_factory=list)  # structural edits made, in order (kind@byte)


def _fresh_names(pool: list[str], ids: Identifiers, used: set[str], n: int, rng: np.random.Generator) -> list[str]:
    """Up to `n` distinct pool names valid as new names in this function and not already used by the attack."""
    out: list[str] = []
    for j in rng.permutation(len(pool)):
        name = pool[j]
        if name not in used and ids.is_valid_new_name(name):
            out.append(name)
            if len(out) == n:
                break
    return out


def _importance(victim, ids, p0, pool, rng) -> list[str]:
    """Identifiers, most important first: the drop in P(true) when each alone gets a random pool name."""
    names = list(ids.names)
    subs = _fresh_names(pool, ids, set(), len(names), rng)
    names = names[: len(subs)]
    p = victim.query([ids.rename({n: s}) for n, s in zip(names, subs)])
    drop = np.full(len(names), -np.inf)
    drop[: len(p)] = p0 - p
    return [names[i] for i in np.argsort(-drop, kind="stable")]


def _metropolis_step(p: np.ndarray, p_cur: float, rng) -> int | None:
    """MHM's choice among scored proposals: index j drawn with probability proportional to 1 - P(true), accepted
    with probability min(1, (1 - P_j) / (1 - P_cur)); None when rejected."""
    score = 1.0 - p + 1e-9
    j = int(rng.choice(len(p), p=score / score.sum()))
    return j if rng.random() < min(1.0, score[j] / (1.0 - p_cur + 1e-9)) else None


def mhm(victim: BudgetedVictim, ids: Identifiers, p0: float, pool, rng, candidates: int, **_) -> Outcome:
    mapping, p_cur = {}, p0
    while victim.remaining > 0:
        name = ids.names[rng.integers(len(ids.names))]
        others = {v for k, v in mapping.items() if k != name}
        cands = _fresh_names(pool, ids, others, candidates, rng)
        p = victim.query([ids.rename({**mapping, name: c}) for c in cands])
        if len(p) == 0:
            break
        j = _metropolis_step(p, p_cur, rng)
        if j is not None:
            mapping, p_cur = {**mapping, name: cands[j]}, float(p[j])
            if p_cur < FLIP:
                break
    return Outcome(p_cur < FLIP, p_cur, mapping, ids.rename(mapping))


def structural(victim: BudgetedVictim, ids: Identifiers, p0: float, pool, rng, candidates: int, **_) -> Outcome:
    code, p_cur, edits = ids.code, p0, []
    while victim.remaining > 0:
        structure = Structure(code)
        cands, kinds = [], []
        for j in rng.permutation(len(structure.edits)):
            new = structure.apply(structure.edits[j])
            if new != code and structure.valid(new):
                cands.append(new)
                kinds.append(structure.edits[j].describe())
                if len(cands) == candidates:
                    break
        if not cands:
            break
        p = victim.query(cands)
        if len(p) == 0:
            break
        j = _metropolis_step(p, p_cur, rng)
        if j is not None:
            code, p_cur, edits = cands[j], float(p[j]), edits + [kinds[j]]
            if p_cur < FLIP:
                break
    return Outcome(p_cur < FLIP, p_cur, {}, code, edits)


def _greedy(victim, ids, p0, pool, rng, substitutes) -> tuple[dict, float]:
    """In importance order, give each identifier the substitute (from `substitutes(name, used)`) that lowers P(true)
    most, until the label flips or the budget is spent. Returns (mapping, P(true))."""
    mapping, p_cur = {}, p0
    for name in _importance(victim, ids, p0, pool, rng):
        if victim.remaining <= 0 or p_cur < FLIP:
            break
        cands = substitutes(name, set(mapping.values()))
        p = victim.query([ids.rename({**mapping, name: c}) for c in cands])
        if len(p) and p.min() < p_cur:
            j = int(p.argmin())
            mapping, p_cur = {**mapping, name: cands[j]}, float(p[j])
    return mapping, p_cur


def wir_random(victim: BudgetedVictim, ids: Identifiers, p0: float, pool, rng, candidates: int, **_) -> Outcome:
    mapping, p_cur = _greedy(victim, ids, p0, pool, rng,
                             lambda name, used: _fresh_names(pool, ids, used, candidates, rng))
    return Outcome(p_cur < FLIP, p_cur, mapping, ids.rename(mapping))


def alert(victim: BudgetedVictim, ids: Identifiers, p0: float, pool, rng, candidates: int, population: int,
          pool_vectors: np.ndarray, embed, **_) -> Outcome:
    # Natural substitutes: the `candidates` valid pool names nearest to each identifier.
    vectors = embed(ids.names)
    sims = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)) @ pool_vectors.T
    subs = {}
    for name, row in zip(ids.names, sims):
        subs[name] = [pool[j] for j in np.argsort(-row) if ids.is_valid_new_name(pool[j])][:candidates]

    # Greedy pass (ALERT's first stage).
    mapping, p_cur = _greedy(victim, ids, p0, pool, rng, lambda name, used: [c for c in subs[name] if c not in used])
    if p_cur < FLIP or victim.remaining <= 0:
        return Outcome(p_cur < FLIP, p_cur, mapping, ids.rename(mapping))

    # Genetic search (ALERT's second stage): individuals are substitution maps, fitness 1 - P(true).
    names = [n for n in ids.names if subs[n]]
    if not names:
        return Outcome(False, p_cur, mapping, ids.rename(mapping))

    def valid(ind: dict) -> bool:  # two identifiers may not take the same new name
        return len(set(ind.values())) == len(ind)

    def mutate(ind: dict) -> dict:
        name = names[rng.integers(len(names))]
        return {**ind, name: subs[name][rng.integers(len(subs[name]))]}

    pop = [mapping] + [mutate(mapping) for _ in range(population - 1)]
    pop = [ind for ind in pop if valid(ind)] or [mapping]
    fit = [1.0 - p_cur] + list(1.0 - victim.query([ids.rename(ind) for ind in pop[1:]]))
    pop = pop[: len(fit)]
    best = int(np.argmax(fit))
    while victim.remaining > 0 and 1.0 - fit[best] >= FLIP:
        weights = np.asarray(fit) + 1e-9
        children = []
        for _ in range(population):
            a, b = rng.choice(len(pop), size=2, p=weights / weights.sum())
            child = {n: (pop[a] if rng.random() < 0.5 else pop[b]).get(n) for n in names}
            child = mutate({n: s for n, s in child.items() if s is not None})
            if valid(child):
                children.append(child)
        if not children:
            break
        p = victim.query([ids.rename(c) for c in children])
        pop, fit = pop + children[: len(p)], fit + list(1.0 - p)
        keep = np.argsort(-np.asarray(fit), kind="stable")[:population]
        pop, fit = [pop[i] for i in keep], [fit[i] for i in keep]
        best = 0
    best_map, p_best = pop[best], 1.0 - fit[best]
    return Outcome(p_best < FLIP, float(p_best), best_map, ids.rename(best_map))


ATTACKS = {"mhm": mhm, "wir-random": wir_random, "alert": alert, "structural": structural}
RENAMING = ("mhm", "wir-random", "alert")  # the attacks that only rename identifiers
