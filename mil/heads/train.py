"""Train an attention-MIL head with Lightning and predict the test bags: ``fit_predict``.

AdamW, class-weighted cross-entropy, random cell subsampling per bag in training, length-bucketed
batches, early stopping on the inner validation split with the best checkpoint restored, CSV logs
always and wandb only when asked. Checkpoints are written atomically and loaded with
``weights_only=True``, every ``LAST_EVERY_SECONDS`` of training and at the end
(``mil.checkpointing.RunCheckpoint``); a run interrupted mid-epoch resumes from ``last.ckpt`` in its
``log_dir`` and ends with the same weights, and a finished run is not trained again (its best checkpoint is reused).
With ``devices > 1`` it trains with DDP (gloo on CPU, nccl on GPUs); see ``TrainConfig.strategy``. Every
rank builds the same length-bucketed batch list and takes every ``devices``-th batch, so one optimiser step
sees ``batch_size x devices`` bags; every rank validates all validation bags, so the early-stopping metric
is the same on all ranks without gathering. Only rank 0 writes ``finished.json``; ``is_global_zero()``
tells a caller launched with ``strategy="ddp"`` (torchrun) which process should write its outputs.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch

from mil.atomic import atomic_write_text
from mil.checkpointing import AtomicCheckpointIO, RunCheckpoint
from mil.errors import ConfigError, refuse_unknown_keys
from mil.heads.common import MilHead
from mil.heads.data import BagRecord, check_records, covariate_width
from mil.heads.module import HeadModule, evaluate_bags
from mil.heads.registry import create_head
from mil.quiet import quiet_lightning
from mil.runs import CHECKPOINT_DIR, FINISHED_FILE, load_checkpoint, prepare_run_dir, run_digest, weight_settings

# A killed run loses at most this much training (plus the epoch in progress); every write is atomic with fsync
# and a re-read. Short runs therefore write their checkpoints once, at the end.
LAST_EVERY_SECONDS = 60.0


@dataclass
class TrainConfig:
    """Everything that decides a training run; saved beside the run (``run.json``)."""

    max_epochs: int = 50
    lr: float = 2e-4
    weight_decay: float = 1e-2
    dropout: float = 0.25
    hidden_dim: int = 128
    patience: int = 10
    max_cells_train: int | None = 512  # random subset per bag and epoch in training; None keeps all cells
    batch_size: int = 8
    seed: int = 0
    devices: int = 1
    accelerator: str = "cpu"
    # "auto": one device -> no strategy; several -> DDP that keeps fit_predict a plain function call inside
    # a larger command: "ddp_fork" on CPU (gloo; no re-import, starts in seconds), "ddp_spawn" on GPUs
    # (CUDA cannot be forked once an earlier fold used it). "ddp" re-executes the whole command once per
    # rank: use it under torchrun/SLURM. Spawned ranks import the main script: guard it with __main__.
    strategy: str = "auto"
    monitor: str = "val_loss"  # or "val_auroc" (macro one-vs-rest over the classes present in val)
    class_weighted: bool = True
    head_kwargs: dict = field(default_factory=dict)  # extra constructor options of the head
    # How patient covariates join the cells: "offset" fits their logit weights first by a (class-balanced) logistic
    # regression on the training patients and keeps them fixed, so the cell head learns what the covariates do not
    # explain; "joint" trains them with the head (on small cohorts the cells then overfit and crowd them out).
    covariate_fusion: str = "offset"
    wandb: str = "disabled"  # "offline" | "online" | "disabled"; WANDB_MODE=disabled in the env wins
    wandb_project: str = "cytomil"
    # "32-true" (exact, reproducible to the bit on CPU) or "bf16-mixed" (autocast: ~1.15x faster ABMIL training
    # steps and end to end on a CPU with AVX512-BF16, see docs/benchmarks.md, and faster on GPUs; the trained
    # model differs from fp32, still seeded and reproducible).
    precision: str = "32-true"
    enable_progress_bar: bool = False
    deterministic: bool = True
    resume: bool = True  # reuse a finished run / continue from last.ckpt when log_dir holds the same run

    def __post_init__(self) -> None:
        problems = []
        if self.monitor not in ("val_loss", "val_auroc"):
            problems.append(f"monitor={self.monitor!r}: use 'val_loss' or 'val_auroc'")
        if self.precision not in ("32-true", "bf16-mixed", "16-mixed"):
            problems.append(f"precision={self.precision!r}: use '32-true', 'bf16-mixed' or '16-mixed' (GPU)")
        if self.wandb not in ("offline", "online", "disabled"):
            problems.append(f"wandb={self.wandb!r}: use 'offline', 'online' or 'disabled'")
        for name in ("max_epochs", "batch_size", "devices", "hidden_dim"):
            if int(getattr(self, name)) < 1:
                problems.append(f"{name}={getattr(self, name)}: must be >= 1")
        if self.max_cells_train is not None and self.max_cells_train < 1:
            problems.append(f"max_cells_train={self.max_cells_train}: must be >= 1 or None")
        if not 0 <= self.dropout < 1:
            problems.append(f"dropout={self.dropout}: must be in [0, 1)")
        if self.covariate_fusion not in ("offset", "joint"):
            problems.append(f"covariate_fusion={self.covariate_fusion!r}: use 'offset' or 'joint'")
        if problems:
            raise ConfigError("invalid training config:\n" + "\n".join(f"  - {p}" for p in problems))

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        """Strict: a key that is not a field is an error naming the valid keys."""
        refuse_unknown_keys(values, [f.name for f in fields(cls)], "training config")
        return cls(**values)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class HeadResult:
    """Test-bag probabilities (in ``test`` order), attention per test patient (real cells only:
    (N,) or (C, N)) and the training history (epochs, best epoch, losses)."""

    probs: np.ndarray
    attention: dict[str, np.ndarray]
    history: dict
    best_checkpoint: str | None = None
    covariate_shift: np.ndarray | None = None  # (K,) the training records' covariate mean and std, applied to
    covariate_scale: np.ndarray | None = None  # every record before the head; a bundle stores them for `mil predict`
    val_probs: np.ndarray | None = None  # (val patients, C) of the restored head, in ``val`` order: what
    # calibration (temperature, conformal sets, binary thresholds) is fitted on, never the test patients


def is_global_zero() -> bool:
    """True in the process that should write outputs (rank 0, or a run without DDP)."""
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0


def _fingerprint(head: MilHead, train: list[BagRecord], val: list[BagRecord], config: TrainConfig) -> str:
    """What decides the trained weights: head, its init, config and the training/validation bags."""
    digest = run_digest({"head": type(head).__name__, "config": weight_settings(config)}, head)
    for role, records in (("train", train), ("val", val)):
        for r in records:
            digest.update(f"{role}:{r.patient_id}:{int(r.target)}".encode())
            digest.update(np.ascontiguousarray(r.features, dtype=np.float32).tobytes())
            if r.covariates is not None:
                digest.update(np.ascontiguousarray(r.covariates, dtype=np.float64).tobytes())
    return digest.hexdigest()


def _standardize_covariates(train: list[BagRecord], others: list[list[BagRecord]], width: int):
    """z-score covariates with the training patients' mean and std (no statistic of a test patient leaks in);
    covariates such as age in years would otherwise dwarf the logits of the cells at initialisation.
    Returns the scaled (train, others) and the (mean, std) used, or None for both without covariates."""
    if not width:
        return train, others, None, None
    values = np.stack([np.asarray(r.covariates, dtype=np.float64).reshape(-1) for r in train])
    mean, std = values.mean(axis=0), values.std(axis=0) + 1e-6

    def scaled(records):
        return [
            replace(r, covariates=((np.asarray(r.covariates, np.float64).reshape(-1) - mean) / std).astype(np.float32))
            for r in records
        ]

    return scaled(train), [scaled(group) for group in others], mean, std


def _fit_covariate_offset(head: MilHead, train: list[BagRecord], num_classes: int, *, seed: int, balanced: bool):
    """Set the head's covariate logit weights (C, K) from a logistic regression on the training patients' covariates
    alone, and freeze them: the covariates' own contribution, fitted where the cells cannot crowd it out."""
    from sklearn.linear_model import LogisticRegression

    x = np.stack([np.asarray(r.covariates, np.float64).reshape(-1) for r in train])  # (P, K), already z-scored
    y = np.array([int(r.target) for r in train])
    weights = np.zeros((num_classes, x.shape[1]))
    if len(set(y)) > 1:
        model = LogisticRegression(max_iter=5000, class_weight="balanced" if balanced else None, random_state=seed)
        model.fit(x, y)
        seen = np.asarray(model.classes_, dtype=np.int64)
        if len(seen) == 2:  # one log-odds vector w: softmax logits -w/2 and +w/2 give the same probabilities
            weights[seen[0]], weights[seen[1]] = -model.coef_[0] / 2, model.coef_[0] / 2
        else:
            weights[seen] = model.coef_
    layer = head.covariate_classifier
    with torch.no_grad():
        layer.weight.copy_(torch.as_tensor(weights, dtype=layer.weight.dtype))
    layer.weight.requires_grad_(False)


