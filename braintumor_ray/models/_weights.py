"""Loading weights from a URI, and finding pretrained weights without hanging on a dead network.

A weights file is data, never code: safetensors, or a PyTorch state dict read with
``weights_only=True``. Keys must match the backbone exactly; only the classifier may differ,
because a new head for our classes is the point of transfer learning.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import threading
import urllib.error
import urllib.request
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

import torch
from torch import nn

from ..core import ConfigError, resolve

logger = logging.getLogger(__name__)

#: Seconds the reachability probe may take, DNS included. huggingface_hub's own path retries
#: for ~45 s per file before giving up on an air-gapped host; we ask once and move on.
HUB_PROBE_TIMEOUT_S = 3.0

_SHA256 = re.compile(r"[0-9a-f]{64}")
_probe_cache: dict[str, bool] = {}


# --- reading a state dict -------------------------------------------------------------------


def read_weights(uri: str, *, sha256: str | None = None, s3_endpoint_url: str | None = None) -> dict[str, torch.Tensor]:
    """Read a state dict from a local path or ``s3://`` URI, checking its sha256 if given."""
    expected = _check_sha256_arg(sha256)
    data = resolve(uri, s3_endpoint_url=s3_endpoint_url).read_bytes()
    if expected is not None:
        actual = hashlib.sha256(data).hexdigest()
        if actual != expected:
            raise ConfigError(
                f"weights {uri} have sha256 {actual}, but {expected} was expected: the file is not the "
                "one you meant (changed, truncated or a different upload). Check the URI or the checksum."
            )
    return decode_state_dict(data, source=uri)


