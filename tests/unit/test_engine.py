"""Training engine: learning, reproducibility, resume after a kill, checkpoints, hooks, EMA, inference."""

from __future__ import annotations

import itertools
import logging
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from semiprune_core.errors import ConfigError
from semiprune_core.models import create_model
from semiprune_core.training import (
    Hook,
    Objective,
    Schedule,
    SupervisedObjective,
    evaluate,
    fit,
    predict,
    resolve_device,
    to_float,
)
from semiprune_core.training import engine
from semiprune_core.training.engine import CHECKPOINT_NAME, resolve_precision

SIZE, CLASSES = 16, 3


def blobs(n: int, *, seed: int = 0, channels: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Three noisy shape classes (horizontal bar, vertical bar, centre blob) that survive flips and
    small shifts: (n, C, 16, 16) uint8, (n,) int64."""
    g = torch.Generator().manual_seed(seed)
    r = torch.arange(SIZE, dtype=torch.float32) - (SIZE - 1) / 2
    bar = torch.exp(-(r / 2.5) ** 2)
    prototypes = torch.stack([bar[:, None].expand(SIZE, SIZE), bar[None, :].expand(SIZE, SIZE), bar[:, None] * bar[None, :]])
    y = torch.randint(0, CLASSES, (n,), generator=g)
    x = 200 * prototypes[y, None].expand(n, channels, SIZE, SIZE) + 30 + torch.randn(n, channels, SIZE, SIZE, generator=g) * 50
    return x.clamp(0, 255).to(torch.uint8), y


def mlp(seed: int = 0):
    return create_model("mlp", in_channels=1, num_classes=CLASSES, image_size=SIZE, hidden=32, seed=seed)


def cnn(seed: int = 0):
    return create_model("fastcnn", in_channels=1, num_classes=CLASSES, image_size=SIZE, widths=(8, 16, 32), seed=seed)


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_weights(a, b):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


SCHEDULE = Schedule(epochs=4, batch_size=64, lr=0.05, warmup=0.1)


@pytest.fixture(scope="module")
def data():
    return blobs(400)


def test_models_learn_blobs(data):
    x, y = data
    x_test, y_test = blobs(300, seed=1)
    for model in (mlp(), cnn()):
        result = fit(model, SupervisedObjective(x, y, view="weak", padding=1), SCHEDULE, seed=0, device="cpu")
        assert evaluate(result.model, x_test, y_test) > 0.8  # chance is 1/3
        assert result.history[-1]["loss"] < result.history[0]["loss"]
        assert [h["epoch"] for h in result.history] == [0, 1, 2, 3]
        assert result.sample_passes == 4 * len(x)
        assert not result.resumed and result.start_epoch == 0 and not result.stopped_early


def test_same_seed_same_weights_other_seed_other_weights(data):
    x, y = data
    runs = [fit(cnn(), SupervisedObjective(x, y, view="strong"), SCHEDULE, seed=s, device="cpu").model for s in (7, 7, 8)]
    assert_same_weights(runs[0], runs[1])
    assert not torch.equal(runs[0].head.weight, runs[2].head.weight)


def test_auto_precision_is_bf16_only_where_the_cpu_computes_it_natively(monkeypatch):
    monkeypatch.setattr(engine, "cpu_has_native_bf16", lambda: False)
    assert resolve_precision("auto", "cpu") is None  # emulated bf16 would be slower than fp32
    monkeypatch.setattr(engine, "cpu_has_native_bf16", lambda: True)
    assert resolve_precision("auto", "cpu") == torch.bfloat16
    assert resolve_precision("fp32", "cpu") is None and resolve_precision("bf16", "cpu") == torch.bfloat16
    with pytest.raises(ConfigError, match="unknown precision 'fp16'"):
        resolve_precision("fp16", "cpu")


def test_bf16_training_learns_like_fp32_and_says_which_it_ran(data):
    x, y = data
    x_test, y_test = blobs(300, seed=1)
    runs = {p: fit(cnn(), SupervisedObjective(x, y, view="weak", padding=1), SCHEDULE, seed=0, device="cpu", precision=p)
            for p in ("fp32", "bf16")}
    assert {p: r.precision for p, r in runs.items()} == {"fp32": "fp32", "bf16": "bf16"}
    assert all(p.dtype == torch.float32 for p in runs["bf16"].model.parameters())  # weights stay fp32
    acc = {p: evaluate(r.model, x_test, y_test, precision=p) for p, r in runs.items()}
    assert acc["bf16"] > 0.8 and abs(acc["bf16"] - acc["fp32"]) < 0.05
    logits = predict(runs["bf16"].model, x_test, precision="bf16")
    assert logits.dtype == torch.float32  # outputs are float32 whatever ran inside
    torch.testing.assert_close(logits, predict(runs["bf16"].model, x_test, precision="fp32"), atol=0.15, rtol=0.05)


def test_a_compiled_model_trains_like_the_eager_one_and_checkpoints_the_same_keys(data, tmp_path):
    x, y = data
    objective = lambda: SupervisedObjective(x, y, view="weak", padding=1)  # noqa: E731
    eager = fit(mlp(), objective(), SCHEDULE, seed=0, device="cpu", precision="fp32")
    compiled = fit(mlp(), objective(), SCHEDULE, seed=0, device="cpu", precision="fp32", compile=True,
                   checkpoint_dir=tmp_path, run_key="k", keep_checkpoint=True)
    assert weights(compiled.model).keys() == weights(eager.model).keys()  # no "_orig_mod." prefix
    for a, b in zip(eager.history, compiled.history):  # fused kernels may round differently, nothing more
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-3, abs=1e-4)
    x_test = blobs(300, seed=1)[0]
    assert (predict(compiled.model, x_test).argmax(1) == predict(eager.model, x_test).argmax(1)).float().mean() > 0.99
    again = fit(mlp(), objective(), SCHEDULE, seed=0, device="cpu", precision="fp32", checkpoint_dir=tmp_path,
                run_key="k")  # an eager run resumes the compiled run's checkpoint
    assert again.resumed and again.start_epoch == SCHEDULE.epochs


def test_stop_after_trains_exactly_the_first_epochs_of_the_full_schedule(data):
    x, y = data
    at_epoch_2 = {}

    class Snapshot(Hook):
        def on_epoch_end(self, epoch, model):
            if epoch == 1:
                at_epoch_2.update(weights(model))

    full = fit(cnn(), SupervisedObjective(x, y), SCHEDULE, seed=3, device="cpu", hooks=[Snapshot()])
    early = fit(cnn(), SupervisedObjective(x, y), Schedule(**{**SCHEDULE.__dict__, "stop_after": 2}), seed=3, device="cpu")
    assert early.epochs_completed == 2 and not early.stopped_early and early.sample_passes == 2 * len(x)
    assert [h["lr"] for h in early.history] == [h["lr"] for h in full.history[:2]]  # not re-annealed over 2 epochs
    assert weights(early.model).keys() == at_epoch_2.keys()
    for k, v in weights(early.model).items():
        assert torch.equal(v, at_epoch_2[k]), k
    with pytest.raises(ConfigError, match="stop_after must be a positive integer"):
        Schedule(epochs=4, stop_after=0)


class Recorder(Hook):
    def __init__(self):
        self.batches, self.epochs, self.starts = [], [], []

    def on_fit_start(self, start_epoch, model):
        self.starts.append(start_epoch)

    def on_batch_end(self, epoch, indices, logits, targets):
        self.batches.append((epoch, indices.clone(), logits.clone(), targets.clone()))

    def on_epoch_end(self, epoch, model):
        self.epochs.append(epoch)


def test_hooks_see_every_index_once_per_epoch_with_training_logits(data):
    x, y = data
    ids = torch.arange(len(x)) * 10 + 5  # e.g. pool indices of a training subset
    rec = Recorder()
    fit(mlp(), SupervisedObjective(x, y, ids=ids), Schedule(epochs=2, batch_size=70, lr=0.05), seed=0, device="cpu", hooks=[rec])
    assert rec.starts == [0] and rec.epochs == [0, 1]
    assert len(rec.batches) == 2 * 6  # ceil(400 / 70) near-equal batches per epoch
    for epoch in (0, 1):
        seen = torch.cat([b[1] for b in rec.batches if b[0] == epoch])
        assert torch.equal(seen.sort().values, ids)
    for _, indices, logits, targets in rec.batches:
        assert logits.shape == (len(indices), CLASSES) and not logits.requires_grad
        assert torch.equal(targets, y[(indices - 5) // 10])
    orders = [torch.cat([b[1] for b in rec.batches if b[0] == e]) for e in (0, 1)]
    assert not torch.equal(orders[0], orders[1])  # reshuffled each epoch


def test_plain_objects_with_some_hook_methods_are_accepted(data):
    x, y = data
    calls = []

    class OnlyEpochs:
        def on_epoch_end(self, epoch, model):
            calls.append(epoch)

    fit(mlp(), SupervisedObjective(x, y), Schedule(epochs=2, batch_size=128), seed=0, device="cpu", hooks=[OnlyEpochs()])
    assert calls == [0, 1]


class Crash(Exception):
    pass


class CrashAt(Hook):
    def __init__(self, epoch):
        self.epoch = epoch

    def on_batch_end(self, epoch, indices, logits, targets):
        if epoch == self.epoch:
            raise Crash


def test_resume_after_an_exception_matches_an_uninterrupted_run(data, tmp_path):
    x, y = data
    schedule = Schedule(epochs=4, batch_size=64, lr=0.05, ema_decay=0.9)
    reference = fit(cnn(), SupervisedObjective(x, y, view="strong"), schedule, seed=3, device="cpu")

    with pytest.raises(Crash):
        fit(cnn(), SupervisedObjective(x, y, view="strong"), schedule, seed=3, device="cpu",
            hooks=[CrashAt(2)], checkpoint_dir=tmp_path, run_key="k")
    assert (tmp_path / CHECKPOINT_NAME).exists()

    rec = Recorder()
    resumed = fit(cnn(), SupervisedObjective(x, y, view="strong"), schedule, seed=3, device="cpu",
                  hooks=[rec], checkpoint_dir=tmp_path, run_key="k")
    assert resumed.resumed and resumed.start_epoch == 2 and rec.starts == [2] and rec.epochs == [2, 3]
    assert_same_weights(resumed.model, reference.model)
    assert_same_weights(resumed.ema_model, reference.ema_model)
    assert [h["epoch"] for h in resumed.history] == [0, 1, 2, 3]
    assert resumed.sample_passes == reference.sample_passes
    assert not (tmp_path / CHECKPOINT_NAME).exists()  # deleted after success


@pytest.mark.parametrize("momentum,nesterov", [(0.9, True), (0.9, False), (0.0, False)])
def test_engine_sgd_steps_exactly_like_torch_optim_sgd_and_shares_its_state_layout(momentum, nesterov):
    torch.manual_seed(0)
    ours_model, theirs_model = cnn(), cnn()
    groups = lambda m: engine._param_groups(m, 5e-4)  # noqa: E731
    ours = engine.SGD(groups(ours_model), lr=0.1, momentum=momentum, nesterov=nesterov)
    theirs = torch.optim.SGD(groups(theirs_model), lr=0.1, momentum=momentum, nesterov=nesterov)
    x = torch.randn(8, 1, SIZE, SIZE)
    for step in range(5):
        for model, opt in ((ours_model, ours), (theirs_model, theirs)):
            for group in opt.param_groups:
                group["lr"] = 0.1 / (1 + step)
            opt.zero_grad()  # torch's default: set_to_none
            model(x).square().mean().backward()
            opt.step()
    assert_same_weights(ours_model, theirs_model)
    # checkpoints written with torch.optim.SGD's state resume into the engine's, and back
    resumed = engine.SGD(groups(cnn()), lr=0.1, momentum=momentum, nesterov=nesterov)
    resumed.load_state_dict(theirs.state_dict())
    theirs.load_state_dict(ours.state_dict())
    for a, b in zip(resumed.state_dict()["state"].values(), theirs.state_dict()["state"].values()):
        assert torch.equal(a["momentum_buffer"], b["momentum_buffer"])
    with pytest.raises(ValueError, match="different number"):
        resumed.load_state_dict(engine.SGD([{"params": list(mlp().parameters())}], lr=0.1).state_dict())


def test_training_does_not_load_torch_compiler_in_a_fresh_process():
    """torch.optim's optimisers import torch._dynamo on first use: 0.8 s of every stage's start."""
    code = textwrap.dedent("""
        import sys, torch
        from semiprune_core.models import create_model
        from semiprune_core.training import Schedule, SupervisedObjective, fit, predict
        x = torch.randint(0, 255, (64, 1, 16, 16), dtype=torch.uint8); y = torch.randint(0, 3, (64,))
        model = create_model("fastcnn", in_channels=1, num_classes=3, image_size=16, widths=(8, 16, 32), seed=0)
        result = fit(model, SupervisedObjective(x, y), Schedule(epochs=1, batch_size=32, ema_decay=0.9), seed=0, device="cpu")
        predict(result.final_model, x)
        print(sorted(m for m in sys.modules if m.startswith("torch._dynamo")))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


class CountingObjective(SupervisedObjective):
    """An objective with state across steps (like FlexMatch's learning status): a per-sample visit count."""

    def __init__(self, x, y):
        super().__init__(x, y)
        self.visits = torch.zeros(len(x), dtype=torch.long)

    def loss(self, model, batch):
        self.visits[batch.rows] += 1
        return super().loss(model, batch)

    def state_dict(self):
        return {"visits": self.visits.clone()}

    def load_state_dict(self, state):
        self.visits = state["visits"].clone()


def test_objective_state_is_checkpointed_and_restored(data, tmp_path):
    x, y = data
    with pytest.raises(Crash):
        fit(mlp(), CountingObjective(x, y), SCHEDULE, seed=0, device="cpu", hooks=[CrashAt(3)], checkpoint_dir=tmp_path, run_key="k")
    objective = CountingObjective(x, y)
    result = fit(mlp(), objective, SCHEDULE, seed=0, device="cpu", checkpoint_dir=tmp_path, run_key="k")
    assert result.start_epoch == 3
    assert torch.equal(objective.visits, torch.full((len(x),), SCHEDULE.epochs))


KILLED_RUN = textwrap.dedent(
    """
    import os, signal, sys, torch
    from semiprune_core.models import create_model
    from semiprune_core.training import Hook, Schedule, SupervisedObjective, fit

    torch.set_num_threads(1)
    x, y = torch.load(sys.argv[1])

    class KillInEpoch2(Hook):
        def on_batch_end(self, epoch, indices, logits, targets):
            if epoch == 2:
                os.kill(os.getpid(), signal.SIGKILL)

    model = create_model("fastcnn", in_channels=1, num_classes=3, image_size=16, widths=(8, 16, 32), seed=0)
    fit(model, SupervisedObjective(x, y), Schedule(epochs=4, batch_size=64, lr=0.05, ema_decay=0.99), seed=5,
        device="cpu", hooks=[KillInEpoch2()], checkpoint_dir=sys.argv[2], run_key="killed")
    """
)


def test_resume_after_sigkill_in_a_subprocess(data, tmp_path):
    """A real SIGKILL mid-epoch 3 (0-based 2): the rerun starts at epoch 2 and matches an uninterrupted run."""
    x, y = data
    torch.save((x, y), tmp_path / "data.pt")
    ckpt_dir = tmp_path / "scratch"
    proc = subprocess.run([sys.executable, "-c", KILLED_RUN, str(tmp_path / "data.pt"), str(ckpt_dir)], capture_output=True, check=False)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    assert (ckpt_dir / CHECKPOINT_NAME).exists()
    assert not [p for p in ckpt_dir.iterdir() if p.name != CHECKPOINT_NAME]  # no partial temp files left behind

    schedule = Schedule(epochs=4, batch_size=64, lr=0.05, ema_decay=0.99)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # same as the killed run, so float sums are ordered identically
    try:
        resumed = fit(cnn(), SupervisedObjective(x, y), schedule, seed=5, device="cpu", checkpoint_dir=ckpt_dir, run_key="killed")
        reference = fit(cnn(), SupervisedObjective(x, y), schedule, seed=5, device="cpu")
    finally:
        torch.set_num_threads(threads)
    assert resumed.resumed and resumed.start_epoch == 2
    assert_same_weights(resumed.model, reference.model)
    assert_same_weights(resumed.ema_model, reference.ema_model)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty", "flipped"])
def test_damaged_checkpoint_is_ignored(data, tmp_path, caplog, damage):
    x, y = data
    schedule = Schedule(epochs=2, batch_size=64)
    fit(mlp(), SupervisedObjective(x, y), schedule, seed=0, device="cpu", checkpoint_dir=tmp_path, run_key="k", keep_checkpoint=True)
    path = tmp_path / CHECKPOINT_NAME
    raw = path.read_bytes()
    mid = len(raw) // 2  # a flipped bit inside a tensor still unpickles: only the digest notices
    flipped = raw[:mid] + bytes([raw[mid] ^ 1]) + raw[mid + 1:]
    path.write_bytes({"garbage": b"not a checkpoint" * 50, "truncated": raw[:mid], "empty": b"", "flipped": flipped}[damage])
    with caplog.at_level(logging.WARNING, logger="semiprune_core.training.engine"):
        result = fit(mlp(), SupervisedObjective(x, y), schedule, seed=0, device="cpu", checkpoint_dir=tmp_path, run_key="k")
    assert not result.resumed and result.start_epoch == 0 and len(result.history) == 2
    assert "ignoring unreadable checkpoint" in caplog.text


def test_checkpoint_of_another_config_is_not_resumed(data, tmp_path, caplog):
    x, y = data
    with pytest.raises(Crash):
        fit(mlp(), SupervisedObjective(x, y), SCHEDULE, seed=0, device="cpu", hooks=[CrashAt(2)], checkpoint_dir=tmp_path, run_key="a")
    for kwargs in ({"run_key": "b", "schedule": SCHEDULE, "seed": 0},  # caller's config changed
                   {"run_key": "a", "schedule": Schedule(epochs=5, batch_size=64), "seed": 0},  # schedule changed
                   {"run_key": "a", "schedule": SCHEDULE, "seed": 1}):  # seed changed
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="semiprune_core.training.engine"), pytest.raises(Crash):
            fit(mlp(), SupervisedObjective(x, y), kwargs["schedule"], seed=kwargs["seed"], device="cpu",
                hooks=[CrashAt(0)], checkpoint_dir=tmp_path, run_key=kwargs["run_key"])
        assert "different run" in caplog.text


