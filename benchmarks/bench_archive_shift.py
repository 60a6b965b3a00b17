"""Archive shift: what a model package does on skull-stripped and z-scored copies of the Testing images.

    .venv/bin/python benchmarks/bench_archive_shift.py --package runs/base/model [--package runs/aug/model] \\
        --testing ../shared/data/sartaj-brain-mri/Testing --out /tmp/archive_shift.md
    .venv/bin/python benchmarks/bench_archive_shift.py --package runs/base/model --package runs/aug/model \\
        --ingest /tmp/real/pre --split val --out /tmp/archive_shift_val.md

``--ingest PRE --split val`` takes the images of one split of an ingest's output instead (the
source file each ``images/split=val/`` row names, under its row's label): the validation images,
on which a choice between packages is made; Testing is reported, never used to choose. With two
packages or more, a second table gives, per variant and for the mean over the variants, each
later package's accuracy minus the first's, with a paired percentile bootstrap 95% interval (the
same images resampled for both, seeded).

Research archives (BraTS-style NIfTI) hold skull-stripped, z-scored float volumes; the model has
only seen 8-bit JPEG slices with their skull. This makes, from every ``<class>/<image>`` under
``--testing``, the variants below (once, shared by every package), scores them all with the real
scoring job (``run_scoring``, ``--explain none``: the same decode, guard, trust and review flags a
user gets) and prints, per package and variant: accuracy, per-class recall, the flag rate (rows
with any review reason, or not scored at all) and the rate of ``no_tumor`` WITHOUT a review
reason on tumour images (the worst answer: a confident "healthy" for a patient), as markdown.

Variants:
- ``original``: the JPEG as it is.
- ``stripped``: exactly the image training's augmentation makes: the package's crop and resize
  (its ``image_size``), then ``TrainAugment.skull_strip`` at ``strip_depth`` (imported, not
  copied), as an 8-bit PNG; scoring crops it again, to the stripped brain, as it would a
  skull-stripped scan.
- ``zscored``: the head (pixels above the crop threshold, holes filled) z-scored as float32 (mean
  0, std 1), the background at one value of its own just below the head's minimum, as z-scoring
  pipelines leave it; a single-slice NIfTI, so scoring's float path (the head window) reads it.
- ``stripped_zscored``: both, what a BraTS-style volume's slice is.
- ``zscored_bg0`` (only when asked with ``--variants``): the head z-scored and the background at
  0, as a nonzero-mask normalisation (nnU-Net) leaves it: 0 then sits inside the head's range
  (scoring's head window takes it for background: a value filling a large share of the volume).

A package's time is the scoring of every variant in one run (one Ray, started once), printed
beside the machine's load: the figures are the model's, the time is only a guide.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from dataclasses import replace

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from braintumor_ray import CLASS_NAMES, MRIPreprocess, canonical_label  # noqa: E402

VARIANTS = ("original", "stripped", "zscored", "stripped_zscored", "zscored_bg0")
DEFAULT_VARIANTS = VARIANTS[:4]
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
log = logging.getLogger("bench_archive_shift")


# --- the variants (pure) ----------------------------------------------------------------------


def head_mask(gray: np.ndarray, threshold: int) -> np.ndarray:
    """The head: pixels above the crop threshold, its holes (dark ventricles, CSF) filled."""
    from scipy import ndimage

    return ndimage.binary_fill_holes(gray > threshold)


def skull_strip(gray: np.ndarray, *, depth: float, preprocess: MRIPreprocess) -> np.ndarray:
    """``gray`` (H, W) uint8 cropped and resized as the ingest does (``preprocess``: the package's
    crop and ``image_size``), then through ``TrainAugment.skull_strip`` at ``depth``: exactly the
    image training's augmentation makes. Unchanged when no head is found (scoring then skips or
    refuses it as it would the original)."""
    import torch

    from braintumor_ray.imaging import TrainAugment, find_head_box, resize_pad

    box = find_head_box(gray, threshold=preprocess.threshold, margin=preprocess.margin)
    if box is None:
        return gray.copy()
    # At the JPEG's own size (~512 px) the erosion's disk is 4x wider and the image 5x larger:
    # 3.9 s an image here against ~0.1 s at the package's image_size.
    pixels = resize_pad(gray[box[1]:box[3], box[0]:box[2]], preprocess.image_size)
    aug = replace(TrainAugment.none(), skull_strip=1.0, strip_depth=depth)
    return aug(torch.from_numpy(pixels[None].copy()))[0].numpy()


def z_score(gray: np.ndarray, head: np.ndarray, *, background: str = "min") -> np.ndarray:
    """float32: the head's pixels z-scored (mean 0, std 1); the background at one value of its own,
    just below the head's minimum (``min``) or 0 (``zero``)."""
    v = gray.astype(np.float64)
    h = v[head]
    if h.size < 2 or h.std() == 0:
        raise ValueError("no head to z-score: fewer than two head pixels or all equal")
    z = (v - h.mean()) / h.std()
    bg = float(z[head].min()) - 0.5 if background == "min" else 0.0
    return np.where(head, z, bg).astype(np.float32)


