"""The HTML review reports, opened in a real browser: Debian's headless Chromium driven by
Playwright (no browser download). Each report must load with no console error, every image
must decode, the tables must hold the Parquet's rows and sort and filter when clicked and typed in.

A screenshot of each page goes to the test's tmp folder, and to $BRAINTUMOR_SCREENSHOT_DIR when
it is set (scripts/report_screenshots.sh makes the docs' pictures that way).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from braintumor_ray import CLASS_NAMES
from braintumor_ray.core import resolve
from braintumor_ray.report import (
    SCORING_REPORT,
    risk_coverage,
    scoring_report_location,
    write_scoring_report,
    write_search_report,
    write_training_report,
)
from conftest import mri_like

SCREENSHOT_ENV = "BRAINTUMOR_SCREENSHOT_DIR"
N_ROWS = 130  # more than a page (100 rows): the pager is part of what is checked


# --- the browser ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser():
    chromium = shutil.which("chromium")
    if chromium is None:  # a failure, not a skip: the reports are only tested in a browser
        pytest.fail("chromium is not installed: run `bash scripts/setup.sh --dev` (it installs Debian's chromium "
                    "package) or `apt-get install chromium`")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        yield b
        b.close()


class Opened:
    """A report loaded in a fresh page, with the console errors it raised."""

    def __init__(self, browser, path: str | os.PathLike, shot: str, tmp_path: Path):
        self.page = browser.new_page(viewport={"width": 1280, "height": 1300})
        self.errors: list[str] = []
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.goto(Path(path).as_uri())
        self.page.wait_for_load_state("load")
        self.images = self.page.evaluate("Array.from(document.images).map(i => i.complete ? i.naturalWidth : 0)")
        for folder in filter(None, (str(tmp_path), os.environ.get(SCREENSHOT_ENV))):
            os.makedirs(folder, exist_ok=True)
            self.page.screenshot(path=os.path.join(folder, f"report_{shot}.png"))

    def check_loaded(self, min_images: int = 0) -> None:
        assert not self.errors, self.errors
        assert len(self.images) >= min_images, self.images
        assert all(w > 0 for w in self.images), f"images that did not load: {self.images}"

    def headers(self, table: str) -> list[str]:
        return [t.strip().rstrip("\u25b2\u25bc") for t in self.page.locator(f"#{table} thead tr:first-child th").all_inner_texts()]

    def column(self, table: str, name: str) -> list[str]:
        k = self.headers(table).index(name)
        return self.page.eval_on_selector_all(f"#{table} tbody tr", f"trs => trs.map(tr => tr.cells[{k}].textContent)")

    def n_rows(self, table: str) -> int:
        return self.page.locator(f"#{table} tbody tr").count()

    def sort(self, table: str, name: str) -> None:
        self.page.locator(f"#{table} thead tr:first-child th").nth(self.headers(table).index(name)).click()

    def filter(self, table: str, name: str, value: str, *, select: bool = False) -> None:
        box = self.page.locator(f'#{table} thead tr.filters [data-col="{self.headers(table).index(name)}"]')
        box.select_option(value) if select else box.fill(value)

    def matching(self, table: str) -> int:
        return int(self.page.get_attribute(f"#{table}", "data-matching"))


def _floats(cells: list[str]) -> list[float]:
    return [float(c) for c in cells if c != ""]


# --- a scoring output, written as run_scoring writes it --------------------------------------------


def _lesion_map(image: np.ndarray, rng) -> np.ndarray:
    """A stand-in heat map that looks like one: a blur of the image's brightest blob (the
    generator's lesions are brighter than the skull), plus noise."""
    import cv2

    hot = cv2.GaussianBlur((image >= 220).astype(np.float32), (0, 0), image.shape[0] / 12) + 0.1 * rng.random(image.shape)
    return (hot / hot.max()).astype(np.float32)