def _class_weights(train: list[BagRecord], num_classes: int, weighted: bool) -> torch.Tensor:
    counts = np.bincount([int(r.target) for r in train], minlength=num_classes).astype(np.float64)
    if not weighted:
        return torch.ones(num_classes, dtype=torch.float32)
    present = counts > 0
    # Balanced weights n / (k * n_c); a class absent from training gets 0 (nothing to learn from).
    weights = np.where(present, counts.sum() / (present.sum() * np.maximum(counts, 1)), 0.0)
    return torch.tensor(weights, dtype=torch.float32)


def _loggers(config: TrainConfig, log_dir: Path) -> list:
    from lightning.pytorch.loggers import CSVLogger

    loggers = [CSVLogger(save_dir=str(log_dir), name="", version="csv")]
    if config.wandb != "disabled" and os.environ.get("WANDB_MODE", "") != "disabled":
        if (
            config.wandb == "online"
            and not os.environ.get("WANDB_API_KEY")
            and not Path("~/.netrc").expanduser().exists()
        ):
            raise ConfigError("wandb 'online' needs WANDB_API_KEY (no login prompt is ever shown); use 'offline'")
        os.environ.setdefault("WANDB_SILENT", "true")
        from lightning.pytorch.loggers import WandbLogger

        loggers.append(
            WandbLogger(project=config.wandb_project, save_dir=str(log_dir), mode=config.wandb, name=log_dir.name)
        )
    return loggers


