"""Train the cell classifier on held-out patients, and cross-fit it so no patient is counted by a model it trained.

`train_classifier` splits patients (never cells) into train / val / test, trains with Lightning, keeps the weights
of the best validation epoch, scores the test patients and writes checkpoint, metrics.json, config.json and the
confusion matrix PNG. `train_crossfitted` repeats that per outer fold and predicts every cell of a fold's test
patients with the model trained without them: the count source the count-based heads need.

A run keeps its checkpoints in `out_dir/run/` (see mil.classifier.resume): killed at any point, the same call
resumes from the last one and ends with the weights of an uninterrupted run; a finished run is reused, not
retrained (so a rerun of `train_crossfitted` trains only the folds that did not finish).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import lightning as L
import numpy as np
import torch

from mil.atomic import atomic_write_text
from mil.cell_table import CellTable
from mil.checkpointing import AtomicCheckpointIO
from mil.classifier import resume
from mil.classifier.data import (
    AUGMENT,
    AugmentConfig,
    CropDataset,
    _group_part,
    labelled_rows,
    load_crops,
    patient_split,
)
from mil.classifier.metrics import classification_metrics, write_confusion_png
from mil.classifier.model import CellClassifierModule, encoder_network, is_encoder_init, normalization
from mil.classifier.predict import load_classifier, predict_crops, predict_rows, save_checkpoint
from mil.classifier.resume import RUN_DIR, ClassifierCheckpoint, EpochSampler, load_run, run_fingerprint
from mil.errors import ConfigError, InputError, refuse_unknown_keys
from mil.labels import classes_of
from mil.progress import EpochLine, say
from mil.quiet import quiet_lightning
from mil.runs import CHECKPOINT_DIR, FINISHED_FILE, prepare_run_dir
from mil.tracking import WANDB_MODES, wandb_logger

IMBALANCE = ("weighted_loss", "sampler", "none")
MODES = ("finetune", "linear_probe")


@dataclass
class ClassifierConfig:
    """Everything that defines a classifier run; written beside its outputs as config.json.

    The defaults are the best setting measured on the PBC sample (docs/real_data.md): EfficientNet-Lite0 from its
    ImageNet weights, 128 px crops, strong smear augmentation, label smoothing and a warm-up + cosine schedule of
    30 epochs, sized for a few hundred labelled cells per class. 15% of the patients validate (choose the kept
    epoch) and none are held out for a test unless `test_fraction` asks for it.
    """

    arch: str = "tf_efficientnet_lite0"  # timm architecture; with an encoder init, the encoder's own
    # 'random', 'imagenet' (EfficientNet-Lite0's offline ImageNet weights) or any registered encoder name
    # (features.registry: e.g. dinobloom_s.v1 or a `mil pretrain` encoder, with init_weights=PATH)
    init: str = "imagenet"
    init_weights: str | None = None  # weights file of an encoder init that needs one
    mode: str = "finetune"  # 'finetune' trains every layer; 'linear_probe' only a linear head on a frozen encoder
    crop_size: int = 128
    max_epochs: int = 30
    warmup_epochs: int = 1
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-4
    imbalance: str = "weighted_loss"
    label_smoothing: float = 0.1
    val_fraction: float = 0.15
    test_fraction: float = 0.0
    patience: int = 0  # epochs without a better val loss before stopping; 0 trains all epochs
    max_steps: int = -1  # stop after this many optimizer steps (tests); -1 = no limit
    augment: str = "strong"  # 'strong', 'light' (flips, 90-degree rotations, mild stain jitter) or 'none'
    tta: bool = True  # predictions average the 8 flips/rotations by 90 degrees of each crop
    seed: int = 0
    accelerator: str = "cpu"
    devices: int = 1
    num_workers: int = 0
    verbose: bool = False  # one line per epoch (loss, val loss and macro-F1, seconds, ETA) on stderr
    resume: bool = True  # reuse a finished run / continue from out_dir/run/checkpoints/last.ckpt of the same run
    wandb: str = "disabled"  # 'offline' | 'online' | 'disabled'

    def __post_init__(self) -> None:
        if isinstance(self.augment, bool):  # configs written before the strengths existed
            self.augment = "light" if self.augment else "none"
        if self.imbalance not in IMBALANCE:
            raise ConfigError(f"imbalance {self.imbalance!r} is unknown; choose one of {list(IMBALANCE)}")
        if self.augment not in AUGMENT:
            raise ConfigError(f"augment {self.augment!r} is unknown; choose one of {list(AUGMENT)}")
        if self.mode not in MODES:
            raise ConfigError(f"mode {self.mode!r} is unknown; choose one of {list(MODES)}")
        if self.wandb not in WANDB_MODES:
            raise ConfigError(f"wandb {self.wandb!r} is unknown; choose one of {list(WANDB_MODES)}")
        if self.crop_size < 16:
            raise ConfigError(f"crop_size {self.crop_size} is too small; use 16 or more pixels")

    @classmethod
    def from_dict(cls, values: dict) -> ClassifierConfig:
        refuse_unknown_keys(values, cls.__dataclass_fields__, "classifier config")
        return cls(**values)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ClassifierResult:
    checkpoint: Path
    class_names: list[str]
    split: dict[str, list[str]]
    metrics: dict  # test patients; empty when the split has no test part
    val_metrics: dict
    history: dict
    test_cell_ids: list[str] = field(default_factory=list)
    test_probs: np.ndarray | None = None


@dataclass
class CrossFitResult:
    """Per-cell probabilities where each patient's cells come from the fold model trained without that patient."""

    class_names: list[str]
    probs: dict[str, np.ndarray]  # cell_id -> (C,)
    fold_of_patient: dict[str, int]
    folds: list[ClassifierResult]

    def table(self, cells: CellTable) -> CellTable:
        from mil.classifier.predict import with_predictions

        return with_predictions(cells, self.probs, self.class_names)


