"""The Ray Train worker function: DDP fine-tuning of a timm backbone on the ingest's images.

``train_loop_per_worker(config)`` is what ``TorchTrainer`` runs on each worker (``config`` is
``TrainConfig.to_dict()`` plus what the driver learnt from the data: ``n_train``,
``class_counts``). It hands the work to a small runner, ``_WorkerRunner``: ``train_one_epoch``,
``validate``, ``save_checkpoint``/``load_checkpoint`` and ``run``, over a typed
:class:`TrainingState` (what a checkpoint carries, loadable with ``weights_only=True``). The
functions ``train_one_epoch`` and ``evaluate`` below are kept short and separate, as in the
torchvision reference scripts.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import pickle
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from timm.utils import ModelEmaV3
from torch import nn

from ..core import CLASS_NAMES, StorageError
from ..imaging import TrainAugment
from ..models import count_parameters, create_model, data_config, param_groups, prepare_input
from ._config import TrainConfig
from ._metrics import classification_metrics

logger = logging.getLogger(__name__)

STATE_FILE = "state.pt"


def class_weights(counts: list[int], mode: str = "inverse") -> torch.Tensor:
    """Loss weights from class counts (``inverse`` 1/n, ``sqrt`` 1/sqrt(n)), mean 1 over the classes present."""
    c = torch.tensor(counts, dtype=torch.float32)
    power = {"inverse": 1.0, "sqrt": 0.5}[mode]
    w = torch.where(c > 0, c.clamp(min=1) ** -power, torch.zeros_like(c))
    return w / w[c > 0].mean()


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over the model's parameter groups: the head at ``cfg.lr``, the backbone scaled."""
    return torch.optim.AdamW(
        param_groups(model, lr=cfg.lr, backbone_lr_scale=cfg.backbone_lr, weight_decay=cfg.weight_decay)
    )


def make_criterion(cfg: TrainConfig, class_counts: list[int], device: torch.device | None = None) -> nn.Module:
    """Cross-entropy with ``cfg``'s label smoothing and class weighting (from the training counts)."""
    weights = None if cfg.class_weighting == "none" else class_weights(class_counts, cfg.class_weighting).to(device)
    return nn.CrossEntropyLoss(weight=weights, label_smoothing=cfg.label_smoothing)


