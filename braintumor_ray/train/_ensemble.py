"""Ensembles: K trained models as one package, trust refitted on the ensemble's own outputs.

    summary = build_ensemble(EnsembleConfig(packages=("runs/a/model", "runs/b/model"), data="pre", output="ens"))

The members' networks go into one package (:mod:`braintumor_ray.models`' ``EnsembleNet``:
mean logits, features side by side, averaged maps). Its temperature, OOD reference, review
threshold and prediction sets are fitted as the training job fits a single model's
(:func:`fit_model_trust`: validation for calibration and thresholds, the training split for the
OOD reference), never on Testing. ``jobs/ensemble.py`` builds one from any runs' packages,
``jobs/tune.py --ensemble K`` from the search's top-K trials, both through :func:`export_ensemble`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..core import CLASS_NAMES, Config, ConfigError, setting
from ..trust import TrustConfig
from ._data import TrainData

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class EnsembleConfig(Config):
    """One ensemble package from trained models' packages (``jobs/ensemble.py``)."""

    packages: tuple[str, ...] = setting(
        (),
        help="the members' model packages, local or s3:// (repeat --package, or "
        "comma-separated): 2 or more, same class names and preprocessing",
        aliases=("--package",),
    )
    data: str | None = setting(
        None,
        help="output of jobs/preprocess.py the members were trained on: validation "
        "calibrates the ensemble, the training split gives its OOD reference, test is reported",
    )
    output: str | None = setting(None, help="the ensemble's package folder, local or s3://")
    s3_endpoint_url: str | None = setting(
        None, help="S3-compatible endpoint for packages, data and output", env="AWS_ENDPOINT_URL"
    )
    seed: int = setting(0, help="the trust fit's split of validation (conformal sets)")
    eval_batch_size: int = setting(64, help="images per step when evaluating")
    onnx: bool = setting(True, help="write model.onnx (one graph running every member) beside the weights")
    trust: TrustConfig = setting(
        default_factory=TrustConfig,
        help="calibration, out-of-distribution reference and review threshold, fitted on the ensemble's outputs",
    )

    def __post_init__(self) -> None:
        if isinstance(self.packages, str):
            object.__setattr__(self, "packages", tuple(p.strip() for p in self.packages.split(",") if p.strip()))
        if len(self.packages) and len(self.packages) < 2:
            raise ConfigError(
                f"packages={list(self.packages)}: an ensemble needs 2 or more members (--package P1 --package P2 ...)"
            )
        if len(set(self.packages)) != len(self.packages):
            raise ConfigError(f"packages={list(self.packages)} names a package twice: give each member once")
        if self.eval_batch_size < 1:
            raise ConfigError(f"eval_batch_size={self.eval_batch_size} must be >= 1")


@dataclass(frozen=True)
class Member:
    """One member: its network, where it came from, what its package says (class names,
    preprocessing, data config)."""

    name: str
    model: Any  # torch.nn.Module
    meta: Mapping[str, Any]  # its model.json (PackageMeta.document()), or a trial's equivalent fields


def load_members(uris: Sequence[str], *, s3_endpoint_url: str | None = None) -> list[Member]:
    """The members' packages, each verified (weights against its id) and loaded."""
    from ..models import load_model_package, verify_package

    out = []
    for uri in uris:
        meta = verify_package(uri, s3_endpoint_url=s3_endpoint_url)
        pkg = load_model_package(uri, s3_endpoint_url=s3_endpoint_url, meta=meta)
        out.append(Member(name=pkg.uri, model=pkg.model, meta=meta.document()))
    return out