def test_checkpoint_of_another_architecture_is_not_resumed(data, tmp_path, caplog):
    x, y = data
    fit(mlp(), SupervisedObjective(x, y), Schedule(epochs=1, batch_size=64), seed=0, device="cpu",
        checkpoint_dir=tmp_path, run_key="k", keep_checkpoint=True)
    wide = create_model("mlp", in_channels=1, num_classes=CLASSES, image_size=SIZE, hidden=48, seed=0)
    with caplog.at_level(logging.WARNING):
        result = fit(wide, SupervisedObjective(x, y), Schedule(epochs=1, batch_size=64), seed=0, device="cpu",
                     checkpoint_dir=tmp_path, run_key="k")
    assert not result.resumed and "different run" in caplog.text


def test_kept_checkpoint_of_a_finished_run_returns_at_once(data, tmp_path):
    x, y = data
    first = fit(mlp(), SupervisedObjective(x, y), SCHEDULE, seed=0, device="cpu", checkpoint_dir=tmp_path, run_key="k", keep_checkpoint=True)
    assert (tmp_path / CHECKPOINT_NAME).exists()
    again = fit(mlp(), SupervisedObjective(x, y), SCHEDULE, seed=0, device="cpu", checkpoint_dir=tmp_path, run_key="k")
    assert again.resumed and again.start_epoch == SCHEDULE.epochs and again.history == first.history
    assert_same_weights(again.model, first.model)