def _epoch_values(trainer, module: HeadModule) -> dict:
    return dict(module.history[-1]) if module.history else {}


def _train(
    module: HeadModule, config: TrainConfig, log_dir: Path, resume_from: Path | None, has_val: bool, desc: str
) -> None:
    import lightning as L
    from lightning.pytorch.callbacks import EarlyStopping

    from mil.progress import EpochLine, interval

    mode = "min" if config.monitor == "val_loss" else "max"
    # One line per epoch (at most one per MIL_PROGRESS_SECONDS: a comparison trains many short runs), the last
    # epoch always; HeadModule logs its validation metrics in its own epoch-end hook, hence after_module.
    # Values from the module's own history: its logged val_auroc is 0.0 where AUROC is undefined, the history's NaN.
    callbacks = [EpochLine(desc, after_module=True, min_seconds=interval(), read=_epoch_values)]
    if has_val:
        callbacks.append(EarlyStopping(monitor=config.monitor, mode=mode, patience=config.patience))
    # last.ckpt every LAST_EVERY_SECONDS and at the end, best.ckpt with it (see mil.checkpointing: resume is exact).
    callbacks.append(
        RunCheckpoint(
            dirpath=log_dir / CHECKPOINT_DIR,
            monitor=config.monitor if has_val else None,
            mode=mode,
            every_seconds=LAST_EVERY_SECONDS,
        )
    )
    strategy = config.strategy
    if strategy == "auto":
        strategy = "auto" if config.devices == 1 else ("ddp_fork" if config.accelerator == "cpu" else "ddp_spawn")
    trainer = L.Trainer(
        max_epochs=config.max_epochs,
        accelerator=config.accelerator,
        devices=config.devices,
        strategy=strategy,
        logger=_loggers(config, log_dir),
        callbacks=callbacks,
        enable_progress_bar=config.enable_progress_bar,
        enable_model_summary=False,
        deterministic=config.deterministic,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,  # the length-bucketed sampler shards batches across ranks itself
        log_every_n_steps=1,
        default_root_dir=str(log_dir),
        plugins=[AtomicCheckpointIO()],
        limit_val_batches=0,  # HeadModule validates in on_train_epoch_end (one batched pass)
        precision=config.precision,
    )
    trainer.fit(module, ckpt_path=str(resume_from) if resume_from else None, weights_only=True)