def nifti_slice(image: np.ndarray) -> bytes:
    """A 2-D image (rows down, as displayed) -> a single-slice NIfTI (x, y, 1) with an identity
    (RAS) affine, laid out so that scoring's reader shows it the same way up and the same way
    round: an axial slice in the radiological convention, x (patient right to left) across from
    the image's right, y (posterior to anterior) up."""
    import nibabel as nib

    vol = np.ascontiguousarray(image[::-1, ::-1].T[:, :, None])
    return nib.Nifti1Image(vol, np.eye(4)).to_bytes()


def make_variants(gray: np.ndarray, *, variants=DEFAULT_VARIANTS, depth: float,
                  preprocess: MRIPreprocess) -> dict[str, tuple[str, bytes | np.ndarray]]:
    """One image's variants: ``{variant: (suffix, data)}`` (``original`` is not made here; PNG bytes
    for ``stripped``, NIfTI bytes for the z-scored ones)."""
    from PIL import Image

    out: dict[str, tuple[str, bytes]] = {}
    stripped = skull_strip(gray, depth=depth, preprocess=preprocess) if {"stripped", "stripped_zscored"} & set(variants) else None
    if "stripped" in variants:
        buf = io.BytesIO()
        Image.fromarray(stripped).save(buf, format="PNG")
        out["stripped"] = (".png", buf.getvalue())
    for name, src, bg in (("zscored", gray, "min"), ("stripped_zscored", stripped, "min"), ("zscored_bg0", gray, "zero")):
        if name in variants:
            out[name] = (".nii.gz", _gz(nifti_slice(z_score(src, head_mask(src, preprocess.threshold), background=bg))))
    return out


def _gz(data: bytes) -> bytes:
    import gzip

    return gzip.compress(data, compresslevel=1)


def build_archive(testing: str, root: str, *, variants=DEFAULT_VARIANTS, depth: float,
                  preprocess: MRIPreprocess) -> dict[str, int]:
    """``root/<variant>/<class>/<image>`` for every image of ``testing/<class>/``; returns the
    number of images per class. An image that cannot be read or has no head for a z-score is
    left out of that variant only (and logged): scoring counts it as not scored then."""
    from braintumor_ray.imaging import decode_image, to_gray_u8

    counts: dict[str, int] = {}
    for cls in sorted(os.listdir(testing)):
        folder = os.path.join(testing, cls)
        if not os.path.isdir(folder) or canonical_label(cls) is None:
            continue
        for name in sorted(os.listdir(folder)):
            if not name.lower().endswith(IMAGE_SUFFIXES):
                continue
            counts[cls] = counts.get(cls, 0) + 1
            src = os.path.join(folder, name)
            stem = os.path.splitext(name)[0]
            if "original" in variants:
                os.makedirs(os.path.join(root, "original", cls), exist_ok=True)
                shutil.copyfile(src, os.path.join(root, "original", cls, name))
            try:
                with open(src, "rb") as f:
                    gray = to_gray_u8(decode_image(f.read())[0])  # the grey scoring sees
                made = make_variants(gray, variants=variants, depth=depth, preprocess=preprocess)
            except Exception as e:  # one odd image costs its variants, not the run
                log.warning("%s: no variants (%s)", src, e)
                continue
            for variant, (suffix, data) in made.items():
                os.makedirs(os.path.join(root, variant, cls), exist_ok=True)
                with open(os.path.join(root, variant, cls, stem + suffix), "wb") as f:
                    f.write(data)
    return counts