def decode_state_dict(data: bytes, *, source: str = "<bytes>") -> dict[str, torch.Tensor]:
    """Decode safetensors or a torch state dict; a pickle that wants more than tensors is refused."""
    if _looks_like_safetensors(data):
        from safetensors.torch import load

        try:
            return dict(load(data))
        except Exception as e:
            raise ConfigError(f"weights {source} are not a valid safetensors file ({e}): re-export them") from e
    try:
        # weights_only=True: the unpickler only rebuilds tensors and plain containers, so a file
        # from an untrusted bucket cannot run code on the cluster.
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError for refused globals; zip/EOF errors for damaged files
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(
            f"refusing to load weights {source}: it is not a plain tensor state dict that torch.load can "
            f"read with weights_only=True ({first}). Save only model.state_dict(), ideally as .safetensors."
        ) from None
    # Training checkpoints wrap the state dict ({"state_dict": ...}, {"model": ...}).
    for key in ("state_dict", "model", "state_dict_ema"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ConfigError(f"weights {source} hold a {type(obj).__name__}, not a state dict of tensors")
    return dict(obj)


def _looks_like_safetensors(data: bytes) -> bool:
    # 8-byte little-endian header length, then a JSON header.
    if len(data) < 10:
        return False
    n = int.from_bytes(data[:8], "little")
    return 0 < n <= len(data) - 8 and data[8:9] == b"{"


def _check_sha256_arg(sha256: str | None) -> str | None:
    if sha256 is None or sha256 == "":
        return None
    s = sha256.strip().lower().removeprefix("sha256:")
    if not _SHA256.fullmatch(s):
        raise ConfigError(f"weights_sha256={sha256!r} is not a sha256: give 64 hex digits (sha256sum FILE)")
    return s


# --- fitting a state dict to a model ----------------------------------------------------------


def classifier_prefixes(model: nn.Module) -> tuple[str, ...]:
    """Module-name prefixes of the classifier head ("fc.", "classifier.", "head.fc."...)."""
    names = model.pretrained_cfg.get("classifier", ()) if hasattr(model, "pretrained_cfg") else ()
    names = (names,) if isinstance(names, str) else tuple(names or ())
    if not names:  # not a timm model with a cfg: find the module get_classifier() returns
        head = model.get_classifier()
        names = tuple(n for n, m in model.named_modules() if m is head and n)
    return tuple(f"{n}." for n in names)


def load_state_dict_into(model: nn.Module, state_dict: Mapping[str, torch.Tensor], *, source: str) -> list[str]:
    """Load ``state_dict`` into ``model``; every backbone tensor must match by name and shape.

    The classifier is loaded when its shapes fit and skipped (keeping the new head) when they do
    not; a missing ``num_batches_tracked`` is tolerated. Returns the model keys left as they were.
    Anything else gives a ConfigError naming the missing, unexpected and mis-shaped keys.
    """
    sd = dict(state_dict)
    if sd and all(k.startswith("module.") for k in sd):  # saved from a DDP-wrapped model
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    own = model.state_dict()
    head = classifier_prefixes(model)

    def is_head(k: str) -> bool:
        return k.startswith(head)

    missing = [k for k in own if k not in sd and not is_head(k) and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in sd if k not in own and not is_head(k)]
    mis_shaped = [k for k in sd if k in own and not is_head(k) and sd[k].shape != own[k].shape]
    if missing or unexpected or mis_shaped:
        arch = getattr(model, "pretrained_cfg", {}).get("architecture", type(model).__name__)
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s): {_few(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s): {_few(unexpected)}")
        if mis_shaped:
            shapes = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in mis_shaped]
            parts.append(f"{len(mis_shaped)} shape mismatch(es), file vs model: {_few(shapes)}")
        raise ConfigError(
            f"weights {source} do not fit the backbone {arch}: " + "; ".join(parts) + ". Only the classifier "
            f"({', '.join(p.rstrip('.') for p in head) or 'head'}) may differ. Give weights saved from a {arch} "
            "(its state_dict), or choose the model they were saved from."
        )
    head_fits = all(k in sd and sd[k].shape == v.shape for k, v in own.items() if is_head(k))
    if not head_fits:
        sd = {k: v for k, v in sd.items() if not is_head(k)}
        logger.info("weights %s: classifier differs from this model's, keeping the new head", source)
    result = model.load_state_dict(sd, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys  # checked above
    return list(result.missing_keys)


def _few(items: list[str], n: int = 8) -> str:
    return ", ".join(items[:n]) + (f", ... and {len(items) - n} more" if len(items) > n else "")


# --- where pretrained weights can come from ----------------------------------------------------


def hub_offline() -> bool:
    """True when the user said there is no hub (``HF_HUB_OFFLINE``/``TRANSFORMERS_OFFLINE``).

    Read from the environment on each call: huggingface_hub reads it once, at import.
    """
    import huggingface_hub.constants as hfc

    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return env.strip().upper() in ("1", "ON", "YES", "TRUE") or bool(hfc.HF_HUB_OFFLINE)


def hf_endpoint() -> str:
    import huggingface_hub.constants as hfc

    return (os.environ.get("HF_ENDPOINT") or hfc.ENDPOINT).rstrip("/")


def reachable(url: str, *, timeout: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """One HEAD request to ``url``; True only for a 2xx/3xx answer.

    The URL is what the weights need (the model's hub API page, or the weights file itself):
    a captive or intercepting proxy that answers every host with 403/404 must not pass for
    the hub. The request runs in a daemon thread so that a hanging DNS lookup (which ignores
    socket timeouts) cannot hold the caller past ``timeout``. Answers are kept per URL for the
    life of the process.
    """
    if url in _probe_cache:
        return _probe_cache[url]
    answer: list[str] = []

    def probe() -> None:
        try:
            with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout) as r:
                answer.append(f"HTTP {r.status}")
        except urllib.error.HTTPError as e:
            answer.append(f"HTTP {e.code}")
        except Exception as e:
            answer.append(f"{type(e).__name__}: {e}")

    thread = threading.Thread(target=probe, name="weights-probe", daemon=True)
    thread.start()
    thread.join(timeout)
    why = answer[0] if answer else f"no answer within {timeout:g} s"
    ok = why.startswith("HTTP ") and int(why.split()[1]) < 400
    _probe_cache[url] = ok
    logger.info("weights source %s: %s (%s)", url, "reachable" if ok else "not reachable", why)
    return ok


def cached_pretrained_file(pretrained_cfg: Mapping[str, Any]) -> str | None:
    """A local copy of the timm weights from an earlier download, if any (HF or torch.hub cache)."""
    hub_id = pretrained_cfg.get("hf_hub_id")
    if hub_id:
        from huggingface_hub import try_to_load_from_cache

        cache_dir = os.environ.get("HF_HUB_CACHE") or None
        names = [pretrained_cfg.get("hf_hub_filename")] if pretrained_cfg.get("hf_hub_filename") else []
        for name in names + ["model.safetensors", "open_clip_pytorch_model.bin", "pytorch_model.bin"]:
            path = try_to_load_from_cache(hub_id, name, cache_dir=cache_dir)
            if isinstance(path, str) and os.path.isfile(path):
                return path
    url = pretrained_cfg.get("url")
    if url:
        path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urlsplit(url).path))
        if os.path.isfile(path):
            return path
    return None


def pretrained_probe_url(pretrained_cfg: Mapping[str, Any]) -> str | None:
    """A URL that answers 2xx/3xx when timm can download these weights: the HF hub's page for
    the repo if the cfg names one (timm prefers the hub), else the weights' own url."""
    if pretrained_cfg.get("hf_hub_id"):
        return f"{hf_endpoint()}/api/models/{pretrained_cfg['hf_hub_id']}"
    return pretrained_cfg.get("url") or None