def fake_scoring_output(root: Path, *, n: int = N_ROWS) -> tuple[Path, Path, dict]:
    """A predictions folder in two Parquet files (the scoring schema plus ``heatmap_path``),
    one file rescored later (its older row must drop out), a series table, and overlay PNGs
    under OUTPUT_explain for the rows a reviewer looks at."""
    from braintumor_ray.explain import overlay_png
    from braintumor_ray.score import output_schema, series_table

    out, explain = root / "predictions", root / "predictions_explain"
    out.mkdir(parents=True)
    explain.mkdir()
    rng = np.random.default_rng(0)
    t0 = datetime(2026, 1, 5, 3, 0, tzinfo=timezone.utc)
    images = mri_like(8, seed=5, size=64)
    schema = output_schema(list(CLASS_NAMES))
    if "heatmap_path" not in schema.names:
        schema = schema.append(pa.field("heatmap_path", pa.string()))
    rows = []
    for i in range(n):
        status = "error" if i % 23 == 7 else "ok"
        p = rng.dirichlet(np.full(4, 0.6)) if status == "ok" else np.full(4, np.nan)
        reason = None
        if status == "ok":
            reason = "out_of_distribution" if i % 17 == 3 else "low_confidence" if p.max() < 0.5 else None
        dicom = i < 30  # three DICOM series of ten slices
        label = CLASS_NAMES[int(np.argmax(p))] if status == "ok" else None
        row = {
            "path": f"archive/study{i // 10}/IMG_{i:04d}.{'dcm' if dicom else 'png'}",
            "sha256": f"{i:064x}", "size": 1000 + i, "version": "1",
            "predicted_label": label,
            **{f"prob_{c}": (float(p[k]) if status == "ok" else None) for k, c in enumerate(CLASS_NAMES)},
            "confidence": float(p.max()) if status == "ok" else None,
            "ood_score": float(rng.uniform(0, 3)) if status == "ok" else None,
            "review_reason": reason,
            "head_fraction": 0.5 if status == "ok" else None,
            "model_id": "resnet10t-abc123", "scored_at": t0 + timedelta(seconds=i),
            "status": status, "error": "cannot decode: truncated file" if status == "error" else None,
            "sop_instance_uid": f"1.2.3.{i}" if dicom else None,
            "series_instance_uid": f"1.2.9.{i // 10}" if dicom else None,
            "study_instance_uid": "1.2.8.1" if dicom else None,
            "instance_number": i % 10 + 1 if dicom else None, "slice_index": None, "selection": "",
            "heatmap_path": None,
        }
        if status == "ok" and (reason or label != "no_tumor"):
            png = explain / f"{i:04d}.png"
            png.write_bytes(overlay_png(images[i % 8], _lesion_map(images[i % 8], rng)))
            row.update(heatmap_path=str(png), heatmap_peak_x=i % 64, heatmap_peak_y=7)
        rows.append(row)
    # An older scoring of a file that was rescored (changed content): left out of the report.
    old = dict(rows[40], scored_at=t0 - timedelta(days=1), predicted_label="glioma", sha256="f" * 64)
    table = pa.Table.from_pylist(rows, schema=schema)
    pq.write_table(table.slice(0, 60), out / "run1_0.parquet")
    pq.write_table(pa.concat_tables([table.slice(60), pa.Table.from_pylist([old], schema=schema)]), out / "run2_0.parquet")
    (out / "_config.yaml").write_text("model: x\n")
    series_dir = root / "predictions_series"
    series_dir.mkdir()
    st = series_table(table, list(CLASS_NAMES))
    pq.write_table(st, series_dir / "series.parquet")
    return out, series_dir / "series.parquet", {"rows": rows, "series": st}