def test_checkpoint_needs_a_run_key(data, tmp_path):
    x, y = data
    with pytest.raises(ValueError, match="run_key"):
        fit(mlp(), SupervisedObjective(x, y), SCHEDULE, seed=0, device="cpu", checkpoint_dir=tmp_path)


def test_ema_is_the_weighted_average_of_the_weights(data):
    x, y = data
    model = cnn()
    start = weights(model)
    # one epoch of one step: ema = d * start + (1 - d) * trained for parameters, buffers copied,
    # with the warm-up decay d = min(ema_decay, (1 + step) / (10 + step)) = 0.1 at step 0
    result = fit(model, SupervisedObjective(x, y), Schedule(epochs=1, batch_size=len(x), lr=0.1, ema_decay=0.75), seed=0, device="cpu")
    trained, ema = weights(result.model), weights(result.ema_model)
    params = {name for name, _ in result.model.named_parameters()}
    for name in params:
        torch.testing.assert_close(ema[name], 0.1 * start[name] + 0.9 * trained[name])
    assert not torch.equal(ema["head.weight"], trained["head.weight"])
    for name in set(trained) - params:
        assert torch.equal(ema[name], trained[name])  # BatchNorm statistics
    assert result.final_model is result.ema_model


def test_epoch_hook_gets_the_ema_model_when_ema_is_on(data):
    x, y = data
    seen = []

    class Grab(Hook):
        def on_epoch_end(self, epoch, model):
            seen.append(model)

    result = fit(mlp(), SupervisedObjective(x, y), Schedule(epochs=1, batch_size=64, ema_decay=0.9), seed=0, device="cpu", hooks=[Grab()])
    assert seen == [result.ema_model]


