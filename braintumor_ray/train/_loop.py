"""The Ray Train worker function: DDP fine-tuning of a timm backbone on the ingest's images.

``train_loop_per_worker(config)`` is what ``TorchTrainer`` runs on each worker (``config`` is
``TrainConfig.to_dict()`` plus what the driver learnt from the data: ``n_train``,
``class_counts``). ``train_one_epoch`` and ``evaluate`` are kept short and separate, as in the
torchvision reference scripts.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import tempfile
import time
from typing import Any, Callable, Iterable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ..core import CLASS_NAMES
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
    return torch.optim.AdamW(param_groups(model, lr=cfg.lr, backbone_lr_scale=cfg.backbone_lr, weight_decay=cfg.weight_decay))


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
) -> dict[str, float]:
    """One pass over this worker's shard; returns this worker's sums (loss, correct, images, seconds).

    ``data_wait_s`` is the time spent waiting for the next batch (data loading not hidden by compute).
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
        sync = contextlib.nullcontext() if last_micro or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            with torch.autocast(device.type, enabled=amp):
                logits = model(x)
                loss = criterion(logits, y)
            scaled = loss / grad_accum_steps
            (scaler.scale(scaled) if scaler else scaled).backward()
        if last_micro:
            _step(optimizer, scheduler, scaler)
            micro, steps = 0, steps + 1
        loss_sum += float(loss.detach()) * len(y)
        correct += int((logits.detach().argmax(1) == y).sum())
        seen += len(y)
    if micro:  # a last partial accumulation
        _step(optimizer, scheduler, scaler)
        steps += 1
    return {"loss_sum": loss_sum, "correct": correct, "seen": seen, "seconds": time.perf_counter() - t0, "steps": steps,
            "data_wait_s": wait}


def _step(optimizer: torch.optim.Optimizer, scheduler: Any, scaler: Any) -> None:
    if scaler:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if scheduler is not None:
        scheduler.step()


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