def test_scoring_report_in_the_browser(browser, tmp_path):
    out, series, made = fake_scoring_output(tmp_path)
    rows = made["rows"]
    cases = [r for r in rows if r["review_reason"] or (r["predicted_label"] not in (None, "no_tumor"))]
    os.remove(cases[-1]["heatmap_path"])  # a map deleted by hand: its card says so, the report still builds
    dst = resolve(str(out))
    uri = write_scoring_report(dst, series=resolve(str(series)))
    assert uri == str(out / SCORING_REPORT) and os.path.exists(uri)
    assert not [f for f in os.listdir(out) if f.startswith(".")]  # the temporary file was renamed
    # Parquet readers still see the predictions only (the report is an underscore file).
    latest = pads.dataset(str(out), format="parquet").to_table().num_rows - 1
    assert latest == N_ROWS

    r = Opened(browser, uri, "scoring", tmp_path)
    r.check_loaded(min_images=len(cases) - 1)
    assert len(r.images) == len(cases) - 1  # one heat map per case card, nothing else embedded
    page = r.page
    assert page.locator("#cases .card", has_text=cases[-1]["path"]).inner_text().startswith("heat map missing")
    # Counts: status and review reasons as the Parquet has them (the superseded row left out).
    text = page.inner_text("#counts")
    n_err = sum(r["status"] == "error" for r in rows)
    assert re.search(rf"\berror\s+{n_err}\b", text) and re.search(rf"\bok\s+{N_ROWS - n_err}\b", text), text
    n_ood = sum(r["review_reason"] == "out_of_distribution" for r in rows)
    assert re.search(rf"out_of_distribution\s+{n_ood}\b", text), text
    # Cases: flagged first (out of distribution, then low confidence), then tumours.
    tags = page.locator("#cases .card .tag").first.inner_text()
    assert tags == "out_of_distribution"
    assert page.locator("#cases .card").count() == len(cases)

    # The predictions table: every row, 100 a page.
    assert int(page.get_attribute("#predictions", "data-total")) == N_ROWS == r.matching("predictions")
    assert r.n_rows("predictions") == 100
    seen = set(r.column("predictions", "path"))
    page.locator("#predictions .pager button", has_text="next").click()
    assert r.n_rows("predictions") == N_ROWS - 100
    seen |= set(r.column("predictions", "path"))
    assert seen == {row["path"] for row in rows}  # exactly the Parquet's paths, as written
    # Sorting: ascending, then descending on a second click; empty cells last either way.
    r.sort("predictions", "confidence")
    conf = _floats(r.column("predictions", "confidence"))
    assert conf == sorted(conf) and len(conf) == 100
    r.sort("predictions", "confidence")
    conf = _floats(r.column("predictions", "confidence"))
    assert conf == sorted(conf, reverse=True)
    assert conf[0] == pytest.approx(max(row["confidence"] or 0 for row in rows), abs=1e-3)
    # Filtering: a text box, a select, and a number comparison, each to the count the rows give.
    r.filter("predictions", "path", "study1/")
    assert r.matching("predictions") == r.n_rows("predictions") == sum("study1/" in row["path"] for row in rows) == 10
    r.filter("predictions", "path", "")
    r.filter("predictions", "review_reason", "low_confidence", select=True)
    want = sum(row["review_reason"] == "low_confidence" for row in rows)
    assert r.matching("predictions") == r.n_rows("predictions") == want > 0
    r.filter("predictions", "review_reason", "\u0000all", select=True)
    r.filter("predictions", "confidence", ">0.8")
    assert r.matching("predictions") == sum((row["confidence"] or 0) > 0.8 for row in rows)

    # The series table: one row per series, as in series.parquet.
    assert r.n_rows("series") == made["series"].num_rows == 3
    assert set(r.column("series", "series_instance_uid")) == {"1.2.9.0", "1.2.9.1", "1.2.9.2"}


