"""`mnistgen seeds`: the training noise of the default run, measured over training seeds.

Seed 0 is the pipeline's own run (models/<m>, metrics/val|test/<m>.json, evaluation/<m>/evidence.pt);
this command trains each model again with other values of train.seed, the same params otherwise,
and measures each with the evaluate stage's code (evaluation.measure) on both splits. It writes
metrics/seeds/<model>.json: every seed's headline metrics on validation and on test, their spread
(mean, standard deviation, min, max), the paired comparison of every pair of seeds on the gate's
metrics with the code and bootstrap the gate uses, and from them the gate's training noise of each
compared metric (`noise`: n, the seeds' standard deviation s, and the pairs' mean evaluation variance
v; mnistgen.gate). The spread beside each figure in the README and the report comes from these files.

    mnistgen seeds                 # seeds 1 to 4 of every model (about an hour on 2 CPU cores)
    mnistgen seeds --models gan --seeds 1 2 3
    mnistgen seeds --reuse         # only the evaluation changed: measure the kept weights again, train no seed

Run it after `dvc repro` whenever the training or evaluation code or params change. Each seed's weights are
kept in seeds/<model>/seed<N> with the digest of what dvc.lock records as train@<model>'s inputs (its code,
params and data); `--reuse` measures the kept weights again only where that digest is today's, and trains
the others.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
import yaml

from .. import comparison, data, evaluation, gate, grades, training
from ..card import HEADLINE
from ..config import EvaluateParams, GateParams, GateSettings, ParamsError, RunParams, load_section, model_names, read_params
from ..models import build_model, load_model_params, load_trained
from ..utils import StageError, evaluation_device, pick_device, seed_everything, sha256_json, write_json


def train_seed(name: str, seed: int, prepared: Path, device: torch.device):
    """models.<name> trained as the train stage trains it, with train.seed = `seed`."""
    run_params = load_section(RunParams, "train")
    seed_everything(seed, run_params.deterministic)
    train, val = data.load_split(prepared, "train"), data.load_split(prepared, "val")
    model = build_model(load_model_params(name)).to(device)
    training.train(
        model,
        data.to_float(train.images, device),
        data.to_float(val.images, device),
        seed=seed,
        progress=False,
        train_labels=train.labels.to(device),
        val_labels=val.labels.to(device),
    )
    return model.eval()


def training_inputs(name: str, lock: Path = Path("dvc.lock")) -> str | None:
    """What dvc.lock records as train@<name>'s inputs (code, params, data) as one digest: equal digests, the same
    training but for the seed. None where the lock has no such stage."""
    stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {}) if lock.exists() else {}
    stage = stages.get(f"train@{name}")
    return None if stage is None else sha256_json({"deps": stage.get("deps"), "params": stage.get("params")})


def seed_model(name: str, seed: int, folder: Path, prepared: Path, device: torch.device, reuse: bool):
    """Seed `seed` of models.<name>, loaded from `folder` as the evaluate stage loads a trained model: the kept
    weights with `reuse` where they were trained from today's inputs, else trained now and kept there."""
    inputs, record = training_inputs(name), folder / "inputs.json"
    kept = reuse and inputs is not None and record.exists() and json.loads(record.read_text()) == {"train": inputs}
    if not kept:
        model = train_seed(name, seed, prepared, device)
        folder.mkdir(parents=True, exist_ok=True)
        torch.save({k: v.cpu() for k, v in model.state_dict().items()}, folder / "weights.pt")
        (folder / "config.json").write_text(model.params.model_dump_json(indent=2) + "\n")
        write_json(record, {"train": inputs})
    print(f"seeds {name} seed {seed}: {'the kept weights' if kept else 'trained'}", flush=True)
    return load_trained(folder, device)


def spread(values: list[float]) -> dict[str, float]:
    return {
        "mean": statistics.fmean(values),
        "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
    }


