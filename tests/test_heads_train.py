"""Head training: data pipeline, fit_predict contract, determinism, early stopping, rerun, resume, DDP."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from limits import HANG_GUARD_S

from mil.errors import ConfigError, InputError
from mil.heads.data import BagDataset, BagRecord, LengthBucketSampler, pad_collate
from mil.heads.train import TrainConfig, fit_predict

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parent.parent


def make_bags(n: int, seed: int, dim: int = 8, classes: int = 3) -> list[BagRecord]:
    """Class c has a fifth of its cells shifted along feature c: a cue only some cells carry."""
    rng = np.random.default_rng(seed)
    bags = []
    for i in range(n):
        target, size = i % classes, int(rng.integers(6, 30))
        features = rng.normal(size=(size, dim)).astype(np.float32)
        features[: max(1, size // 5), target] += 3.0
        bags.append(BagRecord(f"s{seed}-p{i:03d}", features, target))
    return bags


def tiny_config(**overrides) -> TrainConfig:
    values = dict(max_epochs=4, lr=5e-3, hidden_dim=8, patience=3, batch_size=4, max_cells_train=12, seed=3)
    return TrainConfig(**{**values, **overrides})


def test_pad_collate_masks_exactly_the_real_cells():
    items = [(torch.ones(3, 2), 0, 0, None), (torch.ones(5, 2), 1, 1, None)]
    batch = pad_collate(items)
    assert batch["x"].shape == (2, 5, 2)
    assert batch["mask"].sum(1).tolist() == [3, 5]
    assert batch["x"][0, 3:].abs().sum() == 0
    assert batch["target"].tolist() == [0, 1]


def test_length_bucket_sampler_covers_every_bag_once_and_groups_lengths():
    lengths = list(np.random.default_rng(0).integers(1, 500, size=37))
    sampler = LengthBucketSampler(lengths, batch_size=4, shuffle=True, seed=1, pool_batches=100)
    batches = list(sampler)
    assert sorted(i for b in batches for i in b) == list(range(37))
    assert len(batches) == len(sampler)
    # One pool holds all bags here, so the batches partition the length order: no bag is padded
    # against a bag from outside its length neighbourhood.
    spans = sorted((min(lengths[i] for i in b), max(lengths[i] for i in b)) for b in batches)
    assert all(hi <= next_lo for (_, hi), (next_lo, _) in zip(spans, spans[1:]))
    sampler.set_epoch(1)
    assert list(sampler) != batches


def test_length_bucket_sampler_shards_evenly_across_ranks():
    shards = [
        list(LengthBucketSampler([5] * 9, batch_size=2, shuffle=True, seed=0, num_replicas=2, rank=r)) for r in (0, 1)
    ]
    assert len(shards[0]) == len(shards[1]) == 3  # 5 batches padded to 6 so no rank waits for the other
    assert {i for s in shards for b in s for i in b} == set(range(9))


def test_cell_subsampling_is_seeded_per_epoch_and_keeps_small_bags():
    record = BagRecord("p", np.arange(40, dtype=np.float32).reshape(20, 2), 0)
    small = BagRecord("q", np.ones((3, 2), dtype=np.float32), 0)
    data = BagDataset([record, small], max_cells=5, seed=0)
    first = data[0][0]
    assert first.shape == (5, 2) and torch.equal(first, data[0][0])
    assert torch.all(first[1:, 0] > first[:-1, 0])  # kept in cell order
    data.set_epoch(1)
    assert not torch.equal(first, data[0][0])
    assert data[1][0].shape == (3, 2)


def test_fit_predict_returns_probs_attention_history_and_logs(tmp_path):
    train, val, test = make_bags(12, 0), make_bags(6, 1), make_bags(5, 2)
    result = fit_predict(
        "clam_mb", train=train, val=val, test=test, num_classes=3, config=tiny_config(), log_dir=tmp_path
    )
    assert result.probs.shape == (5, 3)
    np.testing.assert_allclose(result.probs.sum(1), 1.0, atol=1e-9)
    for record in test:
        weights = result.attention[record.patient_id]
        assert weights.shape == (3, len(record.features))
        np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-5)
    epochs = result.history["epochs"]
    assert [e["epoch"] for e in epochs] == list(range(len(epochs)))
    assert {"train_loss", "val_loss", "val_auroc"} <= set(epochs[-1])
    assert 0 <= result.history["best_epoch"] < len(epochs)
    assert (tmp_path / "csv" / "metrics.csv").exists()
    checkpoint = torch.load(result.best_checkpoint, weights_only=True)
    assert checkpoint["epoch"] == result.history["best_epoch"]
    assert json.loads((tmp_path / "run.json").read_text())["config"]["max_epochs"] == 4


def test_same_seed_gives_identical_probs_other_seed_differs(tmp_path):
    train, val, test = make_bags(12, 0), make_bags(6, 1), make_bags(6, 2)
    runs = [
        fit_predict("abmil", train=train, val=val, test=test, num_classes=3, config=tiny_config(seed=s), log_dir=d)
        for s, d in ((3, tmp_path / "a"), (3, tmp_path / "b"), (4, tmp_path / "c"))
    ]
    np.testing.assert_array_equal(runs[0].probs, runs[1].probs)
    assert not np.array_equal(runs[0].probs, runs[2].probs)


def test_early_stopping_restores_the_best_epoch(tmp_path):
    train, val = make_bags(9, 0), make_bags(6, 1)
    # lr=0: validation loss never improves after epoch 0, so training stops after `patience` more epochs
    # and the weights of epoch 0 come back.
    result = fit_predict(
        "mean",
        train=train,
        val=val,
        test=val,
        num_classes=3,
        config=tiny_config(lr=0.0, max_epochs=50, patience=2),
        log_dir=tmp_path,
    )
    assert len(result.history["epochs"]) == 3
    assert result.history["best_epoch"] == 0


def test_rerun_reuses_a_finished_run_and_a_changed_config_retrains(tmp_path):
    train, val, test = make_bags(9, 0), make_bags(6, 1), make_bags(4, 2)
    first = fit_predict("max", train=train, val=val, test=test, num_classes=3, config=tiny_config(), log_dir=tmp_path)
    stamp = (tmp_path / "checkpoints" / "best.ckpt").stat().st_mtime_ns
    again = fit_predict("max", train=train, val=val, test=test, num_classes=3, config=tiny_config(), log_dir=tmp_path)
    assert (tmp_path / "checkpoints" / "best.ckpt").stat().st_mtime_ns == stamp
    np.testing.assert_array_equal(first.probs, again.probs)
    changed = fit_predict(
        "max", train=train, val=val, test=test, num_classes=3, config=tiny_config(max_epochs=2), log_dir=tmp_path
    )
    assert len(changed.history["epochs"]) == 2


def test_covariates_carry_a_signal_the_cells_do_not(tmp_path):
    rng = np.random.default_rng(0)

    def bags(n, offset):
        # Cells are pure noise; the diagnosis is whether the "age" covariate is above 10 years (none within 2).
        ages = rng.uniform(0, 8, size=n) + 12 * (np.arange(n) % 2)
        return [
            BagRecord(f"c{offset + i}", rng.normal(size=(8, 4)).astype(np.float32), int(a > 10), np.array([a]))
            for i, a in enumerate(ages)
        ]

    train, val, test = bags(40, 0), bags(10, 100), bags(20, 200)
    config = tiny_config(max_epochs=20, lr=3e-2, max_cells_train=None, patience=20)
    result = fit_predict("mean", train=train, val=val, test=test, num_classes=2, config=config, log_dir=tmp_path)
    accuracy = (result.probs.argmax(1) == np.array([r.target for r in test])).mean()
    assert accuracy >= 0.9
    test[0].covariates = np.array([np.nan])
    with pytest.raises(InputError, match="c200"):
        fit_predict("mean", train=train, val=val, test=test, num_classes=2, config=config, log_dir=tmp_path / "nan")


def test_bf16_mixed_precision_trains_and_predicts(tmp_path):
    config = tiny_config(max_epochs=2, precision="bf16-mixed")
    result = fit_predict(
        "transmil",
        train=make_bags(8, 0),
        val=make_bags(3, 1),
        test=make_bags(3, 2),
        num_classes=3,
        config=config,
        log_dir=tmp_path,
    )
    assert np.isfinite(result.probs).all()
    np.testing.assert_allclose(result.probs.sum(1), 1.0, atol=1e-6)


def test_bad_inputs_and_unknown_options_are_named():
    with pytest.raises(
        ConfigError, match=r"training config: unknown key\(s\) \['max_epoch'\].*did you mean 'max_epochs'"
    ):
        TrainConfig.from_dict({"max_epoch": 3})
    with pytest.raises(ConfigError, match="monitor"):
        TrainConfig(monitor="accuracy")
    bad = make_bags(3, 0) + [BagRecord("empty-patient", np.zeros((0, 8), np.float32), 0)]
    with pytest.raises(InputError, match="empty-patient"):
        fit_predict("abmil", train=bad, val=[], test=[], num_classes=3, config=tiny_config(), log_dir="unused")


TRAIN_SCRIPT = textwrap.dedent(
    """
    import sys, numpy as np, torch
    sys.path.insert(0, {tests!r})
    torch.set_num_threads(1)
    from test_heads_train import make_bags, tiny_config
    from mil.heads import train
    from mil.heads.train import fit_predict
    train.LAST_EVERY_SECONDS = 0.0  # checkpoints after every epoch, so the kill lands between two of them
    if __name__ == "__main__":  # DDP spawns fresh interpreters that import this file
        config = tiny_config(max_epochs={epochs}, devices={devices}, patience=100)
        result = fit_predict({head!r}, train=make_bags(16, 0), val=make_bags(6, 1), test=make_bags(4, 2),
                             num_classes=3, config=config, log_dir=sys.argv[1])
        np.save(sys.argv[1] + "/probs.npy", result.probs)
    """
)


def _script(tmp_path: Path, **values) -> Path:
    path = tmp_path / f"train_{values['devices']}.py"
    path.write_text(TRAIN_SCRIPT.format(tests=str(REPO / "tests"), **values))
    return path


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
def test_training_killed_mid_run_resumes_to_the_same_weights(tmp_path):
    script = _script(tmp_path, epochs=14, devices=1, head="abmil")
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    # The uninterrupted reference runs in this process (same seed, same single thread): one start-up less.
    reference = fit_predict(
        "abmil",
        train=make_bags(16, 0),
        val=make_bags(6, 1),
        test=make_bags(4, 2),
        num_classes=3,
        config=tiny_config(max_epochs=14, patience=100),
        log_dir=clean,
    )
    np.save(clean / "probs.npy", reference.probs)
    victim = subprocess.Popen([sys.executable, str(script), str(killed)], env=_env())
    last = killed / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + HANG_GUARD_S  # a hang guard: the loop ends when the child does
    while victim.poll() is None and time.monotonic() < deadline:
        if last.exists() and torch.load(last, weights_only=True)["epoch"] >= 3:
            victim.send_signal(signal.SIGKILL)  # a real kill, somewhere inside epoch 4 or later
            break
        time.sleep(0.05)
    victim.wait(timeout=60)
    assert victim.returncode == -signal.SIGKILL, "the training finished before it could be killed"
    assert not (killed / "finished.json").exists()
    subprocess.run([sys.executable, str(script), str(killed)], check=True, env=_env(), timeout=HANG_GUARD_S)
    for name in ("last.ckpt", "best.ckpt"):
        a = torch.load(clean / "checkpoints" / name, weights_only=True)
        b = torch.load(killed / "checkpoints" / name, weights_only=True)
        assert a["epoch"] == b["epoch"]
        for key in a["state_dict"]:
            torch.testing.assert_close(a["state_dict"][key], b["state_dict"][key], atol=1e-6, rtol=0)
    np.testing.assert_allclose(np.load(clean / "probs.npy"), np.load(killed / "probs.npy"), atol=1e-6)


@pytest.mark.slow
def test_ddp_with_two_cpu_processes(tmp_path):
    script = _script(tmp_path, epochs=2, devices=2, head="abmil")
    out = tmp_path / "ddp"
    subprocess.run([sys.executable, str(script), str(out)], check=True, env=_env(), timeout=HANG_GUARD_S)
    probs = np.load(out / "probs.npy")
    assert probs.shape == (4, 3) and np.isfinite(probs).all()
    last = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    assert [e["epoch"] for e in last["history"]["epochs"]] == [0, 1]
    # 16 bags in batches of 4 = 4 batches per epoch, shared by 2 ranks: 2 optimizer steps per epoch.
    assert last["global_step"] == 4


def test_wandb_stays_off_when_the_environment_disables_it(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    fit_predict(
        "mean",
        train=make_bags(6, 0),
        val=make_bags(3, 1),
        test=make_bags(3, 2),
        num_classes=3,
        config=tiny_config(max_epochs=1, wandb="offline"),
        log_dir=tmp_path,
    )
    assert not (tmp_path / "wandb").exists()
    assert (tmp_path / "csv" / "metrics.csv").exists()