def test_only_committed_maps_inside_the_maps_folder_are_embedded(tmp_path):
    """A row naming ``OUTPUT_explain/../elsewhere/x.png`` (absolute), a PNG planted in the maps
    folder, or a committed map rewritten in place: none is embedded; committed maps are. Before,
    the first was embedded (the path was never normalised) and the others were trusted."""
    import base64

    from braintumor_ray.report import scoring_report_html

    out, series, made = fake_scoring_output(tmp_path)
    explain = tmp_path / "predictions_explain"
    maps = sorted(p for p in os.listdir(explain) if p.endswith(".png"))
    listed = {n: {"sha256": hashlib.sha256((explain / n).read_bytes()).hexdigest()} for n in maps}
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    secret = b"\x89PNG not the job's map"
    (elsewhere / "x.png").write_bytes(secret)
    planted, rewritten = maps[0], maps[1]
    del listed[planted]  # on storage, not in the manifest
    (explain / rewritten).write_bytes(secret + b"2")  # in the manifest, other bytes
    outside = str(explain) + "/../elsewhere/x.png"
    rows = made["rows"]
    t = pq.read_table(out / "run1_0.parquet")
    paths = t.column("heatmap_path").to_pylist()
    hit = next(i for i, p in enumerate(paths) if p and p.endswith(maps[2]))
    paths[hit] = outside
    t = t.set_column(t.schema.get_field_index("heatmap_path"), "heatmap_path", pa.array(paths, pa.string()))
    pq.write_table(t, out / "run1_0.parquet")
    html = scoring_report_html(resolve(str(out)), maps=resolve(str(explain)), map_files=listed, max_cases=100)
    for bad in (secret, secret + b"2", (explain / planted).read_bytes()):
        assert base64.b64encode(bad).decode() not in html
    kept = [n for n in maps[3:] if any(r["heatmap_path"] and r["heatmap_path"].endswith(n) for r in rows)]
    shown = [n for n in kept if base64.b64encode((explain / n).read_bytes()).decode() in html]
    assert len(shown) >= 10, shown  # committed maps of the cases on the page are embedded


def test_the_report_embeds_the_maps_the_one_manifest_lists_staged_or_committed(tmp_path, caplog):
    """The maps a scoring run's report may embed (HeatMaps): those OUTPUT/_manifest.json lists as
    ``_explain/NAME`` objects, with those bytes, and the run's own still in its staging folder. A
    forged PNG under a listed name, a retired map and one listed nowhere are not embedded."""
    import base64

    from braintumor_ray.report import scoring_report_html
    from braintumor_ray.score._explain import HeatMaps

    out, series, made = fake_scoring_output(tmp_path)
    explain = tmp_path / "predictions_explain"
    maps = sorted(p for p in os.listdir(explain) if p.endswith(".png"))
    t = pq.read_table(out / "run1_0.parquet")
    shown = {os.path.basename(p) for p in t.column("heatmap_path").to_pylist() if p}
    shown = [n for n in maps if n in shown]
    forged, retired, unlisted, staged_one = shown[:4]
    objects = {f"_explain/{n}": {"sha256": hashlib.sha256((explain / n).read_bytes()).hexdigest()} for n in maps}
    del objects[f"_explain/{unlisted}"]
    stage = tmp_path / "predictions._staging" / "run" / "_objects" / "_explain"
    stage.mkdir(parents=True)
    (explain / staged_one).rename(stage / staged_one)  # this run's: not yet moved in
    staged = {f"_explain/{staged_one}": objects.pop(f"_explain/{staged_one}")}
    bad = (explain / forged).read_bytes()[:-8] + b"forged!!"
    (explain / forged).write_bytes(bad)
    heat = HeatMaps(resolve(str(explain)), objects, staged=resolve(str(stage)), staged_entries=staged,
                    retired=frozenset({f"_explain/{retired}"}))
    assert staged_one in heat and forged in heat and retired not in heat and unlisted not in heat
    html = scoring_report_html(resolve(str(out)), maps=heat.root, map_files=heat, staged_maps=heat.staged,
                               max_cases=100)
    b64 = lambda data: base64.b64encode(data).decode()  # noqa: E731
    assert b64(bad) not in html and "its bytes are not the ones committed" in caplog.text
    for n in (retired, unlisted):
        assert b64((explain / n).read_bytes()) not in html
    assert b64((stage / staged_one).read_bytes()) in html
    kept = [n for n in shown[4:] if b64((explain / n).read_bytes()) in html]
    assert len(kept) >= 5, kept


