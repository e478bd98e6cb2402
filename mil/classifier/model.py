"""The cell classifier: a timm backbone with a C-way head, trained as a LightningModule."""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F

from mil.errors import ConfigError
from mil.imagenet import lite0_imagenet_state_dict
from mil.runs import epoch_seed

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# tf_efficientnet_lite0 was trained on inputs scaled to [-1, 1]; its ImageNet weights expect that normalization.
LITE0_MEAN = (0.5, 0.5, 0.5)
LITE0_STD = (0.5, 0.5, 0.5)
INITS = ("random", "imagenet")  # besides these, any encoder registry name (features.registry), e.g. dinobloom_s.v1


def is_encoder_init(init: str) -> bool:
    """An `init` that names a registered encoder (ARCH.TAG) rather than 'random' / 'imagenet'."""
    return init not in INITS and "." in init


def normalization(arch: str, init: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean/std the backbone expects; recorded in the checkpoint so every later use derives the same."""
    if init == "imagenet" and arch == "tf_efficientnet_lite0":
        return LITE0_MEAN, LITE0_STD
    return IMAGENET_MEAN, IMAGENET_STD


def encoder_network(
    init: str, *, num_classes: int, weights: str | None, input_size: int
) -> tuple[torch.nn.Module, str, tuple, tuple, dict]:
    """A timm classifier whose backbone starts from the registered encoder `init` (ImageNet, `mil pretrain`,
    DinoBloom, ...): (network with a fresh `num_classes` head, timm arch, mean, std, timm create kwargs)."""
    from features.registry import create_encoder

    encoder = create_encoder(init, weights=weights, input_size=input_size)
    model = getattr(encoder, "model", None)
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "reset_classifier"):
        raise ConfigError(
            f"encoder {init!r} is no timm network (it has no .model with reset_classifier), so a classifier cannot "
            "be fine-tuned from it; use a timm-based encoder (`mil encoders` lists them) or --init imagenet"
        )
    model.reset_classifier(num_classes)  # pooled features -> a new C-way linear head
    kwargs = {}
    if hasattr(model, "patch_embed") and hasattr(model.patch_embed, "img_size"):
        kwargs["img_size"] = int(encoder.config.input_size)  # a ViT is built for one input side
    return model.train(), encoder.config.arch, encoder.config.mean, encoder.config.std, kwargs


def build_network(*, arch: str, num_classes: int, init: str = "random") -> torch.nn.Module:
    """timm `arch` with a `num_classes` head; init 'imagenet' loads EfficientNet-Lite0 weights (the offline ones)."""
    import timm

    if init not in INITS:
        raise ConfigError(
            f"unknown init {init!r}; choose one of {list(INITS)} or an encoder name from `mil encoders` "
            "(e.g. dinobloom_s.v1 with --init-weights PATH)"
        )
    if init == "imagenet" and arch != "tf_efficientnet_lite0":
        raise ConfigError(
            f"init 'imagenet' is available offline only for arch 'tf_efficientnet_lite0', not {arch!r}; "
            "use --arch tf_efficientnet_lite0 or --init random"
        )
    try:
        net = timm.create_model(arch, pretrained=False, num_classes=num_classes)
    except RuntimeError as e:
        raise ConfigError(f"timm has no architecture {arch!r} ({e}); list them with timm.list_models()") from e
    if init == "imagenet":
        weights = {k: v for k, v in lite0_imagenet_state_dict().items() if not k.startswith("classifier.")}
        missing, unexpected = net.load_state_dict(weights, strict=False)
        if unexpected or any(not k.startswith("classifier.") for k in missing):
            raise ConfigError(f"EfficientNet-Lite0 weights do not fit: missing {missing}, unexpected {unexpected}")
    return net


def head_of(net: torch.nn.Module) -> torch.nn.Module:
    """The final linear classifier of a timm network (what a linear probe trains)."""
    return net.get_classifier()


class CellClassifierModule(L.LightningModule):
    """Cross-entropy on crops; optional class weights; per-epoch mean losses kept in `history`."""

    def __init__(
        self,
        *,
        arch: str,
        num_classes: int,
        init: str = "random",
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        class_weights: list[float] | None = None,
        label_smoothing: float = 0.0,
        max_epochs: int = 10,
        warmup_epochs: int = 0,
        seed: int = 0,
        net: torch.nn.Module | None = None,
        linear_probe: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["net"])
        self.net = net if net is not None else build_network(arch=arch, num_classes=num_classes, init=init)
        if linear_probe:  # frozen encoder: only the final linear layer learns
            for p in self.net.parameters():
                p.requires_grad_(False)
            for p in head_of(self.net).parameters():
                p.requires_grad_(True)
        weights = torch.tensor(class_weights, dtype=torch.float32) if class_weights is not None else None
        self.register_buffer("class_weights", weights, persistent=False)
        self.history: dict[str, list[float]] = {"train_loss": [], "val_loss": [], "val_macro_f1": []}
        self._sums: dict[str, list[float]] = {"train": [0.0, 0], "val": [0.0, 0]}
        self._val_pred: list[torch.Tensor] = []
        self._val_true: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # (B, 3, S, S) -> (B, C)

    def _loss(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> torch.Tensor:
        x, y = batch
        logits = self(x)  # (B, C)
        loss = F.cross_entropy(logits, y, weight=self.class_weights, label_smoothing=self.hparams.label_smoothing)
        self._sums[stage][0] += float(loss.detach()) * len(y)
        self._sums[stage][1] += len(y)
        # sync_dist: with several devices each rank sees a shard; the monitored mean (best epoch, early stopping)
        # must be the same on every rank.
        self.log(f"{stage}_loss", loss, on_epoch=True, on_step=False, batch_size=len(y), sync_dist=True)
        if stage == "val":
            self._val_pred.append(logits.detach().argmax(1).cpu())
            self._val_true.append(y.detach().cpu())
        return loss

    def training_step(self, batch, batch_idx):
        if self.hparams.linear_probe:
            self.net.eval()  # frozen encoder: its BatchNorm statistics stay those of the encoder
        if batch_idx == 0:
            # Dropout (and any other global draw) follows a stream fixed by (seed, epoch): a resumed epoch replays.
            torch.manual_seed(epoch_seed(self.hparams.seed, self.current_epoch, 1))
        return self._loss(batch, "train")

    def validation_step(self, batch, batch_idx):  # noqa: ARG002
        return self._loss(batch, "val")

    def _close_epoch(self, stage: str) -> None:
        total, n = self._sums[stage]
        if n:
            self.history[f"{stage}_loss"].append(total / n)
        self._sums[stage] = [0.0, 0]

    def on_train_epoch_end(self) -> None:
        self._close_epoch("train")

    def on_validation_epoch_end(self) -> None:
        if not self.trainer.sanity_checking:
            self._close_epoch("val")
            if self._val_true:
                from sklearn.metrics import f1_score

                y, p = torch.cat(self._val_true).numpy(), torch.cat(self._val_pred).numpy()
                self.history["val_macro_f1"].append(float(f1_score(y, p, average="macro", zero_division=0)))
        self._sums["val"] = [0.0, 0]
        self._val_pred, self._val_true = [], []

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Written at an epoch's end, after on_train_epoch_end closed it: a resumed run's history is the whole run's.
        checkpoint["history"] = {stage: list(losses) for stage, losses in self.history.items()}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.history = {stage: list(losses) for stage, losses in checkpoint.get("history", self.history).items()}

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        epochs, warmup = max(1, self.hparams.max_epochs), min(self.hparams.warmup_epochs, self.hparams.max_epochs - 1)

        def factor(epoch: int) -> float:  # linear warm-up, then cosine decay to 0 at the last epoch
            import math

            if epoch < warmup:
                return (epoch + 1) / (warmup + 1)
            return 0.5 * (1 + math.cos(math.pi * (epoch - warmup) / max(1, epochs - warmup)))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": sched}
