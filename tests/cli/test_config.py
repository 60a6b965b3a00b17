"""Settings declared once: config round trips, every job option <-> its config field, --config YAML.

Fast and without Ray: the jobs' own parsers (``jobs/<job>.py get_args_parser()``) and
``braintumor_ray.cli.build_config``; the stages never run here (the end-to-end check that a
training run's saved config.yaml rebuilds its TrainConfig is in tests/end_to_end/test_train_job.py).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os

import pytest
import yaml

from braintumor_ray.cli import build_config
from braintumor_ray.core import CONFIG_FILE, ConfigError, InputSettings, cli_options, load_config, resolve
from braintumor_ray.imaging import InputGuard, MRIPreprocess, SeriesSelector, TrainAugment
from braintumor_ray.ingest import IngestConfig
from braintumor_ray.score import OUTPUT_CONFIG_FILE, ScoreConfig
from braintumor_ray.train import TrainConfig
from braintumor_ray.tune import SearchConfig

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
JOBS = {"preprocess": IngestConfig, "train": TrainConfig, "tune": SearchConfig, "score": ScoreConfig}
# The options a job cannot go without, given first in every command line below.
BASE = {
    "preprocess": ["--input", "s3://b/raw", "--output", "s3://b/pre"],
    "train": [],
    "tune": [],
    "score": ["--model", "s3://b/m", "--input", "s3://b/in", "--output", "s3://b/out"],
}


def _job(name: str):
    spec = importlib.util.spec_from_file_location(f"_config_test_job_{name}", os.path.join(REPO, "jobs", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def parsers():
    return {name: _job(name).get_args_parser() for name in JOBS}


def _get(cfg, key: str):
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


# --- round trips ---------------------------------------------------------------------------------

EXAMPLES = [
    TrainConfig(),
    TrainConfig.smoke_test(data="s3://b/pre", name="r1", augment={"rotate": 3.0}, amp=True, use_gpu=True),
    TrainAugment(rotate=7.5, flip=0.0),
    MRIPreprocess(image_size=64, threshold=30, margin=0.05),
    SeriesSelector(modalities=("MR", "CT"), series_description="T1|T2", orientations=("axial",)),
    IngestConfig(input="s3://b/raw", output="/tmp/pre", preprocess=MRIPreprocess(image_size=96),
                 select=SeriesSelector(orientations=("sagittal",)), overwrite=True),
    ScoreConfig(model="s3://b/m", input="s3://b/in", output="s3://b/out", concurrency=3,
                select=SeriesSelector(modalities=("MR",))),
    SearchConfig(),
    SearchConfig.smoke_test(data="s3://b/pre", models=("resnet10t",), max_concurrent_trials=2,
                            fixed={"augment": {"rotate": 5.0}, "label_smoothing": 0.05}),
]


@pytest.mark.parametrize("cfg", EXAMPLES, ids=[type(c).__name__ for c in EXAMPLES])
def test_dict_and_yaml_round_trips(cfg, tmp_path):
    cls = type(cfg)
    assert cls.from_dict(cfg.to_dict()) == cfg
    assert cls.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg  # JSON (metrics.json, search.json) too
    path = tmp_path / "config.yaml"
    cfg.save_yaml(resolve(str(path)))
    assert yaml.safe_load(path.read_text()) == cfg.to_dict()
    assert load_config(cls, str(path)) == cfg


@pytest.mark.parametrize("job", list(JOBS))
def test_the_written_config_fed_back_through_config_is_the_same(job, parsers, tmp_path):
    """What a stage writes beside its output (config.yaml; scoring _config.yaml), given to the
    job's --config, builds an equal config object; an option given beside it still wins."""
    cls = JOBS[job]
    cfg = build_config(cls, parsers[job].parse_args(BASE[job] + (["--smoke-test"] if job in ("train", "tune") else [])))
    name = OUTPUT_CONFIG_FILE if job == "score" else CONFIG_FILE
    cfg.save_yaml(resolve(str(tmp_path / name)))
    again = build_config(cls, parsers[job].parse_args(["--config", str(tmp_path / name)]))
    assert again == cfg
    flag, key = ("--batch-size", "batch_size") if job == "score" else ("--seed", "seed")
    changed = build_config(cls, parsers[job].parse_args(["--config", str(tmp_path / name), flag, "7"]))
    assert changed == cfg.replace(**{key: 7})


