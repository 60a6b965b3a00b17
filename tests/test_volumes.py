"""Real volumes: a volume's empty and headless slices are skipped one by one (never the end of
the volume), a series most of whose head-showing slices are out of distribution gets no verdict,
float volumes are windowed on the head's voxels, and volumes train through the ingest.

Every volume here is generated (tumour slices among empty and headless ones, skull-stripped and
z-scored copies), except the healthy heads that ship inside installed packages (nibabel's)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from braintumor_ray import CLASS_NAMES, MRIPreprocess
from braintumor_ray.imaging import InputGuard, render_mri
from braintumor_ray.score import decode_batch, output_schema, series_table, series_verdict
from test_dicom import dicom_bytes, head12, nifti_bytes

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
    assert "no content" in PRE.try_slices(_png(np.zeros((32, 32), np.uint8)), guard=GUARD).error


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


def _png(a):
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


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