def _maybe_fail(hook: dict[str, Any] | None, epoch: int, rank: int, world: int) -> Callable[[int], None] | None:
    """Test hook: raise once on one rank at one step of one epoch (a marker file makes it once)."""
    if not hook or epoch != int(hook.get("epoch", 2)) or rank != min(int(hook.get("rank", 1)), world - 1):
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


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any] | None:
    """Ray Train worker: restore, train with per-epoch validation and checkpoints, test the best model.

    Returns (on every rank; Ray keeps rank 0's) the run's history and final metrics.
    """
    import ray.train
    import ray.train.torch

    _setup_logging()
    config = dict(config)
    n_train = int(config.pop("n_train"))
    class_counts = list(config.pop("class_counts"))
    has_test = bool(config.pop("has_test", True))
    cfg = TrainConfig.from_dict(config)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.seed)

    model = create_model(
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
        _small_head_init(model)
    dcfg = data_config(model)
    mean, std = dcfg["mean"], dcfg["std"]

    def prepare(pixels: torch.Tensor) -> torch.Tensor:
        return prepare_input(pixels, mean=mean, std=std, channels_last=cfg.use_channels_last)

    optimizer = make_optimizer(model, cfg)
    per_worker = n_train // world  # streaming_split(equal=True) gives each worker this many rows
    batches_per_epoch = max(1, math.ceil(per_worker / cfg.batch_size))
    steps_per_epoch = max(1, math.ceil(batches_per_epoch / cfg.grad_accum_steps))
    total = steps_per_epoch * cfg.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(round(cfg.warmup_epochs * steps_per_epoch), total, cfg.min_lr_ratio)
    )
    amp = cfg.use_amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda") if amp else None
    criterion = make_criterion(cfg, class_counts, device)

    state: dict[str, Any] = {
        "epoch": 0,
        "history": [],
        "best_f1": -1.0,
        "best_epoch": 0,
        "best_model": None,
        "bad_epochs": 0,
        "stopped": False,
        "restores": [],
    }
    ckpt = ray.train.get_checkpoint()
    if ckpt:
        with ckpt.as_directory() as d:
            saved = torch.load(os.path.join(d, STATE_FILE), map_location="cpu", weights_only=False)
        model.load_state_dict(saved.pop("model"))
        optimizer.load_state_dict(saved.pop("optimizer"))
        scheduler.load_state_dict(saved.pop("scheduler"))
        if scaler and saved.get("scaler"):
            scaler.load_state_dict(saved["scaler"])
        saved.pop("scaler", None)
        state.update(saved)
        state["restores"] = state["restores"] + [state["epoch"]]
        if rank == 0:
            logger.warning("restored from the checkpoint of epoch %d (%s); resuming at epoch %d",
                           state["epoch"], ckpt.path, state["epoch"] + 1)
    if rank == 0 and not ckpt:
        logger.info(
            "%s (%s): %d of %d parameters train; %d workers x %d images per epoch, %d steps/epoch, device %s",
            cfg.model, cfg.transfer_mode, count_parameters(model, trainable=True), count_parameters(model),
            world, per_worker, steps_per_epoch, device,
        )

    model = ray.train.torch.prepare_model(model)
    train_shard = ray.train.get_dataset_shard("train")
    val_iter = ray.train.get_dataset_shard("val")
    generator = torch.Generator().manual_seed(cfg.seed * 1000 + rank + 7919 * state["epoch"])
    augment = cfg.train_augment

    while state["epoch"] < cfg.epochs and not state["stopped"]:
        epoch = state["epoch"] + 1
        batches = train_shard.iter_torch_batches(
            batch_size=cfg.batch_size,
            local_shuffle_buffer_size=max(cfg.batch_size * 8, 256),
            local_shuffle_seed=cfg.seed * 1000 + epoch * 10 + rank,
        )
        tr = train_one_epoch(
            model, batches, criterion=criterion, optimizer=optimizer, scheduler=scheduler, prepare=prepare,
            augment=augment, generator=generator, device=device, scaler=scaler, amp=amp,
            grad_accum_steps=cfg.grad_accum_steps, on_step=_maybe_fail(cfg.inject_failure, epoch, rank, world),
        )
        loss_sum, correct, seen = _all_sum([tr["loss_sum"], tr["correct"], tr["seen"]], device)
        ev = gather_eval(
            evaluate(model, val_iter.iter_torch_batches(batch_size=cfg.eval_batch_size),
                     criterion=criterion, prepare=prepare, device=device, amp=amp, rank=rank, world_size=world)
        )
        val = eval_metrics(ev)
        improved = val["macro_f1"] > state["best_f1"]
        if improved:
            state.update(best_f1=val["macro_f1"], best_epoch=epoch, bad_epochs=0,
                         best_model={k: v.detach().cpu().clone() for k, v in _bare(model).state_dict().items()})
        else:
            state["bad_epochs"] += 1
        if cfg.early_stop_patience and state["bad_epochs"] >= cfg.early_stop_patience and epoch < cfg.epochs:
            state["stopped"] = True
        row = {
            "epoch": epoch,
            "train_loss": loss_sum / max(1, seen),
            "train_accuracy": correct / max(1, seen),
            "val_loss": val["loss"],
            "val_accuracy": val["accuracy"],
            "val_macro_f1": val["macro_f1"],
            "best_val_macro_f1": state["best_f1"],
            "lr": max(g["lr"] for g in optimizer.param_groups),
            "epoch_s": tr["seconds"],
            "train_images_per_s_per_worker": tr["seen"] / max(tr["seconds"], 1e-9),
            "data_wait_s": tr["data_wait_s"],
            "stopped_early": state["stopped"],
        }
        state["history"].append(row)
        state["epoch"] = epoch
        if rank == 0:
            logger.info(
                "epoch %d/%d  train loss %.4f acc %.3f | val loss %.4f acc %.3f macro-F1 %.3f%s | lr %.2e | %.0fs, %.1f img/s/worker%s",
                epoch, cfg.epochs, row["train_loss"], row["train_accuracy"], row["val_loss"], row["val_accuracy"],
                row["val_macro_f1"], " *" if improved else "", row["lr"], tr["seconds"],
                row["train_images_per_s_per_worker"], "  (early stop)" if state["stopped"] else "",
            )
        _report(row, state, model, optimizer, scheduler, scaler, rank)

    # The best epoch's weights, tested once on the test split.
    if state["best_model"] is not None:
        _bare(model).load_state_dict(state["best_model"])
    result: dict[str, Any] = {
        "history": state["history"],
        "best_epoch": state["best_epoch"],
        "restores": state["restores"],
        "stopped_early": state["stopped"],
        "world_size": world,
    }
    ev = gather_eval(
        evaluate(model, val_iter.iter_torch_batches(batch_size=cfg.eval_batch_size),
                 criterion=criterion, prepare=prepare, device=device, amp=amp, rank=rank, world_size=world)
    )
    result["val"] = eval_metrics(ev)
    if has_test:
        test_iter = ray.train.get_dataset_shard("test")
        ev = gather_eval(
            evaluate(model, test_iter.iter_torch_batches(batch_size=cfg.eval_batch_size),
                     criterion=criterion, prepare=prepare, device=device, amp=amp, rank=rank, world_size=world)
        )
        result["test"] = eval_metrics(ev)
        result["test_clean"] = eval_metrics(ev, ~ev["leaked"])
    return result


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


def _report(row: dict, state: dict, model: nn.Module, optimizer, scheduler, scaler, rank: int) -> None:
    import ray.train

    with tempfile.TemporaryDirectory() as d:
        checkpoint = None
        if rank == 0:
            torch.save(
                {
                    **state,
                    "model": _bare(model).state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict() if scaler else None,
                },
                os.path.join(d, STATE_FILE),
            )
            checkpoint = ray.train.Checkpoint.from_directory(d)
        ray.train.report({k: v for k, v in row.items() if not isinstance(v, bool)} | {"stopped_early": int(row["stopped_early"])},
                         checkpoint=checkpoint)
