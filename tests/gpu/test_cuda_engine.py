"""The engine on a CUDA GPU: data resident on the device, bf16 autocast, results like the CPU's."""

from __future__ import annotations

import pytest
import torch

from semiprune_core.models import create_model
from semiprune_core.training import Schedule, SupervisedObjective, evaluate, fit, predict, resolve_precision
from tests.unit.test_engine import CLASSES, SIZE, blobs


def cnn():
    return create_model("fastcnn", in_channels=1, num_classes=CLASSES, image_size=SIZE, widths=(8, 16, 32), seed=0)


def test_training_keeps_the_data_on_the_gpu_in_bf16_and_learns():
    x, y = blobs(2000)
    x_test, y_test = blobs(500, seed=1)
    objective = SupervisedObjective(x, y, view="weak", padding=1)
    result = fit(cnn(), objective, Schedule(epochs=4, batch_size=128, lr=0.05, warmup=0.1), seed=0, device="cuda")
    assert objective.images.device.type == "cuda" and objective.targets.device.type == "cuda"
    assert next(result.model.parameters()).device.type == "cuda"
    assert result.precision == ("bf16" if resolve_precision("auto", "cuda") is not None else "fp32")
    assert evaluate(result.model, x_test, y_test) > 0.8  # chance is 1/3


def test_gpu_and_cpu_predictions_agree_within_bf16_rounding():
    x, y = blobs(600)
    model = fit(cnn(), SupervisedObjective(x, y), Schedule(epochs=2, batch_size=64), seed=0, device="cpu",
                precision="fp32").model
    on_cpu = predict(model, x, precision="fp32")
    on_gpu = predict(model.to("cuda"), x, device="cuda")
    assert on_gpu.device.type == "cpu" and on_gpu.dtype == torch.float32
    torch.testing.assert_close(on_gpu, on_cpu, atol=0.15, rtol=0.05)
    assert (on_gpu.argmax(1) == on_cpu.argmax(1)).float().mean() > 0.98


def test_a_gpu_run_is_reproducible_in_outcome():
    x, y = blobs(1000)
    x_test, y_test = blobs(300, seed=1)
    accs = [evaluate(fit(cnn(), SupervisedObjective(x, y), Schedule(epochs=3, batch_size=64), seed=5, device="cuda").model,
                     x_test, y_test) for _ in range(2)]
    assert abs(accs[0] - accs[1]) < 0.03  # bytes may differ (atomics in CUDA kernels), the outcome may not


def test_cuda_graphs_train_like_eager_with_ema_and_a_per_batch_hook():
    """base.compile: reduce-overhead replays the step from CUDA graphs, whose outputs are overwritten
    by the next replay: hooks and the EMA must take what they need at once, and the model learn as eager."""
    x, y = blobs(2000)
    x_test, y_test = blobs(500, seed=1)
    seen = []

    class Counter:  # what the dynamics recorder does: reduce each batch's logits on the device at once
        def on_batch_end(self, epoch, indices, logits, targets):
            seen.append((logits.argmax(1) == targets).sum())

    schedule = Schedule(epochs=4, batch_size=128, lr=0.05, warmup=0.1, ema_decay=0.9)
    objective = SupervisedObjective(x, y, view="weak", padding=1)
    result = fit(cnn(), objective, schedule, seed=0, device="cuda", compile="reduce-overhead", hooks=[Counter()])
    eager = fit(cnn(), SupervisedObjective(x, y, view="weak", padding=1), schedule, seed=0, device="cuda")
    assert result.model.state_dict().keys() == eager.model.state_dict().keys()
    assert len(seen) == 4 * objective.steps_per_epoch(128)
    assert int(sum(seen)) / (4 * len(x)) == pytest.approx(sum(h["acc"] for h in result.history) / 4, abs=0.01)
    for model in (result.model, result.final_model):
        assert evaluate(model, x_test, y_test) > 0.8
    assert abs(evaluate(result.final_model, x_test, y_test) - evaluate(eager.final_model, x_test, y_test)) < 0.05
