"""Sending the committed DICOM objects of ``OUTPUT_dicom/`` to a PACS (``--dicom-send``).

Two ways, by the destination's scheme: ``dicom://CALLED_AET@host:port`` is a DIMSE C-STORE
(pynetdicom), ``http(s)://host:port/dicom-web`` a DICOMweb STOW-RS (dicomweb-client). Both are
the libraries pydicom's maintainers keep (pynetdicom) and the one highdicom's authors keep
(dicomweb-client); hand-written DIMSE or multipart/related code was not an option worth weighing.

What was sent, where, is recorded in ``OUTPUT_dicom/_sent.json`` (the ledger): an object is sent
to a destination once, ever (its name holds the model id and the series); one that failed (the
PACS down, refused, timed out) is tried ``retries`` more times with a backoff, then left for the
next run, which sends whatever the ledger lacks. A failed send never fails the run: its rows and
objects are committed before anything is sent; the summary says what was not sent and why.
"""

from __future__ import annotations

import io
import json
import logging
import re
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable, Literal, Sequence
from urllib.parse import urlsplit, urlunsplit

from ..core import ConfigError, Location

logger = logging.getLogger(__name__)

SENT_FILE = "_sent.json"
SENT_FORMAT = 1
DEFAULT_AE_TITLE = "BRAINTUMOR"
_AET = re.compile(r"[\x20-\x5b\x5d-\x7e]{1,16}")  # printable ASCII but backslash, 16 at most (PS3.5 AE)


@dataclass(frozen=True)
class Destination:
    """Where objects go: ``dimse`` (C-STORE to ``ae_title`` at ``host``:``port``) or ``stow`` (``url``)."""

    kind: Literal["dimse", "stow"]
    url: str = ""
    ae_title: str = ""
    host: str = ""
    port: int = 0

    @property
    def key(self) -> str:
        """The destination as the ledger and summary name it (never a password)."""
        if self.kind == "dimse":
            return f"dicom://{self.ae_title}@{self.host}:{self.port}"
        parts = urlsplit(self.url)
        netloc = parts.hostname or ""
        if parts.port:
            netloc += f":{parts.port}"
        return urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))


def parse_destinations(value: str | None) -> tuple[Destination, ...]:
    """``dicom://AET@host:port`` and ``http(s)://.../dicom-web``, comma-separated; a ConfigError names a bad one."""
    out = []
    for raw in [v.strip() for v in (value or "").split(",") if v.strip()]:
        if raw.startswith(("http://", "https://")):
            if not urlsplit(raw).hostname:
                raise ConfigError(f"dicom_send={raw!r} has no host: give http(s)://HOST:PORT/PATH of a DICOMweb service")
            if urlsplit(raw).username:
                raise ConfigError(f"dicom_send: {urlsplit(raw).hostname}: credentials in the URL would be written to "
                                  "OUTPUT/_config.yaml: give the DICOMweb service's URL without them (a PACS on the "
                                  "hospital network; or a proxy that adds them)")
            out.append(Destination("stow", url=raw.rstrip("/")))
            continue
        m = re.fullmatch(r"dicom://([^@]+)@([^:/]+):(\d+)/?", raw)
        if not m:
            raise ConfigError(f"dicom_send={raw!r} is not a destination: give dicom://CALLED_AET@HOST:PORT (C-STORE) or "
                              "http(s)://HOST:PORT/dicom-web (STOW-RS), comma-separated for several")
        aet, host, port = m.group(1), m.group(2), int(m.group(3))
        check_ae_title(aet, "the called AE title of dicom_send")
        if not 1 <= port <= 65535:
            raise ConfigError(f"dicom_send={raw!r}: port {port} is out of range: use 1..65535")
        out.append(Destination("dimse", ae_title=aet, host=host, port=port))
    return tuple(out)


def check_ae_title(aet: str, what: str) -> None:
    if not _AET.fullmatch(aet) or not aet.strip():
        raise ConfigError(f"{what} {aet!r} is not an AE title: use 1-16 printable ASCII characters, no backslash")