def test_a_training_runs_config_yaml_rebuilds_its_train_config(parsers, tmp_path):
    """As run_training writes it: storage/name/config.yaml; `jobs/train.py --config` takes it back."""
    argv = ["--data", "s3://b/pre", "--storage", str(tmp_path), "--name", "r1", "--model", "resnet18",
            "--augment.rotate", "3", "--eval-batch-size", "16", "--min-lr-ratio", "0.05", "--class-weighting", "sqrt"]
    cfg = build_config(TrainConfig, parsers["train"].parse_args(argv))
    run = resolve(cfg.storage).join(cfg.name)
    cfg.save_yaml(run.join(CONFIG_FILE))
    assert build_config(TrainConfig, parsers["train"].parse_args(["--config", run.join(CONFIG_FILE).uri])) == cfg


# --- every option lands in its field -------------------------------------------------------------

# A valid value other than the default, for options whose kind alone does not give one.
SAMPLES = {
    "weights_sha256": (["--weights", "w.safetensors"], "ab" * 32),
    "amp": (["--use-gpu"], True),
    "transfer": ([], "last-2"),
    "space": ([], {"lr": {"uniform": [0.001, 0.002]}}),
    "fixed": ([], {"label_smoothing": 0.05}),
    "models": ([], ["resnet50", "vgg16"]),
    "modalities": ([], ["MR", "CT"]),
    "body_parts": ([], ["BRAIN", "KNEE"]),
    "ood_pass_rate": ([], 0.95),
    "orientations": ([], ["axial", "sagittal"]),
    "data": ([], "s3://b/other"),
    "storage": ([], "s3://b/runs"),
    "expect_model_id": ([], "0123456789abcdef"),  # a model id: 16 hex digits
    "dicom_send": ([], "dicom://PACS@127.0.0.1:104"),  # a DICOM node
    "ensemble": ([], 3),  # 0 or 2 or more trials (1 is refused)
}


def _sample(opt):
    """(extra arguments, value) for an option: a valid value other than its default."""
    leaf = opt.key.rsplit(".", 1)[-1]
    if opt.key in SAMPLES or leaf in SAMPLES:
        return SAMPLES.get(opt.key) or SAMPLES[leaf]
    d = opt.default
    if opt.kind == "bool":
        return [], not d
    if opt.kind == "choice":
        return [], next(c for c in opt.choices if c != d)
    if opt.kind == "int":
        return [], 3 if d is None else d + 1
    if opt.kind == "float":
        return [], 0.5 if not d else d / 2
    return [], f"x-{leaf}"  # any text: a name, a URI, a regular expression


def _text(value) -> str:
    if isinstance(value, list):
        return ",".join(value)
    if isinstance(value, dict):
        return yaml.safe_dump(value, default_flow_style=True).strip()
    return str(value)


CASES = [(job, opt, flag) for job, cls in JOBS.items() for opt in cli_options(cls) for flag in opt.flags]


@pytest.mark.parametrize("job,opt,flag", CASES, ids=[f"{j}:{f}" for j, _, f in CASES])
def test_every_option_and_alias_lands_in_its_field(job, opt, flag, parsers):
    extra, value = _sample(opt)
    if opt.kind == "bool":
        words = [flag if value else "--no-" + flag[2:]]
    else:
        words = [flag, _text(value)]
    cfg = build_config(JOBS[job], parsers[job].parse_args(BASE[job] + extra + words))
    expected = tuple(v.upper() if opt.key.endswith("modalities") else v for v in value) if isinstance(value, list) \
        else value
    assert _get(cfg, opt.key) == expected, (flag, _get(cfg, opt.key), expected)
    assert _get(cfg, opt.key) != _get(build_config(JOBS[job], parsers[job].parse_args(BASE[job] + extra)), opt.key)


def test_every_field_is_an_option():
    """Nothing is left to the YAML only: every field, nested ones too, has its option."""
    def keys(cls, prefix=""):
        for f in dataclasses.fields(cls):
            sub = f.default_factory if dataclasses.is_dataclass(f.default_factory) else None
            yield from keys(sub, f"{prefix}{f.name}.") if sub else [f"{prefix}{f.name}"]

    for cls in JOBS.values():
        assert set(keys(cls)) == {o.key for o in cli_options(cls)}, cls.__name__