def test_a_model_loaded_from_its_state_dict_predicts_in_the_fast_layout_with_the_same_outputs(data):
    x, y = data
    trained = fit(cnn(), SupervisedObjective(x, y), SCHEDULE, seed=0, device="cpu").model
    loaded = cnn(seed=1)
    loaded.load_state_dict(trained.state_dict())  # what a stage reading model.pt has: contiguous weights
    convs = [m.weight for m in loaded.modules() if isinstance(m, torch.nn.Conv2d)]
    assert not all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    for output in ("logits", "features"):
        assert torch.equal(predict(loaded, x, output=output), predict(trained, x, output=output))
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)


def test_predict_is_deterministic_in_eval_mode_and_restores_the_mode(data):
    x, y = data
    model = fit(cnn(), SupervisedObjective(x, y), SCHEDULE, seed=0, device="cpu").model
    model.train()
    a = predict(model, x, batch_size=37, precision="fp32")
    b = predict(model, x, batch_size=1000, precision="fp32")
    assert a.shape == (len(x), CLASSES) and a.dtype == torch.float32 and a.device.type == "cpu"
    torch.testing.assert_close(a, b)
    assert torch.equal(predict(model, x, batch_size=37, precision="fp32"), a)
    assert model.training  # mode restored
    with torch.no_grad():
        torch.testing.assert_close(a, model.eval()(to_float(x)))
        assert not torch.allclose(a, model.train()(to_float(x)))  # train-mode BatchNorm would differ
    probs = predict(model, x, output="probs")
    torch.testing.assert_close(probs.sum(1), torch.ones(len(x)))
    assert predict(model, x, output="features").shape == (len(x), 32)
    assert evaluate(model, x, y) == pytest.approx((a.argmax(1) == y).float().mean().item())


