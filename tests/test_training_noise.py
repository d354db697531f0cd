"""What holds bit for bit, and what holds within the training noise.

Bit for bit (the same commit on the same CPU): training twice with one seed gives the same weights, and
measuring them twice the same metrics. Within the noise (another seed, or another CPU, whose floats
differ): metrics/seeds/ holds the default run retrained with other seeds (`mnistgen seeds`), measured
under the run's own protocol, and from them the gate's training noise of each compared metric (n, s, v).
"""

import json
import statistics

import pytest
import torch
from helpers import ROOT, pin_tiny_evaluators, tiny, tiny_evaluation_sections, write_prepared

from mnistgen import data, evaluation, gate, training
from mnistgen.config import EvaluateParams, GateParams, GateSettings, load_section, model_names
from mnistgen.models import build_model

MODELS = model_names(ROOT / "params.yaml")


def seeds_of(name: str) -> dict:
    return json.loads((ROOT / "metrics" / "seeds" / f"{name}.json").read_text())


@pytest.mark.parametrize("name", MODELS)
def test_the_seeds_were_measured_like_the_run_and_give_the_gates_noise(name):
    seeds = seeds_of(name)
    assert len(seeds["seeds"]) >= 3
    assert seeds["protocol"] == json.loads((ROOT / "metrics" / "val" / f"{name}.json").read_text())["protocol"]
    rule = load_section(GateParams, f"gate.{name}", ROOT / "params.yaml")
    assert seeds["bootstrap"] == load_section(GateSettings, "gate", ROOT / "params.yaml").bootstrap >= 2000
    assert len(seeds["pairs"]) == len(seeds["seeds"]) * (len(seeds["seeds"]) - 1) // 2
    assert all([c["metric"] for c in pair["comparisons"]] == gate.compared_metrics(rule) for pair in seeds["pairs"])
    for metric, noise in seeds["noise"].items():  # n, s and v are what the seeds and their pairs say
        assert noise["seeds"] == len(seeds["seeds"])
        assert noise["seed_sd"] == statistics.stdev(s["val"][metric] for s in seeds["seeds"].values())
        variances = [c["eval_sd"] ** 2 for pair in seeds["pairs"] for c in pair["comparisons"] if c["metric"] == metric]
        assert noise["pair_eval_var"] == pytest.approx(statistics.fmean(variances))
    assert sorted(seeds["noise"]) == sorted(gate.compared_metrics(rule))


@pytest.mark.parametrize("name", MODELS)
def test_no_pair_of_seeds_promotes_or_regresses_the_other(name):
    """Every pair of seeds, both ways round, through the gate's own rule and the seeds' own noise."""
    seeds = seeds_of(name)
    rule = load_section(GateParams, f"gate.{name}", ROOT / "params.yaml")
    alpha = load_section(GateSettings, "gate", ROOT / "params.yaml").alpha
    for pair in seeds["pairs"]:
        for c in pair["comparisons"]:
            noise = gate.TrainingNoise.from_record(c["metric"], seeds["noise"][c["metric"]])
            for difference in (c["difference"], -c["difference"]):
                verdict = gate.judge(gate.Comparison(c["metric"], difference, c["eval_sd"]), noise, alpha, rule.higher_is_better)
                assert verdict.outcome == gate.INCONCLUSIVE, (name, pair["champion"], pair["candidate"], verdict.text())


def test_the_pair_check_above_can_fail():
    """Without training noise and with a tiny evaluation noise, the GAN's widest pair would promote one seed."""
    gan = seeds_of("gan")
    widest = max((c for pair in gan["pairs"] for c in pair["comparisons"]), key=lambda c: abs(c["difference"]))
    quiet = gate.TrainingNoise(widest["metric"], 3, 0.0, 0.0)
    comparison = gate.Comparison(widest["metric"], -abs(widest["difference"]), 1e-6)
    assert gate.judge(comparison, quiet, 0.05, higher_is_better=False).outcome == gate.PROMOTE


def test_the_same_seed_on_the_same_cpu_gives_the_same_weights_and_metrics_bit_for_bit(tmp_path, monkeypatch):
    write_prepared(tmp_path / "data" / "prepared")
    pinned = pin_tiny_evaluators(tmp_path)
    monkeypatch.chdir(tmp_path)
    import subprocess
    import sys

    from helpers import TINY_PINNED, write_params

    write_params(tmp_path, **tiny_evaluation_sections())
    subprocess.run(
        [sys.executable, "-m", "mnistgen.stages.reference", "--data", "data/prepared", "--evaluators", TINY_PINNED]
        + ["--out", "models/evaluator", "--metrics", "metrics/evaluator.json"],
        check=True,
        capture_output=True,
    )
    assert pinned.exists()
    train, val = data.load_split("data/prepared", "train"), data.load_split("data/prepared", "val")
    params = load_section(EvaluateParams, "evaluate")
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        model = build_model(tiny("vae", epochs=2))
        training.train(model, data.to_float(train.images), data.to_float(val.images), seed=0, progress=False)
        with data.reading_test("evaluate"):
            measured, _ = evaluation.measure(
                model.eval(), tmp_path / "models/evaluator", tmp_path / "data/prepared", params, "cpu"
            )
        runs.append((model.state_dict(), measured))
    (first, a), (second, b) = runs
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert a == b


def test_seeds_reuse_kept_weights_only_when_the_training_inputs_are_todays(tmp_path, monkeypatch):
    """`mnistgen seeds --reuse` measures a kept seed again without training it only while dvc.lock records the
    same train@<model> inputs it was trained from; otherwise (or without --reuse) the seed is trained again."""
    from mnistgen.commands import seeds

    monkeypatch.chdir(tmp_path)
    lock = {
        "stages": {
            "train@vae": {
                "cmd": "train",
                "deps": [{"path": "src/mnistgen/training.py", "md5": "a"}],
                "params": {"params.yaml": {"models.vae": {"lr": 0.01}}},
            }
        }
    }
    (tmp_path / "dvc.lock").write_text(json.dumps(lock))  # JSON is YAML
    trained = []

    def train_seed(name, seed, prepared, device):
        trained.append(seed)
        torch.manual_seed(len(trained))  # each training gives other weights
        return build_model(tiny("vae"))

    monkeypatch.setattr(seeds, "train_seed", train_seed)
    folder = tmp_path / "seeds" / "vae" / "seed1"

    def weights(model):
        return [v.clone() for v in model.state_dict().values()]

    first = weights(seeds.seed_model("vae", 1, folder, tmp_path, torch.device("cpu"), reuse=True))  # nothing kept yet
    again = weights(seeds.seed_model("vae", 1, folder, tmp_path, torch.device("cpu"), reuse=True))
    assert trained == [1] and all(torch.equal(a, b) for a, b in zip(first, again))  # the kept weights, measured again
    seeds.seed_model("vae", 1, folder, tmp_path, torch.device("cpu"), reuse=False)
    assert trained == [1, 1]  # without --reuse every seed trains
    lock["stages"]["train@vae"]["params"]["params.yaml"]["models.vae"]["lr"] = 0.02  # the training changed
    (tmp_path / "dvc.lock").write_text(json.dumps(lock))
    changed = weights(seeds.seed_model("vae", 1, folder, tmp_path, torch.device("cpu"), reuse=True))
    assert trained == [1, 1, 1] and not all(torch.equal(a, b) for a, b in zip(first, changed))
    (tmp_path / "dvc.lock").unlink()  # no record of the inputs: nothing can be reused
    seeds.seed_model("vae", 1, folder, tmp_path, torch.device("cpu"), reuse=True)
    assert trained == [1, 1, 1, 1]