def _class_weights(targets: np.ndarray, num_classes: int) -> list[float]:
    """Inverse class frequency, mean 1 over the classes present; an absent class gets 1 (it never occurs)."""
    counts = np.bincount(targets, minlength=num_classes).astype(float)
    present = counts > 0
    w = np.ones(num_classes)
    w[present] = counts[present].sum() / (present.sum() * counts[present])
    return w.tolist()


def _loader(
    dataset: CropDataset, config: ClassifierConfig, *, train: bool, epoch_source=None
) -> torch.utils.data.DataLoader:
    """Training: an order drawn per (seed, epoch) (class-balanced draws with imbalance 'sampler'); else in order."""
    sampler = None
    if train:
        weights = None
        if config.imbalance == "sampler":
            weights = 1.0 / np.bincount(dataset.targets)[dataset.targets]
        sampler = EpochSampler(len(dataset), seed=config.seed, epoch_source=epoch_source, weights=weights)
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=config.batch_size,
        sampler=sampler,
        num_workers=config.num_workers,
        drop_last=train and len(dataset) > config.batch_size,
    )


def train_classifier(
    cells: CellTable,
    *,
    out_dir: str | Path,
    config: ClassifierConfig | None = None,
    class_names: list[str] | None = None,
    split: dict[str, list[str]] | None = None,
) -> ClassifierResult:
    """Train on the labelled cells of the split's train patients; score val and test patients; write outputs."""
    config = config or ClassifierConfig()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    class_names = list(class_names or classes_of(cells.rows))
    if len(class_names) < 2:
        raise InputError(
            f"the cell table has {len(class_names)} labelled class(es) {class_names}; a classifier needs 2"
        )
    rows = labelled_rows(cells.rows, class_names)
    given = split is not None
    split = split or patient_split(
        rows, val_fraction=config.val_fraction, test_fraction=config.test_fraction, seed=config.seed
    )
    _check_split(split)
    index = {c: i for i, c in enumerate(class_names)}
    parts = {name: [r for r in rows if r["patient_id"] in set(pids)] for name, pids in split.items()}
    if not parts["train"]:
        raise InputError(f"no labelled cells among the {len(split['train'])} training patients; label some cells")
    if config.verbose:
        sizes = ", ".join(f"{len(split[k])} {k} ({len(parts[k])} cells)" for k in ("train", "val", "test"))
        how = (
            "as given"
            if given
            else f"by --val-fraction {config.val_fraction:g} and --test-fraction {config.test_fraction:g}"
        )
        say(f"classifier: patients split {how}: {sizes}; validation chooses the kept epoch, the test part is scored")
    net, timm_kwargs = None, {}
    if is_encoder_init(config.init):
        net, arch, mean, std, timm_kwargs = encoder_network(
            config.init, num_classes=len(class_names), weights=config.init_weights, input_size=config.crop_size
        )
        config = replace(config, arch=arch)
    else:
        mean, std = normalization(config.arch, config.init)
    crops = {name: load_crops(part, crop_size=config.crop_size) for name, part in parts.items()}
    targets = {name: np.array([index[r["label"]] for r in part], dtype=np.int64) for name, part in parts.items()}

    L.seed_everything(config.seed, workers=True, verbose=False)
    weights = _class_weights(targets["train"], len(class_names)) if config.imbalance == "weighted_loss" else None
    module = CellClassifierModule(
        arch=config.arch,
        num_classes=len(class_names),
        init=config.init,
        lr=config.lr,
        weight_decay=config.weight_decay,
        class_weights=weights,
        label_smoothing=config.label_smoothing,
        max_epochs=config.max_epochs,
        warmup_epochs=config.warmup_epochs,
        seed=config.seed,
        net=net,
        linear_probe=config.mode == "linear_probe",
    )
    has_val = len(parts.get("val", [])) > 0
    run_dir = out_dir / RUN_DIR
    trained_on = {name: ([r["cell_id"] for r in parts[name]], crops[name], targets[name]) for name in ("train", "val")}
    fingerprint = run_fingerprint(config, class_names, split, module.net, trained_on)
    state = prepare_run_dir(run_dir, fingerprint, config)
    if state != "finished":
        resume_from = run_dir / CHECKPOINT_DIR / "last.ckpt" if state == "resume" else None
        _fit(module, config, crops=crops, targets=targets, mean=mean, std=std, run_dir=run_dir, resume_from=resume_from)
    kept, module.history, best_epoch = load_run(run_dir, CHECKPOINT_DIR, has_val)
    module.load_state_dict(kept)
    if state != "finished":
        atomic_write_text(run_dir / FINISHED_FILE, json.dumps({"best_epoch": best_epoch}) + "\n")
    module.net.eval()

    ckpt = save_checkpoint(
        out_dir / "classifier.pt",
        net=module.net,
        arch=config.arch,
        input_size=config.crop_size,
        mean=mean,
        std=std,
        class_names=class_names,
        extra={"config": asdict(config), "split": split},
        tta=config.tta,
        timm_kwargs=timm_kwargs,
    )
    device = "cuda" if config.accelerator in ("gpu", "cuda") else "cpu"
    scored = {}
    for name in ("val", "test"):
        if len(parts.get(name, [])):
            probs = predict_crops(module.net, crops[name], mean=mean, std=std, device=device, tta=config.tta)
            scored[name] = (probs, classification_metrics(targets[name], probs, class_names))
    history = dict(module.history, best_epoch=best_epoch)
    result = ClassifierResult(
        checkpoint=ckpt,
        class_names=class_names,
        split=split,
        metrics=scored["test"][1] if "test" in scored else {},
        val_metrics=scored["val"][1] if "val" in scored else {},
        history=history,
        test_cell_ids=[r["cell_id"] for r in parts.get("test", [])],
        test_probs=scored["test"][0] if "test" in scored else None,
    )
    _write_outputs(out_dir, config, result)
    return result