def test_predict_on_a_cpu_keeps_each_activation_within_the_budget_with_the_same_outputs():
    # resnet18_cifar on 32x32: 128 KiB per sample in its first activation, so batch 1024 would
    # make 128 MiB tensors (mmap-ed and page-faulted afresh per batch, and 1.9x slower)
    model = create_model("resnet18_cifar", in_channels=3, num_classes=CLASSES, image_size=32)
    x = torch.randint(0, 256, (300, 3, 32, 32), dtype=torch.uint8)
    largest = []

    def record(_module, _args, out) -> None:
        largest.append(out.nbytes)

    hooks = [m.register_forward_hook(record) for m in model.modules()]
    try:
        capped = predict(model, x, batch_size=1024, precision="bf16")
    finally:
        for hook in hooks:
            hook.remove()
    assert engine.CPU_ACTIVATION_BUDGET // 2 < max(largest) <= engine.CPU_ACTIVATION_BUDGET  # not tiny batches either
    assert torch.equal(capped, predict(model, x, batch_size=16, precision="bf16"))


def test_sample_weights_scale_the_loss(data):
    x, y = data
    model = mlp()
    plain = SupervisedObjective(x, y, view="none")
    doubled = SupervisedObjective(x, y, view="none", sample_weights=torch.full((len(x),), 2.0))
    batch = next(plain.batches(0, 50, torch.Generator().manual_seed(0)))
    torch.testing.assert_close(doubled.loss(model, batch).loss, 2 * plain.loss(model, batch).loss)


