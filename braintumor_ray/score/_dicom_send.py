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
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

from ..core import ConfigError, Location

logger = logging.getLogger(__name__)

SENT_FILE = "_sent.json"
SENT_FORMAT = 1
DEFAULT_AE_TITLE = "BRAINTUMOR"
# The STOW-RS Authorization header (e.g. "Bearer TOKEN"), or a file holding it: never in the destination.
AUTH_ENV, AUTH_FILE_ENV = "BRAINTUMOR_DICOMWEB_AUTHORIZATION", "BRAINTUMOR_DICOMWEB_AUTHORIZATION_FILE"
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
    """``dicom://AET@host:port`` and ``http(s)://.../dicom-web``, comma-separated; a ConfigError names a bad
    one by its scheme and host only: the value may hold a secret, and the error is logged."""
    out = []
    for raw in [v.strip() for v in (value or "").split(",") if v.strip()]:
        shown = _redacted(raw)
        if raw.lower().startswith(("http://", "https://")):
            parts = urlsplit(raw)
            if "@" in parts.netloc or parts.query or parts.fragment or ";" in parts.path:
                # Any of them may hold a secret (http://:TOKEN@host, ?apikey=, ;jsessionid=), and the
                # destination is written to OUTPUT/_config.yaml, the ledger and the logs.
                raise ConfigError(
                    f"dicom_send={shown}: the URL carries user info, parameters or a query string; "
                    "credentials there would be written to OUTPUT/_config.yaml and the logs: give the "
                    f"DICOMweb URL without them and the HTTP Authorization header in the environment "
                    f"variable {AUTH_ENV} (e.g. 'Bearer TOKEN') or in a file named by {AUTH_FILE_ENV}"
                )
            if not parts.hostname:
                raise ConfigError(
                    f"dicom_send={shown} has no host: give http(s)://HOST:PORT/PATH of a DICOMweb service"
                )
            out.append(Destination("stow", url=raw.rstrip("/")))
            continue
        m = re.fullmatch(r"dicom://([^@:/?#]+)@([^:/@?#]+):(\d+)/?", raw)
        if not m:
            raise ConfigError(
                f"dicom_send={shown} is not a destination: give dicom://CALLED_AET@HOST:PORT (C-STORE, "
                "no password: DIMSE has none) or http(s)://HOST:PORT/dicom-web (STOW-RS), "
                "comma-separated for several"
            )
        aet, host, port = m.group(1), m.group(2), int(m.group(3))
        check_ae_title(aet, "the called AE title of dicom_send")
        if not 1 <= port <= 65535:
            raise ConfigError(f"dicom_send={shown}: port {port} is out of range: use 1..65535")
        out.append(Destination("dimse", ae_title=aet, host=host, port=port))
    return tuple(out)


def _redacted(raw: str) -> str:
    """A destination as an error may quote it: scheme, host and port, nothing that could be a secret."""
    try:
        parts = urlsplit(raw)
        host = parts.hostname or "?"
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "(an unparsable destination)"
    return f"{parts.scheme or '?'}://{'AET@' if parts.scheme == 'dicom' and '@' in parts.netloc else ''}{host}{port}"


def dicomweb_authorization(env: Mapping[str, str] | None = None) -> str | None:
    """The HTTP Authorization header for STOW-RS, from :data:`AUTH_ENV` or the file :data:`AUTH_FILE_ENV`
    names; never part of the destination (which is written out), never logged."""
    env = os.environ if env is None else env
    value = env.get(AUTH_ENV, "").strip()
    if not value and env.get(AUTH_FILE_ENV, "").strip():
        path = env[AUTH_FILE_ENV].strip()
        try:
            with open(path, encoding="utf-8") as fh:
                value = fh.read().strip()
        except OSError as e:
            raise ConfigError(
                f"{AUTH_FILE_ENV} names a file that cannot be read ({type(e).__name__}): give the path "
                "of a file holding the Authorization header's value"
            ) from None
    if value and any(c in value for c in "\r\n"):
        raise ConfigError(f"the DICOMweb Authorization value ({AUTH_ENV} or {AUTH_FILE_ENV}) must be one line")
    return value or None


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
                logger.warning(
                    "score: %s is not readable: every object is sent again (a PACS overwrites an object it "
                    "has: same SOP Instance UID)",
                    self.location.uri,
                )

    def pending(self, dest: Destination, names: Sequence[str]) -> list[str]:
        done = self.sent.get(dest.key, {})
        return [n for n in names if n not in done]

    def record(self, dest: Destination, name: str, sop_instance_uid: str) -> None:
        self.sent.setdefault(dest.key, {})[name] = {
            "sop_instance_uid": sop_instance_uid,
            "sent_at": datetime.now(UTC).isoformat(),
        }

    def save(self) -> None:
        doc = {"format": SENT_FORMAT, "sent": {k: dict(sorted(v.items())) for k, v in sorted(self.sent.items())}}
        self.location.write_atomic(json.dumps(doc, indent=1).encode())


class Refused(str):
    """A failure that is the PACS's definitive answer (it refused the object's SOP class)."""