def test_the_input_settings_are_one_declaration_in_both_stages():
    """The ingest and scoring read an input with the same settings: each is one field of core's
    InputSettings that both configs take (a stage declaring its own copy would be another Field,
    with its own help, default and checks)."""
    shared = {f.name: f for f in dataclasses.fields(InputSettings)}
    assert list(shared) == ["s3_endpoint_url", "path_mode", "uid_mode", "max_folder_depth"]
    options = {}
    for cls, first, required in ((IngestConfig, "input", {"input": "i", "output": "o"}),
                                 (ScoreConfig, "model", {"model": "m", "input": "i", "output": "o"})):
        fields = {f.name: f for f in dataclasses.fields(cls)}
        assert all(fields[name] is f for name, f in shared.items()), cls.__name__
        # Listed after the stage's own settings, on the command line and in config.yaml alike.
        keys = [o.key for o in cli_options(cls)]
        assert keys[0] == first and keys[-len(shared):] == list(shared), keys
        assert list(cls(**required).to_dict())[-len(shared):] == list(shared)
        options[cls] = {o.key: o for o in cli_options(cls) if o.key in shared}
        # The checks come with the declaration.
        with pytest.raises(ConfigError, match="path_mode='plain' is unknown"):
            cls(**required, path_mode="plain")
        with pytest.raises(ConfigError, match="max_folder_depth=0 is out of range"):
            cls(**required, max_folder_depth=0)
    assert options[IngestConfig] == options[ScoreConfig]  # flags, help, default, choices, env


@pytest.mark.parametrize("job,argv,key,expected", [
    ("train", ["--dropout", "0.2"], "drop_rate", 0.2),
    ("train", ["--augment.rotate", "4", "--augment.flip", "0"], "augment", TrainAugment(rotate=4.0, flip=0.0)),
    ("train", ["--class-weighting", "none"], "class_weighting", "none"),
    ("train", ["--no-pretrained"], "pretrained", False),
    ("preprocess", ["--image-size", "64", "--crop-threshold", "30", "--crop-margin", "0.1"],
     "preprocess", MRIPreprocess(image_size=64, threshold=30, margin=0.1)),
    # The limits moved from the model's preprocessing to the input guard; the old spelling stays.
    ("preprocess", ["--max-pixels", "5000", "--max-file-bytes", "4096"], "guard", InputGuard(max_pixels=5000, max_file_bytes=4096)),
    ("score", ["--dicom-modality", "mr,CT", "--orientation", "Axial", "--series-description", "T1"], "select",
     SeriesSelector(modalities=("MR", "CT"), orientations=("axial",), series_description="T1")),
    ("tune", ["--models", "resnet50, vgg16", "--no-pretrained"], "models", ("resnet50", "vgg16")),
    ("tune", ["--space", "{lr: {loguniform: [1.0e-4, 1.0e-2]}, transfer: null}"], "space",
     {"lr": {"loguniform": [1e-4, 1e-2]}, "transfer": None}),
])
def test_old_spellings_and_nested_options(job, argv, key, expected, parsers):
    assert _get(build_config(JOBS[job], parsers[job].parse_args(BASE[job] + argv)), key) == expected


# --- --config: precedence, nesting, unknown keys ----------------------------------------------------


