"""DICOM and NIfTI files for the tests, generated with pydicom and nibabel (no file is stored, no
real patient data is involved): MRI-like 12-bit slices (:func:`head12`), part-10 files with
identifying values planted in them (:func:`dicom_bytes`; no output may ever hold one of
:data:`SECRETS`), NIfTI volumes, a PACS-like export (:func:`make_pacs`), and :func:`write_file`
that puts any of them on disk.
"""

from __future__ import annotations

import gzip
import io
import os

import nibabel as nib
import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import MPEG2MPML, ExplicitVRLittleEndian, RLELossless, generate_uid

from braintumor_ray.imaging import render_mri

from _images import jpeg_bytes

# Values no output may ever hold: planted in every generated DICOM file (and a NIfTI header).
PATIENT_NAME = "Zyxwvut^Quillon"
PATIENT_ID = "PID-7731-QX"
BIRTH_DATE = "19410203"
SECRETS = ("Zyxwvut", "Quillon", PATIENT_ID, BIRTH_DATE)
AXIAL = (1, 0, 0, 0, 1, 0)
SAGITTAL = (0, 1, 0, 0, 0, -1)
CORONAL = (1, 0, 0, 0, 0, -1)


def dicom_bytes(
    pixels: np.ndarray,
    *,
    photometric: str = "MONOCHROME2",
    bits_stored: int = 12,
    signed: bool = False,
    rescale: tuple[float, float] | None = None,
    window: tuple[float, float] | None = None,
    series: str | None = None,
    study: str | None = None,
    instance: int = 1,
    orientation=AXIAL,
    modality: str = "MR",
    description: str = "AX T1 POST",
    syntax=None,
    with_pixels: bool = True,
) -> bytes:
    """A part-10 MR image file (preamble and all) with our identifying values planted in it."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"  # MR Image Storage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID, ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = PATIENT_NAME, PATIENT_ID, BIRTH_DATE
    ds.InstitutionName, ds.ReferringPhysicianName = "Quillon Memorial", "Zyxwvut^Doctor"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study or generate_uid(), series or generate_uid()
    ds.InstanceNumber, ds.Modality, ds.SeriesDescription = instance, modality, description
    ds.ImageOrientationPatient = list(orientation)
    frames = pixels.shape[0] if pixels.ndim == 3 else 1
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.Rows, ds.Columns = pixels.shape[-2:]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated = 8 if bits_stored <= 8 else 16
    ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits_stored, bits_stored - 1, int(signed)
    if rescale is not None:
        ds.RescaleSlope, ds.RescaleIntercept = rescale
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    dtype = np.uint8 if ds.BitsAllocated == 8 else (np.int16 if signed else np.uint16)
    if with_pixels:
        ds.PixelData = pixels.astype(dtype).tobytes()
        if syntax is not None:
            ds.compress(syntax, pixels.astype(dtype))
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def undecodable(pixels: np.ndarray, **kw) -> bytes:
    """A file claiming MPEG-2 video pixel data, a syntax pydicom has no decoder for."""
    ds = pydicom.dcmread(io.BytesIO(dicom_bytes(pixels, **kw)))
    ds.file_meta.TransferSyntaxUID = MPEG2MPML
    ds.PixelData = encapsulate([b"\x00\x00\x01\xb3" + b"\x00" * 60])
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def nifti_bytes(volume: np.ndarray, *, affine=None, cal: tuple[float, float] | None = None, gz: bool = False) -> bytes:
    img = nib.Nifti1Image(volume, np.eye(4) if affine is None else affine)
    img.header["descrip"] = PATIENT_NAME.encode()  # free text in a header: must not leak either
    if cal is not None:
        img.header["cal_min"], img.header["cal_max"] = cal
    data = img.to_bytes()
    return gzip.compress(data) if gz else data


def head12(seed: int, size: int = 64, label: str = "glioma") -> np.ndarray:
    """An MRI-like slice as 12-bit values."""
    pixels, _ = render_mri(label, np.random.default_rng(seed), size)
    return pixels.astype(np.uint16) * 16


def write_file(path: str, data: bytes) -> str:
    """``data`` at ``path`` (its folders made); the path back, to collect what a test wrote."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    return path


def make_pacs(root: str) -> dict:
    """A PACS-like export: two DICOM series (axial, sagittal) in nested folders, named with and
    without .dcm, a NIfTI volume, JPEGs, and bad files."""
    study = generate_uid()
    ax, sag = generate_uid(), generate_uid()
    files = {"axial": [], "sagittal": []}
    for i in range(4):
        name = f"IM{i:04d}" if i % 2 else f"{generate_uid()}.dcm"
        files["axial"].append(write_file(f"{root}/PAT1/STUDY1/SER1/{name}", dicom_bytes(head12(i), series=ax, study=study, instance=i + 1, window=(1500, 3000))))
    for i in range(2):
        files["sagittal"].append(write_file(f"{root}/PAT1/STUDY1/SER2/IM{i:04d}", dicom_bytes(head12(10 + i), series=sag, study=study, instance=i + 1, orientation=SAGITTAL, description="SAG T2")))
    vol = np.stack([head12(20 + k, label="meningioma") for k in range(3)], axis=-1).transpose(1, 0, 2)[:, ::-1]
    files["nifti"] = write_file(f"{root}/nifti/brain.nii.gz", nifti_bytes(vol.astype(np.int16), gz=True))
    files["jpeg"] = [write_file(f"{root}/jpeg/{i}.jpg", jpeg_bytes(render_mri("glioma", np.random.default_rng(40 + i), 64)[0])) for i in range(2)]
    rle = generate_uid()
    # Bad files of the axial series (their rows keep its UIDs), a good compressed one of its own series.
    files["bad"] = {
        "nopixels.dcm": write_file(f"{root}/bad/nopixels.dcm", dicom_bytes(head12(1), with_pixels=False, series=ax, study=study, instance=97)),
        "truncated": write_file(f"{root}/bad/truncated", dicom_bytes(head12(2), series=ax, study=study, instance=98)[:-700]),
        "mpeg.dcm": write_file(f"{root}/bad/mpeg.dcm", undecodable(head12(1), series=ax, study=study, instance=99)),
        "rle.dcm": write_file(f"{root}/bad/rle.dcm", dicom_bytes(head12(5), syntax=RLELossless, series=rle, study=study)),
        "notes": write_file(f"{root}/bad/notes", f"{PATIENT_NAME} {PATIENT_ID} born {BIRTH_DATE}\n".encode()),
    }
    return {"study": study, "axial": ax, "sagittal": sag, "rle": rle, "files": files}
