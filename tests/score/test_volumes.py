"""Real volumes: a volume's empty and headless slices are skipped one by one (never the end of
the volume), a series most of whose head-showing slices are out of distribution gets no verdict,
float volumes are windowed on the head's voxels, and volumes train through the ingest.

Every volume here is generated (tumour slices among empty and headless ones, skull-stripped and
z-scored copies), except the healthy heads that ship inside installed packages (nibabel's,
pydicom's, nilearn's MNI152 template) and one built from the template with generated heads."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from braintumor_ray import CLASS_NAMES, MRIPreprocess
from braintumor_ray.imaging import InputGuard, render_mri
from braintumor_ray.score import decode_batch, output_schema, series_table, series_verdict
from _images import png_bytes
from generators.medical import dicom_bytes, head12, nifti_bytes

GUARD = InputGuard()
PRE = MRIPreprocess(image_size=64)
NAMES = list(CLASS_NAMES)
NO_TUMOR = NAMES.index("no_tumor")


def head_volume(n_head: int = 4, *, empty: int = 2, headless: int = 1, label: str = "glioma", seed: int = 0,
                size: int = 64) -> tuple[np.ndarray, list[str]]:
    """(x, y, z) float32 volume: ``empty`` all-zero slices at each end, ``headless`` slices of faint
    noise (below the crop threshold) next to them, and ``n_head`` MRI-like slices in the middle;
    and what each slice is (``empty``, ``headless``, ``head``)."""
    rng = np.random.default_rng(seed)
    kinds = ["empty"] * empty + ["headless"] * headless + ["head"] * n_head + ["headless"] * headless + ["empty"] * empty
    out = []
    for kind in kinds:
        if kind == "head":
            out.append(render_mri(label, rng, size)[0].astype(np.float32))
        elif kind == "headless":
            out.append(rng.uniform(0, 14, (size, size)).astype(np.float32))
        else:
            out.append(np.zeros((size, size), np.float32))
    # render_mri's rows run down the image: stored as NIfTI x, y with the display convention undone.
    return np.stack(out, axis=-1).transpose(1, 0, 2)[:, ::-1].copy(), kinds


# --- 1. per-slice skip ------------------------------------------------------------------------


def test_a_volumes_empty_and_headless_slices_are_skipped_one_by_one():
    vol, kinds = head_volume()
    r = PRE.try_slices(nifti_bytes(vol), name="v.nii", guard=GUARD)
    assert r.error is None and r.skipped is None
    assert [s.info.slice_index for s in r.slices] == [k for k, kind in enumerate(kinds) if kind == "head"]
    skipped = {s.info.slice_index: s.reason for s in r.skipped_slices}
    assert set(skipped) == {k for k, kind in enumerate(kinds) if kind != "head"}
    assert all(skipped[k].startswith("no content") for k, kind in enumerate(kinds) if kind == "empty")
    assert all(skipped[k].startswith("no head found") for k, kind in enumerate(kinds) if kind == "headless")


def test_a_multi_frame_dicoms_blank_frame_is_skipped_and_the_others_kept():
    frames = np.stack([np.zeros((64, 64), np.uint16), head12(1), head12(2), np.zeros((64, 64), np.uint16)])
    r = PRE.try_slices(dicom_bytes(frames), guard=GUARD)
    assert r.error is None and [s.info.slice_index for s in r.slices] == [1, 2]
    assert [s.info.slice_index for s in r.skipped_slices] == [0, 3]
    assert all(s.info.sop_instance_uid == r.slices[0].info.sop_instance_uid for s in r.skipped_slices)
    # An all-empty volume: every slice skipped, none an error (the file itself reads).
    blank = PRE.try_slices(nifti_bytes(np.zeros((32, 32, 3), np.float32)), name="b.nii", guard=GUARD)
    assert blank.error is None and not blank.slices and len(blank.skipped_slices) == 3
    # A plain image with no content is still the file's error (it has nothing else).
    assert "no content" in PRE.try_slices(png_bytes(np.zeros((32, 32), np.uint8)), guard=GUARD).error


def test_scoring_decodes_a_volume_to_a_row_per_slice_skipped_ones_with_their_reason():
    vol, kinds = head_volume(n_head=3)
    frames = np.stack([np.zeros((64, 64), np.uint16), head12(1)])
    batch = pa.table({"path": ["v.nii.gz", "mf.dcm"], "bytes": [nifti_bytes(vol, gz=True), dicom_bytes(frames)]})
    rows = decode_batch(batch, preprocess=PRE, guard=GUARD).to_pylist()
    vol_rows = sorted((r for r in rows if r["path"] == "v.nii.gz"), key=lambda r: r["slice_index"])
    assert [r["slice_index"] for r in vol_rows] == list(range(len(kinds)))
    assert [r["status"] for r in vol_rows] == ["ok" if k == "head" else "skipped" for k in kinds]
    assert all(r["error"].startswith(("no content", "no head found")) and r["pixels"] is None
               for r in vol_rows if r["status"] == "skipped")
    mf = sorted((r for r in rows if r["path"] == "mf.dcm"), key=lambda r: r["slice_index"])
    assert [(r["slice_index"], r["status"]) for r in mf] == [(0, "skipped"), (1, "ok")]
    assert mf[0]["sop_instance_uid"] == mf[1]["sop_instance_uid"] is not None


def _rows(slices: list[dict]) -> pa.Table:
    """Prediction rows of one NIfTI volume (the scoring schema), from short per-slice dicts."""
    schema = output_schema(NAMES)
    base = {n: None for n in schema.names}
    rows = []
    for k, s in enumerate(slices):
        r = dict(base, path="vol.nii.gz", model_id="m", scored_at=pa.scalar(0, pa.timestamp("us", tz="UTC")).as_py(),
                 slice_index=k, status=s.get("status", "ok"), error=s.get("error"))
        if r["status"] == "ok":
            p = s.get("p", [0.1, 0.1, 0.7, 0.1])
            r.update({f"prob_{c}": float(v) for c, v in zip(NAMES, p)}, head_fraction=s.get("head", 0.5),
                     review_reason=s.get("reason"))
        rows.append(r)
    return pa.Table.from_pylist(rows, schema=schema)


def test_the_series_table_counts_scored_skipped_and_failed_slices():
    rows = _rows([{"status": "skipped", "error": "no content: the image is near-constant"},
                  {"status": "skipped", "error": "no head found: nothing in the image"},
                  {}, {}, {"status": "error", "error": "corrupt"}, {}])
    (s,) = series_table(rows, NAMES).to_pylist()
    assert (s["slices_scored"], s["slices_skipped"], s["slices_failed"]) == (3, 2, 1)
    assert s["predicted_label"] == "no_tumor" and s["volume_path"] == "vol.nii.gz"


# --- 2. series-level distribution check -------------------------------------------------------


def test_a_volume_mostly_out_of_distribution_gets_no_verdict_from_its_other_slices():
    glioma, healthy = [0.8, 0.05, 0.1, 0.05], [0.02, 0.02, 0.94, 0.02]
    p = np.array([glioma] * 6 + [healthy] * 4)
    head = np.full(10, 0.5)
    ood = np.array([True] * 6 + [False] * 4)
    v = series_verdict(p, head_fraction=head, ood=ood, no_tumor=NO_TUMOR)
    # Before: the four unflagged slices voted a confident no_tumor for a glioma volume.
    assert v.label is None and v.review_reason == "out_of_distribution" and v.voting == 0
    # A few flagged slices (1 in 10) leave the verdict to the others.
    v = series_verdict(p, head_fraction=head, ood=np.arange(10) == 0, no_tumor=NO_TUMOR)
    assert v.label == 0 and v.review_reason is None
    # Only head-showing slices count: flagged slivers at the ends of the head do not tip it.
    head2 = np.array([0.05] * 6 + [0.5] * 4)
    v = series_verdict(p, head_fraction=head2, ood=ood, no_tumor=NO_TUMOR)
    assert v.label == NO_TUMOR and v.voting == 4
    # Through the table: the volume's row says out_of_distribution, with no label.
    rows = _rows([{"p": glioma, "reason": "out_of_distribution"}] * 3 + [{"p": healthy}] * 2)
    (s,) = series_table(rows, NAMES).to_pylist()
    assert s["predicted_label"] is None and s["review_reason"] == "out_of_distribution"


# --- 3. windowing of float volumes on the head's voxels ---------------------------------------


def _pixels(data: bytes) -> dict[int, np.ndarray]:
    r = PRE.try_slices(data, name="v.nii", guard=GUARD)
    assert r.error is None
    return {s.info.slice_index: s.image.pixels.astype(int) for s in r.slices}


def test_a_z_scored_and_a_raw_copy_of_a_volume_give_the_same_slices():
    raw, kinds = head_volume(n_head=5, empty=3, headless=0, seed=3)
    head = raw > 0
    z = np.zeros_like(raw)
    z[head] = (raw[head] - raw[head].mean()) / raw[head].std()
    z[~head] = z[head].min() - 0.5  # the background at the minimum, as z-scoring pipelines leave it
    a, b = _pixels(nifti_bytes(raw)), _pixels(nifti_bytes(z.astype(np.float32)))
    assert set(a) == set(b) == {k for k, kind in enumerate(kinds) if kind == "head"}
    for k in a:
        diff = np.abs(a[k] - b[k])
        assert diff.max() <= 2 and diff.mean() < 0.5, (k, diff.max(), diff.mean())
    # The head's contrast does not depend on how much of the field of view is empty.
    padded = np.concatenate([np.zeros(raw.shape[:2] + (30,), np.float32), raw], axis=-1)
    c = _pixels(nifti_bytes(padded))
    assert all(np.abs(c[k + 30] - a[k]).max() <= 1 for k in a)


def test_a_z_scored_volume_whose_background_is_0_inside_the_heads_range_is_windowed_on_the_head():
    # nnU-Net's nonzero-mask normalisation: the head z-scored, the background left at exactly 0,
    # among the head's values. Counted as head it came out mid-grey and the crop kept the whole
    # field of view; as background it is black, and the slices are the raw copy's.
    raw, kinds = head_volume(n_head=5, empty=3, headless=0, seed=3)
    head = raw > 0
    z = np.zeros_like(raw)
    z[head] = (raw[head] - raw[head].mean()) / raw[head].std()
    assert z[head].min() < 0 < z[head].max() and (z == 0).mean() > 0.5
    a, b = _pixels(nifti_bytes(raw)), _pixels(nifti_bytes(z))
    assert set(a) == set(b) == {k for k, kind in enumerate(kinds) if kind == "head"}
    for k in a:
        diff = np.abs(a[k] - b[k])
        assert diff.max() <= 2 and diff.mean() < 0.5, (k, diff.max(), diff.mean())
    # Training reads volumes through the same window: the ingest's rows are these pixels too.
    from braintumor_ray.ingest._run import preprocess_batch

    rows = preprocess_batch(pa.table({"path": ["z.nii"], "bytes": [nifti_bytes(z)]}), preprocess=PRE, guard=GUARD)
    ok = [r for r in rows.to_pylist() if r["outcome"] == "ok"]
    assert sorted(r["slice_index"] for r in ok) == sorted(b)
    for r in ok:
        got = np.frombuffer(r["image"], np.uint8).reshape(r["image_height"], r["image_width"]).astype(int)
        assert np.array_equal(got, b[r["slice_index"]])


def test_the_head_window_leaves_a_background_at_the_minimum_and_a_heads_own_values_alone():
    from braintumor_ray.imaging._window import BACKGROUND_SHARE, HeadWindow, _percentile_levels, head_levels

    def edges(a):
        return np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])

    rng = np.random.default_rng(0)
    # A z-scored image with its background at the minimum: the window as before (the head's
    # voxels above the minimum), nothing else mapped to black.
    image, _ = render_mri("glioma", rng, 128)
    head = image > 0
    z = np.where(head, (image - image[head].mean()) / image[head].std(), -9.0)
    assert head_levels(z.ravel(), edges(z)) == HeadWindow(_percentile_levels(z[head]))
    # The same with its background at 0, inside the head's range: left out of the window, black.
    z0 = np.where(head, z, 0.0)
    w = head_levels(z0.ravel(), edges(z0))
    assert w.black == (0.0,) and w.levels == _percentile_levels(z0[head & (z0 > z0.min())])
    assert (w(z0)[~head] == 0).all() and w(z0)[head].mean() > 60
    # A uint8 slice (a JPEG's grey levels as a volume), black background: a head's own flat
    # values are not background though they fill more than the share, the skull as a CT's bone
    # window leaves it (one grey level, below the lesion's white).
    ring = np.hypot(*np.mgrid[-64:64, -64:64]) < 40
    image[ring & (image > 0) & (image < 150)] = 200
    assert (image == 200).mean() > BACKGROUND_SHARE and image.max() > 200
    w = head_levels(image.ravel(), edges(image))
    assert w == HeadWindow(_percentile_levels(image[image > 0].astype(float)))
    # A background that is the edges' most common value but fills under the share is left in.
    small = np.full((64, 64), 50.0)
    small[1:-1, 1:-1] = rng.uniform(0, 100, (62, 62))
    assert head_levels(small.ravel(), edges(small)).black == ()


# --- 4. train on volumes: the ingest ----------------------------------------------------------


def lesion_volume(seed: int = 0, size: int = 64) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """A glioma volume and its segmentation mask: 2 empty slices at each end, then 2 healthy
    slices, a slice with a sliver of lesion, 3 slices with a large one; and what each slice is
    (``empty``, ``none``, ``sliver``, ``lesion``)."""
    rng = np.random.default_rng(seed)
    kinds = ["empty"] * 2 + ["none", "none", "sliver", "lesion", "lesion", "lesion"] + ["empty"] * 2
    vol, seg = [], []
    for kind in kinds:
        m = np.zeros((size, size), np.uint8)
        if kind == "empty":
            vol.append(np.zeros((size, size), np.float32))
        else:
            image, head = render_mri("glioma" if kind == "lesion" else "no_tumor", rng, size)
            vol.append(image.astype(np.float32))
            if kind == "lesion":
                m[size // 2 - 8: size // 2 + 8, size // 2 - 8: size // 2 + 8] = 1  # 256 px: ~15% of the head
            elif kind == "sliver":
                m[size // 2, size // 2: size // 2 + 3] = 2  # 3 px: well under 1% of the head
        seg.append(m)
    fix = lambda a: np.stack(a, axis=-1).transpose(1, 0, 2)[:, ::-1].copy()  # noqa: E731
    return fix(vol), fix(seg), kinds


def test_plan_inputs_takes_masks_aside_and_finds_each_volumes_patient():
    from braintumor_ray.ingest import plan_inputs

    files = ["/r/glioma/P1/p1_flair.nii.gz", "/r/glioma/P1/p1_t1ce.nii.gz", "/r/glioma/P1/p1_seg.nii.gz",
             "/r/glioma/P2/p2_flair.nii.gz", "/r/glioma/P2/a_seg.nii.gz", "/r/glioma/P2/b_SEG.nii.gz",
             "/r/glioma/flat.nii.gz", "/r/no_tumor/x.jpg", "/r/glioma/P1/IM0001"]
    plan = plan_inputs(files, "/r", mask_pattern="*_seg.nii.gz")
    got = {p.path: (p.mask, p.patient) for p in plan.images}
    assert got == {"/r/glioma/P1/p1_flair.nii.gz": ("/r/glioma/P1/p1_seg.nii.gz", "/r/glioma/P1"),
                   "/r/glioma/P1/p1_t1ce.nii.gz": ("/r/glioma/P1/p1_seg.nii.gz", "/r/glioma/P1"),
                   "/r/glioma/flat.nii.gz": (None, None), "/r/no_tumor/x.jpg": (None, None),
                   "/r/glioma/P1/IM0001": (None, "/r/glioma/P1")}  # a DICOM beside: its patient, not the mask
    assert [(e.path, "2 segmentation masks" in e.reason) for e in plan.errors] == [("/r/glioma/P2/p2_flair.nii.gz", True)]
    # Without the setting a mask is a volume like any other (and was ingested with the folder's label).
    assert len(plan_inputs(files, "/r").images) == len(files)


def test_a_mask_labels_a_volumes_slices_and_the_empty_ones_are_left_out(tmp_path):
    from braintumor_ray.core import resolve
    from braintumor_ray.ingest._run import preprocess_batch

    vol, seg, kinds = lesion_volume()
    (tmp_path / "v.nii.gz").write_bytes(nifti_bytes(vol, gz=True))
    (tmp_path / "v_seg.nii.gz").write_bytes(nifti_bytes(seg, gz=True))
    (tmp_path / "bad_seg.nii.gz").write_bytes(nifti_bytes(seg[:, :, :5], gz=True))
    batch = pa.table({"path": [str(tmp_path / "v.nii.gz")] * 2, "mask": [str(tmp_path / "v_seg.nii.gz"), str(tmp_path / "bad_seg.nii.gz")]})
    rows = preprocess_batch(batch, preprocess=PRE, guard=GUARD, source=resolve(str(tmp_path)), mask_min_lesion=0.01).to_pylist()
    good = sorted((r for r in rows[: len(kinds)]), key=lambda r: r["slice_index"])
    want = {"empty": ("skipped", None), "none": ("ok", "none"), "sliver": ("unlabelled", None), "lesion": ("ok", "lesion")}
    assert [(r["outcome"], r["slice_label"]) for r in good] == [want[k] for k in kinds]
    assert len({r["key"] for r in good}) == len(kinds)
    (bad,) = rows[len(kinds):]
    assert bad["outcome"] == "error" and "segmentation mask bad_seg.nii.gz" in bad["error"] and "grid" in bad["error"]


def test_a_patients_slices_of_two_labels_share_one_split():
    from braintumor_ray.ingest._splits import ImageFacts, assign_splits

    images = []
    for p in range(8):  # 8 patients, each 3 glioma and 3 no_tumor slices of one volume
        for k in range(6):
            images.append(ImageFacts(f"p{p}\x00{k}", f"{p:02d}{k:062d}", f"{(p * 6 + k) * 0x0f0f0f0f0f0f:016x}"[-16:],
                                     "glioma" if k < 3 else "no_tumor", "train", f"/r/glioma/P{p}"))
    res = assign_splits(images, val_fraction=0.25, seed=0, near_dup_distance=-1)
    for p in range(8):
        assert len({res.decisions[f"p{p}\x00{k}"].split for k in range(6)}) == 1, p
    assert {d.split for d in res.decisions.values()} == {"train", "val"}


def test_an_ingest_of_volumes_with_masks_labels_slices_and_trains_unchanged(ray_session, tmp_path):
    import json
    import os

    from braintumor_ray import make_sample_dataset
    from braintumor_ray.ingest import IngestConfig, run_ingest
    from conftest import load_job

    root = tmp_path / "data"
    make_sample_dataset(str(root), per_class=6, test_per_class=2, size=64, seed=3)
    kinds = lesion_volume()[2]
    (glioma,) = [d for d in (root / "Training").iterdir() if d.name.startswith("glioma")]
    for p in range(5):  # five glioma patients, each a folder with a FLAIR volume and its mask
        vol, seg, _ = lesion_volume(seed=10 + p)
        (glioma / f"P{p}").mkdir()
        (glioma / f"P{p}" / f"p{p}_flair.nii.gz").write_bytes(nifti_bytes(vol, gz=True))
        (glioma / f"P{p}" / f"p{p}_seg.nii.gz").write_bytes(nifti_bytes(seg, gz=True))
    out = tmp_path / "pre"
    report = run_ingest(IngestConfig(input=str(root), output=str(out), preprocess=MRIPreprocess(image_size=64),
                                     mask_pattern="*_seg.nii.gz", near_dup_distance=-1))
    c = report["counts"]
    assert c["errors"] == 0 and not report["errors"]
    assert c["slices_skipped"] == 5 * kinds.count("empty") and c["slices_unlabelled"] == 5 * kinds.count("sliver")
    import pandas as pd

    rows = pd.read_parquet(out / "images")
    vols = rows[rows.path.str.endswith("_flair.nii.gz")]
    want = {k: ("glioma" if kind == "lesion" else "no_tumor") for k, kind in enumerate(kinds) if kind in ("lesion", "none")}
    assert len(vols) == 5 * len(want) and not rows.path.str.endswith("_seg.nii.gz").any()
    assert all(want[int(r.slice_index)] == r.label for r in vols.itertuples())
    assert (vols.groupby("path")["split"].nunique() == 1).all()  # a patient's slices in one split
    # jobs/train.py trains on it as on any ingest.
    job = load_job("train")
    assert job.main(["--smoke-test", "--data", str(out), "--storage", str(tmp_path / "runs"), "--name", "vol",
                     "--epochs", "1", "--no-onnx"]) == 0
    assert json.loads((tmp_path / "runs" / "vol" / "metrics.json").read_text())["epochs"]


# --- 5. real healthy volumes that ship in installed packages ----------------------------------


def healthy_volumes(folder) -> list[str]:
    """Real healthy heads shipped in installed packages, copied to ``folder``: nibabel's test data
    (a T1 head, the same resampled to float, the first volume of a 4-D EPI series), pydicom's
    MR_small (one MR head slice) and nilearn's MNI152 template (a skull-stripped T1 brain,
    197x233x189, the average of 152 healthy adults). What else was looked for is in
    docs/scoring.md ("Volumes")."""
    import os
    import shutil

    import nibabel as nib
    import pydicom.data

    data = os.path.join(os.path.dirname(nib.__file__), "tests", "data")
    out = []
    for name in ("anatomical.nii", "reoriented_anat_moved.nii"):
        shutil.copy(os.path.join(data, name), folder / name)
        out.append(str(folder / name))
    epi = nib.load(os.path.join(data, "example4d.nii.gz"))
    nib.save(epi.slicer[..., 0], str(folder / "example4d_vol0.nii.gz"))
    out.append(str(folder / "example4d_vol0.nii.gz"))
    shutil.copy(pydicom.data.get_testdata_file("MR_small.dcm"), folder / "MR_small.dcm")
    out.append(str(folder / "MR_small.dcm"))
    shutil.copy(mni152_path(), folder / "mni152_t1.nii.gz")
    out.append(str(folder / "mni152_t1.nii.gz"))
    return out


def mni152_path() -> str:
    """The MNI152 T1 template in nilearn's package data: the file ``load_mni152_template`` reads
    (it fetches nothing), found without importing nilearn (its datasets module costs ~10 s here)."""
    import importlib.util
    import os

    spec = importlib.util.find_spec("nilearn")
    assert spec is not None, "nilearn is a dev dependency (pyproject.toml): pip install -e .[dev]"
    path = os.path.join(os.path.dirname(spec.origin), "datasets", "data", "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz")
    assert os.path.isfile(path), f"nilearn no longer ships {os.path.basename(path)}"
    return path


GENERATED_IN_MNI = (6, 7, 8)


def mni_with_generated_heads():
    """A real healthy volume the test model has not seen (12 axial slices through the MNI152
    brain) with 3 generated healthy heads (which it has) put among them at GENERATED_IN_MNI: a
    volume most of whose slices are out of distribution, where a few escape the flag. Returns the
    NIfTI bytes."""
    import nibabel as nib

    img = nib.load(mni152_path())
    data = np.asanyarray(img.dataobj)
    nx, ny, _ = data.shape  # 197 x 233: a generated head is rendered 233 high and cut to 197 wide
    real = [data[:, :, k] for k in range(50, 146, 8)]
    rng = np.random.default_rng(11)
    gen = []
    for _ in GENERATED_IN_MNI:
        shown = render_mri("no_tumor", rng, ny)[0][:, (ny - nx) // 2: (ny - nx) // 2 + nx]
        gen.append(shown[::-1, ::-1].T)  # displayed rows/columns -> the RAS voxel grid a viewer shows so
    k0 = GENERATED_IN_MNI[0]
    vol = np.stack(real[:k0] + gen + real[k0:], axis=-1).astype(np.uint8)
    out = nib.Nifti1Image(vol, img.affine)
    # A display window in the header (0..255, the template's own range): the generated heads keep
    # their pixels, as in the package's OOD reference, instead of the volume's percentile window.
    out.header["cal_min"], out.header["cal_max"] = 0, 255
    return out.to_bytes()


@pytest.fixture(scope="module")
def volume_package(tmp_path_factory):
    """The test model (resnet10t, random init, 64 px) with a trust that leaves the series rule the
    only guard: raw softmax (no temperature), no prediction sets (as packages from before them),
    and its OOD reference on generated heads rendered at the MNI volume's size, so that the
    generated slices of :func:`mni_with_generated_heads` are in distribution."""
    import torch

    from braintumor_ray import create_model, export_model_package
    from braintumor_ray.imaging import encode_png
    from braintumor_ray.models import WithFeatures, data_config, prepare_input
    from braintumor_ray.trust import TrustConfig, fit_trust
    from conftest import mri_like

    torch.manual_seed(0)
    model = create_model("resnet10t", pretrained=False, drop_rate=0.0).eval()
    dcfg = data_config(model)

    def outputs(images):
        px = np.stack([PRE(encode_png(im[:, 18:215])).pixels for im in images])  # cut as in the volume
        with torch.inference_mode():
            lo, fe = WithFeatures(model)(prepare_input(px, mean=dcfg["mean"], std=dcfg["std"]))
        return lo.numpy(), fe.numpy()

    _, tr_fe = outputs(mri_like(80, seed=1, size=233))
    va_lo, va_fe = outputs(mri_like(40, seed=2, size=233))
    trust = fit_trust(TrustConfig(ood_pass_rate=1.0, calibrate=False, conformal_fraction=0.0), train_features=tr_fe,
                      train_labels=np.arange(80) % 4, val_logits=va_lo, val_features=va_fe, val_labels=np.arange(40) % 4)
    uri = str(tmp_path_factory.mktemp("volume_pkg") / "model")
    export_model_package(model, uri, preprocess=PRE, trust=trust)
    return uri


@pytest.fixture(scope="module")
def scored_volumes(ray_session, volume_package, tmp_path_factory):
    from braintumor_ray.score import ScoreConfig, run_scoring

    base = tmp_path_factory.mktemp("volumes")
    archive, out = base / "archive", base / "predictions"
    (archive / "healthy").mkdir(parents=True)
    (archive / "generated").mkdir()
    healthy = healthy_volumes(archive / "healthy")
    (archive / "healthy" / "mni_with_generated.nii").write_bytes(mni_with_generated_heads())
    healthy.append(str(archive / "healthy" / "mni_with_generated.nii"))
    vol, kinds = head_volume(n_head=4, empty=3, headless=1, seed=7)
    (archive / "generated" / "glioma.nii.gz").write_bytes(nifti_bytes(vol, gz=True))
    summary = run_scoring(ScoreConfig(model=volume_package, input=str(archive), output=str(out), batch_size=16))
    return str(archive), str(out), healthy, kinds, summary


def test_scoring_a_volume_skips_its_empty_slices_and_counts_them(scored_volumes):
    import os

    import pyarrow.dataset as pads
    import pyarrow.parquet as pq

    from braintumor_ray.score import SERIES_FILE

    archive, out, _, kinds, summary = scored_volumes
    rows = [r for r in pads.dataset(out, format="parquet").to_table().to_pylist() if r["path"].endswith("glioma.nii.gz")]
    # Skipped slices are not files the series selector left out; the summary tells them apart.
    all_skipped = sum(1 for r in pads.dataset(out, format="parquet").to_table().to_pylist() if r["status"] == "skipped")
    assert summary["slices_skipped"] == all_skipped >= len(kinds) - kinds.count("head") and summary["not_selected"] == 0
    rows.sort(key=lambda r: r["slice_index"])
    assert [r["status"] for r in rows] == ["ok" if k == "head" else "skipped" for k in kinds]
    series = {r["volume_path"]: r for r in pq.read_table(os.path.join(out + "_series", SERIES_FILE)).to_pylist()}
    s = series[os.path.join(archive, "generated", "glioma.nii.gz")]
    assert (s["slices_scored"], s["slices_skipped"], s["slices_failed"]) == (kinds.count("head"), len(kinds) - kinds.count("head"), 0)


def test_real_healthy_volumes_never_get_a_tumour_verdict_without_a_review_reason(scored_volumes):
    import os

    import pyarrow.dataset as pads
    import pyarrow.parquet as pq

    from braintumor_ray.score import SERIES_FILE

    _, out, healthy, _, _ = scored_volumes
    rows = pads.dataset(out, format="parquet").to_table().to_pylist()
    for path in healthy:  # each read (no error row) with slices scored
        mine = [r for r in rows if r["path"] == path]
        assert mine and not [r for r in mine if r["status"] == "error"] and any(r["status"] == "ok" for r in mine), path
    series = pq.read_table(os.path.join(out + "_series", SERIES_FILE)).to_pylist()
    by_path = {r["volume_path"]: r for r in series if r["volume_path"]}
    verdicts = [by_path[p] for p in healthy if p.endswith((".nii", ".nii.gz"))]
    verdicts += [r for r in series if r["series_instance_uid"] and not r["volume_path"]]  # MR_small's series
    assert len(verdicts) == len(healthy)
    for v in verdicts:
        assert v["predicted_label"] in (None, "no_tumor") or v["review_reason"] is not None, v


def test_a_healthy_volume_whose_few_unflagged_slices_say_tumour_gets_no_verdict(scored_volumes, volume_package,
                                                                                  monkeypatch):
    """The series rule is what keeps the MNI volume with a few generated heads from a tumour
    verdict: without it (a share no volume reaches), the few slices that escaped the OOD flag
    decide, and they call a healthy volume a tumour with no review reason."""
    import json
    import os

    import pyarrow.dataset as pads
    import pyarrow.parquet as pq

    import braintumor_ray.score._series as series_module
    from braintumor_ray.score import SERIES_FILE

    _, out, healthy, _, _ = scored_volumes
    (path,) = [p for p in healthy if p.endswith("mni_with_generated.nii")]
    rows = pads.dataset(out, format="parquet").to_table()
    rows = rows.filter(pads.field("path") == path)
    slices = sorted(rows.to_pylist(), key=lambda r: r["slice_index"])
    # The case as built: every real slice is out of distribution, the generated heads are not.
    assert [r["status"] for r in slices] == ["ok"] * 15
    flagged = [r["review_reason"] == "out_of_distribution" for r in slices]
    assert all(f for k, f in enumerate(flagged) if k not in GENERATED_IN_MNI), flagged
    assert not all(flagged[k] for k in GENERATED_IN_MNI), flagged
    # With the rule (the job's own series table): no verdict, out of distribution.
    (v,) = [r for r in pq.read_table(os.path.join(out + "_series", SERIES_FILE)).to_pylist() if r["volume_path"] == path]
    assert v["predicted_label"] is None and v["review_reason"] == "out_of_distribution", v
    # Without it, the same rows and the package's review threshold: a tumour, unflagged.
    with open(os.path.join(volume_package, "model.json")) as f:
        threshold = json.load(f)["trust"]["review_threshold"]
    monkeypatch.setattr(series_module, "OOD_SHARE", 1.01)
    (bad,) = series_table(rows, NAMES, review_threshold=threshold).to_pylist()
    assert bad["predicted_label"] not in (None, "no_tumor") and bad["review_reason"] is None, bad


# --- 6. archive-shift augmentation: skull strip and renormalisation ---------------------------


def test_skull_strip_and_renormalise_augmentations():
    import torch

    from braintumor_ray.imaging import TrainAugment

    image, head = render_mri("glioma", np.random.default_rng(0), 64)
    x = torch.from_numpy(np.stack([image, image]))
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    off = TrainAugment.none()
    import dataclasses

    from scipy import ndimage

    healthy, _ = render_mri("no_tumor", np.random.default_rng(0), 64)
    strip = dataclasses.replace(off, skull_strip=1.0, strip_depth=0.06)
    y = strip(torch.from_numpy(np.stack([healthy, healthy])), generator=g()).numpy()[0]

    def rim(img):  # the outermost 2 pixels of what is not black
        head = ndimage.binary_fill_holes(img > 20)
        return img[head & ~ndimage.binary_erosion(head, iterations=2)]

    assert rim(healthy).mean() > 180, "render_mri's head ends in its bright skull"
    assert rim(y).mean() < 150, "the skull is gone: the stripped head ends in brain"
    ys, xs = np.nonzero(y > 20)
    span = max(ys.max() - ys.min(), xs.max() - xs.min()) + 1
    hs, ws = np.nonzero(healthy > 20)
    assert span >= 0.9 * 64 > max(hs.max() - hs.min(), ws.max() - ws.min()) + 1, (
        "cropped again as scoring crops a stripped scan: the brain fills the frame")
    assert 60 < np.median(y[y > 20]) < 140, "the brain is kept (render_mri's tissue is ~95, its skull 200)"
    # Renormalised: the head spans the full range, the background stays black.
    dim = torch.from_numpy((np.stack([image, image]) * 0.5).astype(np.uint8))
    z = dataclasses.replace(off, renormalise=1.0)(dim, generator=g()).numpy()
    assert z[0].max() == 255 and int(dim.numpy()[0].max()) < 130 and (z[0][image == 0] == 0).all()
    # On by default, chosen on validation (docs/benchmarks.md), seeded like the others; the smoke
    # preset leaves them off.
    from braintumor_ray.train import TrainConfig

    assert TrainAugment().skull_strip == TrainAugment().renormalise == 0.3
    assert TrainConfig.smoke_test().augment.skull_strip == TrainConfig.smoke_test().augment.renormalise == 0
    assert torch.equal(TrainAugment()(x, generator=g()), TrainAugment()(x, generator=g()))
    assert not dataclasses.replace(off, skull_strip=0.5).is_identity and off.is_identity


# --- 7. the archive-shift benchmark's variants (benchmarks/bench_archive_shift.py) ------------


def test_the_archive_shift_variants_strip_the_skull_and_z_score_the_head(tmp_path):
    from scipy import ndimage

    from benchmarks.bench_archive_shift import (
        build_archive,
        head_mask,
        nifti_slice,
        skull_strip,
        summarise,
        z_score,
    )
    from braintumor_ray.imaging import encode_png

    image, _ = render_mri("glioma", np.random.default_rng(5), 128)
    kept = PRE(encode_png(image)).pixels  # what training's augmentation strips: the ingest's crop
    head = ndimage.binary_fill_holes(kept > PRE.threshold)
    stripped = skull_strip(image, depth=0.06, preprocess=PRE)
    # Only the head's interior is left, cropped again to fill the frame (as scoring crops a
    # stripped scan): the bright skull ring at the head's edge is gone, the brain is kept.
    depth_px = ndimage.distance_transform_edt(head)
    assert stripped.shape == kept.shape and (stripped > 0).sum() > 0.4 * head.sum()
    assert (kept[depth_px < 4] >= 150).sum() > 20, "the original had its bright skull ring there"

    def rim(img):  # the outermost 2 pixels of what is not black
        inside = ndimage.binary_fill_holes(img > PRE.threshold)
        return img[inside & ~ndimage.binary_erosion(inside, iterations=2)]

    assert rim(kept).mean() > 140 and rim(stripped).mean() < 100, "the stripped head ends in brain, not skull"
    assert 60 < np.median(stripped[stripped > PRE.threshold]) < 140, "the brain is kept (render_mri's tissue ~95)"

    # z-scored: the head (holes filled) has mean 0 and std 1, the background one value of its own.
    mask = head_mask(image, PRE.threshold)
    for background in ("min", "zero"):
        z = z_score(image, mask, background=background)
        assert z.dtype == np.float32 and abs(z[mask].mean()) < 1e-4 and abs(z[mask].std() - 1) < 1e-4
        (bg,) = np.unique(z[~mask])
        assert bg < z[mask].min() if background == "min" else bg == 0
    # Written as a single-slice NIfTI, scoring's float path reads it the same way up and round.
    z = z_score(image, mask)
    r = PRE.try_slices(nifti_slice(z), name="z.nii", guard=GUARD)
    assert r.error is None and len(r.slices) == 1
    got, want = r.slices[0].image.pixels.astype(float).ravel(), PRE(encode_png(image)).pixels.astype(float)
    assert np.corrcoef(got, want.ravel())[0, 1] > 0.95 > np.corrcoef(got, want[:, ::-1].ravel())[0, 1]

    # The archive: every image of Testing/<class>/ once per variant, each kind in its format.
    testing = tmp_path / "Testing"
    for cls in ("glioma_tumor", "no_tumor"):
        (testing / cls).mkdir(parents=True)
        for k in range(2):
            im, _ = render_mri(cls.removesuffix("_tumor"), np.random.default_rng(k), 96)
            (testing / cls / f"{k}.jpg").write_bytes(_jpeg(im))
    root = tmp_path / "archive"
    variants = ("original", "stripped", "zscored", "stripped_zscored")
    counts = build_archive(str(testing), str(root), variants=variants, depth=0.06, preprocess=PRE)
    assert counts == {"glioma_tumor": 2, "no_tumor": 2}
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    assert files == sorted(f"{v}/{c}/{k}{s}" for v, s in zip(variants, (".jpg", ".png", ".nii.gz", ".nii.gz"))
                           for c in counts for k in range(2))

    # The figures: an image without an ok row counts as wrong and flagged; no_tumor without a
    # review reason on tumour images is counted apart.
    rows = [{"path": str(root / "zscored" / "glioma_tumor" / "0.nii.gz"), "status": "ok", "predicted_label": "no_tumor", "review_reason": None},
            {"path": str(root / "zscored" / "glioma_tumor" / "1.nii.gz"), "status": "ok", "predicted_label": "glioma", "review_reason": "low_confidence"},
            {"path": str(root / "zscored" / "no_tumor" / "0.nii.gz"), "status": "ok", "predicted_label": "no_tumor", "review_reason": None},
            {"path": str(root / "zscored" / "no_tumor" / "1.nii.gz"), "status": "error", "predicted_label": None, "review_reason": None}]
    (s,) = summarise(rows, str(root), counts, ["zscored"]).values()
    assert (s["images"], s["not_scored"], s["accuracy"], s["flag_rate"], s["no_tumor_unflagged_on_tumour"]) == (4, 1, 0.5, 0.5, 0.5)
    assert s["recall"] == {"glioma": 0.5, "no_tumor": 0.5}


def test_the_archive_shift_bench_takes_an_ingests_validation_images_and_pairs_two_packages(tmp_path):
    import pyarrow.parquet as pq

    from benchmarks.bench_archive_shift import correct_by_image, image_stems, paired_difference, split_folder

    src = tmp_path / "data"
    src.mkdir()
    for name in ("a.jpg", "b.jpg", "c.jpg", "v.nii.gz"):
        (src / name).write_bytes(name.encode())
    (src / "x").mkdir()
    (src / "x" / "a.jpg").write_bytes(b"another a")
    pre = tmp_path / "pre" / "images"
    rows = {"val": [(src / "a.jpg", "glioma", None), (src / "x" / "a.jpg", "glioma", None),
                    (src / "b.jpg", "no_tumor", None), (src / "v.nii.gz", "glioma", 3)],
            "train": [(src / "c.jpg", "glioma", None)]}
    for split, rs in rows.items():
        (pre / f"split={split}").mkdir(parents=True)
        table = pa.table({"path": [str(p) for p, _, _ in rs], "label": [lb for _, lb, _ in rs],
                          "slice_index": pa.array([k for _, _, k in rs], pa.int32())})
        pq.write_table(table, pre / f"split={split}" / "part-0.parquet")
    dst = tmp_path / "val"
    # The validation rows' own files under their labels; training's and a volume's slices left out.
    assert split_folder(str(tmp_path / "pre"), "val", str(dst)) == {"glioma": 2, "no_tumor": 1}
    assert sorted(str(p.relative_to(dst)) for p in dst.rglob("*") if p.is_file()) == [
        "glioma/a.jpg", "glioma/a~1.jpg", "no_tumor/b.jpg"]
    assert {(dst / "glioma" / n).read_bytes() for n in ("a.jpg", "a~1.jpg")} == {b"a.jpg", b"another a"}
    stems = image_stems(str(dst))
    assert stems == {"glioma": ["a", "a~1"], "no_tumor": ["b"]}

    # Per image, right or not; an image without an ok row is wrong.
    root = tmp_path / "archive"
    rows_a = [{"path": str(root / "zscored" / "glioma" / "a.nii.gz"), "status": "ok", "predicted_label": "glioma"},
              {"path": str(root / "zscored" / "no_tumor" / "b.nii.gz"), "status": "error", "predicted_label": None}]
    assert correct_by_image(rows_a, str(root), stems, "zscored") == {
        ("glioma", "a"): True, ("glioma", "a~1"): False, ("no_tumor", "b"): False}

    # Paired: b is right on 3 more of 10 images in one variant and the same in the other.
    keys = [("glioma", str(k)) for k in range(10)]
    a = {"original": dict.fromkeys(keys, True), "stripped": {k: i >= 5 for i, k in enumerate(keys)}}
    b = {"original": dict.fromkeys(keys, True), "stripped": {k: i >= 2 for i, k in enumerate(keys)}}
    d = paired_difference(a, b, resamples=500)
    assert d["original"] == (0.0, 0.0, 0.0)
    diff, lo, hi = d["stripped"]
    assert diff == pytest.approx(0.3) and 0 <= lo < 0.3 < hi <= 0.7
    assert d["mean"][0] == pytest.approx(0.15) and d["mean"][1] <= 0.15 <= d["mean"][2]
    assert paired_difference(a, a)["mean"] == (0.0, 0.0, 0.0)


def _jpeg(a):
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="JPEG", quality=95)
    return buf.getvalue()