def split_folder(ingest: str, split: str, dst: str) -> dict[str, int]:
    """The images of one split of an ingest's output (``ingest/images/split=<split>/``) copied to
    ``dst/<label>/<name>`` (each row's source file under its row's label, a name taken twice
    numbered), so :func:`build_archive` reads them as it reads Testing; returns the images per
    label. Rows of a volume's slice are left out: the variants are made of 2-D images."""
    import pyarrow.dataset as pads

    part = os.path.join(ingest, "images", f"split={split}")
    if not os.path.isdir(part):
        raise SystemExit(f"{part} not found: --ingest takes an ingest's output folder (jobs/preprocess.py --output)")
    t = pads.dataset(part, format="parquet").to_table(columns=["path", "label", "slice_index"]).to_pylist()
    counts: dict[str, int] = {}
    for row in sorted(t, key=lambda r: r["path"]):
        if row["slice_index"] is not None:
            continue
        src = row["path"].removeprefix("file://")
        os.makedirs(os.path.join(dst, row["label"]), exist_ok=True)
        stem, suffix = os.path.splitext(os.path.basename(src))
        name, k = stem + suffix, 1
        while os.path.exists(os.path.join(dst, row["label"], name)):
            name, k = f"{stem}~{k}{suffix}", k + 1
        shutil.copyfile(src, os.path.join(dst, row["label"], name))
        counts[row["label"]] = counts.get(row["label"], 0) + 1
    return counts


# --- the figures (pure) -----------------------------------------------------------------------


def summarise(rows: list[dict], root: str, counts: dict[str, int], variants) -> dict[str, dict]:
    """Prediction rows (path, status, predicted_label, review_reason) of the archive at ``root`` ->
    per variant: images, not scored, accuracy, recall per class, flag rate, no_tumor unflagged
    on tumour images. Every image of ``counts`` counts: one without a row, or whose row is not
    ``ok``, is wrong and flagged (it got no verdict to trust)."""
    by = {}
    for r in rows:
        rel = os.path.relpath(r["path"].removeprefix("file://"), root).split(os.sep)
        by[(rel[0], rel[1], os.path.splitext(rel[-1].removesuffix(".gz"))[0])] = r
    out = {}
    for variant in variants:
        mine = {k: r for k, r in by.items() if k[0] == variant}
        n = sum(counts.values())
        correct, flagged, not_scored, tumour, nt_unflagged = 0, 0, 0, 0, 0
        recall = {}
        for cls, total in counts.items():
            label = canonical_label(cls)
            hits = 0
            got = [r for k, r in mine.items() if k[1] == cls]
            not_scored += total - sum(1 for r in got if r["status"] == "ok")
            for r in got:
                ok = r["status"] == "ok"
                hits += ok and r["predicted_label"] == label
                flagged += ok and r["review_reason"] is not None
                if label != "no_tumor":
                    nt_unflagged += ok and r["predicted_label"] == "no_tumor" and r["review_reason"] is None
            if label != "no_tumor":
                tumour += total
            correct += hits
            recall[label] = hits / total if total else float("nan")
        flagged += not_scored
        out[variant] = {"images": n, "not_scored": not_scored, "accuracy": correct / n if n else float("nan"),
                        "recall": recall, "flag_rate": flagged / n if n else float("nan"),
                        "no_tumor_unflagged_on_tumour": nt_unflagged / tumour if tumour else float("nan")}
    return out


def image_stems(testing: str) -> dict[str, list[str]]:
    """``{class folder: [image stem, ...]}``: the images :func:`build_archive` takes from ``testing``."""
    out = {}
    for cls in sorted(os.listdir(testing)):
        if os.path.isdir(os.path.join(testing, cls)) and canonical_label(cls) is not None:
            names = sorted(os.listdir(os.path.join(testing, cls)))
            out[cls] = [os.path.splitext(n)[0] for n in names if n.lower().endswith(IMAGE_SUFFIXES)]
    return out


def correct_by_image(rows: list[dict], root: str, stems: dict[str, list[str]], variant: str) -> dict[tuple[str, str], bool]:
    """``(class folder, image stem) -> right or not`` for every image of ``stems`` in one variant,
    as :func:`summarise` counts it (an image without an ``ok`` row is wrong): the key names the
    same image in every variant and for every package."""
    got = {}
    for r in rows:
        rel = os.path.relpath(r["path"].removeprefix("file://"), root).split(os.sep)
        if rel[0] == variant:
            got[(rel[1], os.path.splitext(rel[-1].removesuffix(".gz"))[0])] = r
    out = {}
    for cls, names in stems.items():
        for stem in names:
            r = got.get((cls, stem))
            out[(cls, stem)] = bool(r and r["status"] == "ok" and r["predicted_label"] == canonical_label(cls))
    return out


