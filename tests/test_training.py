"""The shared training loop: divergence, checkpoints, resume, determinism."""

import math

import pytest
import torch
from helpers import tiny

from mnistgen import training
from mnistgen.models import build_model
from mnistgen.utils import StageError, seed_everything


def params(family="vae", epochs=3, **schedule):
    return tiny(family, epochs=epochs, batch_size=16, arch="conv", width=4, **{"lr_warmup": 0.0, "lr_decay": False, **schedule})


def images(n=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 28, 28, generator=g)


def run(family, tmp_path, epochs=3, on_epoch=None, checkpoint=True, **schedule):
    seed_everything(0, deterministic=True)
    model = build_model(params(family, epochs, **schedule))
    ckpt = training.Checkpoint(tmp_path / "last.pt", {"family": family}) if checkpoint else None
    history = training.train(model, images(), images(32, 1), seed=0, checkpoint=ckpt, on_epoch=on_epoch, progress=False)
    return model, history


def test_nan_loss_stops_with_the_documented_message(tmp_path, monkeypatch):
    model = build_model(params("ae", epochs=2))
    original = model.train_step

    def poisoned(x, optimizers, step):
        out = original(x, optimizers, step)
        return {**out, "loss": out["loss"] * float("nan")} if step == 3 else out

    monkeypatch.setattr(model, "train_step", poisoned)
    ckpt = training.Checkpoint(tmp_path / "last.pt", {})
    with pytest.raises(
        training.DivergenceError, match="ae: training diverged: loss is nan in epoch 1; stopped, no model was saved or registered"
    ):
        training.train(model, images(), images(32), seed=0, checkpoint=ckpt, progress=False)
    assert not ckpt.path.exists()  # the diverged epoch was not checkpointed


@pytest.mark.parametrize(
    "family, schedule",
    [
        ("vae", {}),
        ("wgan", {}),
        ("ae", {"lr_warmup": 1.5, "lr_decay": True}),
        ("gan", {"ema_decay": 0.9}),
        ("vae", {"ema_decay": 0.9}),
    ],
)
def test_resume_after_interruption_equals_uninterrupted_run(tmp_path, family, schedule):
    reference, ref_history = run(family, tmp_path / "a", **schedule)

    def interrupt(epoch, metrics, model):
        if epoch == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(family, tmp_path / "b", on_epoch=interrupt, **schedule)
    resumed, history = run(family, tmp_path / "b", **schedule)
    assert [h["epoch"] for h in history] == [1, 2, 3]
    for key, value in reference.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key
    assert [h.get("loss", h.get("d_loss")) for h in history] == [h.get("loss", h.get("d_loss")) for h in ref_history]


def test_lr_factor_warms_up_then_decays_to_zero():
    assert [training.lr_factor(s, 10, 4, decay=False) for s in (0, 1, 3, 4, 9)] == [0.25, 0.5, 1.0, 1.0, 1.0]
    assert [training.lr_factor(s, 10, 4, decay=True) for s in (3, 4, 7, 9)] == pytest.approx([1.0, 1.0, 0.5, 1 / 6])
    assert [training.lr_factor(s, 4, 0, decay=True) for s in range(4)] == [1.0, 0.75, 0.5, 0.25]
    assert training.lr_factor(5, 10, 0, decay=False) == 1.0


def test_every_step_uses_the_scheduled_lr(monkeypatch):
    """6 steps an epoch for 2 epochs: 3 warm-up steps, then linear decay (the optimizer sees it)."""
    model = build_model(params("ae", epochs=2, lr_warmup=0.5, lr_decay=True))
    seen, original = [], model.train_step

    def record(x, optimizers, step):
        seen.append((step, optimizers["model"].param_groups[0]["lr"]))
        return original(x, optimizers, step)

    monkeypatch.setattr(model, "train_step", record)
    training.train(model, images(), images(32, 1), seed=0, progress=False)
    assert [s for s, _ in seen] == list(range(12))
    assert [lr for _, lr in seen] == pytest.approx([1e-3 * training.lr_factor(s, 12, 3, True) for s in range(12)])
    assert seen[2][1] == pytest.approx(1e-3) and seen[-1][1] == pytest.approx(1e-3 / 9)


def test_same_seed_same_result(tmp_path):
    a, _ = run("gan", tmp_path / "a", epochs=1, checkpoint=False)
    b, _ = run("gan", tmp_path / "b", epochs=1, checkpoint=False)
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


def test_corrupt_checkpoint_is_an_error_naming_it(tmp_path):
    path = tmp_path / "last.pt"
    path.write_bytes(b"this is not a checkpoint")
    with pytest.raises(StageError, match=f"{path}: corrupt checkpoint"):
        training.Checkpoint(path, {}).load()


def test_checkpoint_of_other_params_is_not_resumed(tmp_path, capsys):
    run("ae", tmp_path, epochs=1)
    assert training.Checkpoint(tmp_path / "last.pt", {"family": "other"}).load() is None
    assert "made with other params" in capsys.readouterr().out