def test_options_override_the_yaml_which_overrides_the_smoke_preset(parsers, tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("epochs: 5\nlr: 0.002\naugment: {rotate: 2.0}\n")
    cfg = build_config(TrainConfig, parsers["train"].parse_args(["--smoke-test", "--config", str(f), "--lr", "0.004",
                                                                 "--augment.shift", "0.2"]))
    assert (cfg.epochs, cfg.lr, cfg.model) == (5, 0.004, TrainConfig.SMOKE["model"])
    # a nested config merges key by key: the YAML's rotate, the option's shift, the preset's zoom
    assert (cfg.augment.rotate, cfg.augment.shift, cfg.augment.zoom) == (2.0, 0.2, 0.05)


def test_a_mapping_setting_is_replaced_whole_not_merged(parsers, tmp_path):
    f = tmp_path / "s.yaml"
    f.write_text("space:\n  drop_rate: {uniform: [0.1, 0.2]}\n")
    cfg = build_config(SearchConfig, parsers["tune"].parse_args(["--smoke-test", "--config", str(f)]))
    assert cfg.space == {"drop_rate": {"uniform": [0.1, 0.2]}}  # not the preset's lr and batch_size too
    assert cfg.models == SearchConfig.SMOKE["models"]


def test_the_search_yaml_in_deploy_still_loads(parsers):
    cfg = build_config(SearchConfig, parsers["tune"].parse_args(["--config", os.path.join(REPO, "deploy", "tune-search.yaml"),
                                                                 "--data", "s3://b/pre", "--num-samples", "1"]))
    assert cfg.num_samples == 1 and cfg.models[0] == "tf_efficientnet_lite0" and cfg.fixed["early_stop_patience"] == 3
    assert cfg.space["transfer"] == {"grid": ["last-3", "full"]} and cfg.cpus_per_trial == 2.0


@pytest.mark.parametrize("job,text,named", [
    ("train", "epochs: 2\nlearning_rate: 0.1\n", "learning_rate"),
    ("train", "augment: {rotat: 3}\n", "augment.rotat"),
    ("tune", "modles: [resnet50]\n", "modles"),
    ("preprocess", "input: a\noutput: b\npreprocess: {size: 64}\n", "preprocess.size"),
    ("score", "model: m\ninput: i\noutput: o\nselect: {modality: [MR]}\n", "select.modality"),
])
def test_an_unknown_key_in_a_yaml_file_is_an_error_that_names_it(job, text, named, parsers, tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=r"unknown \w+ setting") as e:
        build_config(JOBS[job], parsers[job].parse_args(["--config", str(f)]))
    msg = str(e.value)
    leaf_cls = {"augment": TrainAugment, "preprocess": MRIPreprocess, "select": SeriesSelector}.get(named.split(".")[0],
                                                                                                   JOBS[job])
    assert named in msg and "known settings are" in msg
    assert all(f.name in msg for f in dataclasses.fields(leaf_cls)), msg


@pytest.mark.parametrize("text,message", [
    ("space: [1, 2\n", "not valid YAML"),
    ("- a\n- b\n", "expected a mapping"),
])
def test_a_yaml_file_that_is_not_a_mapping_is_a_clear_error(text, message, parsers, tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=message):
        build_config(SearchConfig, parsers["tune"].parse_args(["--config", str(f)]))


def test_a_missing_required_setting_names_its_option(parsers):
    with pytest.raises(ConfigError, match="--output is required"):
        build_config(ScoreConfig, parsers["score"].parse_args(["--model", "m", "--input", "i"]))
    with pytest.raises(ConfigError, match="--model, --input, --output are required"):
        build_config(ScoreConfig, parsers["score"].parse_args([]))


@pytest.mark.parametrize("argv,message", [
    (["--epochs", "eight"], "invalid int value"),
    (["--class-weighting", "yes"], "use one of sqrt, inverse, none"),
    (["--no-class-weighting"], "unrecognized arguments"),  # gone: --class-weighting none
])
def test_a_bad_option_value_is_a_usage_error(argv, message, parsers, capsys):
    with pytest.raises(SystemExit) as e:
        parsers["train"].parse_args(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


# --- a model package's preprocessing --------------------------------------------------------------


def test_an_unknown_key_in_a_packages_preprocessing_names_the_package_file(tmp_path):
    """A package written by another version (a preprocessing setting this one does not know,
    model_id consistent) is refused with the file and the known settings, not a TypeError."""
    import hashlib

    import torch

    from braintumor_ray.models import PACKAGE_JSON, create_model, export_model_package, load_model_package

    torch.manual_seed(0)
    uri = str(tmp_path / "model")
    export_model_package(create_model("resnet10t", pretrained=False), uri, preprocess=MRIPreprocess(image_size=64),
                         onnx=False)
    meta_path = os.path.join(uri, PACKAGE_JSON)
    meta = json.load(open(meta_path))
    meta["preprocess"]["gamma"] = 1.2
    keys = ("backbone", "num_classes", "global_pool", "class_names", "data_config", "preprocess", "weights_sha256")
    canon = json.dumps({k: meta[k] for k in keys}, sort_keys=True, separators=(",", ":"))
    meta["model_id"] = hashlib.sha256(canon.encode()).hexdigest()[:16]  # as that version would have written it
    json.dump(meta, open(meta_path, "w"))
    with pytest.raises(ConfigError) as e:
        load_model_package(uri)
    msg = str(e.value)
    assert meta_path in msg and "preprocess.gamma" in msg and "image_size" in msg, msg


# --- the scoring output's _config.yaml ------------------------------------------------------------


def test_the_scoring_config_file_is_not_part_of_the_predictions_dataset(tmp_path):
    """OUTPUT/_config.yaml sits among the Parquet files: pandas and pyarrow read the folder as before."""
    import pandas as pd
    import pyarrow as pa
    import pyarrow.dataset as pads
    import pyarrow.parquet as pq

    out = tmp_path / "predictions"
    out.mkdir()
    pq.write_table(pa.table({"path": ["a", "b"], "status": ["ok", "error"]}), out / "run1_0.parquet")
    ScoreConfig(model="m", input="i", output=str(out)).save_yaml(resolve(str(out / OUTPUT_CONFIG_FILE)))
    assert OUTPUT_CONFIG_FILE.startswith("_")
    assert len(pd.read_parquet(out)) == 2 and pads.dataset(out, format="parquet").count_rows() == 2
    assert load_config(ScoreConfig, str(out / OUTPUT_CONFIG_FILE)).output == str(out)
