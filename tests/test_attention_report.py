"""The attention report: faithfulness measures on known cases, pages, escaping, figures."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from mil.attention.faithfulness import attention_entropy, cue_enrichment, deletion_curve
from mil.attention.report import PatientAttention, build_report


def _toy_predict(features: np.ndarray) -> np.ndarray:
    """Probability of class 1 = share of 'cue' cells (feature 0 == 1): removing them lowers it."""
    p1 = float(features[:, 0].mean())
    return np.array([1 - p1, p1])


def test_deletion_curve_of_faithful_attention_lies_below_random():
    rng = np.random.default_rng(0)
    feats = np.zeros((40, 3))
    feats[:10, 0] = 1.0
    rng.shuffle(feats)
    faithful = feats[:, 0] + 0.01
    faithful = faithful / faithful.sum()
    curve = deletion_curve(feats, faithful, _toy_predict, target=1)
    assert curve.attention[0] == curve.random[0]
    assert curve.area_between > 0.1
    inverted = deletion_curve(feats, 1.0 - faithful, _toy_predict, target=1)
    assert inverted.area_between < 0


def test_enrichment_and_entropy():
    cue = np.zeros(100, bool)
    cue[:5] = True
    att = np.where(cue, 10.0, 1.0)
    assert cue_enrichment(att / att.sum(), cue, top_k=10) == 0.5 / 0.05
    assert cue_enrichment(att, np.zeros(100, bool)) is None
    assert abs(attention_entropy(np.full(10, 0.1)) - 1.0) < 1e-9
    assert attention_entropy(np.eye(1, 10)[0]) < 1e-6
    # multi-branch attention is summed over branches
    assert abs(attention_entropy(np.full((3, 10), 1 / 30)) - 1.0) < 1e-9


def _patient(tmp_path, pid: str, dx: str, n: int = 12, seed: int = 0) -> PatientAttention:
    rng = np.random.default_rng(seed)
    field = tmp_path / f"field_{seed}.png"
    Image.fromarray(rng.integers(0, 255, (96, 96, 3), dtype=np.uint8)).save(field)
    x0 = rng.integers(0, 70, n)
    y0 = rng.integers(0, 70, n)
    boxes = np.stack([x0, y0, x0 + 20, y0 + 20], 1)
    cue = np.zeros(n, bool)
    cue[:3] = True
    feats = cue[:, None].astype(float).repeat(2, 1)
    att = np.where(cue, 5.0, 1.0)
    types = ["myeloblast" if c else "lymphocyte" for c in cue]
    return PatientAttention(
        patient_id=pid,
        true=dx,
        predicted=dx,
        attention=att / att.sum(),
        boxes=boxes,
        image_paths=[str(field)] * n,
        cell_type=types,
        truth=types,
        features=feats,
        cue=cue,
    )


def _saturating_predict(features: np.ndarray) -> np.ndarray:
    p1 = min(1.0, 4 * float(features[:, 0].mean()))  # a quarter of cue cells already means class 1
    return np.array([1 - p1, p1])


def test_report_pages_figures_and_escaping(tmp_path):
    evil = "<script>alert(1)</script>"
    patients = [_patient(tmp_path, "p1", "AML", seed=1), _patient(tmp_path, evil, "AML", seed=2)]
    multi = _patient(tmp_path, "p3", "ALL", seed=3)
    multi.attention = np.stack([multi.attention, multi.attention[::-1]]) / 2
    multi.branch_names = ["ALL", "AML"]
    patients.append(multi)
    summary = build_report(
        patients, tmp_path / "report", head="abmil", predict=lambda pid, f: _saturating_predict(f), top_k=4
    )
    index = (tmp_path / "report" / "index.html").read_text()
    assert evil not in index and "&lt;script&gt;alert(1)&lt;/script&gt;" in index
    pages = sorted((tmp_path / "report" / "patients").glob("*.html"))
    assert len(pages) == 3
    for page in pages:
        text = page.read_text()
        assert "<script" not in text
        for src in [s.split('"')[0] for s in text.split('src="')[1:]]:
            assert (page.parent / src).resolve().exists(), src
    # one gallery for all branches plus one per diagnosis branch
    multi_dir = [d for d in (tmp_path / "report" / "figures").iterdir() if d.name.startswith("p3-")][0]
    assert len(list(multi_dir.glob("gallery_*.png"))) == 3
    assert abs(summary["cue_enrichment_top10"] - (3 / 10) / (3 / 12)) < 1e-9  # all 3 cue cells in the top 10
    assert summary["deletion_area"] > 0
    saved = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert saved["patients"] == 3 and "mass_by_type" in saved


def test_report_renders_in_headless_chromium(tmp_path):
    """Open index.html and a patient page: every image loads, no console error, a screenshot is saved."""
    from browser import open_browser

    patients = [
        _patient(tmp_path, "<script>alert('x')</script>", "AML", seed=5),
        _patient(tmp_path, "p2", "ALL", seed=6),
    ]
    build_report(patients, tmp_path / "report", head="abmil", predict=lambda pid, f: _saturating_predict(f), top_k=4)
    browser = open_browser(tmp_path)
    try:
        pages = [tmp_path / "report" / "index.html", *sorted((tmp_path / "report" / "patients").glob("*.html"))]
        for page in pages:
            browser.get(page.as_uri())
            n_images, broken = browser.execute_script(
                "const imgs = Array.from(document.images);"
                "return [imgs.length, imgs.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.src)];"
            )
            assert n_images > 0 and broken == [], f"{page.name}: broken images {broken}"
            errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
            assert errors == [], f"{page.name}: console errors {errors}"
            assert browser.execute_script("return window.__xss === undefined")
            shot = tmp_path / f"{page.stem}.png"
            assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
        assert "<script>alert('x')</script>" in browser.find_element("tag name", "h1").text
    finally:
        browser.quit()


def test_overlay_colours_are_matplotlibs_inferno():
    import matplotlib

    from mil.attention.figures import _colour

    inferno = matplotlib.colormaps["inferno"]
    for value in [*np.random.default_rng(0).random(500).tolist(), 0.0, 1.0]:
        r, g, b, _ = inferno(value)
        assert _colour(value * 3.0, 3.0) == (int(r * 255), int(g * 255), int(b * 255))
    assert _colour(-1.0, 1.0) == _colour(0.0, 1.0) and _colour(5.0, 1.0) == _colour(1.0, 1.0)  # clipped