def paired_difference(a: dict[str, dict], b: dict[str, dict], *, resamples: int = 1000, seed: int = 0) -> dict[str, tuple]:
    """Per variant, and ``mean`` over the variants: accuracy of ``b`` minus that of ``a`` (each
    ``{variant: {image: right}}`` on the same images) with a paired percentile bootstrap 95%
    interval: the images resampled with replacement, the same draw for both packages and every
    variant (the mean's interval keeps the variants' correlation)."""
    variants = [v for v in a if v in b]
    keys = sorted(set.intersection(*(set(a[v]) & set(b[v]) for v in variants))) if variants else []
    if not keys:
        return {}
    d = np.array([[float(b[v][k]) - float(a[v][k]) for k in keys] for v in variants])  # variants x images
    draws = np.random.default_rng(seed).integers(0, len(keys), size=(resamples, len(keys)))
    boot = d[:, draws].mean(axis=2)  # variants x resamples
    out = {}
    for i, v in enumerate(variants):
        out[v] = (float(d[i].mean()), *(float(x) for x in np.percentile(boot[i], [2.5, 97.5])))
    out["mean"] = (float(d.mean()), *(float(x) for x in np.percentile(boot.mean(axis=0), [2.5, 97.5])))
    return out


def difference_markdown(diffs: dict[str, dict[str, tuple]], first: str) -> str:
    pp = lambda x: f"{100 * x:+.1f}"  # noqa: E731
    lines = [f"Accuracy minus {first}'s, points, paired bootstrap 95% interval:", "",
             "| package | variant | difference | 95% interval |", "|---|---|---:|---|"]
    for pkg, per in diffs.items():
        for variant, (d, lo, hi) in per.items():
            lines.append(f"| {pkg} | {variant} | {pp(d)} | {pp(lo)} .. {pp(hi)} |")
    return "\n".join(lines) + "\n"


def markdown(results: dict[str, dict], header: str) -> str:
    classes = list(CLASS_NAMES)
    lines = [header, "", "| package | variant | images | not scored | accuracy | "
             + " | ".join(f"recall {c}" for c in classes) + " | flag rate | no_tumor unflagged on tumour |",
             "|---|---|---:|---:|---:|" + "---:|" * len(classes) + "---:|---:|"]
    pct = lambda x: f"{100 * x:.1f}%"  # noqa: E731
    for pkg, per in results.items():
        for variant, s in per.items():
            rec = " | ".join(pct(s["recall"][c]) if c in s["recall"] else "-" for c in classes)
            lines.append(f"| {pkg} | {variant} | {s['images']} | {s['not_scored']} | {pct(s['accuracy'])} | {rec} | "
                         f"{pct(s['flag_rate'])} | {pct(s['no_tumor_unflagged_on_tumour'])} |")
    return "\n".join(lines) + "\n"


# --- the run ----------------------------------------------------------------------------------


def package_name(uri: str) -> str:
    """``runs/NAME/model`` -> NAME; otherwise the folder's name."""
    parts = [p for p in uri.rstrip("/").split("/") if p]
    return parts[-2] if len(parts) > 1 and parts[-1] in ("model", "best_model") else parts[-1]


def score(package: str, root: str, out: str, batch_size: int) -> tuple[list[dict], dict, float]:
    import pyarrow.dataset as pads

    from braintumor_ray.score import ScoreConfig, run_scoring

    t = time.perf_counter()
    summary = run_scoring(ScoreConfig(model=package, input=root, output=out, batch_size=batch_size, explain="none"))
    took = time.perf_counter() - t
    cols = ["path", "status", "predicted_label", "review_reason"]
    return pads.dataset(out, format="parquet").to_table(columns=cols).to_pylist(), summary, took