def lr_lambda(warmup_steps: int, total_steps: int, min_ratio: float) -> Callable[[int], float]:
    """Linear warm-up from ~0 to 1, then cosine down to ``min_ratio``."""

    def f(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        t = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))

    return f


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_sum(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if _world()[1] > 1:
        dist.all_reduce(t)
    return t.tolist()


def _backward(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    criterion: nn.Module,
    scaler: Any,
    amp: bool,
    grad_accum_steps: int,
    sync: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward and backward of one micro-batch, its gradient averaged over the accumulation;
    DDP's all-reduce only on the last one (``sync``). Returns (loss, logits)."""
    no_sync = contextlib.nullcontext() if sync or not hasattr(model, "no_sync") else model.no_sync()
    with no_sync:
        with torch.autocast(x.device.type, enabled=amp):
            logits = model(x)
            loss = criterion(logits, y)
        scaled = loss / grad_accum_steps
        (scaler.scale(scaled) if scaler else scaled).backward()
    return loss, logits


def train_one_epoch(
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    *,
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    prepare: Callable[[torch.Tensor], torch.Tensor],
    augment: TrainAugment,
    generator: torch.Generator,
    device: torch.device,
    scaler: Any = None,
    amp: bool = False,
    grad_accum_steps: int = 1,
    on_step: Callable[[int], None] | None = None,
    on_update: Callable[[], None] | None = None,
) -> dict[str, float]:
    """One pass over this worker's shard; returns this worker's sums (loss, correct, images, seconds).

    ``data_wait_s`` is the time spent waiting for the next batch (data loading not hidden by compute).
    ``on_update`` runs after each optimizer step (the weight average's update).

    One piece on purpose (its keyword signature is a quarter of it): the loop's state (the
    micro-batch count, the sums, the wait timer) is shared by every step, and the backward pass
    and the optimizer step are already their own functions (:func:`_backward`, :func:`_step`).
    """
    model.train()
    loss_sum, correct, seen, steps = 0.0, 0, 0, 0
    t0 = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    micro, wait = 0, 0.0
    it = iter(batches)
    i = -1
    while True:
        t = time.perf_counter()
        batch = next(it, None)
        wait += time.perf_counter() - t
        if batch is None:
            break
        i += 1
        if on_step:
            on_step(i)
        pixels = augment(batch["image"], generator=generator)
        x = prepare(pixels).to(device, non_blocking=True)
        y = batch["label"].to(device, non_blocking=True)
        micro += 1
        last_micro = micro == grad_accum_steps
        loss, logits = _backward(
            model, x, y, criterion=criterion, scaler=scaler, amp=amp, grad_accum_steps=grad_accum_steps, sync=last_micro
        )
        if last_micro:
            _step(optimizer, scheduler, scaler, on_update)
            micro, steps = 0, steps + 1
        loss_sum += float(loss.detach()) * len(y)
        correct += int((logits.detach().argmax(1) == y).sum())
        seen += len(y)
    if micro:  # a last partial accumulation
        _step(optimizer, scheduler, scaler, on_update)
        steps += 1
    return {
        "loss_sum": loss_sum,
        "correct": correct,
        "seen": seen,
        "seconds": time.perf_counter() - t0,
        "steps": steps,
        "data_wait_s": wait,
    }


def _step(optimizer: torch.optim.Optimizer, scheduler: Any, scaler: Any, on_update: Callable[[], None] | None) -> None:
    if scaler:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if scheduler is not None:
        scheduler.step()
    if on_update is not None:
        on_update()


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    *,
    criterion: nn.Module,
    prepare: Callable[[torch.Tensor], torch.Tensor],
    device: torch.device,
    amp: bool = False,
    rank: int = 0,
    world_size: int = 1,
) -> dict[str, np.ndarray]:
    """Probabilities, labels, leak flags and losses of this worker's batches (every world_size-th).

    Every worker reads the whole (unsplit) split but runs the model only on its own batches, so
    nothing is dropped to even out shards; ``gather_eval`` joins the parts.
    """
    model = _bare(model)  # no DDP: ranks score different numbers of batches, DDP would sync buffers
    model.eval()
    probs, labels, leaked, losses = [], [], [], []
    for i, batch in enumerate(batches):
        if i % world_size != rank:
            continue
        x = prepare(batch["image"]).to(device, non_blocking=True)
        y = batch["label"].to(device)
        with torch.autocast(device.type, enabled=amp):
            logits = model(x)
        logits = logits.float()
        losses.append(nn.functional.cross_entropy(logits, y, reduction="none").cpu().numpy())
        probs.append(torch.softmax(logits, 1).cpu().numpy())
        labels.append(batch["label"].numpy())
        leaked.append(batch["leaked"].numpy().astype(bool))
    k = len(CLASS_NAMES)
    cat = lambda parts, empty: np.concatenate(parts) if parts else empty  # noqa: E731
    return {
        "probs": cat(probs, np.zeros((0, k), np.float32)),
        "labels": cat(labels, np.zeros(0, np.int64)),
        "leaked": cat(leaked, np.zeros(0, bool)),
        "losses": cat(losses, np.zeros(0, np.float32)),
    }


def gather_eval(part: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    rank, world = _world()
    if world == 1:
        return part
    parts: list[Any] = [None] * world
    dist.all_gather_object(parts, part)
    return {k: np.concatenate([p[k] for p in parts]) for k in part}


def eval_metrics(ev: dict[str, np.ndarray], mask: np.ndarray | None = None) -> dict[str, Any]:
    if mask is not None:
        ev = {k: v[mask] for k, v in ev.items()}
    loss = float(ev["losses"].mean()) if len(ev["losses"]) else 0.0
    return classification_metrics(ev["labels"], ev["probs"], CLASS_NAMES, loss=loss)


# --- test hook ------------------------------------------------------------------------------------

# Tests only: JSON of {"marker": path, "epoch": 2, "rank": 1, "step": 1, "name": run name (optional)}
# makes one worker raise once (the marker file makes it once), to exercise Ray Train's restarts.
# Tests hand it to the workers with ray.init(runtime_env={"env_vars": {...}}); nothing else sets it.
INJECT_FAILURE_ENV = "BRAINTUMOR_TEST_INJECT_FAILURE"


def _failure_hook(epoch: int, rank: int, world: int, run_name: str) -> Callable[[int], None] | None:
    """The step callback that raises once on one rank at one step of one epoch, when armed."""
    text = os.environ.get(INJECT_FAILURE_ENV)
    hook = json.loads(text) if text else None
    if not hook or hook.get("name", run_name) != run_name:
        return None
    if epoch != int(hook.get("epoch", 2)) or rank != min(int(hook.get("rank", 1)), world - 1):
        return None
    marker, at = hook["marker"], int(hook.get("step", 1))

    def on_step(i: int) -> None:
        if i == at and not os.path.exists(marker):
            with open(marker, "w") as f:
                f.write(f"epoch {epoch} rank {rank} step {i}\n")
            raise RuntimeError(f"injected failure (test hook) on rank {rank} in epoch {epoch} at step {i}")

    return on_step


def _setup_logging() -> None:
    pkg = logging.getLogger("braintumor_ray")
    if not pkg.handlers and not logging.getLogger().handlers:
        h = logging.StreamHandler()
        h.setFormatter(logging.Formatter("%(message)s"))
        pkg.addHandler(h)
    pkg.setLevel(logging.INFO)


# --- the worker -----------------------------------------------------------------------------------


@dataclass
class TrainingState:
    """A run's progress: what a checkpoint carries besides the model, optimizer, schedule and scaler.

    Plain tensors and Python values only, so that ``torch.load(..., weights_only=True)`` reads it.
    """

    epoch: int = 0  # epochs finished
    history: list[dict[str, Any]] = field(default_factory=list)  # one row per epoch (the reported metrics)
    best_f1: float = -1.0  # best validation macro-F1 so far
    best_epoch: int = 0
    best_model: dict[str, torch.Tensor] | None = None  # that epoch's weights (CPU copies)
    bad_epochs: int = 0  # epochs since the best one (early stopping)
    stopped: bool = False  # stopped early
    restores: list[int] = field(default_factory=list)  # epochs the run was restored from
    ema_steps: int = 0  # optimizer steps the weight average has seen (its decay warms up over them)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainingState:
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})


