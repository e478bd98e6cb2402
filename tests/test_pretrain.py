"""`mil pretrain` (DINO and SimCLR through lightly): it writes an `ssl.file` encoder whose record comes from the run,
`mil extract` takes it and records the run and the weights' sha256 in every bag, a finished run is reused, and a
run SIGKILLed inside an epoch resumes to the weights of an uninterrupted one (RELIABILITY promise 2)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from features.encoders.weights import sha256_file
from mil.cell_table import read_cell_table
from mil.classifier import resume
from mil.cli import main
from mil.errors import ConfigError, InputError
from mil.pretrain.config import PretrainConfig
from mil.pretrain.train import pretrain

REPO = Path(__file__).resolve().parent.parent


def tiny(method: str, **overrides) -> PretrainConfig:
    values = dict(method=method, arch="test_resnet", crop_size=32, batch_size=8, max_epochs=2, local_views=2, seed=1)
    values.update(dino_out_dim=64, dino_hidden_dim=32, dino_bottleneck_dim=16, proj_dim=16, verbose=False)
    return PretrainConfig(**{**values, **overrides})


@pytest.fixture(scope="module")
def cells_csv(tmp_path_factory) -> Path:
    """~34 cells of two small synthetic smears, written by `mil synth` and read by `mil cells`."""
    root = tmp_path_factory.mktemp("pretrain_cells")
    synth = ["synth", "--out", str(root / "cohort"), "--seed", "3", "--patients", "2", "--fields-per-patient", "1",
             "--cells-per-field", "16", "--field-width", "192", "--field-height", "192", "--quiet"]  # fmt: skip
    assert main(synth) == 0
    assert main(["cells", "--format", "zenodo", "--input", str(root / "cohort"), "--out", str(root / "cells")]) == 0
    return root / "cells" / "cells.csv"


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0)


@pytest.mark.parametrize("method", ["dino", "simclr"])
def test_pretrained_encoder_registers_and_extract_records_its_run(method, cells_csv, tmp_path, monkeypatch):
    from features.bag_directory import BagDirectory
    from features.registry import create_encoder

    monkeypatch.setenv("MIL_PROGRESS", "0")
    torch.set_num_threads(1)
    result = pretrain(read_cell_table(cells_csv), out_dir=tmp_path / "enc", config=tiny(method, max_steps=3))
    assert result.state == "fresh" and len(result.history["train_loss"]) >= 1
    assert (tmp_path / "enc" / "loss.png").stat().st_size > 1000
    encoder = create_encoder("ssl.file", weights=str(result.encoder))
    config = encoder.config
    # The record is the pretraining run's: nothing retyped at extraction.
    assert (config.arch, config.input_size, config.mean, config.interpolation) == ("test_resnet", 32, (0.5,) * 3,
                                                                                   "bilinear")  # fmt: skip
    assert config.embed_dim == 96 and config.extra["method"] == method
    assert config.extra["pretrain"]["fingerprint"] == result.fingerprint
    assert config.weights_sha256 == sha256_file(result.encoder)
    with pytest.raises(ConfigError, match="pretrained at 32 px"):
        create_encoder("ssl.file", weights=str(result.encoder), input_size=64)

    bags = tmp_path / "bags"
    argv = ["extract", "--cells", str(cells_csv), "--encoder", "ssl.file", "--weights", str(result.encoder),
            "--out", str(bags), "--threads", "1"]  # fmt: skip
    assert main(argv) == 0
    directory = BagDirectory(bags)
    recorded = directory.load(directory.patients()[0]).encoder_config
    assert recorded["weights_sha256"] == sha256_file(result.encoder)
    assert recorded["extra"]["pretrain"]["run_dir"] == str((tmp_path / "enc" / "run").resolve())
    assert recorded["extra"]["pretrain"]["method"] == method and recorded["input_size"] == 32

    # The same call again reuses the finished run: no training, the same encoder file.
    again = pretrain(read_cell_table(cells_csv), out_dir=tmp_path / "enc", config=tiny(method, max_steps=3))
    assert again.state == "finished" and again.seconds == 0
    _assert_same(_tensors(again.encoder), _tensors(result.encoder))


def test_ssl_file_refuses_other_files(tmp_path):
    import timm

    from features.registry import create_encoder

    plain = tmp_path / "plain.pth"
    torch.save(timm.create_model("test_resnet", num_classes=0).state_dict(), plain)
    with pytest.raises(InputError, match="encoder.safetensors that `mil pretrain` writes"):
        create_encoder("ssl.file", weights=str(plain))
    with pytest.raises(InputError, match="does not exist"):
        create_encoder("ssl.file", weights=str(tmp_path / "missing.safetensors"))


def test_pretrain_refuses_a_table_smaller_than_a_batch(cells_csv, tmp_path):
    with pytest.raises(InputError, match="lower --batch-size"):
        pretrain(read_cell_table(cells_csv), out_dir=tmp_path / "e", config=tiny("simclr", batch_size=64))


# Holds the process right after its first checkpoint inside an epoch (epoch 0, after batch 1), so the test's SIGKILL
# lands there whatever the speed of the machine; the rerun (no HOLD) finishes the run.
INSIDE_SCRIPT = textwrap.dedent(
    """
    import os, sys, time, torch
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    torch.set_num_threads(1)
    from test_pretrain import tiny
    from mil.cell_table import read_cell_table
    from mil.classifier import resume
    from mil.pretrain.train import pretrain
    resume.LAST_EVERY_SECONDS = 0.0
    flush = resume.ClassifierCheckpoint._flush
    def held(self, trainer):
        flush(self, trainer)
        if self._inside is not None and os.environ.get("HOLD"):
            print("HELD", self._inside["epoch"], self._inside["batches"], flush=True)
            time.sleep(600)
    resume.ClassifierCheckpoint._flush = held
    cells, out = Path(sys.argv[1]), Path(sys.argv[2])
    pretrain(read_cell_table(cells), out_dir=out, config=tiny("dino"))
    """
)


@pytest.mark.slow
def test_pretrain_killed_inside_an_epoch_resumes_to_the_same_weights(cells_csv, tmp_path, monkeypatch):
    """DINO: the student, the EMA teacher, the loss's centre and the views all have to replay exactly."""
    monkeypatch.setattr(resume, "LAST_EVERY_SECONDS", 0.0)
    monkeypatch.setenv("MIL_PROGRESS", "0")
    torch.set_num_threads(1)
    script = tmp_path / "inside.py"
    script.write_text(INSIDE_SCRIPT.format(tests=str(REPO / "tests")))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MIL_PROGRESS": "0"}
    killed = tmp_path / "killed"
    victim = subprocess.Popen([sys.executable, str(script), str(cells_csv), str(killed)], env={**env, "HOLD": "1"},
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    reference = pretrain(read_cell_table(cells_csv), out_dir=tmp_path / "clean", config=tiny("dino"))
    held = victim.stdout.readline().split()
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=600)
    assert held == ["HELD", "0", "1"], held
    last = torch.load(killed / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["epoch"] == 0 and last["global_step"] == 1  # one batch of the first epoch, kept
    assert not (killed / "encoder.safetensors").exists()
    subprocess.run([sys.executable, str(script), str(cells_csv), str(killed)], check=True, env=env, timeout=600)
    _assert_same(_tensors(reference.encoder), _tensors(killed / "encoder.safetensors"))
    a = torch.load(tmp_path / "clean" / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(killed / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    _assert_same(a["state_dict"], b["state_dict"])  # student, teacher, heads and the DINO centre
    assert b["history"]["train_loss"] == pytest.approx(a["history"]["train_loss"], abs=1e-6)


DDP_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    sys.path.insert(0, {tests!r})
    torch.set_num_threads(1)
    from pathlib import Path
    from test_pretrain import tiny
    from mil.cell_table import read_cell_table
    from mil.pretrain.train import pretrain
    if __name__ == "__main__":  # Lightning's "ddp" launcher runs this file once per rank
        cells, out = Path(sys.argv[1]), Path(sys.argv[2])
        result = pretrain(read_cell_table(cells), out_dir=out, config=tiny(sys.argv[3], devices=2, batch_size=4))
        print("RESULT", [round(v, 6) for v in result.history["train_loss"]], flush=True)
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["dino", "simclr"])
def test_two_cpu_processes_pretrain_one_encoder(method, cells_csv, tmp_path):
    """DDP smoke test (--devices 2): both ranks finish with the same losses (gathered negatives for SimCLR, an
    all-reduced centre for DINO) and the encoder loads."""
    from features.registry import create_encoder

    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT.format(tests=str(REPO / "tests")))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MIL_PROGRESS": "0"}
    argv = [sys.executable, str(script), str(cells_csv), str(tmp_path / "out"), method]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    results = [line for line in done.stdout.splitlines() if line.startswith("RESULT")]
    assert len(results) == 2 and results[0] == results[1], results
    assert create_encoder("ssl.file", weights=str(tmp_path / "out" / "encoder.safetensors")).config.embed_dim == 96


def test_pretrain_takes_wandb_like_the_other_training_commands():
    from mil.errors import ConfigError
    from mil.pretrain.config import PretrainConfig
    from mil.runs import weight_settings

    assert PretrainConfig(wandb="offline").wandb == "offline"
    assert "wandb" not in weight_settings(PretrainConfig(wandb="offline"))  # logging never changes the weights
    with pytest.raises(ConfigError, match="wandb 'bogus' is unknown"):
        PretrainConfig(wandb="bogus")
