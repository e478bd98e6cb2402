"""Count heads: registry, differential (truth/hard/soft, groups), each head's fit/predict, cross-fit checks."""

from __future__ import annotations

import numpy as np
import pytest

from features.bags import Bag
from mil.count import build_count_data, create_count_head, list_count_heads, load_groups, register_count_head
from mil.count.differential import cell_counts, check_crossfit
from mil.errors import ConfigError, InputError
from mil.protocol import crossfit_plan, make_splits

CLASSES = ["myeloblast", "lymphoblast", "segmented_neutrophil", "lymphocyte"]
DIAGNOSES = ["ALL", "AML", "CML"]
# share of each cell class by diagnosis (rows) - distinct enough for a count head to separate
COMPOSITION = np.array([[0.05, 0.6, 0.15, 0.2], [0.6, 0.05, 0.15, 0.2], [0.05, 0.05, 0.7, 0.2]])


def make_bag(pid: str, dx: int, rng: np.random.Generator, n: int = 30, probs: bool = False) -> Bag:
    label = rng.choice(len(CLASSES), size=n, p=COMPOSITION[dx])
    label[: n // 10] = -1  # a few unlabelled cells are never counted
    cell_probs = None
    if probs:
        logits = rng.normal(size=(n, len(CLASSES)))
        logits[np.arange(n), np.maximum(label, 0)] += 3.0
        cell_probs = (np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)).astype(np.float32)
    return Bag(
        patient_id=pid,
        features=rng.normal(size=(n, 4)).astype(np.float32),
        boxes=np.tile([0, 0, 8, 8], (n, 1)).astype(np.int32),
        image_index=np.zeros(n, dtype=np.int32),
        image_paths=["img.png"],
        cell_id=[f"{pid}:{i}" for i in range(n)],
        label=label.astype(np.int64),
        cell_probs=cell_probs,
        attrs={"label_classes": CLASSES, "encoder_config": {"name": "fake"}},
    )


def cohort_bags(n_per_class: int = 8, seed: int = 0, probs: bool = False) -> tuple[dict, np.ndarray]:
    rng = np.random.default_rng(seed)
    bags, y = {}, []
    for i in range(n_per_class * len(DIAGNOSES)):
        dx = i % len(DIAGNOSES)
        bags[f"P{i:02d}"] = make_bag(f"P{i:02d}", dx, rng, probs=probs)
        y.append(dx)
    return bags, np.array(y)


def test_registry_lists_builtin_heads_refuses_duplicates_and_names_valid_ones():
    assert {"count.logreg", "count.rf", "count.gb", "count.ratio", "count.meta"} <= set(list_count_heads())
    with pytest.raises(ValueError, match="twice"):
        register_count_head("count.logreg")(type("Again", (), {}))
    with pytest.raises(ConfigError, match="count.logreg"):
        create_count_head("count.nope")
    with pytest.raises(ConfigError, match="count.rf"):
        create_count_head("count.rf", depth=3)


def test_counts_from_truth_hard_and_soft():
    bag = make_bag("P0", 0, np.random.default_rng(1), n=40, probs=True)
    truth, classes = cell_counts(bag, "truth")
    assert classes == CLASSES
    assert truth.sum() == (bag.label >= 0).sum() and truth[0] == (bag.label == 0).sum()
    hard, _ = cell_counts(bag, "hard")
    np.testing.assert_array_equal(hard, np.bincount(bag.cell_probs.argmax(axis=1), minlength=4))
    soft, _ = cell_counts(bag, "soft")
    assert soft.sum() == pytest.approx(40, rel=1e-5)
    no_probs = make_bag("P1", 0, np.random.default_rng(1))
    with pytest.raises(InputError, match="P1.*cell_probs"):
        cell_counts(no_probs, "hard")


def test_truth_counts_of_bags_without_labelled_cells_are_an_error_naming_the_fix():
    bags, _ = cohort_bags(n_per_class=2, probs=True)
    for bag in bags.values():
        bag.label[:] = -1
    with pytest.raises(InputError, match=r"none of the 6 bag\(s\) has a labelled cell.*P00.*--counts hard") as e:
        build_count_data(bags, source="truth")
    assert "classifier.file" in str(e.value) and "column `label`" in str(e.value)
    assert build_count_data(bags, source="soft").differential.sum(axis=1) == pytest.approx(1.0)  # the fix works
    bags, _ = cohort_bags(n_per_class=2)
    bags["P03"].label[:] = -1
    with pytest.raises(InputError, match=r"1 of the 6 bag\(s\) have no labelled cell .*: P03\."):
        build_count_data(bags, source="truth")


