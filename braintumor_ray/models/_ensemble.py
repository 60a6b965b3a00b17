"""Ensemble packages: K members' networks (same or different backbones) as one model.

An ensemble is a package like any other (``model.json``, ``model.safetensors``, ``model.onnx``,
``trust.safetensors``; one model id), so scoring, the report, DICOM SR and MLflow take it as
they take one model. What differs:

* ``model.safetensors`` holds every member's tensors, keyed ``members.<i>.<name>``, and
  ``model.json`` lists the members (``members``: backbone, head, data config, and the package
  each came from). The id covers the weights file (every member) and that list, so changing
  any member changes the id.
* The network (:class:`EnsembleNet`) runs every member on the same input and averages their
  logits, before the package's own temperature; its penultimate features are the members'
  features side by side (the OOD reference is fitted on them); its class-activation maps are
  the members' maps averaged, each bilinearly resized to the largest member's grid first.
* Members may normalise their input differently (Lite: mean 0.5; EfficientNet: ImageNet's):
  the package's input is then ``pixels / 255`` (mean 0, std 1) and each member renormalises
  inside the network. The MRI preprocessing (crop, size) must be the same for every member.

:func:`check_members` refuses members that cannot be one model (class names, preprocessing),
naming the member and the field.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..core import ConfigError
from ._factory import has_cam, timm_outputs

if TYPE_CHECKING:
    from ._format import PackageMeta

#: What every member must share with the first, from its ``model.json``.
SHARED_FIELDS = ("class_names", "preprocess")


def check_members(members: Sequence[Mapping[str, Any]], names: Sequence[str]) -> None:
    """Refuse members whose ``model.json`` (``members``) differ from the first in a field every
    member must share; ``names`` name them in the error (their URIs). A member is described as
    its ``model.json`` has it (:meth:`PackageMeta.document`), or, for weights never packaged (a
    search's trials), by those fields alone."""
    if len(members) < 2:
        raise ConfigError(f"an ensemble needs at least 2 members, got {len(members)}: give --package twice or more")
    first = members[0]
    for name, meta in zip(names[1:], members[1:]):
        for key in SHARED_FIELDS:
            if meta.get(key) != first.get(key):
                raise ConfigError(
                    f"member {name} has {key} {_short(meta.get(key))}, but {names[0]} has {_short(first.get(key))}: "
                    "the members of an ensemble must see the same images and name the same classes. Leave it out, "
                    "or train it again on the same preprocessed data"
                )
        if meta.get("members"):
            raise ConfigError(f"member {name} is itself an ensemble: give its members' packages instead")
    if first.get("members"):
        raise ConfigError(f"member {names[0]} is itself an ensemble: give its members' packages instead")


def _short(x: Any) -> str:
    s = repr(x)
    return s if len(s) < 200 else s[:200] + "..."


class EnsembleNet(nn.Module):
    """K timm classifiers as one network: ``forward`` gives the mean logits; ``ensemble_outputs``
    (what :class:`~braintumor_ray.models.WithFeatures` calls, so the ONNX export and both engines
    run it) gives (logits, features[, cam]).

    ``data_configs``: each member's data config (``mean``/``std`` used here). ``build``: each
    member's ``backbone``, ``num_classes``, ``global_pool`` (for ``model.json``); ``sources``:
    where each came from (recorded, not part of the id).
    """

    def __init__(
        self,
        members: Sequence[nn.Module],
        *,
        data_configs: Sequence[Mapping[str, Any]],
        build: Sequence[Mapping[str, Any]],
        sources: Sequence[Mapping[str, Any]] | None = None,
        input_size: int | None = None,
    ) -> None:
        super().__init__()
        if len(members) < 2:
            raise ConfigError(f"an ensemble needs at least 2 members, got {len(members)}")
        self.members = nn.ModuleList([getattr(m, "_orig_mod", m) for m in members])
        means = [tuple(float(v) for v in c["mean"]) for c in data_configs]
        stds = [tuple(float(v) for v in c["std"]) for c in data_configs]
        same = len(set(means)) == 1 and len(set(stds)) == 1
        self.mean, self.std = (means[0], stds[0]) if same else ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
        self.renormalise = not same
        # Member i sees x * a_i + b_i = (pixels/255 - mean_i) / std_i (buffers: they follow .to()).
        for i, (m, s) in enumerate(zip(means, stds)):
            a = torch.tensor([se / si for se, si in zip(self.std, s)]).view(1, 3, 1, 1)
            b = torch.tensor([(me - mi) / si for me, mi, si in zip(self.mean, m, s)]).view(1, 3, 1, 1)
            self.register_buffer(f"scale{i}", a, persistent=False)
            self.register_buffer(f"shift{i}", b, persistent=False)
        self.has_maps = all(has_cam(m) for m in self.members)
        num_classes = {int(b["num_classes"]) for b in build}
        if len(num_classes) != 1:
            raise ConfigError(f"ensemble members have {sorted(num_classes)} outputs: they must name the same classes")
        self.num_classes = num_classes.pop()
        first = dict(data_configs[0])
        side = int(input_size or first["input_size"][-1])
        self.pretrained_cfg = {  # what timm's resolve_model_data_config (models.data_config) reads
            "input_size": (3, side, side),
            "interpolation": first.get("interpolation", "bilinear"),
            "mean": self.mean,
            "std": self.std,
            "crop_pct": first.get("crop_pct"),
            "crop_mode": first.get("crop_mode"),
        }
        name = "ensemble(" + "+".join(b["backbone"] for b in build) + ")"
        # The name reaches DICOM SR's Algorithm Name (LO: 64 characters) after "braintumor-ray ":
        # a long list is left to model.json's members.
        name = name if len(name) <= 48 else f"ensemble of {len(build)}"
        self.braintumor_build = {"backbone": name, "num_classes": self.num_classes, "global_pool": "ensemble"}
        self.braintumor_members = [
            {
                "backbone": b["backbone"],
                "num_classes": int(b["num_classes"]),
                "global_pool": b["global_pool"],
                "data_config": _plain_config(c),
                **({"source": dict(src)} if src else {}),
            }
            for b, c, src in zip(build, data_configs, sources or [{}] * len(build))
        ]

    def _inputs(self, x: torch.Tensor, i: int) -> torch.Tensor:
        if not self.renormalise:
            return x
        return x * getattr(self, f"scale{i}").to(x.dtype) + getattr(self, f"shift{i}").to(x.dtype)

    def member_outputs(self, x: torch.Tensor, *, maps: bool = False) -> list[tuple[torch.Tensor, ...]]:
        """Each member's (logits, features[, cam]) on the ensemble's input."""
        return [timm_outputs(m, self._inputs(x, i), maps=maps) for i, m in enumerate(self.members)]

    def ensemble_outputs(self, x: torch.Tensor, *, maps: bool = False) -> tuple[torch.Tensor, ...]:
        outs = self.member_outputs(x, maps=maps and self.has_maps)
        logits = torch.stack([o[0] for o in outs]).mean(0)
        feats = torch.cat([o[1] for o in outs], dim=1)
        if not (maps and self.has_maps):
            return logits, feats
        cams = [o[2] for o in outs]
        h = max(int(c.shape[2]) for c in cams)
        w = max(int(c.shape[3]) for c in cams)
        cams = [
            c
            if tuple(c.shape[2:]) == (h, w)
            else nn.functional.interpolate(c, size=(h, w), mode="bilinear", align_corners=False)
            for c in cams
        ]
        return logits, feats, torch.stack(cams).mean(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack(
            [timm_outputs(m, self._inputs(x, i), maps=False)[0] for i, m in enumerate(self.members)]
        ).mean(0)


def _plain_config(c: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "input_size": [int(v) for v in c["input_size"]],
        "interpolation": c.get("interpolation"),
        "mean": [float(v) for v in c["mean"]],
        "std": [float(v) for v in c["std"]],
        "crop_pct": c.get("crop_pct"),
        "crop_mode": c.get("crop_mode"),
    }


def ensemble_from_meta(meta: PackageMeta) -> EnsembleNet:
    """An ensemble's network, randomly initialised, from its ``model.json`` (the weights load next)."""
    import timm

    try:
        listed = meta.document()["members"]  # plain dicts: the network writes them back on export
        members = [
            timm.create_model(
                m["backbone"], pretrained=False, num_classes=int(m["num_classes"]), global_pool=m["global_pool"]
            )
            for m in listed
        ]
        return EnsembleNet(
            members,
            data_configs=[m["data_config"] for m in listed],
            build=listed,
            sources=[m.get("source") for m in listed],
            input_size=int(meta.data_config["input_size"][-1]),
        )
    except (KeyError, TypeError) as e:
        raise ConfigError(
            f"model.json's members list is not an ensemble's ({type(e).__name__}: {e}): export the ensemble again"
        ) from e


def member_source(meta: Mapping[str, Any], uri: str) -> dict[str, Any]:
    """What an ensemble records of a member package: where it came from and its id (a member
    described as in :func:`check_members`)."""
    return {"uri": uri, "model_id": meta.get("model_id")}


def member_build(model: nn.Module) -> dict[str, Any]:
    """A member's backbone, outputs and pooling, as its package records them."""
    model = getattr(model, "_orig_mod", model)
    return dict(
        getattr(model, "braintumor_build", None)
        or {"backbone": model.pretrained_cfg["architecture"], "num_classes": model.num_classes, "global_pool": "avg"}
    )