@pytest.mark.parametrize("family", ["gan", "cwgan", "vae"])
def test_the_moving_average_follows_every_step_and_replaces_the_sampling_weights(family, monkeypatch):
    """ema_decay d: after training, the sampling weights are e_1 = w_1, e_t = d_t e_(t-1) + (1 - d_t) w_t over the raw
    weights w_t after each step (batch-norm statistics included), d_t = min(d, t / (9 + t)) warming up; the critic
    keeps its raw weights."""
    decay = 0.4  # the warm-up reaches it after 5 of the 12 steps: both regimes are exercised
    model = build_model(params(family, epochs=2, ema_decay=decay))
    labels = (torch.arange(96) % 10, torch.arange(32) % 10) if model.conditional else (None, None)
    raw_after_step, critic_after_step, original = [], [], training.step

    def record(model, *args, **kwargs):
        losses = original(model, *args, **kwargs)
        raw_after_step.append({k: v.clone() for k, v in model.averaged().state_dict().items()})
        if hasattr(model, "critic"):
            critic_after_step.append({k: v.clone() for k, v in model.critic.state_dict().items()})
        return losses

    monkeypatch.setattr(training, "step", record)
    training.train(model, images(), images(32, 1), seed=0, progress=False, train_labels=labels[0], val_labels=labels[1])
    assert len(raw_after_step) == 2 * (96 // 16)
    expected = dict(raw_after_step[0])
    for t, weights in enumerate(raw_after_step[1:], start=1):  # t updates averaged so far
        d = min(decay, (1 + t) / (10 + t))
        expected = {k: v if not v.is_floating_point() else d * v + (1 - d) * weights[k] for k, v in expected.items()}
    final = model.averaged().state_dict()
    for key, value in expected.items():
        if value.is_floating_point():
            assert torch.allclose(final[key], value, atol=1e-6), key
    assert any(not torch.allclose(final[k], raw_after_step[-1][k]) for k in expected if expected[k].is_floating_point())
    if critic_after_step:  # the critic is not averaged
        assert all(torch.equal(v, critic_after_step[-1][k]) for k, v in model.critic.state_dict().items())


def test_each_rank_resumes_with_its_own_rng_states(tmp_path, monkeypatch):
    """Rank 0 writes the checkpoint, every other rank its own RNG states beside it: a resume gives each rank its own."""
    from mnistgen import distributed

    checkpoint = training.Checkpoint(tmp_path / "last.pt", {"params": "p"})
    model = build_model(tiny("vae"))
    optimizers = model.make_optimizers()
    schedules = training.schedules(optimizers, 4, 1, 0.0, False)
    shuffle = torch.Generator().manual_seed(0)
    torch.manual_seed(100)
    rank0 = torch.get_rng_state()
    checkpoint.save(model, optimizers, schedules, 2, [], shuffle)
    monkeypatch.setattr(distributed, "rank", lambda: 1)
    torch.manual_seed(101)
    rank1 = torch.get_rng_state()
    checkpoint.save_rank_rng(2)
    assert checkpoint.rank_path(1).name == "last.rank1.pt"

    state = checkpoint.load()
    torch.manual_seed(999)
    training.restore(state, model, optimizers, schedules, shuffle, own_rng=checkpoint.rank_rng(2))
    assert torch.equal(torch.get_rng_state(), rank1)  # rank 1 resumes with its own states, not rank 0's
    assert checkpoint.rank_rng(3) is None  # states of another epoch are never taken
    monkeypatch.setattr(distributed, "rank", lambda: 0)
    training.restore(state, model, optimizers, schedules, shuffle, own_rng=checkpoint.rank_rng(2))
    assert torch.equal(torch.get_rng_state(), rank0)


@pytest.mark.parametrize("family, eager", [("wgan", {"critic"}), ("cwgan", {"critic"}), ("gan", set()), ("vae", set())])
def test_compiling_leaves_eager_only_what_is_differentiated_twice(family, eager):
    """A Wasserstein critic's gradient penalty needs a double backward, which compiled graphs do not support: WGAN's
    and CWGAN's critics stay eager, everything else is compiled (nn.Module.compile is lazy: nothing is traced here)."""
    model = build_model(tiny(family))
    compiled = set(training.compile_in_place(model))
    children = dict(model.named_children())
    assert compiled == set(children) - eager
    assert all((children[name]._compiled_call_impl is None) == (name in eager) for name in children)


def test_every_epoch_callback_sees_the_averaged_weights_the_run_keeps(tmp_path):
    """on_epoch runs once per epoch in the main process, with the moving average in place: the last epoch's view is the
    model that is kept, not the raw weights (handed out through raw_weights)."""
    model = build_model(tiny("gan", ema_decay=0.9))
    seen, raw = [], {}
    training.train(
        model,
        images(),
        images(32, 1),
        seed=0,
        on_epoch=lambda epoch, row, m: seen.append((epoch, {k: v.clone() for k, v in m.averaged().state_dict().items()})),
        progress=False,
        raw_weights=raw,
    )
    assert [epoch for epoch, _ in seen] == list(range(1, model.params.epochs + 1))
    kept = model.averaged().state_dict()
    assert all(torch.equal(seen[-1][1][k], kept[k]) for k in kept)
    assert any(not torch.equal(raw[k], kept[k]) for k in kept if kept[k].is_floating_point())


@pytest.mark.parametrize(("precision", "matmul_dtype"), [("bf16", torch.bfloat16), ("fp32", torch.float32)])
def test_precision_sets_the_steps_autocast_and_leaves_weights_and_losses_fp32(precision, matmul_dtype):
    seed_everything(0)
    model = build_model(params("vae", epochs=1, precision=precision))
    seen: set[torch.dtype] = set()
    model.encoder.register_forward_hook(lambda module, inputs, output: seen.add(output.dtype))
    history = training.train(model, images(), images(32, 1), seed=0, progress=False)
    assert seen == {matmul_dtype}  # every training step's and validation pass's encoder ran in the precision's dtype
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(math.isfinite(v) for v in history[-1].values())
