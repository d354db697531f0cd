"""Typed params: strict, frozen, unknown keys refused, each family only its own fields, no defaults in code."""

import subprocess
import sys

import pytest
import yaml
from helpers import ROOT, repo_params, tiny_model_params, write_params, write_prepared

from mnistgen.config import EvaluateParams, ParamsError, flatten, model_names
from mnistgen.models import FAMILIES, load_model_params, model_params

MODELS = model_names(ROOT / "params.yaml")


def foreign_key(family: str) -> tuple[str, object]:
    """A key (and the value it has there) of another family's section in params.yaml that this family does not have."""
    own = set(FAMILIES[family].Params.model_fields)
    for section in repo_params()["models"].values():
        for key, value in section.items():
            if key not in own:
                return key, value
    raise AssertionError(f"every key of every section is also a field of {family}")


def test_the_repo_params_validate_and_every_family_is_used():
    used = set()
    for name in MODELS:
        params = load_model_params(name, ROOT / "params.yaml")
        assert type(params) is FAMILIES[params.family].Params
        used.add(params.family)
    assert used == set(FAMILIES)  # a family with no section in params.yaml is untested and untrained


@pytest.mark.parametrize("profile", [None, "params-smoke.yaml", "params-paper.yaml"])
def test_every_model_has_a_valid_gate_section_in_every_profile(profile, tmp_path):
    """promote reads gate.<model> for every model: a missing or incomplete gate section would only show at the last stage."""
    from mnistgen.config import GateParams, load_section
    from mnistgen.profiles import apply_profile

    params = ROOT / "params.yaml"
    if profile:
        params = tmp_path / "params.yaml"
        apply_profile(ROOT / profile, ROOT / "params.yaml", params)
    for name in model_names(params):
        load_model_params(name, params)
        load_section(GateParams, f"gate.{name}", params)


@pytest.mark.parametrize("family", MODELS)
def test_a_key_of_another_family_is_refused_naming_it(family):
    key, value = foreign_key(family)
    with pytest.raises(ParamsError, match=rf"^params.yaml: models.{family}.{key}: unknown key$"):
        model_params({**repo_params()["models"][family], key: value}, f"models.{family}")


@pytest.mark.parametrize("family", MODELS)
def test_a_wrong_type_or_missing_key_is_refused_naming_it(family):
    section = repo_params()["models"][family]
    with pytest.raises(ParamsError, match=rf"^params.yaml: models.{family}.lr: input should be a valid number, got 'fast'$"):
        model_params({**section, "lr": "fast"}, f"models.{family}")
    with pytest.raises(ParamsError, match=rf"^params.yaml: models.{family}.epochs: input should be a valid integer, got '8'$"):
        model_params({**section, "epochs": "8"}, f"models.{family}")  # strict: no string-to-number coercion
    with pytest.raises(ParamsError, match=rf"^params.yaml: models.{family}.lr_decay: input should be a valid boolean, got 1$"):
        model_params({**section, "lr_decay": 1}, f"models.{family}")
    with pytest.raises(ParamsError, match=rf"^params.yaml: models.{family}.latent_dim: missing key$"):
        model_params({k: v for k, v in section.items() if k != "latent_dim"}, f"models.{family}")


def test_an_unknown_family_lists_the_known_ones():
    known = ", ".join(FAMILIES)
    with pytest.raises(ParamsError, match=rf"models.x.family: unknown or missing model family 'dcgan' \(known: {known}\)"):
        model_params({**repo_params()["models"]["gan"], "family": "dcgan"}, "models.x")


def test_each_family_logs_only_its_own_fields():
    """What the train stage logs for a model (flatten of its loaded section) is exactly its family's fields."""
    logged = {}
    for name in model_names(ROOT / "params.yaml"):
        params = load_model_params(name, ROOT / "params.yaml")
        logged[name] = set(flatten({"model": params}))
        assert logged[name] == {f"model.{f}" for f in FAMILIES[params.family].Params.model_fields}, name
    assert "model.beta" in logged["vae"] and "model.beta" not in logged["gan"] | logged["wgan"] | logged["ae"]
    assert "model.gp_weight" in logged["wgan"] and "model.gp_weight" not in logged["gan"]
    assert "model.prior_mean_init" in logged["cvae"] and "model.prior_mean_init" not in logged["vae"]


def test_params_are_frozen_and_have_no_defaults_in_code():
    params = load_model_params("vae", ROOT / "params.yaml")
    with pytest.raises(Exception, match="frozen"):
        params.beta = 2.0
    section = repo_params()["evaluate"]
    for key in section:  # every evaluate key must come from params.yaml: dropping any one is an error
        with pytest.raises(ParamsError, match=rf"evaluate.{key}: missing key"):
            from mnistgen.config import validate_section

            validate_section(EvaluateParams, {k: v for k, v in section.items() if k != key}, "evaluate")


@pytest.mark.slow
@pytest.mark.parametrize("family", MODELS)
def test_dvc_repro_stops_at_once_on_a_key_of_another_family(tmp_path, family):
    """`dvc repro train@<family>` fails before any training with one line naming the key; nothing is written."""
    from mnistgen.commands import smoke

    work = smoke.make_workspace(tmp_path / "w", None)
    write_prepared(work / "data" / "prepared")
    (work / "data" / "validated.json").write_text("{}")  # the dependency that validate would have written
    key, value = foreign_key(family)
    models = yaml.safe_load((work / "params.yaml").read_text())["models"]
    write_params(work, models={**models, family: {**tiny_model_params(family), key: value}})
    result = smoke.dvc("repro", "--single-item", f"train@{family}", cwd=work, capture=True)
    assert result.returncode != 0
    errors = [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("error:")]
    assert errors == [f"error: params.yaml: models.{family}.{key}: unknown key"]
    assert not (work / "models" / family).exists() and not (work / "checkpoints" / family).exists()
    assert "epoch 1" not in result.stdout


def test_stage_script_refuses_a_bad_key_before_touching_mlflow(tmp_path):
    write_prepared(tmp_path / "data" / "prepared")
    write_params(tmp_path, models={"gan": {**tiny_model_params("gan"), "beta": 1.0}})
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mnistgen.stages.train",
            "gan",
            "--data",
            "data/prepared",
            "--out",
            "models/gan",
            "--curves",
            "curves/gan",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={"MNISTGEN_TRACKING": "on", "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db", "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == ["error: params.yaml: models.gan.beta: unknown key"]
    assert not (tmp_path / "mlflow.db").exists()
