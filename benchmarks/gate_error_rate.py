"""How often the promotion gate is wrong, for each model, from the noise its real seeds measured.

For each model and compared metric, metrics/seeds/<model>.json gives n, s and v; the rule's typical comparison has
the seeds' evaluation noise (σ_B² = v), and σ_T² = max(0, s² - v/2). With those sizes, mnistgen.gate_rate simulates
the gate (its own rule, gate.judge) and prints:

- T: the threshold of a typical comparison, in the metric's units;
- the false-promotion rate of a reseeded identical recipe (at most alpha, up to Monte Carlo error);
- the rate for the best of 10 reseeded trials: chosen on its first measurement and compared as one (the winner's
  curse), and as the gate treats a candidate it knows was chosen among 10 (measured again, at alpha / 10);
- the rate for a recipe whose seed spread is three times the seeded one's (the rule assumes the seeded spread);
- the power: the improvement the gate promotes 80 % of the time, and the power at 2 % and 5 % of the metric.

    python benchmarks/gate_error_rate.py            # every model of params.yaml, 100,000 rounds each
    python benchmarks/gate_error_rate.py --models gan --rounds 50000
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import replace
from pathlib import Path

from mnistgen import gate
from mnistgen.config import GateParams, GateSettings, load_section, model_names
from mnistgen.gate_rate import World, detectable, monte_carlo_error, simulate

ROOT = Path(__file__).resolve().parents[1]


def world_of(noise: gate.TrainingNoise) -> World:
    return World(training_sd=math.sqrt(noise.training_var), eval_sd=math.sqrt(noise.pair_eval_var), seeds=noise.seeds)


def rows(model: str, seeds_dir: Path, alpha: float, rounds: int) -> list[dict]:
    record = json.loads((seeds_dir / f"{model}.json").read_text())
    rule = load_section(GateParams, f"gate.{model}", ROOT / "params.yaml")
    out = []
    for metric in gate.compared_metrics(rule):
        noise = gate.TrainingNoise.from_record(metric, record["noise"][metric])
        world = world_of(noise)
        typical = gate.judge(gate.Comparison(metric, 0.0, world.eval_sd), noise, alpha, rule.higher_is_better)
        mean = record["spread"]["val"][metric]["mean"]
        out.append(
            {
                "model": model,
                "metric": metric,
                "n": noise.seeds,
                "s": noise.seed_sd,
                "eval_sd": world.eval_sd,
                "training_sd": world.training_sd,
                "threshold": typical.threshold,
                "rate": simulate(world, alpha, rounds),
                "best_of_10_naive": simulate(replace(world, trials=10, remeasure=False, told_trials=False), alpha, rounds),
                "best_of_10_gate": simulate(replace(world, trials=10), alpha, rounds),
                "spread_x3": simulate(replace(world, candidate_training_sd=3 * max(world.training_sd, 1e-12)), alpha, rounds),
                "detectable_80": detectable(world, alpha, 0.8),
                "power_2pct": simulate(replace(world, improvement=0.02 * abs(mean)), alpha, rounds),
                "power_5pct": simulate(replace(world, improvement=0.05 * abs(mean)), alpha, rounds),
                "mean": mean,
            }
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", help="keys of params.yaml's models (default: all)")
    parser.add_argument("--seeds", type=Path, default=ROOT / "metrics" / "seeds")
    parser.add_argument("--rounds", type=int, default=100_000)
    args = parser.parse_args()
    alpha = load_section(GateSettings, "gate", ROOT / "params.yaml").alpha
    print(
        f"alpha {alpha}; {args.rounds} simulated rounds per figure (Monte Carlo sd at alpha: {monte_carlo_error(alpha, args.rounds):.4f})"
    )
    print(
        "| model | metric | mean | n | s | σ_B | σ_T | threshold T | false promotions | best of 10, naive | best of 10, gate "
        "| spread x3 | 80 % power at | power at 2 % | power at 5 % |"
    )
    print("| --- " * 15 + "|")
    for model in args.models or model_names(ROOT / "params.yaml"):
        for r in rows(model, args.seeds, alpha, args.rounds):
            print(
                f"| {r['model']} | {r['metric']} | {r['mean']:.4g} | {r['n']} | {r['s']:.3g} | {r['eval_sd']:.3g} | "
                f"{r['training_sd']:.3g} | {r['threshold']:.3g} | {r['rate']:.4f} | {r['best_of_10_naive']:.4f} | "
                f"{r['best_of_10_gate']:.4f} | {r['spread_x3']:.4f} | {r['detectable_80']:.3g} | {r['power_2pct']:.3f} | "
                f"{r['power_5pct']:.3f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