Sender = Callable[[Destination, list], dict[str, str | None]]


def send_with_retries(
    dest: Destination,
    datasets: list,
    *,
    calling_aet: str,
    retries: int,
    backoff_s: float = 0.5,
    timeout_s: float = 30.0,
    sender: Sender | None = None,
    on_try: Callable[[dict[str, str | None]], None] | None = None,
) -> dict[str, str | None]:
    """SOP Instance UID -> None (stored) or the last error, after ``retries`` more tries of the failed ones.
    ``on_try`` gets each try's answers as they come (the ledger records what was stored before the
    next try: a run cut off during the backoff does not send those again)."""
    send = sender or (
        lambda d, ds: _c_store(d, ds, calling_aet, timeout_s) if d.kind == "dimse" else _stow(d, ds, timeout_s)
    )
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
        if on_try is not None:
            on_try(got)
        # A refused SOP class is the PACS's answer for this association's terms: not tried again
        # in this run (the association would only be aborted: no context left), the next run asks again.
        todo = [
            ds
            for ds in todo
            if result[str(ds.SOPInstanceUID)] is not None and not isinstance(result[str(ds.SOPInstanceUID)], Refused)
        ]
        if not todo:
            break
        logger.warning(
            "score: sending %d DICOM objects to %s failed (try %d of %d): %s",
            len(todo),
            dest.key,
            attempt + 1,
            retries + 1,
            result[str(todo[0].SOPInstanceUID)],
        )
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
        raise ConnectionError(
            f"association with {dest.key} {why}: check the PACS's AE title, host, port and that "
            f"it accepts calling AE title {calling_aet}"
        )
    accepted = {str(cx.abstract_syntax) for cx in assoc.accepted_contexts}
    out: dict[str, str | None] = {}
    try:
        for ds in datasets:
            uid = str(ds.SOPInstanceUID)
            if str(ds.SOPClassUID) not in accepted:
                # The PACS refused this SOP class's presentation context: this object's failure;
                # the others on the association still go.
                out[uid] = Refused(f"the PACS refused SOP class {ds.SOPClassUID} (presentation context rejected)")
                continue
            if not assoc.is_established:  # lost mid-way: what is left was not tried
                out[uid] = "not tried (association lost)"
                continue
            try:
                status = assoc.send_c_store(ds)
            except ValueError as e:  # no accepted context for its transfer syntax (pynetdicom names the syntax)
                out[uid] = f"not sent: {e}"
                continue
            except Exception as e:  # the connection broke: the objects answered before keep their answers
                out[uid] = f"{type(e).__name__}: {e}"
                continue
            code = getattr(status, "Status", None)
            out[uid] = (
                None
                if code in _STORED
                else ("no C-STORE response (association lost)" if code is None else f"C-STORE status 0x{code:04X}")
            )
    finally:
        if assoc.is_established:
            assoc.release()
    return out


def _stow(dest: Destination, datasets: list, timeout_s: float) -> dict[str, str | None]:
    import requests
    from dicomweb_client.api import DICOMwebClient

    session = requests.Session()
    auth = dicomweb_authorization()
    if auth:
        session.headers["Authorization"] = auth
    replies: list = []
    session.hooks["response"].append(lambda r, *a, **k: replies.append(r))
    client = DICOMwebClient(url=dest.url, session=session, timeout=timeout_s)
    response: Any = client.store_instances(datasets=datasets)
    if replies and not len(response or ()):  # dicomweb-client reads only exact JSON/XML media types
        try:
            import pydicom

            response = pydicom.Dataset.from_json(replies[-1].json())
        except Exception:  # a login page, an empty body: nothing in it says an object was stored
            response = None
    return stow_outcome(
        response, [str(ds.SOPInstanceUID) for ds in datasets], replies[-1].status_code if replies else None
    )


def stow_outcome(response, uids: Sequence[str], http_status: int | None = None) -> dict[str, str | None]:
    """Each SOP Instance UID -> None where the STOW-RS reply lists it in its ReferencedSOPSequence
    (PS3.18 10.5.3: the instances stored), else why not. A 200 without that list (an HTML login
    page of a proxy, ``{}``) stored nothing that it says: a failure, tried again later."""
    stored, failed = set(), {}
    if response is not None:
        for item in response.get("ReferencedSOPSequence", None) or []:
            stored.add(str(item.get("ReferencedSOPInstanceUID", "")))
        for item in response.get("FailedSOPSequence", None) or []:
            failed[str(item.get("ReferencedSOPInstanceUID", ""))] = (
                f"STOW-RS failure reason {item.get('FailureReason', '?')}"
            )
    status = f"HTTP {http_status}" if http_status is not None else "the reply"
    return {
        u: None
        if u in stored
        else failed.get(
            u, f"not in the STOW-RS reply's stored instances ({status} listed no ReferencedSOPSequence item for it)"
        )
        for u in uids
    }


def read_dataset(data: bytes):
    import pydicom

    return pydicom.dcmread(io.BytesIO(data))
