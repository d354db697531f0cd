"""How often the gate's rule promotes: its false-promotion rate and its power, simulated on synthetic noise.

A `World` is the noise model the rule assumes, with its sizes given: every training run's metric is its
recipe's mean plus training noise (sd `training_sd`), and every measurement adds evaluation noise, so that the
paired difference of two measurements carries evaluation noise of sd `eval_sd`. One simulated round draws the
`seeds` runs that metrics/seeds would hold, the bootstrap's estimates of the evaluation noise (`bootstrap`
rounds), a champion and `trials` candidates of a recipe better by `improvement`; the best candidate on its first
measurement is, with `remeasure`, measured again on fresh samples; then gate.judge, the gate's own rule, decides.
The fraction of rounds promoted is the false-promotion rate when `improvement` is 0, and the power otherwise.

The test suite checks the rate against alpha on synthetic worlds; benchmarks/gate_error_rate.py prints the rate
and the power of each model from the sizes its real seeds measured.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from . import gate


@dataclass(frozen=True)
class World:
    training_sd: float  # σ_T of one training run of the seeded recipe
    eval_sd: float  # σ_E: the evaluation noise of a paired difference of two measurements
    seeds: int = 3  # n: training seeds behind the rule's estimate of the training noise
    bootstrap: int = 2000  # rounds behind each bootstrap estimate of the evaluation noise
    improvement: float = 0.0  # δ: how much better the candidates' recipe truly is (0: a reseeded identical recipe)
    trials: int = 1  # K: candidates of that recipe the best is chosen among, on their first measurement
    remeasure: bool = True  # with K > 1: the chosen candidate and the champion are measured again on fresh samples
    told_trials: bool = True  # the gate is told K (alpha / K); False: it believes K = 1
    candidate_training_sd: float | None = None  # the candidates' recipe's training noise, when not the seeded one's


def simulate(world: World, alpha: float, rounds: int = 20_000, seed: int = 0) -> float:
    """The fraction of `rounds` in which the gate promotes the best candidate of `world`."""
    rng = np.random.default_rng(seed)
    n, k = world.seeds, world.trials
    half = world.eval_sd / math.sqrt(2)  # each measurement's own evaluation noise: a difference of two has eval_sd
    cand_sd = world.training_sd if world.candidate_training_sd is None else world.candidate_training_sd
    seeded = rng.normal(0, world.training_sd, (rounds, n)) + rng.normal(0, half, (rounds, n))
    seed_sd = seeded.std(axis=1, ddof=1)
    pairs = n * (n - 1) // 2
    chi = rng.chisquare(world.bootstrap - 1, (rounds, pairs + 1)) / (world.bootstrap - 1)
    pair_eval_var = (world.eval_sd**2 * chi[:, :pairs]).mean(axis=1)
    eval_sd = world.eval_sd * np.sqrt(chi[:, pairs])
    champion = rng.normal(0, world.training_sd, rounds)
    trained = world.improvement + rng.normal(0, cand_sd, (rounds, k))
    first = trained + rng.normal(0, half, (rounds, k))
    best = first.argmax(axis=1)
    rows = np.arange(rounds)
    if world.remeasure and k > 1:  # fresh samples for both sides
        d = trained[rows, best] + rng.normal(0, half, rounds) - champion - rng.normal(0, half, rounds)
    else:  # the measurement the choice was made on, against the champion's
        d = first[rows, best] - champion - rng.normal(0, half, rounds)
    told = k if world.told_trials else 1
    promoted = 0
    for i in range(rounds):
        noise = gate.TrainingNoise("m", n, float(seed_sd[i]), float(pair_eval_var[i]))
        verdict = gate.judge(gate.Comparison("m", float(d[i]), float(eval_sd[i])), noise, alpha, True, told)
        promoted += verdict.outcome == gate.PROMOTE
    return promoted / rounds


def monte_carlo_error(rate: float, rounds: int) -> float:
    """The standard error of a simulated rate."""
    return math.sqrt(max(rate * (1 - rate), 1e-12) / rounds)


def detectable(world: World, alpha: float, power: float = 0.8, rounds: int = 4_000, seed: int = 0) -> float:
    """The smallest true improvement the gate promotes at least `power` of the time (bisection; the same draws at
    every step, so the simulated power grows with the improvement)."""
    scale = math.sqrt(2 * world.training_sd**2 + world.eval_sd**2)
    lo, hi = 0.0, scale
    while simulate(replace(world, improvement=hi), alpha, rounds, seed) < power:
        lo, hi = hi, 2 * hi
    for _ in range(12):
        mid = (lo + hi) / 2
        if simulate(replace(world, improvement=mid), alpha, rounds, seed) >= power:
            hi = mid
        else:
            lo = mid
    return hi
