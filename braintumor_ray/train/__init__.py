"""Distributed fine-tuning with Ray Train (``jobs/train.py``).

    from braintumor_ray.train import TrainConfig, run_training, build_trainer
    metrics = run_training(TrainConfig(data="s3://b/preprocessed", storage="s3://b/runs", name="lite0"))

``train_loop_per_worker`` is the TorchTrainer worker function; ``build_trainer(cfg)`` gives the
trainer (Ray Tune launches it inside its trial function); ``run_training`` also writes
``metrics.json``, the plots and the model package under ``storage/name``.
"""

from ..imaging import TrainAugment
from ._config import TrainConfig
from ._data import TrainData, decode_batch, load_train_data
from ._ensemble import EnsembleConfig, Member, build_ensemble, export_ensemble, format_ensemble, load_members
from ._loop import (
    STATE_FILE,
    TrainingState,
    class_weights,
    evaluate,
    lr_lambda,
    make_criterion,
    make_optimizer,
    read_checkpoint_state,
    train_loop_per_worker,
    train_one_epoch,
)
from ._metrics import classification_metrics, confusion_matrix, roc_auc
from ._outputs import package_metrics, pyplot, save_figure, write_plots
from ._report import validation_examples, write_run_report
from ._run import (
    METRICS_FILE,
    MODEL_DIR,
    TrainingError,
    best_model,
    build_trainer,
    export_package,
    format_table,
    run_location,
    run_training,
    start_run,
)
from ._trust import (
    RELIABILITY_PNG,
    fit_model_trust,
    model_outputs,
    output_metrics,
    split_outputs,
    split_report,
    write_reliability,
)

__all__ = [
    "EnsembleConfig",
    "Member",
    "build_ensemble",
    "export_ensemble",
    "format_ensemble",
    "load_members",
    "RELIABILITY_PNG",
    "STATE_FILE",
    "read_checkpoint_state",
    "fit_model_trust",
    "output_metrics",
    "split_outputs",
    "model_outputs",
    "split_report",
    "write_reliability",
    "METRICS_FILE",
    "MODEL_DIR",
    "TrainAugment",
    "TrainConfig",
    "TrainData",
    "TrainingError",
    "TrainingState",
    "best_model",
    "build_trainer",
    "class_weights",
    "classification_metrics",
    "confusion_matrix",
    "decode_batch",
    "evaluate",
    "export_package",
    "format_table",
    "load_train_data",
    "lr_lambda",
    "make_criterion",
    "make_optimizer",
    "package_metrics",
    "pyplot",
    "roc_auc",
    "run_location",
    "run_training",
    "save_figure",
    "start_run",
    "train_loop_per_worker",
    "train_one_epoch",
    "write_plots",
    "validation_examples",
    "write_run_report",
]