def read_checkpoint_state(path: str, *, source: str | None = None) -> dict[str, Any]:
    """A checkpoint's ``state.pt`` (written by the worker's ``save_checkpoint``), read with
    ``weights_only=True``: tensors and plain values only. Anyone who can write the runs storage
    can put a file there, and a full unpickle would run whatever code it names on every node
    that restores it; such a file is refused with a StorageError naming it (``source``: its
    URI, where ``path`` is a local copy)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise StorageError(
            f"refusing to load the checkpoint {source or path}: it holds objects other than tensors and plain values, "
            f"and unpickling them could run code ({str(e).splitlines()[0][:300]}). This job never writes such a "
            "checkpoint, so someone or something else wrote it: check who can write the runs storage, then delete "
            "that checkpoint (or start a new run instead of --resume)."
        ) from e


class _WorkerRunner:
    """One Ray Train worker's part of a run (each rank builds one): restore, train with per-epoch
    validation and checkpoints, then evaluate the best weights on val and test.

    ``config`` is ``TrainConfig.to_dict()`` plus what the driver learnt from the data:
    ``n_train``, ``class_counts``, ``has_test``.
    """

    def __init__(self, config: dict[str, Any]) -> None:
        import ray.train
        import ray.train.torch

        config = dict(config)
        n_train = int(config.pop("n_train"))
        class_counts = list(config.pop("class_counts"))
        self.has_test = bool(config.pop("has_test", True))
        self.cfg = cfg = TrainConfig.from_dict(config)
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
        self.device = ray.train.torch.get_device()
        torch.manual_seed(cfg.seed)

        self.model = create_model(
            cfg.model,
            pretrained=cfg.pretrained,
            weights=cfg.weights,
            weights_sha256=cfg.weights_sha256,
            drop_rate=cfg.drop_rate,
            transfer=cfg.transfer_mode,
            channels_last=cfg.use_channels_last,
            s3_endpoint_url=cfg.s3_endpoint_url,
        )
        if cfg.pretrained or cfg.weights:
            _small_head_init(self.model)
        dcfg = data_config(self.model)
        self.mean, self.std = dcfg["mean"], dcfg["std"]
        self.optimizer = make_optimizer(self.model, cfg)
        self.per_worker = n_train // self.world  # streaming_split(equal=True) gives each worker this many rows
        batches_per_epoch = max(1, math.ceil(self.per_worker / cfg.batch_size))
        self.steps_per_epoch = max(1, math.ceil(batches_per_epoch / cfg.grad_accum_steps))
        total = self.steps_per_epoch * cfg.epochs
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(round(cfg.warmup_epochs * self.steps_per_epoch), total, cfg.min_lr_ratio)
        )
        self.amp = cfg.use_amp and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda") if self.amp else None
        self.criterion = make_criterion(cfg, class_counts, self.device)
        self.state = TrainingState()
        # The weight average (EMA) when asked for: what is validated, kept as the best epoch and
        # exported. Built from the bare model before DDP wraps it, on the training device.
        self.ema = (
            ModelEmaV3(self.model, decay=cfg.ema_decay, use_warmup=True, device=self.device) if cfg.ema_decay else None
        )
        self.generator = torch.Generator()
        self._shards: dict[str, Any] = {}

    def prepare(self, pixels: torch.Tensor) -> torch.Tensor:
        return prepare_input(pixels, mean=self.mean, std=self.std, channels_last=self.cfg.use_channels_last)

    def shard(self, split: str):
        """This worker's iterator over a split (training is sharded; val and test are whole)."""
        import ray.train

        if split not in self._shards:
            self._shards[split] = ray.train.get_dataset_shard(split)
        return self._shards[split]

    # --- checkpoints ---------------------------------------------------------------------------

    def save_checkpoint(self, directory: str) -> None:
        """Write the run's state (progress, model, optimizer, schedule, scaler) to ``directory``."""
        torch.save(
            {
                **self.state.to_dict(),
                "model": _bare(self.model).state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler else None,
                "ema": self.ema.module.state_dict() if self.ema is not None else None,
            },
            os.path.join(directory, STATE_FILE),
        )

    def load_checkpoint(self, checkpoint) -> None:
        """Continue from a checkpoint written by :meth:`save_checkpoint` (before DDP wraps the model)."""
        with checkpoint.as_directory() as d:
            saved = read_checkpoint_state(os.path.join(d, STATE_FILE), source=f"{checkpoint.path}/{STATE_FILE}")
        self.model.load_state_dict(saved.pop("model"))
        self.optimizer.load_state_dict(saved.pop("optimizer"))
        self.scheduler.load_state_dict(saved.pop("scheduler"))
        scaler_state = saved.pop("scaler", None)
        if self.scaler and scaler_state:
            self.scaler.load_state_dict(scaler_state)
        ema_state = saved.pop("ema", None)
        if self.ema is not None and ema_state is not None:
            self.ema.module.load_state_dict(ema_state)
        self.state = TrainingState.from_dict(saved)
        self.state.restores = self.state.restores + [self.state.epoch]
        if self.rank == 0:
            logger.warning(
                "restored from the checkpoint of epoch %d (%s); resuming at epoch %d",
                self.state.epoch,
                checkpoint.path,
                self.state.epoch + 1,
            )

    def report(self, row: dict[str, Any]) -> None:
        """Report an epoch's row to Ray Train, with a checkpoint written by rank 0."""
        import ray.train

        with tempfile.TemporaryDirectory() as d:
            checkpoint = None
            if self.rank == 0:
                self.save_checkpoint(d)
                checkpoint = ray.train.Checkpoint.from_directory(d)
            metrics = {k: v for k, v in row.items() if not isinstance(v, bool)} | {
                "stopped_early": int(row["stopped_early"])
            }
            ray.train.report(metrics, checkpoint=checkpoint)

    # --- one epoch --------------------------------------------------------------------------------

    def train_one_epoch(self, epoch: int) -> dict[str, float]:
        """One pass over this worker's shard; loss and accuracy over every worker's images."""
        cfg = self.cfg
        batches = self.shard("train").iter_torch_batches(
            batch_size=cfg.batch_size,
            local_shuffle_buffer_size=max(cfg.batch_size * 8, 256),
            local_shuffle_seed=cfg.seed * 1000 + epoch * 10 + self.rank,
        )
        tr = train_one_epoch(
            self.model,
            batches,
            criterion=self.criterion,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            prepare=self.prepare,
            augment=cfg.train_augment,
            generator=self.generator,
            device=self.device,
            scaler=self.scaler,
            amp=self.amp,
            grad_accum_steps=cfg.grad_accum_steps,
            on_step=_failure_hook(epoch, self.rank, self.world, cfg.name),
            on_update=self._update_ema,
        )
        loss_sum, correct, seen = _all_sum([tr["loss_sum"], tr["correct"], tr["seen"]], self.device)
        return {
            "loss": loss_sum / max(1, seen),
            "accuracy": correct / max(1, seen),
            "seconds": tr["seconds"],
            "images_per_s": tr["seen"] / max(tr["seconds"], 1e-9),  # this worker's
            "data_wait_s": tr["data_wait_s"],
        }

    def _update_ema(self) -> None:
        if self.ema is not None:
            self.state.ema_steps += 1
            self.ema.update(_bare(self.model), step=self.state.ema_steps)

    @property
    def eval_model(self) -> nn.Module:
        """The weights that are validated and kept: the average when there is one."""
        return self.ema.module if self.ema is not None else self.model

    def evaluate(self, split: str, model: nn.Module | None = None) -> dict[str, np.ndarray]:
        """Every image of ``split`` through ``model`` (default :attr:`eval_model`; each worker
        scores its own batches), gathered."""
        batches = self.shard(split).iter_torch_batches(batch_size=self.cfg.eval_batch_size)
        return gather_eval(
            evaluate(
                self.eval_model if model is None else model,
                batches,
                criterion=self.criterion,
                prepare=self.prepare,
                device=self.device,
                amp=self.amp,
                rank=self.rank,
                world_size=self.world,
            )
        )

    def validate(self) -> dict[str, Any]:
        return eval_metrics(self.evaluate("val"))

    def _track_best(self, epoch: int, val: dict[str, Any]) -> bool:
        """Keep the best epoch's weights; count epochs without one and stop early after too many."""
        s, cfg = self.state, self.cfg
        improved = val["macro_f1"] > s.best_f1
        if improved:
            s.best_f1, s.best_epoch, s.bad_epochs = val["macro_f1"], epoch, 0
            s.best_model = {k: v.detach().cpu().clone() for k, v in _bare(self.eval_model).state_dict().items()}
        else:
            s.bad_epochs += 1
        if cfg.early_stop_patience and s.bad_epochs >= cfg.early_stop_patience and epoch < cfg.epochs:
            s.stopped = True
        return improved

    # --- the run ------------------------------------------------------------------------------------

    def one_epoch(self, epoch: int) -> dict[str, Any]:
        """Train and validate one epoch; its row, appended to the history."""
        cfg, s = self.cfg, self.state
        tr = self.train_one_epoch(epoch)
        val = self.validate()
        improved = self._track_best(epoch, val)
        row = {
            "epoch": epoch,
            "train_loss": tr["loss"],
            "train_accuracy": tr["accuracy"],
            "val_loss": val["loss"],
            "val_accuracy": val["accuracy"],
            "val_macro_f1": val["macro_f1"],
            "best_val_macro_f1": s.best_f1,
            "lr": max(g["lr"] for g in self.optimizer.param_groups),
            "epoch_s": tr["seconds"],
            "train_images_per_s_per_worker": tr["images_per_s"],
            "data_wait_s": tr["data_wait_s"],
            "stopped_early": s.stopped,
        }
        if self.ema is not None:
            # The raw weights too, on the same epoch and data order: EMA's effect is read off one
            # run, paired, not off two runs whose spread (1.6 points of Testing accuracy between
            # two identical runs) is as large as the effect.
            raw = eval_metrics(self.evaluate("val", model=self.model))
            row |= {"val_raw_accuracy": raw["accuracy"], "val_raw_macro_f1": raw["macro_f1"]}
        s.history.append(row)
        s.epoch = epoch
        if self.rank == 0:
            logger.info(
                "epoch %d/%d  train loss %.4f acc %.3f | val loss %.4f acc %.3f macro-F1 %.3f%s | lr %.2e | %.0fs, %.1f img/s/worker%s",
                epoch,
                cfg.epochs,
                row["train_loss"],
                row["train_accuracy"],
                row["val_loss"],
                row["val_accuracy"],
                row["val_macro_f1"],
                " *" if improved else "",
                row["lr"],
                tr["seconds"],
                row["train_images_per_s_per_worker"],
                "  (early stop)" if s.stopped else "",
            )
            if "val_raw_macro_f1" in row:
                logger.info(
                    "epoch %d/%d  raw weights (not averaged): val acc %.3f macro-F1 %.3f",
                    epoch,
                    cfg.epochs,
                    row["val_raw_accuracy"],
                    row["val_raw_macro_f1"],
                )
        return row

    def run(self) -> dict[str, Any]:
        import ray.train
        import ray.train.torch

        cfg, s = self.cfg, self.state
        checkpoint = ray.train.get_checkpoint()
        if checkpoint:
            self.load_checkpoint(checkpoint)
            s = self.state
        elif self.rank == 0:
            logger.info(
                "%s (%s): %d of %d parameters train; %d workers x %d images per epoch, %d steps/epoch, device %s",
                cfg.model,
                cfg.transfer_mode,
                count_parameters(self.model, trainable=True),
                count_parameters(self.model),
                self.world,
                self.per_worker,
                self.steps_per_epoch,
                self.device,
            )
        self.model = ray.train.torch.prepare_model(self.model)
        for split in ("train", "val"):  # every rank asks for its shards up front, epochs left to train or not
            self.shard(split)
        self.generator.manual_seed(cfg.seed * 1000 + self.rank + 7919 * s.epoch)

        if checkpoint and s.history and (s.epoch >= cfg.epochs or s.stopped):
            # Restored from the run's last checkpoint: nothing is left to train, but whoever
            # restarted the run (Tune, resuming a search whose state was saved before this trial
            # ended) needs its final result again, or the trial ends with no metrics at all.
            self.report(s.history[-1])
        while s.epoch < cfg.epochs and not s.stopped:
            self.report(self.one_epoch(s.epoch + 1))

        # The best epoch's weights (averaged, with EMA), tested once on the test split.
        if s.best_model is not None:
            _bare(self.model).load_state_dict(s.best_model)
        self.ema = None
        result: dict[str, Any] = {
            "history": s.history,
            "best_epoch": s.best_epoch,
            "restores": s.restores,
            "stopped_early": s.stopped,
            "world_size": self.world,
            "val": self.validate(),
        }
        if self.has_test:
            ev = self.evaluate("test")
            result["test"] = eval_metrics(ev)
            result["test_clean"] = eval_metrics(ev, ~ev["leaked"])
        return result


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any] | None:
    """Ray Train worker function (what ``TorchTrainer`` runs on each worker): restore, train with
    per-epoch validation and checkpoints, test the best model.

    Returns (on every rank; Ray keeps rank 0's) the run's history and final metrics.
    """
    _setup_logging()
    return _WorkerRunner(config).run()


def _small_head_init(model: nn.Module) -> None:
    """A near-zero new head on pretrained features (timm's EfficientNet init draws it uniform in
    +-0.5 for 4 classes: logits of ~10 and a first-batch loss of ~3.6 whose gradients shake the
    pretrained stages). Starting from ~uniform predictions is the usual fine-tuning practice."""
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    if isinstance(head, nn.Linear):
        nn.init.trunc_normal_(head.weight, std=0.01)
        nn.init.zeros_(head.bias)


def _bare(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