def test_scoring_report_caps_and_s3(browser, tmp_path, s3_endpoint, s3_bucket):
    """A large output keeps the page small: cases and table rows are capped, with a notice.
    On S3 the report is one object inside the output prefix, heat maps read from the bucket."""
    import boto3

    from conftest import upload_tree

    out, series, made = fake_scoring_output(tmp_path / "local")
    # heatmap_path as an s3:// URI, as a run on S3 writes it
    for f in out.glob("*.parquet"):
        t = pq.read_table(f)
        hp = [None if v is None else v.replace(str(tmp_path / "local"), f"s3://{s3_bucket}/o") for v in t["heatmap_path"].to_pylist()]
        pq.write_table(t.set_column(t.schema.get_field_index("heatmap_path"), "heatmap_path", pa.array(hp, pa.string())), f)
    upload_tree(str(tmp_path / "local"), s3_endpoint, s3_bucket, "o")
    dst = resolve(f"s3://{s3_bucket}/o/predictions", s3_endpoint_url=s3_endpoint)
    uri = write_scoring_report(dst, max_cases=5, max_rows=40)
    assert uri == f"s3://{s3_bucket}/o/predictions/{SCORING_REPORT}" == scoring_report_location(dst).uri
    body = boto3.client("s3", endpoint_url=s3_endpoint).get_object(Bucket=s3_bucket, Key=f"o/predictions/{SCORING_REPORT}")["Body"].read()
    local = tmp_path / "from_s3.html"
    local.write_bytes(body)
    r = Opened(browser, local, "scoring_capped", tmp_path)
    r.check_loaded(min_images=5)
    text = r.page.inner_text("body")
    assert "Showing the first 5 of" in text and f"the first 40 of {N_ROWS} rows" in text
    assert r.page.locator("#cases .card").count() == 5 and len(r.images) == 5
    assert int(r.page.get_attribute("#predictions", "data-total")) == 40