def main(argv: list[str] | None = None) -> int:
    from braintumor_ray.imaging import TrainAugment

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--package", action="append", required=True, help="model package folder (repeat for several)")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--testing", help="the Testing folder: <class>/<image>.jpg")
    src.add_argument("--ingest", help="an ingest's output folder: the images of its --split (the source files its rows name)")
    ap.add_argument("--split", default="val", help="with --ingest: which split (default val, the one a choice is made on)")
    ap.add_argument("--out", required=True, help="markdown file of the results (JSON beside it: .json)")
    ap.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    ap.add_argument("--strip-depth", type=float, default=TrainAugment().strip_depth,
                    help="skull strip depth, fraction of the head crop's side (default: the augmentation's)")
    ap.add_argument("--limit", type=int, default=0, help="at most this many images per class (0: all)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--work", default=None, help="folder for the variants and predictions (default: a temporary one)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    variants = [v for v in args.variants.split(",") if v]
    if bad := [v for v in variants if v not in VARIANTS]:
        ap.error(f"unknown variant(s) {bad}: use {', '.join(VARIANTS)}")
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    import ray

    from braintumor_ray.models import load_model_package

    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or tmp
        if args.ingest:
            testing = os.path.join(work, f"split-{args.split}")
            shutil.rmtree(testing, ignore_errors=True)
            print(json.dumps({"split": args.split, "images": split_folder(args.ingest, args.split, testing)}), flush=True)
        else:
            testing = os.path.abspath(args.testing)
        if args.limit:
            testing = _limited(testing, os.path.join(work, "limited"), args.limit)
        root = os.path.join(work, "archive")
        t = time.perf_counter()
        results, timings, counts, right = {}, {}, {}, {}
        for pkg in args.package:
            # Each package's own crop settings (they decide where the head is, so the strip).
            pre = load_model_package(pkg).preprocess
            pkg_root = f"{root}-{_key(pre)}"
            if pkg_root not in counts:
                shutil.rmtree(pkg_root, ignore_errors=True)
                counts[pkg_root] = build_archive(testing, pkg_root, variants=variants, depth=args.strip_depth, preprocess=pre)
                print(json.dumps({"variants_made": pkg_root, "images": counts[pkg_root],
                                  "seconds": round(time.perf_counter() - t, 1)}), flush=True)
            if not ray.is_initialized():
                _start_ray(ray)
            name = package_name(pkg)
            if name in results:  # two runs/NAME/model and runs/NAME/best_model, say
                name = f"{name} ({len(results) + 1})"
            preds = os.path.join(work, f"predictions-{len(results)}")
            for old in (preds, preds + "_series"):  # scoring is incremental: a kept --work must not skip
                shutil.rmtree(old, ignore_errors=True)
            rows, summary, took = score(pkg, pkg_root, preds, args.batch_size)
            results[name] = summarise(rows, pkg_root, counts[pkg_root], variants)
            right[name] = {v: correct_by_image(rows, pkg_root, image_stems(testing), v) for v in variants}
            timings[name] = {"seconds": round(took, 1), "rows": len(rows), "load": _load()}
            print(json.dumps({"package": name, **timings[name], "errors": summary.get("errors")}), flush=True)
        command = " ".join(["benchmarks/bench_archive_shift.py", *(sys.argv[1:] if argv is None else argv)])
        header = (f"Archive shift, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: `{command}`; "
                  f"{os.cpu_count()} CPUs; scoring time per package (all variants, one run): "
                  + ", ".join(f"{k} {v['seconds']} s at load {v['load']}" for k, v in timings.items()))
        text = markdown(results, header)
        names = list(right)
        diffs = {n: paired_difference(right[names[0]], right[n]) for n in names[1:]}
        if diffs:
            text += "\n" + difference_markdown(diffs, names[0])
    with open(args.out, "w") as f:
        f.write(text)
    with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
        json.dump({"results": results, "timings": timings, "variants": variants, "strip_depth": args.strip_depth,
                   "differences": diffs, "images": args.ingest and f"{args.ingest} split={args.split}" or testing},
                  f, indent=2)
    print(text)
    return 0


def _key(pre: MRIPreprocess) -> str:
    """What the variants depend on: the crop (where the head is) and the size the strip runs at."""
    return f"t{pre.threshold}-m{pre.margin:g}-s{pre.image_size}"


def _limited(testing: str, dst: str, limit: int) -> str:
    for cls in sorted(os.listdir(testing)):
        if os.path.isdir(os.path.join(testing, cls)):
            os.makedirs(os.path.join(dst, cls), exist_ok=True)
            names = sorted(n for n in os.listdir(os.path.join(testing, cls)) if n.lower().endswith(IMAGE_SUFFIXES))
            for n in names[:limit]:
                shutil.copyfile(os.path.join(testing, cls, n), os.path.join(dst, cls, n))
    return dst


def _start_ray(ray, tries: int = 3) -> None:
    """``ray.init`` on every core, tried again: Ray gives its raylet 30 s (fixed) to register, and
    on the shared 2-core machine at load average 40 that failed 2 starts in 3 on 2026-12-06."""
    for k in range(tries):
        try:
            ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
            return
        except Exception as e:
            if k == tries - 1:
                raise
            log.warning("Ray did not start (%s): trying again", e)
            ray.shutdown()


def _load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


if __name__ == "__main__":
    sys.exit(main())