def fit_predict(
    head: str | MilHead,
    *,
    train: list[BagRecord],
    val: list[BagRecord],
    test: list[BagRecord],
    num_classes: int,
    config: TrainConfig | None = None,
    log_dir: str | os.PathLike,
    desc: str | None = None,
) -> HeadResult:
    """Train ``head`` (a registered name or a built head) on ``train``, stop early on ``val``, restore the
    best checkpoint and predict ``test`` with full bags. The head's input width comes from the bags.
    ``desc`` starts each progress line (default: the head's name)."""
    import lightning as L

    config = config or TrainConfig()
    desc = desc or (head if isinstance(head, str) else type(head).__name__)
    log_dir = Path(log_dir)
    in_dim = check_records(train, num_classes=num_classes, role="training")
    covariates = covariate_width(train, role="training")
    for role, records in (("validation", val), ("test", test)):
        if records and check_records(records, num_classes=num_classes, role=role) != in_dim:
            raise ConfigError(f"the {role} bags differ in feature width from the training bags ({in_dim})")
        if records and covariate_width(records, role=role) != covariates:
            raise ConfigError(f"the {role} records do not carry the {covariates} covariates of the training records")
    train, (val, test), cov_shift, cov_scale = _standardize_covariates(train, [val, test], covariates)
    with quiet_lightning(not config.enable_progress_bar):
        L.seed_everything(config.seed, workers=True, verbose=False)
        if isinstance(head, str):
            kwargs = {"hidden_dim": config.hidden_dim, "dropout": config.dropout, **config.head_kwargs}
            if covariates:
                kwargs["covariate_dim"] = covariates
            head = create_head(head, in_dim=in_dim, num_classes=num_classes, **kwargs)
        if head.covariate_dim != covariates:
            raise ConfigError(f"the head takes {head.covariate_dim} covariates but the records carry {covariates}")
        if covariates and config.covariate_fusion == "offset":
            _fit_covariate_offset(head, train, num_classes, seed=config.seed, balanced=config.class_weighted)
        monitor = config.monitor
        if monitor == "val_auroc" and len({int(r.target) for r in val}) < 2:
            monitor = "val_loss"  # AUROC needs two classes in validation; loss always exists
        run_config = TrainConfig.from_dict({**config.to_dict(), "monitor": monitor})
        state = prepare_run_dir(log_dir, _fingerprint(head, train, val, run_config), run_config)
        weights = _class_weights(train, num_classes, run_config.class_weighted)
        module = HeadModule(head, train=train, val=val, config=run_config, class_weights=weights)
        ckpt_dir = log_dir / CHECKPOINT_DIR
        if state != "finished":
            resume_from = ckpt_dir / "last.ckpt" if state == "resume" else None
            _train(module, run_config, log_dir, resume_from, has_val=bool(val), desc=desc)
        best = ckpt_dir / ("best.ckpt" if val else "last.ckpt")  # without validation the last epoch is kept
        best_state = load_checkpoint(best, what="head training checkpoint", fix=f"delete {log_dir} to train afresh")
        module.load_state_dict(best_state["state_dict"])
        last = load_checkpoint(ckpt_dir / "last.ckpt", what="head training checkpoint", fix=f"delete {log_dir}")
        history = dict(last["history"])
        history["best_epoch"] = int(best_state["epoch"])
        history["monitor"] = monitor
        if state != "finished" and is_global_zero():
            atomic_write_text(log_dir / FINISHED_FILE, json.dumps({"best_epoch": history["best_epoch"]}))
        probs, attention = evaluate_bags(module.head, test, batch_size=run_config.batch_size)
        val_probs = evaluate_bags(module.head, val, batch_size=run_config.batch_size)[0] if val else None
    return HeadResult(
        probs=probs,
        attention=attention,
        history=history,
        best_checkpoint=str(best),
        covariate_shift=cov_shift,
        covariate_scale=cov_scale,
        val_probs=val_probs,
    )