def test_run_scoring_writes_the_report(ray_session, package, tmp_path, browser):
    """The real hook: each scoring run that commits rows commits OUTPUT/_report.html with them (a
    run with nothing new keeps it); the summary names it; the page holds every row of the Parquet."""
    from braintumor_ray.imaging import encode_png
    from braintumor_ray.score import ScoreConfig, format_summary, run_scoring

    archive = tmp_path / "archive"
    archive.mkdir()
    for i, im in enumerate(mri_like(6, seed=11)):
        (archive / f"{i}.png").write_bytes(encode_png(im))
    (archive / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "preds"
    cfg = ScoreConfig(model=package, input=str(archive), output=str(out), batch_size=4)
    s = run_scoring(cfg)
    assert s["report"] == str(out / SCORING_REPORT) and f"report: {s['report']}" in format_summary(s)
    table = pads.dataset(str(out), format="parquet").to_table()
    assert table.num_rows == 7
    r = Opened(browser, s["report"], "scoring_run", tmp_path)
    r.check_loaded()
    assert int(r.page.get_attribute("#predictions", "data-total")) == r.n_rows("predictions") == table.num_rows
    # Each heat map the run wrote (--explain, default flagged) is on the page, decoded.
    maps = [p for p in table.column("heatmap_path").to_pylist() if p] if "heatmap_path" in table.column_names else []
    assert len(r.images) == len(maps)
    before = os.stat(s["report"]).st_mtime_ns
    nothing = run_scoring(cfg)  # nothing new: the committed report stands, not written again
    assert nothing["scored"] == 0 and nothing["report"] == s["report"] and os.stat(s["report"]).st_mtime_ns == before


# --- training and search reports ---------------------------------------------------------------


@pytest.fixture(scope="module")
def run_figures(tmp_path_factory):
    """Metrics as run_training records them (the real metric, trust and plot code on made-up
    predictions), the PNGs beside them, and validation examples with real Grad-CAM maps."""
    import torch

    from braintumor_ray.models import create_model
    from braintumor_ray.train import classification_metrics, split_report, validation_examples, write_plots, write_reliability
    from braintumor_ray.trust import TrustConfig, fit_trust

    rng = np.random.default_rng(1)

    def outputs(n):
        y = np.arange(n) % 4
        logits = rng.normal(0, 1, (n, 4)) + 3.0 * np.eye(4)[np.where(rng.random(n) < 0.8, y, (y + 1) % 4)]
        return {"logits": logits, "features": rng.normal(0, 1, (n, 8)) + y[:, None], "labels": y,
                "leaked": np.zeros(n, bool)}

    tr, va, te = outputs(200), outputs(120), outputs(80)
    trust = fit_trust(TrustConfig(), train_features=tr["features"], train_labels=tr["labels"], val_logits=va["logits"],
                      val_features=va["features"], val_labels=va["labels"])
    hist = [{"epoch": e, "train_loss": 1.2 / e, "val_loss": 1.3 / e, "train_accuracy": 0.5 + e / 20,
             "val_accuracy": 0.45 + e / 20, "val_macro_f1": 0.4 + e / 20, "lr": 1e-3, "epoch_s": 3.0} for e in range(1, 6)]
    softmax = lambda lo: np.exp(lo) / np.exp(lo).sum(1, keepdims=True)  # noqa: E731
    metrics = {
        "run": {"name": "r1", "uri": "", "data": "demo/preprocessed", "images": {"train": 200, "val": 120, "test": 80},
                "config": {"model": "resnet10t", "epochs": 5}, "wall_s": 61.0, "ray": "2", "torch": torch.__version__},
        "class_names": list(CLASS_NAMES), "epochs": hist, "best_epoch": 5, "restores": [], "stopped_early": False,
        **{s: classification_metrics(o["labels"], softmax(o["logits"]), CLASS_NAMES) for s, o in (("val", va), ("test", te))},
        "trust": {"temperature": trust.temperature, "ood_detector": trust.detector, "ood_threshold": trust.ood_threshold,
                  "review_threshold": trust.review_threshold, "val": split_report(trust, va), "test": split_report(trust, te)},
        "model": {"uri": "runs/r1/model", "model_id": "resnet10t-0123"},
    }
    run = resolve(str(tmp_path_factory.mktemp("run") / "r1"))
    metrics["run"]["uri"] = run.uri
    write_plots(metrics, run)
    write_reliability(metrics["trust"], run)
    torch.manual_seed(0)
    model = create_model("resnet10t", pretrained=False, drop_rate=0.0).eval()
    # A validation split as Ray Data hands it out (batches of numpy arrays), 24 images.
    split = Split(np.stack(mri_like(24, seed=4)), np.arange(24) % 4)
    examples = validation_examples(model, split, per_class=2)
    return metrics, run, examples


class Split:
    """The one method of a Ray dataset that validation_examples calls."""

    def __init__(self, images, labels):
        self.images, self.labels = images, labels

    def iter_batches(self, *, batch_size, batch_format):
        assert batch_format == "numpy"
        for s in range(0, len(self.images), batch_size):
            yield {"image": self.images[s : s + batch_size], "label": self.labels[s : s + batch_size]}


def test_pick_examples_takes_mistakes_first_then_each_class_in_turn():
    from braintumor_ray.train._report import pick_examples

    y = np.array([0, 0, 0, 1, 1, 2, 2, 2, 3, 3])
    pred = np.array([0, 1, 0, 1, 1, 0, 2, 2, 3, 2])  # mistakes at 1, 5 and 9
    assert pick_examples(pred, y, classes=4, per_class=1) == [1, 5, 0, 3]  # half the grid at most for mistakes
    assert pick_examples(pred, y, classes=4, per_class=2) == [1, 5, 9, 0, 3, 6, 8, 2]
    assert pick_examples(pred, y, classes=4, per_class=5) == [1, 5, 9, 0, 3, 6, 8, 2, 4, 7]  # all there is


def test_validation_examples_mistakes_first_with_maps(run_figures):
    """The grid: mistakes first (at most half), then each class in turn; each a scan and a Grad-CAM overlay."""
    from braintumor_ray.imaging import decode_png

    examples = run_figures[2]
    assert len(examples) == 8
    wrong = [e.true_label != e.predicted_label for e in examples]
    assert 1 <= sum(wrong[:4]) and wrong == sorted(wrong, reverse=True)  # the untrained model errs; errors lead
    coloured = 0
    for e in examples:
        scan, overlay = decode_png(e.scan_png), decode_png(e.overlay_png)
        assert scan.shape == (64, 64) and overlay.shape == (64, 64, 3)
        coloured += not np.array_equal(overlay[..., 0], overlay[..., 2])  # a map on it (an empty map is grey)
        assert 0 < e.confidence <= 1
    assert coloured >= len(examples) // 2


def test_training_report_in_the_browser(browser, run_figures, tmp_path):
    metrics, run, examples = run_figures
    before = {f: os.path.getmtime(os.path.join(run.path, f)) for f in os.listdir(run.path)}
    uri = write_training_report(metrics, run, examples)
    assert uri == os.path.join(run.path, "report.html")
    assert {f: os.path.getmtime(os.path.join(run.path, f)) for f in before} == before  # nothing replaced
    r = Opened(browser, uri, "training", tmp_path)
    # curves.png, reliability.png, and a scan and an overlay per example
    r.check_loaded(min_images=2 + 2 * len(examples))
    page = r.page
    assert page.locator("#examples .card").count() == len(examples)
    assert page.locator("#confusion table.confusion").count() == 2
    cm = metrics["test"]["confusion_matrix"]
    cells = page.locator("#confusion figure").nth(1).locator("tbody td").all_inner_texts()
    assert [int(c) for c in cells] == [v for row in cm for v in row]
    # The risk-coverage chart: one line per split, its last point is full coverage at the split's error rate.
    assert page.locator("#trust svg polyline").count() == 2
    cov, risk = risk_coverage(metrics["trust"]["test"]["reliability"])
    assert cov[-1] == pytest.approx(1.0) and risk[-1] == pytest.approx(1 - metrics["trust"]["test"]["accuracy"])
    # The epoch table sorts.
    r.sort("history", "val_loss")
    losses = _floats(r.column("history", "val_loss"))
    assert losses == sorted(losses) and len(losses) == 5
    r.sort("per-class-test", "F1")
    f1 = _floats(r.column("per-class-test", "F1"))
    assert f1 == sorted(f1) and len(f1) == 4


def test_search_report_in_the_browser(browser, run_figures, tmp_path):
    metrics, run, examples = run_figures
    root = resolve(str(tmp_path / "search"))
    os.makedirs(root.path)
    shutil.copy(os.path.join(run.path, "reliability.png"), root.path)
    rows = [{"rank": i + 1, "trial": f"t{i}", "backbone": b, "lr": lr, "best_val_macro_f1": f1, "best_epoch": e,
             "epochs_run": e, "status": st, "time_s": 10.0 * e, "error": None}
            for i, (b, lr, f1, e, st) in enumerate([("resnet10t", 3e-3, 0.91, 3, "completed"),
                                                     ("tf_efficientnet_lite0", 1e-3, 0.85, 3, "completed"),
                                                     ("resnet10t", 1e-7, 0.30, 1, "stopped by ASHA")])]
    hist = {f"{r['trial']} {r['backbone']}": [{"epoch": e, "val_macro_f1": r["best_val_macro_f1"] * e / r["epochs_run"],
                                               "val_loss": 1.0 / e, "train_loss": 1.1 / e} for e in range(1, r["epochs_run"] + 1)]
            for r in rows}
    summary = {"search": root.uri, "trials": 3, "trial_epochs_run": 7, "trial_epochs_budget": 9,
               "asha_saved_fraction": 2 / 9, "best_trial": rows[0], "model": metrics["model"], "wall_s": 99.0,
               "class_names": list(CLASS_NAMES), "val": metrics["val"], "test": metrics["test"], "trust": metrics["trust"]}
    cols = ["rank", "trial", "backbone", "lr", "best_val_macro_f1", "best_epoch", "epochs_run", "status", "time_s"]
    uri = write_search_report(summary, root, leaderboard=rows, columns=cols, histories=hist, examples=examples[:4])
    r = Opened(browser, uri, "search", tmp_path)
    r.check_loaded(min_images=1 + 2 * 4)
    assert r.n_rows("leaderboard") == 3
    # Three curves (one per trial) in each of the three per-epoch charts.
    assert r.page.locator("#trials svg polyline").count() == 9
    r.sort("leaderboard", "best_val_macro_f1")
    assert _floats(r.column("leaderboard", "best_val_macro_f1")) == [0.30, 0.85, 0.91]
    r.sort("leaderboard", "best_val_macro_f1")
    assert r.column("leaderboard", "trial") == ["t0", "t1", "t2"]
    r.filter("leaderboard", "backbone", "resnet10t", select=True)
    assert r.column("leaderboard", "trial") == ["t0", "t2"] and r.matching("leaderboard") == 2
    r.filter("leaderboard", "backbone", "\u0000all", select=True)
    r.filter("leaderboard", "lr", "<1e-5")
    assert r.column("leaderboard", "trial") == ["t2"]


# --- scripts/setup.sh installs the browser -----------------------------------------------------


def test_setup_installs_chromium_for_dev_only_when_missing(tmp_path):
    """``setup.sh --dev`` runs ``apt-get install chromium`` when the browser is missing (as root;
    otherwise it stops with the command to run), and nothing when it is there or without --dev;
    likewise Debian's orthanc, orthanc-dicomweb and dcmtk (the PACS tests), all in one install.
    Run on a copy of the script with a stub apt-get and an up-to-date stamp, so no install happens."""
    repo = Path(__file__).resolve().parents[2]
    (tmp_path / "scripts").mkdir()
    shutil.copy(repo / "scripts" / "setup.sh", tmp_path / "scripts" / "setup.sh")
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    os.symlink(sys.executable, tmp_path / ".venv" / "bin" / "python")
    want = hashlib.sha256((tmp_path / "pyproject.toml").read_bytes()).hexdigest()
    for stamp in (".installed", ".installed[dev]"):
        (tmp_path / ".venv" / stamp).write_text(want + "\n")
    calls = tmp_path / "apt_calls"
    apt = tmp_path / "apt-get"
    apt.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    apt.chmod(0o755)

    def setup(*args, browser="no-such-browser", pacs="sh", plugin=str(apt)):
        env = dict(os.environ, CHROMIUM=browser, APT_GET=str(apt), PYTHON=sys.executable, ORTHANC=pacs, DSRDUMP=pacs,
                   ORTHANC_DICOMWEB=plugin)
        return subprocess.run(["bash", str(tmp_path / "scripts" / "setup.sh"), *args], env=env, capture_output=True,
                              text=True, timeout=60)

    assert setup().returncode == 0 and not calls.exists()  # no --dev: no browser needed
    assert setup("--dev", browser="sh").returncode == 0 and not calls.exists()  # already there
    p = setup("--dev")
    if os.geteuid() == 0:
        assert p.returncode == 0, p.stderr
        assert calls.read_text().splitlines() == ["update -qq", "install -y -qq --no-install-recommends chromium"]
        assert p.stdout == ""  # quiet
    else:
        assert p.returncode == 1 and "apt-get install -y --no-install-recommends chromium" in p.stderr
        assert not calls.exists()
    # The PACS and dcmtk missing as well: one install of all four; none of them without --dev.
    calls.unlink(missing_ok=True)
    assert setup(pacs="no-such-tool", plugin="/no/such/plugin.so").returncode == 0 and not calls.exists()
    p = setup("--dev", pacs="no-such-tool", plugin="/no/such/plugin.so")
    if os.geteuid() == 0:
        assert p.returncode == 0, p.stderr
        assert calls.read_text().splitlines()[1] == ("install -y -qq --no-install-recommends chromium orthanc "
                                                      "orthanc-dicomweb dcmtk")
    else:
        assert p.returncode == 1 and "--no-install-recommends chromium orthanc orthanc-dicomweb dcmtk" in p.stderr