def _fit(module, config, *, crops, targets, mean, std, run_dir: Path, resume_from: Path | None) -> None:
    """Train with Lightning from scratch or from ``resume_from``; checkpoints go to ``run_dir`` (see resume.py)."""
    augment = AugmentConfig.named(config.augment)
    train_set = CropDataset(
        crops=crops["train"], targets=targets["train"], mean=mean, std=std, augment=augment, seed=config.seed
    )
    train_loader = _loader(train_set, config, train=True, epoch_source=lambda: module.current_epoch)
    has_val = len(crops.get("val", [])) > 0
    val_loader = None
    if has_val:
        val_set = CropDataset(crops=crops["val"], targets=targets["val"], mean=mean, std=std)
        val_loader = _loader(val_set, config, train=False)
    checkpoint = ClassifierCheckpoint(
        dirpath=run_dir / CHECKPOINT_DIR,
        monitor="val_loss" if has_val else None,
        every_seconds=resume.LAST_EVERY_SECONDS,
        sampler=train_loader.sampler,
        batch_size=config.batch_size,
    )
    callbacks = [checkpoint, EpochLine("classifier", read=_epoch_values, enabled=config.verbose)]
    if has_val and config.patience > 0:
        callbacks.append(L.pytorch.callbacks.EarlyStopping(monitor="val_loss", patience=config.patience))
    ckpt_path = str(resume_from) if resume_from else None
    with quiet_lightning(), warnings.catch_warnings():  # the epoch lines of EpochLine are what a user watches
        # Resumed inside an epoch, the sampler skips what was trained (ClassifierCheckpoint): Lightning cannot see it.
        warnings.filterwarnings("ignore", message=".*resuming from a checkpoint that ended before the epoch ended.*")
        trainer = L.Trainer(
            max_epochs=config.max_epochs,
            max_steps=config.max_steps,
            accelerator=config.accelerator,
            devices=config.devices,
            logger=wandb_logger(config.wandb, run_dir, name=run_dir.parent.name) or False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            callbacks=callbacks,
            default_root_dir=str(run_dir),
            plugins=[AtomicCheckpointIO()],
        )
        trainer.fit(module, train_loader, val_loader, ckpt_path=ckpt_path, weights_only=True)