def summarise(
    name: str, measured: dict[int, dict], evidence: dict[int, dict], refs: dict, rule: GateParams, settings: GateSettings
) -> dict:
    """The seeds file of one model: per-seed headline metrics, their spread, every pair's paired comparison, and the
    training noise of each metric the gate compares. `refs`: the validation images' features in each space."""
    seeds = sorted(measured)
    out: dict = {"model": name, "seeds": {}, "spread": {}, "pairs": [], "noise": {}}
    for seed in seeds:
        out["seeds"][str(seed)] = {
            split: {k: measured[seed][split][k] for k in HEADLINE if k in measured[seed][split]} for split in ("val", "test")
        }
    for split in ("val", "test"):
        keys = [k for k in HEADLINE if all(k in measured[s][split] for s in seeds)]
        out["spread"][split] = {k: spread([measured[s][split][k] for s in seeds]) for k in keys}
    compared = gate.compared_metrics(rule)
    for a, b in itertools.combinations(seeds, 2):
        comparisons = comparison.paired_comparisons(compared, evidence[b], evidence[a], refs, settings)
        out["pairs"].append({"champion": a, "candidate": b, "comparisons": [asdict(c) for c in comparisons]})
    for metric in compared:
        variances = [c["eval_sd"] ** 2 for pair in out["pairs"] for c in pair["comparisons"] if c["metric"] == metric]
        out["noise"][metric] = {
            "seeds": len(seeds),
            "seed_sd": out["spread"]["val"][metric]["sd"],
            "pair_eval_var": statistics.fmean(variances),
        }
    out["protocol"] = measured[seeds[0]]["val"]["protocol"]  # the gate's: validation
    out["protocols"] = {split: measured[seeds[0]][split]["protocol"] for split in ("val", "test")}
    out["recipe"] = grades.recipe_hash(read_params(), name)
    out["bootstrap"] = settings.bootstrap
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="mnistgen seeds", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", help="keys of params.yaml's models (default: all)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3, 4], help="train.seed values besides the pipeline's own")
    parser.add_argument("--data", type=Path, default=Path("data/prepared"))
    parser.add_argument("--evaluator", type=Path, default=Path("models/evaluator"))
    parser.add_argument("--out", type=Path, default=Path("metrics/seeds"))
    parser.add_argument("--keep", type=Path, default=Path("seeds"), help="each seed's weights and evidence (not in git)")
    parser.add_argument(
        "--reuse", action="store_true", help="measure a seed's kept weights again where they were trained from today's inputs"
    )
    args = parser.parse_args(argv)
    try:
        p = load_section(EvaluateParams, "evaluate")
        settings = load_section(GateSettings, "gate")
        own_seed = load_section(RunParams, "train").seed
        device = pick_device("auto")  # trains here, measures on the evaluation device
        measuring = evaluation_device()
        refs = {suffix: ref.feats for suffix, ref in evaluation.load_references(args.evaluator, "val").items()}
        for name in args.models or model_names():
            started = time.perf_counter()
            rule = load_section(GateParams, f"gate.{name}")
            measured = {
                own_seed: {split: json.loads(Path(f"metrics/{split}/{name}.json").read_text()) for split in ("val", "test")}
            }
            evidence = {
                own_seed: torch.load(Path("evaluation") / name / evaluation.EVIDENCE, map_location=measuring, weights_only=True)
            }
            for seed in args.seeds:
                folder = args.keep / name / f"seed{seed}"
                model = seed_model(name, seed, folder, args.data, device, args.reuse).to(measuring)
                with data.reading_test("seeds"):  # the spread beside each reported test figure
                    measured[seed], evidence[seed] = evaluation.measure(model, args.evaluator, args.data, p, measuring)
                torch.save(evidence[seed], folder / evaluation.EVIDENCE)
                print(f"seeds {name} seed {seed}: val fid_cls {measured[seed]['val']['fid_cls']:.3f}", flush=True)
            if len({m["val"]["protocol"] for m in measured.values()}) != 1:
                raise StageError(f"{name}: the seeds were measured under different protocols; run `dvc repro` first")
            summary = summarise(name, measured, evidence, refs, rule, settings)
            write_json(args.out / f"{name}.json", summary)
            val = summary["spread"]["val"]
            print(
                f"seeds {name}: {len(measured)} seeds in {time.perf_counter() - started:.0f} s; validation "
                + ", ".join(f"{k} {v['mean']:.4g} (sd {v['sd']:.3g}, {v['min']:.4g}..{v['max']:.4g})" for k, v in val.items())
            )
    except (StageError, ParamsError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