@pytest.mark.parametrize(
    "kwargs",
    [{"epochs": 0}, {"epochs": -2}, {"epochs": 1.5}, {"batch_size": 0}, {"batch_size": -8}, {"lr": 0}, {"lr": -0.1},
     {"warmup": 1.0}, {"ema_decay": 1.0}, {"max_seconds": 0}, {"momentum": 0.0}],
)
def test_bad_schedule_values_are_config_errors(kwargs):
    with pytest.raises(ConfigError):
        Schedule(**{"epochs": 3, **kwargs})


def test_lr_schedule_warms_up_then_anneals_to_zero():
    s = Schedule(epochs=1, lr=0.2, warmup=0.1)
    lrs = [s.lr_at(i, 100) for i in range(100)]
    assert 0 < lrs[0] < lrs[5] < lrs[9] == pytest.approx(0.2)
    assert all(a >= b for a, b in itertools.pairwise(lrs[9:]))
    assert lrs[-1] < 1e-3


def test_max_seconds_stops_before_an_epoch_that_would_overrun(data, caplog):
    x, y = data

    class Slow(Hook):
        def on_epoch_end(self, epoch, model):
            time.sleep(0.3)

    with caplog.at_level(logging.WARNING):
        result = fit(mlp(), SupervisedObjective(x, y), Schedule(epochs=5, batch_size=200, max_seconds=0.5), seed=0, device="cpu", hooks=[Slow()])
    assert result.stopped_early and result.epochs_completed == 1
    assert "max_seconds" in caplog.text