class SentLedger:
    """``OUTPUT_dicom/_sent.json``: ``{"format": 1, "sent": {destination: {object name: {...}}}}``."""

    def __init__(self, root: Location) -> None:
        self.location = root.join(SENT_FILE)
        self.sent: dict[str, dict[str, dict]] = {}
        if self.location.exists():
            raw = self.location.read_bytes()
            try:
                self.sent = json.loads(raw)["sent"] if raw.strip() else {}
            except (ValueError, KeyError, TypeError):
                logger.warning("score: %s is not readable: every object is sent again (a PACS overwrites an object it "
                               "has: same SOP Instance UID)", self.location.uri)

    def pending(self, dest: Destination, names: Sequence[str]) -> list[str]:
        done = self.sent.get(dest.key, {})
        return [n for n in names if n not in done]

    def record(self, dest: Destination, name: str, sop_instance_uid: str) -> None:
        self.sent.setdefault(dest.key, {})[name] = {"sop_instance_uid": sop_instance_uid,
                                                    "sent_at": datetime.now(timezone.utc).isoformat()}

    def save(self) -> None:
        doc = {"format": SENT_FORMAT, "sent": {k: dict(sorted(v.items())) for k, v in sorted(self.sent.items())}}
        self.location.write_atomic(json.dumps(doc, indent=1).encode())


Sender = Callable[[Destination, list], dict[str, str | None]]


def send_with_retries(dest: Destination, datasets: list, *, calling_aet: str, retries: int, backoff_s: float = 0.5,
                      timeout_s: float = 30.0, sender: Sender | None = None) -> dict[str, str | None]:
    """SOP Instance UID -> None (stored) or the last error, after ``retries`` more tries of the failed ones."""
    send = sender or (lambda d, ds: _c_store(d, ds, calling_aet, timeout_s) if d.kind == "dimse" else _stow(d, ds, timeout_s))
    result: dict[str, str | None] = {str(ds.SOPInstanceUID): "not tried" for ds in datasets}
    todo = list(datasets)
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(backoff_s * 2 ** (attempt - 1))
        try:
            got = send(dest, todo)
        except Exception as e:  # the PACS down, a refused association, a timeout: every object failed
            got = {str(ds.SOPInstanceUID): f"{type(e).__name__}: {e}" for ds in todo}
        result.update(got)
        todo = [ds for ds in todo if result[str(ds.SOPInstanceUID)] is not None]
        if not todo:
            break
        logger.warning("score: sending %d DICOM objects to %s failed (try %d of %d): %s", len(todo), dest.key,
                       attempt + 1, retries + 1, result[str(todo[0].SOPInstanceUID)])
    return result


# C-STORE statuses that store the object: success, and the warnings "coerced", "elements
# discarded", "does not match the SOP class" (PS3.4 B.2.3).
_STORED = {0x0000, 0xB000, 0xB006, 0xB007}


def _c_store(dest: Destination, datasets: list, calling_aet: str, timeout_s: float) -> dict[str, str | None]:
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
    from pynetdicom import AE

    ae = AE(ae_title=calling_aet)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    ae.connection_timeout = timeout_s
    for sop_class in sorted({str(ds.SOPClassUID) for ds in datasets}):
        ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title)
    if not assoc.is_established:
        why = "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else "not established (no answer?)"
        raise ConnectionError(f"association with {dest.key} {why}: check the PACS's AE title, host, port and that "
                              f"it accepts calling AE title {calling_aet}")
    out: dict[str, str | None] = {}
    try:
        for ds in datasets:
            status = assoc.send_c_store(ds)
            code = getattr(status, "Status", None)
            out[str(ds.SOPInstanceUID)] = None if code in _STORED else (
                "no C-STORE response (association lost)" if code is None else f"C-STORE status 0x{code:04X}")
    finally:
        if assoc.is_established:
            assoc.release()
    return out


def _stow(dest: Destination, datasets: list, timeout_s: float) -> dict[str, str | None]:
    import requests
    from dicomweb_client.api import DICOMwebClient

    client = DICOMwebClient(url=dest.url, session=requests.Session(), timeout=timeout_s)
    response = client.store_instances(datasets=datasets)
    failed = {str(item.get("ReferencedSOPInstanceUID", "")): f"STOW-RS failure reason {item.get('FailureReason', '?')}"
              for item in (response.get("FailedSOPSequence", []) if response is not None else [])}
    return {str(ds.SOPInstanceUID): failed.get(str(ds.SOPInstanceUID)) for ds in datasets}


def read_dataset(data: bytes):
    import pydicom

    return pydicom.dcmread(io.BytesIO(data))