def export_ensemble(
    members: Sequence[Member],
    data: TrainData,
    uri: str,
    *,
    trust: TrustConfig,
    seed: int = 0,
    batch_size: int = 64,
    s3_endpoint_url: str | None = None,
    onnx: bool = True,
    extra_metrics: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The ensemble of ``members`` evaluated on val/test, its trust fitted on ``data``, exported
    to ``uri``; returns the figures (as ``best.json`` has them for one model)."""
    from ..imaging import MRIPreprocess
    from ..models import member_source
    from ._outputs import package_metrics
    from ._run import export_package
    from ._trust import fit_model_trust, output_metrics, split_outputs

    names = [m.name for m in members]
    net = _ensemble_net(members, data)
    # Every split through the ensemble once: the metrics and the trust fit share the outputs.
    outs = split_outputs(net, data, batch_size=batch_size)
    metrics = output_metrics(outs)
    fitted, trust_report = fit_model_trust(net, data, trust, seed=seed, batch_size=batch_size, outputs=outs)
    class_names = tuple(members[0].meta.get("class_names") or CLASS_NAMES)
    meta = export_package(
        net,
        uri,
        preprocess=MRIPreprocess.from_dict(data.report["preprocess"]),
        class_names=class_names,
        trust=fitted,
        metrics=package_metrics(metrics, members=len(members), **dict(extra_metrics or {})),
        s3_endpoint_url=s3_endpoint_url,
        onnx=onnx,
    )
    logger.info(
        "ensemble of %d members (%s): val accuracy %.3f, macro-F1 %.3f; model %s at %s",
        len(members),
        meta.backbone,
        metrics["val"]["accuracy"],
        metrics["val"]["macro_f1"],
        meta.model_id,
        uri,
    )
    return {
        "model": {"uri": uri, "model_id": meta.model_id, "backbone": meta.backbone},
        "members": [
            {"name": n, **member_source(m.meta, n)} | {"backbone": b["backbone"]}
            for n, m, b in zip(names, members, meta.members)
        ],
        **metrics,
        "trust": trust_report,
    }


def _ensemble_net(members: Sequence[Member], data: TrainData) -> Any:
    """The members as one network (an ``EnsembleNet`` in eval mode), once they are shown to be one
    model's parts: the same class names and preprocessing, the data's."""
    from ..imaging import MRIPreprocess
    from ..models import EnsembleNet, check_members, member_build, member_source

    check_members([m.meta for m in members], [m.name for m in members])
    want = MRIPreprocess.from_dict(data.report["preprocess"]).to_dict()
    for m in members:
        if m.meta.get("preprocess") != want:
            raise ConfigError(
                f"member {m.name} has preprocess {m.meta.get('preprocess')}, but the data has {want}: the "
                "ensemble's calibration would see other images than its members were trained on. Give "
                "--data the preprocessed data the members were trained on"
            )
    return EnsembleNet(
        [m.model for m in members],
        data_configs=[m.meta["data_config"] for m in members],
        build=[member_build(m.model) for m in members],
        sources=[member_source(m.meta, m.name) for m in members],
        input_size=data.image_size,
    ).eval()


def build_ensemble(cfg: EnsembleConfig) -> dict[str, Any]:
    """``jobs/ensemble.py``: load the members, the data, build and export the ensemble."""
    from ..core import resolve
    from ._data import load_train_data

    if len(cfg.packages) < 2:
        raise ConfigError("give the members: --package P1 --package P2 ... (2 or more)")
    if not cfg.data or not cfg.output:
        raise ConfigError(
            "give --data (the preprocessed data the members were trained on) and --output (the "
            "ensemble's package folder)"
        )
    out = resolve(cfg.output, s3_endpoint_url=cfg.s3_endpoint_url)
    for p in cfg.packages:
        if resolve(p, s3_endpoint_url=cfg.s3_endpoint_url).uri.rstrip("/") == out.uri.rstrip("/"):
            raise ConfigError(f"--output {out.uri} is member {p}: write the ensemble to a new folder")
    members = load_members(cfg.packages, s3_endpoint_url=cfg.s3_endpoint_url)
    data = load_train_data(cfg.data, s3_endpoint_url=cfg.s3_endpoint_url, seed=cfg.seed)
    return export_ensemble(
        members,
        data,
        out.uri,
        trust=cfg.trust,
        seed=cfg.seed,
        batch_size=cfg.eval_batch_size,
        s3_endpoint_url=cfg.s3_endpoint_url,
        onnx=cfg.onnx,
    )


def format_ensemble(summary: Mapping[str, Any]) -> str:
    """The console lines of a built ensemble: members, then accuracy and macro-F1 per split."""
    m = summary["model"]
    lines = [f"ensemble {m['model_id']} ({m['backbone']}) at {m['uri']}"]
    for mem in summary["members"]:
        lines.append(f"  member {mem['backbone']} {mem.get('model_id') or ''} from {mem['name']}")
    lines.append(f"  {'split':<11}{'n':>5}{'accuracy':>10}{'macro-F1':>10}")
    for s in ("val", "test", "test_clean"):
        if s in summary:
            lines.append(f"  {s:<11}{summary[s]['n']:>5}{summary[s]['accuracy']:>10.3f}{summary[s]['macro_f1']:>10.3f}")
    t = summary.get("trust") or {}
    if t:
        lines.append(
            f"  calibration on val: temperature {t['temperature']:.2f}, {t['ood_detector']} OOD, review below "
            f"confidence {t['review_threshold']:.2f}"
        )
    return "\n".join(lines)