def _epoch_values(trainer, module) -> dict:
    """What the epoch line shows: callbacks run before the module closes the epoch, so read its running sums."""
    total, n = module._sums["train"]
    values = {"train_loss": total / n if n else float("nan")}
    if module.history["val_loss"]:
        values["val_loss"] = module.history["val_loss"][-1]
    if module.history.get("val_macro_f1"):
        values["val_macro_f1"] = module.history["val_macro_f1"][-1]
    return values


def _check_split(split: dict[str, list[str]]) -> None:
    missing = {"train", "val", "test"} - set(split)
    if missing:
        raise InputError(f"split lacks part(s) {sorted(missing)}; give train, val and test patient lists")
    seen: dict[str, str] = {}
    for part, pids in split.items():
        for p in pids:
            if p in seen and seen[p] != part:
                raise InputError(f"patient {p!r} is in both {seen[p]} and {part}; a patient belongs to one part")
            seen[p] = part


def _write_outputs(out_dir: Path, config: ClassifierConfig, result: ClassifierResult) -> None:
    atomic_write_text(out_dir / "config.json", json.dumps(asdict(config), indent=2) + "\n")
    summary = {
        "class_names": result.class_names,
        "split": result.split,
        "test": result.metrics,
        "val": result.val_metrics,
        "history": result.history,
        "checkpoint": str(result.checkpoint),
    }
    atomic_write_text(out_dir / "metrics.json", json.dumps(summary, indent=2) + "\n")
    for name, metrics in (("test", result.metrics), ("val", result.val_metrics)):
        if metrics:
            title = f"{name} patients: macro-F1 {metrics['macro_f1']:.3f}, AUROC {metrics['macro_auroc']:.3f}"
            write_confusion_png(
                metrics["confusion_matrix"], result.class_names, out_dir / f"confusion_{name}.png", title
            )


def train_crossfitted(
    cells: CellTable,
    folds: list[tuple[list[str], list[str]]],
    *,
    out_dir: str | Path,
    config: ClassifierConfig | None = None,
    class_names: list[str] | None = None,
) -> CrossFitResult:
    """One classifier per fold (train patients -> test patients); every cell of a test patient, labelled or not,
    gets probabilities from the model that never saw that patient."""
    config = config or ClassifierConfig()
    class_names = list(class_names or classes_of(cells.rows))
    fold_of: dict[str, int] = {}
    for k, (train_pids, test_pids) in enumerate(folds):
        overlap = set(train_pids) & set(test_pids)
        if overlap:
            raise InputError(
                f"fold {k}: patient(s) {sorted(overlap)[:5]} are in train and test; folds must be disjoint"
            )
        for p in test_pids:
            if p in fold_of:
                raise InputError(f"patient {p!r} is a test patient of folds {fold_of[p]} and {k}; give it one fold")
            fold_of[p] = k
    by_patient = cells.by_patient()
    labelled = labelled_rows(cells.rows, class_names)
    probs: dict[str, np.ndarray] = {}
    results = []
    for k, (train_pids, test_pids) in enumerate(folds):
        train_rows = [r for r in labelled if r["patient_id"] in set(train_pids)]
        val = _group_part(train_rows, sorted(set(train_pids)), config.val_fraction, config.seed + k)
        split = {"train": sorted(set(train_pids) - set(val)), "val": val, "test": sorted(test_pids)}
        result = train_classifier(
            cells, out_dir=Path(out_dir) / f"fold_{k}", config=config, class_names=class_names, split=split
        )
        results.append(result)
        test_rows = [r for p in test_pids for r in by_patient.get(p, [])]
        fold_probs = predict_rows(load_classifier(result.checkpoint), test_rows)
        probs.update({r["cell_id"]: p for r, p in zip(test_rows, fold_probs)})
    return CrossFitResult(class_names=class_names, probs=probs, fold_of_patient=fold_of, folds=results)
