"""RELIABILITY promises 4 and 6, issue 14 case 8: boxes of inf or 1e400 and pickles given as a head bundle or as a
training run's last.ckpt are one plain error naming the file and the fix, never an OverflowError or
UnpicklingError traceback; a pickle is refused without running it. (Long patient ids: tests/test_tables.py.)"""

from __future__ import annotations

import json
import os
import pickle

import pytest
import torch
from reader_files import coco_doc
from test_extract import make_cohort

from mil.cell_table import read_cell_table
from mil.cli import main as mil_main
from mil.errors import InputError
from mil.readers import read_dataset


class Payload:
    """Unpickling this runs code: it would create the file `path`."""

    def __init__(self, path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (os.makedirs, (self.path,))


def write_pickle(path, marker) -> None:
    with open(path, "wb") as f:
        pickle.dump({"state_dict": {}, "payload": Payload(marker)}, f)


@pytest.mark.parametrize("value", ["inf", "1e400", "-inf", "nan", "1e12"])
def test_promise4_a_box_of_inf_or_1e400_names_the_row_not_an_overflow(tmp_path, capsys, value):
    cells = make_cohort(tmp_path, patients=2, cells=3)
    lines = cells.read_text().splitlines()
    columns = lines[0].split(",")
    row = lines[2].split(",")
    row[columns.index("x1")] = value
    lines[2] = ",".join(row)
    cells.write_text("\n".join(lines) + "\n")
    with pytest.raises(InputError, match=f"{cells.name}:3: column x1 is '{value}', not a pixel coordinate"):
        read_cell_table(cells)
    code = mil_main(
        ["extract", "--cells", str(cells), "--encoder", "morphology.handcrafted", "--out", str(tmp_path / "b")]
    )
    err = capsys.readouterr().err
    assert code == 2 and "column x1 is" in err and "Traceback" not in err


def test_promise4_a_reader_box_of_1e400_is_a_listed_problem(tmp_path):
    doc = coco_doc(tmp_path / "images")
    (tmp_path / "annotations").mkdir()
    text = json.dumps(doc).replace("[4.0, 5.0, 20.0, 10.0]", "[4.0, 5.0, 1e400, 10.0]")  # json reads it as inf
    (tmp_path / "annotations" / "instances.json").write_text(text)
    with pytest.raises(
        InputError, match=r"instances\.json annotations\[0\] \(id 10\): bbox is inf, not a finite number"
    ):
        read_dataset("coco", tmp_path)


def test_promise4_box_in_image_refuses_coordinates_that_are_no_pixel():
    """YOLO and VOC compute boxes from floats: 1e400 reads as inf, and math.floor(inf) was an OverflowError."""
    from mil.readers.common import Problems, box_in_image

    problems = Problems("test")
    for box in [(0, 0, float("inf"), 5), (float("nan"), 0, 4, 5), (0, 0, 1e300, 5)]:
        assert box_in_image(box, (64, 64), "labels/a.txt:1", problems) is None
    assert len(problems) == 3 and all("no pixel position" in p for p in problems.items)
    assert box_in_image((0.4, 0.6, 10.5, 5), (64, 64), "ok", problems) == (0, 1, 11, 5)


def test_promise6_a_pickle_given_as_a_head_bundle_is_refused_unrun(tmp_path):
    from mil.heads.bundle import load_head_bundle

    bundle, marker = tmp_path / "abmil.pt", tmp_path / "ran"
    write_pickle(bundle, marker)
    with pytest.raises(InputError) as error:
        load_head_bundle(bundle)
    message = str(error.value)
    assert f"head bundle {bundle} is no file of tensors and plain values" in message and "refused unread" in message
    assert "weights_only=False" not in message  # torch's advice would run the file
    assert not marker.exists()
    torch.save({"format": "something else"}, bundle)
    with pytest.raises(Exception, match="is not a head bundle"):
        load_head_bundle(bundle)
    bundle.write_bytes(b"PK\x03\x04" + b"\x00" * 10)  # a truncated archive
    with pytest.raises(InputError, match="is not a readable checkpoint"):
        load_head_bundle(bundle)


def test_promise6_a_pickle_as_the_detectors_last_ckpt_or_checkpoint_is_refused(tmp_path, capsys):
    from test_detector import TINY, write_fields

    from mil.detector import train
    from mil.detector.model import DetectorConfig
    from mil.detector.train import DetectorTrainConfig, train_detector

    torch.set_num_threads(1)
    cells = write_fields(tmp_path)
    run = dict(config=DetectorConfig(**TINY), train_config=DetectorTrainConfig(epochs=1, batch_size=3, seed=0))
    result = train_detector(cells, out_dir=tmp_path / "det", **run)
    marker = tmp_path / "ran"
    last = tmp_path / "det" / train.RUN_DIR / "checkpoints" / "last.ckpt"
    write_pickle(last, marker)
    with pytest.raises(InputError, match=f"detector training checkpoint {last} is no file of tensors and plain values"):
        train_detector(cells, out_dir=tmp_path / "det", **run)
    write_pickle(result.checkpoint, marker)
    args = ["detect", "--images", str(tmp_path / "P0.png"), "--checkpoint", str(result.checkpoint)]
    assert mil_main([*args, "--out", str(tmp_path / "found.csv")]) == 2
    err = capsys.readouterr().err
    assert "detector checkpoint" in err and "refused unread" in err and "Traceback" not in err
    assert not marker.exists()


def test_promise6_a_pickle_as_the_classifiers_or_a_heads_last_ckpt_is_refused(tmp_path):
    import numpy as np
    from test_classifier import write_cohort
    from test_classifier_resume import SPLIT, tiny_config

    from mil.classifier.train import train_classifier
    from mil.heads.data import BagRecord
    from mil.heads.train import TrainConfig, fit_predict

    torch.set_num_threads(1)
    marker = tmp_path / "ran"
    cells = write_cohort(tmp_path)
    config = tiny_config(max_epochs=1)
    train_classifier(cells, out_dir=tmp_path / "clf", config=config, split=SPLIT)
    run = tmp_path / "clf" / "run"
    write_pickle(run / "checkpoints" / "last.ckpt", marker)
    with pytest.raises(InputError, match="classifier training checkpoint .* is no file of tensors and plain values"):
        train_classifier(cells, out_dir=tmp_path / "clf", config=config, split=SPLIT)  # finished: reused
    (run / "finished.json").unlink()
    with pytest.raises(InputError, match="training checkpoint .*last.ckpt is no file of tensors and plain values"):
        train_classifier(cells, out_dir=tmp_path / "clf", config=config, split=SPLIT)  # resumed by Lightning
    # A head's run folder: reused when finished, so its last.ckpt is read too.
    rng = np.random.default_rng(0)
    bags = [BagRecord(f"p{i}", rng.normal(size=(5, 4)).astype(np.float32), i % 2) for i in range(8)]
    head_config = TrainConfig(max_epochs=1, hidden_dim=4, batch_size=4, seed=0)
    split = dict(train=bags[:4], val=bags[4:6], test=bags[6:], num_classes=2, config=head_config)
    fit_predict("mean", **split, log_dir=tmp_path / "head")
    write_pickle(tmp_path / "head" / "checkpoints" / "last.ckpt", marker)
    with pytest.raises(InputError, match="head training checkpoint .* is no file of tensors and plain values"):
        fit_predict("mean", **split, log_dir=tmp_path / "head")
    assert not marker.exists()
