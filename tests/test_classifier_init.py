"""Classifier for few labels: initialised from any registered encoder (a ViT too), a frozen-encoder linear probe
trains only its head, strong augmentation keeps crops valid, test-time flips make predictions rotation-invariant,
`mil classify` shows cells/s, and every option of the two commands has help text."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_classifier import CLASSES, write_cohort

SPLIT = {"train": ["P0", "P1"], "val": ["P2"], "test": ["P3"]}


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def test_init_from_a_registered_vit_encoder_writes_a_loadable_checkpoint(tmp_path):
    from mil.classifier.predict import load_classifier, predict_rows
    from mil.classifier.train import ClassifierConfig, train_classifier

    cells = write_cohort(tmp_path, n_patients=4)
    # ARCH.random is the registry's generic entry: any timm network, here a ViT built for 32 px (img_size kwarg).
    config = ClassifierConfig(init="test_vit.random", crop_size=32, max_epochs=1, batch_size=16, tta=False)
    result = train_classifier(cells, out_dir=tmp_path / "clf", config=config, split=SPLIT)
    ckpt = torch.load(result.checkpoint, weights_only=True)
    assert ckpt["arch"] == "test_vit" and ckpt["timm_kwargs"] == {"img_size": 32}
    loaded = load_classifier(result.checkpoint)
    probs = predict_rows(loaded, cells.rows[:4])
    assert probs.shape == (4, len(CLASSES)) and np.allclose(probs.sum(1), 1, atol=1e-5)
    assert np.allclose(predict_rows(loaded, cells.rows[:4]), probs)  # deterministic in eval mode


def test_an_encoder_without_a_timm_network_is_refused_with_the_fix(tmp_path):
    from mil.classifier.train import ClassifierConfig, train_classifier
    from mil.errors import ConfigError

    cells = write_cohort(tmp_path, n_patients=4)
    config = ClassifierConfig(init="morphology.handcrafted", crop_size=32, max_epochs=1)
    with pytest.raises(ConfigError, match="no timm network.*mil encoders"):
        train_classifier(cells, out_dir=tmp_path / "clf", config=config, split=SPLIT)


def test_linear_probe_changes_only_the_head(tmp_path):
    from mil.classifier.model import head_of
    from mil.classifier.predict import load_classifier
    from mil.classifier.train import ClassifierConfig, train_classifier

    cells = write_cohort(tmp_path, n_patients=4)
    config = ClassifierConfig(
        init="test_resnet.random", mode="linear_probe", crop_size=32, max_epochs=2, batch_size=8, lr=1e-2, tta=False
    )
    result = train_classifier(cells, out_dir=tmp_path / "clf", config=config, split=SPLIT)
    from features.registry import create_encoder

    start = create_encoder("test_resnet.random", input_size=32).model.state_dict()
    net = load_classifier(result.checkpoint).net
    head = {f"{name}" for name, _ in head_of(net).named_parameters()}
    changed = {k for k, v in net.state_dict().items() if k in start and not torch.equal(v, start[k])}
    assert changed == set(), f"frozen encoder tensors changed: {sorted(changed)[:5]}"
    assert head and result.history["train_loss"][-1] < result.history["train_loss"][0]


def test_strong_augment_keeps_shape_range_and_is_seeded():
    from mil.classifier.data import AugmentConfig, smear_augment

    x = torch.rand(3, 24, 24)
    strong = AugmentConfig.named("strong")
    a = smear_augment(x, strong, torch.Generator().manual_seed(3))
    b = smear_augment(x, strong, torch.Generator().manual_seed(3))
    assert a.shape == x.shape and float(a.min()) >= 0 and float(a.max()) <= 1
    assert torch.equal(a, b) and not torch.equal(a, x)
    assert AugmentConfig.named("none") is None


def test_tta_predictions_do_not_depend_on_the_crops_orientation():
    from mil.classifier.predict import predict_crops

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(3))
    crops = np.random.default_rng(0).integers(0, 255, size=(2, 12, 12, 3), dtype=np.uint8)
    kw = {"mean": (0.5,) * 3, "std": (0.5,) * 3}
    turned = np.ascontiguousarray(np.rot90(crops, 1, axes=(1, 2))[:, :, ::-1])  # rotated and mirrored
    plain = predict_crops(net, crops, **kw), predict_crops(net, turned, **kw)
    tta = predict_crops(net, crops, tta=True, **kw), predict_crops(net, turned, tta=True, **kw)
    assert np.allclose(tta[0], tta[1], atol=1e-5) and not np.allclose(plain[0], plain[1], atol=1e-5)


def test_classify_shows_cells_per_second(tmp_path, capfd, monkeypatch):
    from mil.classifier.train import ClassifierConfig, train_classifier
    from mil.cli import main

    cells = write_cohort(tmp_path, n_patients=4)
    config = ClassifierConfig(arch="test_resnet", init="random", crop_size=32, max_epochs=1, batch_size=16)
    result = train_classifier(cells, out_dir=tmp_path / "clf", config=config, split=SPLIT)
    monkeypatch.setenv("MIL_PROGRESS", "plain")
    monkeypatch.setattr("mil.progress.interval", lambda: 0.0)
    args = ["classify", "--cells", str(tmp_path / "cells.csv"), "--checkpoint", str(result.checkpoint)]
    assert main([*args, "--out", str(tmp_path / "pred.csv")]) == 0
    err = capfd.readouterr().err
    assert f"classify: {len(cells)}/{len(cells)} cells" in err and "cells/s" in err


@pytest.mark.parametrize("command", ["train-classifier", "classify"])
def test_every_option_has_help_text(command):
    import argparse
    import importlib

    from mil.cli import COMMANDS

    parser = argparse.ArgumentParser()
    importlib.import_module(COMMANDS[command][0]).add_arguments(parser)
    missing = [a.option_strings for a in parser._actions if a.option_strings != ["-h", "--help"] and not a.help]
    assert missing == []


def test_wandb_is_off_unless_asked_and_online_needs_credentials(tmp_path, monkeypatch):
    from mil.errors import ConfigError
    from mil.tracking import WandbRun, wandb_logger, wanted

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    assert not wanted("disabled") and wandb_logger("disabled", tmp_path, name="x") is None
    assert WandbRun("disabled", tmp_path, name="x", config={}).run is None
    with pytest.raises(ConfigError, match="WANDB_API_KEY.*--wandb offline"):
        wanted("online")
    monkeypatch.setenv("WANDB_MODE", "disabled")  # the environment wins
    assert not wanted("offline")
    with pytest.raises(ConfigError, match="choose one of"):
        wanted("sometimes")