def test_supervised_objective_follows_the_protocol_and_accepts_read_only_numpy(data, recwarn):
    x, y = data
    frozen = x.numpy().copy()
    frozen.flags.writeable = False
    objective = SupervisedObjective(frozen, y.numpy())
    assert isinstance(objective, Objective)
    assert not [w for w in recwarn if "not writable" in str(w.message)]
    assert objective.steps_per_epoch(128) == 4
    sizes = [len(b.rows) for b in objective.batches(0, 128, torch.Generator().manual_seed(0))]
    assert sizes == [100, 100, 100, 100]  # near-equal batches, no tiny last batch


def test_objective_and_device_errors(data):
    x, y = data
    with pytest.raises(ValueError, match="uint8"):
        SupervisedObjective(x.float(), y)
    with pytest.raises(ValueError, match="targets"):
        SupervisedObjective(x, y[:-1])
    with pytest.raises(ConfigError):
        SupervisedObjective(x, y, view="heavy")
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ConfigError):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="cuda"):
            resolve_device("cuda")


def test_to_float_maps_bytes_to_minus_one_to_one():
    x = torch.arange(256, dtype=torch.uint8).view(4, 1, 8, 8)
    y = to_float(x)
    assert y.dtype == torch.float32 and y.shape == x.shape
    assert y.min() == -1.0 and y.max() == 1.0 and torch.all(y.flatten().diff() > 0)
    want = (torch.arange(256, dtype=torch.float32) * torch.tensor(1 / 127.5, dtype=torch.float32) - 1).view(4, 1, 8, 8)
    assert torch.equal(y, want)  # float32 arithmetic, one rounding per step: saved models see the same inputs
