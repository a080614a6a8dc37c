"""Per-sample statistics, the dynamics recorder hook (in-sample + held-out fold, resume), the Parquet table."""

from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from semiprune_core.data.folds import assign_folds
from semiprune_core.dynamics import (
    METRICS,
    DynamicsRecorder,
    per_sample_stats,
    read_dynamics,
    write_dynamics,
)
from semiprune_core.errors import DataError
from semiprune_core.io import table_meta
from semiprune_core.models import create_model
from semiprune_core.training import Schedule, SupervisedObjective, fit, predict
from semiprune_core.training.engine import CHECKPOINT_NAME

# --- per_sample_stats ---------------------------------------------------------------------------------


def reference_stats(logits: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
    z = logits - logits.max(1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    rows = np.arange(len(y))
    q = p[rows, y]
    other = p.copy()
    other[rows, y] = -1
    onehot = np.eye(p.shape[1])[y]
    return {"target_prob": q, "margin": q - other.max(1), "loss": -np.log(q), "entropy": -(p * np.log(p)).sum(1),
            "el2n": np.linalg.norm(p - onehot, axis=1), "correct": p.argmax(1) == y}


def test_stats_match_a_numpy_reference():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 5, generator=g) * 3
    y = torch.randint(0, 5, (64,), generator=g)
    got = per_sample_stats(logits, y)
    want = reference_stats(logits.double().numpy(), y.numpy())
    assert set(got) == set(METRICS)
    for name in METRICS:
        assert got[name].shape == (64,)
        np.testing.assert_allclose(got[name].numpy(), want[name], rtol=1e-5, atol=1e-6, err_msg=name)
    assert got["correct"].dtype == torch.bool


def test_stats_by_hand_and_stable_for_extreme_logits():
    logits = torch.tensor([[0.0, 0.0], [1000.0, -1000.0], [1000.0, -1000.0]])
    s = per_sample_stats(logits, torch.tensor([0, 0, 1]))
    np.testing.assert_allclose(s["target_prob"], [0.5, 1.0, 0.0])
    np.testing.assert_allclose(s["margin"], [0.0, 1.0, -1.0])
    np.testing.assert_allclose(s["loss"], [np.log(2), 0.0, 2000.0])
    np.testing.assert_allclose(s["entropy"], [np.log(2), 0.0, 0.0], atol=1e-7)
    np.testing.assert_allclose(s["el2n"], [np.sqrt(0.5), 0.0, np.sqrt(2)], rtol=1e-6)
    assert s["correct"].tolist() == [True, True, False]  # a tie goes to the first maximum
    for v in s.values():
        assert torch.isfinite(v.float()).all()


def test_stats_accept_low_precision_logits():
    logits = torch.randn(8, 3).bfloat16()
    s = per_sample_stats(logits, torch.zeros(8, dtype=torch.long))
    assert s["loss"].dtype == torch.float32
    with pytest.raises(ValueError, match="C >= 2"):
        per_sample_stats(torch.zeros(4, 1), torch.zeros(4, dtype=torch.long))


# --- the recorder with the engine ---------------------------------------------------------------------

N, SIZE, CLASSES, EPOCHS = 48, 8, 3, 4


@pytest.fixture(scope="module")
def pool():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(N) % CLASSES
    x = (torch.rand(N, 1, SIZE, SIZE, generator=g) * 80 + 60 * y[:, None, None, None]).to(torch.uint8)
    ids = np.array([f"train/{i:05d}" for i in np.random.default_rng(0).permutation(N)], dtype=object)
    fold = assign_folds(y.numpy(), k=2, seed=0)
    return x, y, ids, fold


def model():
    return create_model("mlp", in_channels=1, num_classes=CLASSES, image_size=SIZE, hidden=16, seed=0)


class Spy:
    """Captures what the recorder should have stored: training-batch stats and held-out predictions."""

    def __init__(self, x_oos):
        self.x_oos, self.batches, self.oos = x_oos, {}, {}

    def on_batch_end(self, epoch, indices, logits, targets):
        for i, row in enumerate(torch.stack(list(per_sample_stats(logits, targets).values()), 1).float()):
            self.batches[(epoch, int(indices[i]))] = row.numpy()

    def on_epoch_end(self, epoch, model):
        self.oos[epoch] = predict(model, self.x_oos)


def make_recorder(pool, scratch, *, held_out=0, run_key="k"):
    x, y, _, fold = pool
    rows = np.flatnonzero(fold == held_out)
    return DynamicsRecorder(N, EPOCHS, oos_rows=rows, oos_images=x[rows], oos_targets=y[rows], scratch_dir=scratch,
                            run_key=run_key)


def train(pool, hooks, *, held_out=0, checkpoint_dir=None, epochs=EPOCHS, objective_rows=None, keep=False):
    x, y, _, fold = pool
    rows = np.flatnonzero(fold != held_out) if objective_rows is None else objective_rows
    objective = SupervisedObjective(x[rows], y[rows], ids=rows, view="weak", padding=1)
    return fit(model(), objective, Schedule(epochs=epochs, batch_size=10, lr=0.05, ema_decay=0.9), seed=1,
               device="cpu", hooks=hooks, checkpoint_dir=checkpoint_dir, run_key="k" if checkpoint_dir else None,
               keep_checkpoint=keep)


def test_recorder_stores_training_stats_in_sample_and_eval_stats_out_of_sample(pool, tmp_path):
    x, y, ids, fold = pool
    rec = make_recorder(pool, tmp_path / "scratch")
    spy = Spy(x[rec.oos_rows])
    train(pool, [rec, spy])
    out = tmp_path / "dynamics" / "fold_0.parquet"
    rec.write_parquet(out, ids, fold=fold, meta={"held_out_fold": 0}, chunk_rows=7)

    table = pq.read_table(out)
    assert table.column_names == ["sample_id", "fold", "is_oos", *METRICS]
    assert table.schema.field("target_prob").type == pa.list_(pa.float16(), EPOCHS)
    assert table.schema.field("correct").type == pa.list_(pa.bool_(), EPOCHS)
    assert table.schema.field("fold").type == pa.int8()
    meta = table_meta(out)
    assert meta["held_out_fold"] == 0 and meta["epochs"] == EPOCHS and meta["epochs_planned"] == EPOCHS

    dyn = read_dynamics(out)
    assert list(dyn.sample_ids) == sorted(ids)
    row_of = {s: r for r, s in enumerate(ids)}
    rows = np.array([row_of[s] for s in dyn.sample_ids])  # table position -> pool row
    np.testing.assert_array_equal(dyn.fold, fold[rows])
    np.testing.assert_array_equal(dyn.is_oos, fold[rows] == 0)
    oos_pos = {int(r): i for i, r in enumerate(rec.oos_rows)}
    for e in range(EPOCHS):
        oos_stats = per_sample_stats(spy.oos[e], y[rec.oos_rows])
        for t, r in enumerate(rows):
            if fold[r] == 0:
                want = np.array([oos_stats[m][oos_pos[r]].float().item() for m in METRICS])
            else:
                want = spy.batches[(e, r)]
            got = np.array([float(dyn.trajectories[m][t, e]) for m in METRICS])
            np.testing.assert_allclose(got, want.astype(np.float16).astype(np.float64), rtol=0, atol=0, err_msg=f"{e} {r}")
    rec.cleanup()
    assert not list((tmp_path / "scratch").iterdir())


def test_a_held_out_sample_in_training_is_a_leak(pool, tmp_path):
    rec = make_recorder(pool, tmp_path)
    with pytest.raises(DataError, match="held-out sample"):
        train(pool, [rec], objective_rows=np.arange(N))


def test_every_training_sample_must_be_reported_once(pool, tmp_path):
    _, _, _, fold = pool
    rec = make_recorder(pool, tmp_path)
    with pytest.raises(DataError, match="not trained on exactly once"):
        train(pool, [rec], objective_rows=np.flatnonzero(fold != 0)[1:])


class Crash(Exception):
    pass


class CrashAt:
    def __init__(self, epoch):
        self.epoch, self.batches = epoch, 0

    def on_batch_end(self, epoch, indices, logits, targets):
        if epoch == self.epoch:
            self.batches += 1
            if self.batches == 2:
                raise Crash


def recorded(rec, pool, path):
    _, _, ids, fold = pool
    rec.write_parquet(path, ids, fold=fold)
    return read_dynamics(path).trajectories


def test_resume_after_a_crash_gives_the_uninterrupted_dynamics(pool, tmp_path):
    reference = make_recorder(pool, tmp_path / "ref")
    train(pool, [reference])
    want = recorded(reference, pool, tmp_path / "ref.parquet")

    scratch = tmp_path / "scratch"
    with pytest.raises(Crash):
        train(pool, [make_recorder(pool, scratch), CrashAt(2)], checkpoint_dir=scratch)
    assert (scratch / CHECKPOINT_NAME).exists()
    rec = make_recorder(pool, scratch)
    result = train(pool, [rec], checkpoint_dir=scratch)
    assert result.resumed and result.start_epoch == 2
    got = recorded(rec, pool, tmp_path / "resumed.parquet")
    for m in METRICS:
        np.testing.assert_array_equal(got[m], want[m], err_msg=m)


def test_a_kept_checkpoint_of_a_finished_run_rewrites_the_table_without_training(pool, tmp_path):
    scratch = tmp_path / "scratch"
    first = make_recorder(pool, scratch)
    train(pool, [first], checkpoint_dir=scratch, keep=True)
    want = recorded(first, pool, tmp_path / "first.parquet")
    again = make_recorder(pool, scratch)
    result = train(pool, [again], checkpoint_dir=scratch, keep=True)
    assert result.resumed and result.start_epoch == EPOCHS
    got = recorded(again, pool, tmp_path / "again.parquet")
    for m in METRICS:
        np.testing.assert_array_equal(got[m], want[m], err_msg=m)


@pytest.mark.parametrize("damage", ["overwrite", "delete", "other_fold"])
def test_a_damaged_or_foreign_scratch_file_makes_the_engine_start_fresh(pool, tmp_path, caplog, damage):
    reference = make_recorder(pool, tmp_path / "ref")
    train(pool, [reference])
    want = recorded(reference, pool, tmp_path / "ref.parquet")

    scratch = tmp_path / "scratch"
    first = make_recorder(pool, scratch)
    with pytest.raises(Crash):
        train(pool, [first, CrashAt(2)], checkpoint_dir=scratch)
    if damage == "overwrite":
        mm = np.lib.format.open_memmap(first.path, mode="r+")
        mm[0, 3, 0] += 1
        mm.flush()
        del mm
    elif damage == "delete":
        first.path.unlink()
    rec = make_recorder(pool, scratch, run_key="k" if damage != "other_fold" else "another config")
    with caplog.at_level(logging.WARNING):
        result = train(pool, [rec], checkpoint_dir=scratch)
    assert not result.resumed and "ignoring checkpoint" in caplog.text
    got = recorded(rec, pool, tmp_path / "fresh.parquet")
    for m in METRICS:
        np.testing.assert_array_equal(got[m], want[m], err_msg=m)


def test_resume_without_the_recorders_state_is_an_error(pool, tmp_path):
    rec = make_recorder(pool, tmp_path)
    with pytest.raises(DataError, match="cannot resume recording dynamics at epoch 3"):
        rec.on_fit_start(2, model())


def test_stopped_early_writes_the_recorded_epochs(pool, tmp_path):
    x, y, ids, fold = pool
    rec = make_recorder(pool, tmp_path / "s")
    m = model()
    rec.on_fit_start(0, m)
    rows = np.flatnonzero(fold != 0)
    rec.on_batch_end(0, torch.as_tensor(rows), m(x[rows].float()).detach(), y[rows])
    rec.on_epoch_end(0, m)
    assert rec.epochs_recorded == 1
    rec.write_parquet(tmp_path / "d.parquet", ids, fold=fold)
    dyn = read_dynamics(tmp_path / "d.parquet")
    assert dyn.epochs == 1 and table_meta(tmp_path / "d.parquet")["epochs_planned"] == EPOCHS
    with pytest.raises(ValueError, match="is_oos differs"):
        rec.write_parquet(tmp_path / "d.parquet", ids, fold=fold, is_oos=fold == 1)


# --- the table ----------------------------------------------------------------------------------------


def small_values(n=5, e=3):
    g = np.random.default_rng(0)
    values = g.uniform(0, 1, (e, n, len(METRICS)))
    values[..., METRICS.index("correct")] = g.integers(0, 2, (e, n))
    return values


def test_table_roundtrip_sorted_and_float16(tmp_path):
    ids = np.array(["b", "a", "d", "c", "e"], dtype=object)
    values = small_values()
    values[0, 0, METRICS.index("loss")] = 1e6  # beyond float16: clipped, not inf
    path = tmp_path / "t.parquet"
    write_dynamics(path, ids, fold=np.array([0, 1, 0, 1, 0]), is_oos=np.array([1, 0, 1, 0, 1], bool), values=values,
                   chunk_rows=2)
    dyn = read_dynamics(path)
    order = np.argsort(ids)
    assert list(dyn.sample_ids) == ["a", "b", "c", "d", "e"]
    np.testing.assert_array_equal(dyn.fold, [1, 0, 1, 0, 0])
    for j, m in enumerate(METRICS):
        want = values[:, order, j].T
        if m == "correct":
            np.testing.assert_array_equal(dyn.trajectories[m], want > 0.5)
        else:
            assert dyn.trajectories[m].dtype == np.float16
            np.testing.assert_array_equal(dyn.trajectories[m], np.clip(want, -65504, 65504).astype(np.float16))
    meta = pq.ParquetFile(path).metadata
    assert meta.num_row_groups == 3
    assert "BYTE_STREAM_SPLIT" in meta.row_group(0).column(3).encodings  # target_prob: compact float16 encoding


def test_duplicate_ids_are_refused(tmp_path):
    with pytest.raises(DataError, match="'a' occurs more than once"):
        write_dynamics(tmp_path / "t.parquet", np.array(["a", "b", "a", "c", "d"], dtype=object), fold=np.zeros(5),
                       is_oos=np.zeros(5, bool), values=small_values())


def test_nan_in_a_trajectory_names_the_file_and_sample(tmp_path):
    values = small_values()
    values[2, 3, METRICS.index("margin")] = np.nan
    path = tmp_path / "fold_1.parquet"
    write_dynamics(path, np.array(list("vwxyz"), dtype=object), fold=np.zeros(5), is_oos=np.zeros(5, bool), values=values)
    with pytest.raises(DataError, match=r"fold_1.parquet: margin trajectory of sample 'y' has a NaN"):
        read_dynamics(path)


def test_missing_file_or_column_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_dynamics(tmp_path / "nope.parquet")
    path = tmp_path / "t.parquet"
    write_dynamics(path, np.array(list("abcde"), dtype=object), fold=np.zeros(5), is_oos=np.zeros(5, bool),
                   values=small_values())
    pq.write_table(pq.read_table(path).drop_columns(["el2n"]), path)
    with pytest.raises(DataError, match="lacks the column"):
        read_dynamics(path)
