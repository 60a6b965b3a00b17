"""The cluster configs are valid for the Ray that the project installs (Ray's own schema and
defaults, as `ray up` applies them), and the Kubernetes manifests have the shape KubeRay reads."""

from __future__ import annotations

import copy
import os
import re

import pytest
import yaml

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LAUNCHER_CONFIGS = ["cluster.yaml", "deploy/cluster-onprem.yaml"]


def _load(rel: str):
    with open(os.path.join(REPO, rel)) as f:
        return yaml.safe_load(f)


def _validate(config: dict) -> dict:
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(copy.deepcopy(config))  # fills defaults exactly as `ray up` does
    validate_config(config)  # Ray's validator against ray/autoscaler/ray-schema.json
    return config


@pytest.mark.parametrize("rel", LAUNCHER_CONFIGS)
def test_launcher_config_passes_rays_schema(rel):
    config = _validate(_load(rel))
    assert any("pip install" in c and "-e ." in c for c in config["setup_commands"]), "must install this project"


@pytest.mark.parametrize("rel", LAUNCHER_CONFIGS)
def test_a_typo_fails_validation(rel):
    from jsonschema import ValidationError

    bad = _load(rel)
    bad["idle_timeout_minute"] = 5  # missing "s"
    with pytest.raises(ValidationError, match="idle_timeout_minute"):
        _validate(bad)


def test_aws_config_keeps_drivers_off_spot_and_credentials_out():
    config = _load("cluster.yaml")
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert "InstanceMarketOptions" not in head["node_config"], "the head runs drivers: on-demand"
    assert head["resources"]["CPU"] == 0, "no tasks on the head"
    assert head["resources"].get("trial_driver", 0) >= 1, "Tune trial drivers (jobs/tune.py) live on the on-demand head"
    gpu_types = [t for t in types.values() if t.get("resources", {}).get("GPU")]
    assert gpu_types and all(t["min_workers"] == 0 for t in gpu_types), "GPU workers scale from zero"
    assert any(t["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot" for t in gpu_types)
    text = open(os.path.join(REPO, "cluster.yaml")).read()
    assert not re.search(r"(?i)aws_(access_key_id|secret_access_key)|AKIA[0-9A-Z]{16}", text)
    assert all(t["node_config"].get("IamInstanceProfile") for t in types.values()), "credentials from the instance role"


def test_onprem_config_lists_its_workers():
    config = _load("deploy/cluster-onprem.yaml")
    assert config["provider"]["type"] == "local"
    assert len(config["provider"]["worker_ips"]) == config["max_workers"] == config["min_workers"]


def _rayjobs():
    docs = [("deploy/rayjob-score.yaml", _load("deploy/rayjob-score.yaml"))]
    text = open(os.path.join(REPO, "docs", "scoring.md")).read()
    for block in re.findall(r"```yaml\n(.*?)```", text, flags=re.S):
        docs.append(("docs/scoring.md", yaml.safe_load(block)))
    return docs


@pytest.mark.parametrize("where,doc", _rayjobs())
def test_kubernetes_manifests_have_the_shape_kuberay_and_batch_read(where, doc):
    # No KubeRay CRD schema ships with Ray; check the fields the operator and kube-apiserver require.
    if doc["kind"] == "RayJob":
        assert doc["apiVersion"] == "ray.io/v1"
        spec = doc["spec"]
        assert spec["entrypoint"].startswith("python ") and "jobs/score.py" in spec["entrypoint"]
        cluster = spec["rayClusterSpec"]
        pods = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster.get("workerGroupSpecs", [])]
        for group in [cluster["headGroupSpec"], *cluster.get("workerGroupSpecs", [])]:
            assert "rayStartParams" in group
        for pod in pods:
            (container,) = pod["spec"]["containers"]
            assert container["image"] and container["name"]
    else:
        assert (doc["apiVersion"], doc["kind"]) == ("batch/v1", "CronJob")
        assert doc["spec"]["concurrencyPolicy"] == "Forbid", "two scoring runs must never overlap"
        (container,) = doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
        assert container["command"][:3] == ["ray", "job", "submit"] and "jobs/score.py" in container["command"]