def test_differential_shares_groups_and_metadata(tmp_path):
    bags, _ = cohort_bags(2)
    data = build_count_data(bags, source="truth")
    assert data.names == CLASSES and data.differential.shape == (6, 4)
    np.testing.assert_allclose(data.differential.sum(axis=1), 1.0)
    blast = data.share("blast")  # from the label map's groups: myeloblast + lymphoblast here
    np.testing.assert_allclose(blast, data.differential[:, 0] + data.differential[:, 1])
    assert data.meta[0, 0] == pytest.approx(np.log1p(30)) and data.meta[0, 1] == pytest.approx(27 / 30)
    groups_file = tmp_path / "groups.yaml"
    groups_file.write_text("groups:\n  blast: [myeloblast, lymphoblast]\n")
    grouped = build_count_data(bags, source="truth", group_by=load_groups(groups_file))
    assert grouped.names == ["blast", "ungrouped"]
    np.testing.assert_allclose(grouped.differential[:, 0], blast)
    np.testing.assert_allclose(grouped.share("blast"), blast)
    with pytest.raises(ConfigError, match="choose one of"):
        grouped.share("monocytic")
    sub = data.take(["P03", "P01"])
    assert sub.patients == ["P03", "P01"]
    np.testing.assert_array_equal(sub.differential[0], data.differential[3])


@pytest.mark.parametrize("name", ["count.logreg", "count.rf", "count.gb", "count.ratio", "count.meta"])
def test_every_count_head_gives_probabilities_for_every_class(name):
    bags, y = cohort_bags(6)
    data = build_count_data(bags, source="truth")
    train, test = list(data.patients[:12]), list(data.patients[12:])
    head = create_count_head(name, seed=0).fit(data.take(train), y[:12], num_classes=3)
    probs = head.predict_proba(data.take(test))
    assert probs.shape == (6, 3) and np.all(probs >= 0)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0)
    # a class absent from training keeps its column (probability 0) instead of shifting the others
    keep = [i for i in range(12) if y[i] != 2]
    missing = create_count_head(name, seed=0).fit(data.take([train[i] for i in keep]), y[keep], num_classes=3)
    assert np.all(missing.predict_proba(data.take(test))[:, 2] == 0)


def test_logreg_separates_distinct_compositions_and_meta_does_not():
    bags, y = cohort_bags(10)
    data = build_count_data(bags, source="truth")
    train, test = data.patients[::2], data.patients[1::2]
    logreg = create_count_head("count.logreg").fit(data.take(train), y[::2], num_classes=3)
    acc = (logreg.predict_proba(data.take(test)).argmax(axis=1) == y[1::2]).mean()
    assert acc >= 0.9
    meta = create_count_head("count.meta").fit(data.take(train), y[::2], num_classes=3)
    assert (meta.predict_proba(data.take(test)).argmax(axis=1) == y[1::2]).mean() < 0.7  # no shortcut here


def test_ratio_rule_is_one_threshold_on_the_blast_share_for_two_diagnoses():
    bags, y = cohort_bags(8)
    keep = [i for i in range(len(y)) if y[i] != 0]  # AML (blast-rich) vs CML (blast-poor)
    data = build_count_data(bags, source="truth").take([f"P{i:02d}" for i in keep])
    head = create_count_head("count.ratio", group="blast").fit(data, (y[keep] == 1).astype(int), num_classes=2)
    (threshold,) = head.thresholds()
    share = data.share("blast")
    assert share[y[keep] == 2].max() < threshold < share[y[keep] == 1].min()


def test_crossfit_check_refuses_a_classifier_that_saw_a_test_patient():
    splits = make_splits({f"P{i:02d}": DIAGNOSES[i % 3] for i in range(15)}, folds=3, seeds=1)
    fold = crossfit_plan(splits)[0]
    check_crossfit(fold, fold["train_patients"], where="fold0")  # clean: passes
    with pytest.raises(InputError, match="trained on 1 of its test"):
        check_crossfit(fold, fold["train_patients"] + fold["test_patients"][:1], where="fold0")
    with pytest.raises(InputError, match="not recorded"):
        check_crossfit(fold, None, where="fold0")


def test_heads_that_never_read_the_differential_run_on_unlabelled_bags(tmp_path):
    """count.meta and count.covariates read no cell class, so bags without labels are fine for them alone."""
    import numpy as np
    from test_compare import DIAGNOSES, fake_bag

    from features.bags import write_bag
    from mil.cell_table import PatientTable
    from mil.compare import load_compare_config, run_compare

    rng = np.random.default_rng(0)
    rows = []
    for i in range(12):
        bag = fake_bag(f"P{i:02d}", i % 3, rng)
        bag.label[:] = -1
        write_bag(tmp_path / "bags" / f"P{i:02d}.h5", bag)
        rows.append({"patient_id": f"P{i:02d}", "diagnosis": DIAGNOSES[i % 3], "age": str(i)})
    PatientTable(rows=rows).write(tmp_path / "p.csv")
    config = load_compare_config(None, heads="count.meta", folds=3, seeds=1, n_boot=100, covariates="age")
    result = run_compare(config, bags=tmp_path / "bags", patients=tmp_path / "p.csv", out=tmp_path / "r", log=print)
    assert set(result.probs) == {"count.meta", "count.covariates"}
