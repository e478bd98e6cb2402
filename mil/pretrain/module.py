"""The pretraining LightningModule: a timm backbone with lightly's SimCLR or DINO head and loss.

The encoder kept at the end is the backbone (SimCLR) or the EMA teacher's backbone (DINO, as the DINO authors
publish the teacher). `_sums` and `history` follow the classifier module so mil.classifier.resume's checkpoint
callback (written inside an epoch too) resumes this module exactly.
"""

from __future__ import annotations

import copy
import warnings

import lightning as L
import torch

from mil.pretrain.config import PretrainConfig
from mil.runs import epoch_seed


def build_backbone(arch: str) -> torch.nn.Module:
    """timm `arch` without its classifier: (B, 3, S, S) -> (B, D) pooled features."""
    from features.encoders.timm_encoders import build_timm_model

    return build_timm_model(arch, input_size=None, pretrained=False)


class PretrainModule(L.LightningModule):
    def __init__(self, config: PretrainConfig) -> None:
        super().__init__()
        from features.encoders.timm_encoders import embed_dim_of

        self.config = config
        self.backbone = build_backbone(config.arch)
        width = embed_dim_of(self.backbone)
        self.width = width
        if config.method == "simclr":
            from lightly.loss import NTXentLoss
            from lightly.models.modules import SimCLRProjectionHead

            self.head = SimCLRProjectionHead(width, width, config.proj_dim)
            self.criterion = NTXentLoss(temperature=config.temperature, gather_distributed=config.devices > 1)
        else:
            from lightly.loss import DINOLoss
            from lightly.models.modules import DINOProjectionHead
            from lightly.models.utils import deactivate_requires_grad

            def head() -> torch.nn.Module:
                with warnings.catch_warnings():  # lightly's head uses torch's deprecated weight_norm
                    warnings.filterwarnings("ignore", message=".*weight_norm.*")
                    return DINOProjectionHead(
                        width,
                        config.dino_hidden_dim,
                        config.dino_bottleneck_dim,
                        config.dino_out_dim,
                        batch_norm=True,  # a CNN backbone (lightly's note: False only for ViTs)
                        freeze_last_layer=1,
                    )

            self.head = head()
            self.teacher_backbone = copy.deepcopy(self.backbone)
            # weight_norm tensors cannot be deep-copied: a second head gets the student's weights instead.
            self.teacher_head = head()
            self.teacher_head.load_state_dict(self.head.state_dict())
            deactivate_requires_grad(self.teacher_backbone)
            deactivate_requires_grad(self.teacher_head)
            self.criterion = DINOLoss(
                output_dim=config.dino_out_dim,
                warmup_teacher_temp=config.teacher_temp,
                teacher_temp=config.teacher_temp,
                warmup_teacher_temp_epochs=max(1, config.warmup_teacher_temp_epochs),
            )
        self.history: dict[str, list[float]] = {"train_loss": []}
        self._sums: dict[str, list[float]] = {"train": [0.0, 0]}

    def encoder(self) -> torch.nn.Module:
        """The backbone whose features are the encoder's: the DINO teacher, the SimCLR backbone."""
        return self.teacher_backbone if self.config.method == "dino" else self.backbone

    def _simclr_loss(self, views: list[torch.Tensor]) -> torch.Tensor:
        z0 = self.head(self.backbone(views[0]))  # (B, P)
        z1 = self.head(self.backbone(views[1]))  # (B, P)
        return self.criterion(z0, z1)

    def _dino_loss(self, views: list[torch.Tensor]) -> torch.Tensor:
        from lightly.models.utils import update_momentum
        from lightly.utils.scheduler import cosine_schedule

        total = max(1, int(self.trainer.estimated_stepping_batches))
        m = cosine_schedule(int(self.global_step), total, self.config.momentum, 1.0)
        update_momentum(self.backbone, self.teacher_backbone, m=m)
        update_momentum(self.head, self.teacher_head, m=m)
        global_views = views[:2]  # the teacher sees the two global crops only
        with torch.no_grad():
            teacher_out = [self.teacher_head(self.teacher_backbone(v)) for v in global_views]  # [(B, K)] * 2
        student_out = [self.head(self.backbone(v)) for v in views]  # [(B, K)] * (2 + local views)
        return self.criterion(teacher_out, student_out, epoch=int(self.current_epoch))

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        if batch_idx == 0:
            # Any global draw follows a stream fixed by (seed, epoch): a resumed epoch replays.
            torch.manual_seed(epoch_seed(self.config.seed, self.current_epoch, 1))
        loss = self._simclr_loss(batch) if self.config.method == "simclr" else self._dino_loss(batch)
        n = len(batch[0])
        self._sums["train"][0] += float(loss.detach()) * n
        self._sums["train"][1] += n
        self.log("train_loss", loss, on_epoch=True, on_step=False, batch_size=n, sync_dist=True)
        return loss

    def on_after_backward(self) -> None:
        if self.config.method == "dino":
            self.head.cancel_last_layer_gradients(current_epoch=int(self.current_epoch))

    def on_train_epoch_end(self) -> None:
        total, n = self._sums["train"]
        if n:
            self.history["train_loss"].append(total / n)
        self._sums["train"] = [0.0, 0]

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["history"] = {k: list(v) for k, v in self.history.items()}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.history = {k: list(v) for k, v in checkpoint.get("history", self.history).items()}

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=self.config.lr, weight_decay=self.config.weight_decay)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, self.config.max_epochs))
        return {"optimizer": opt, "lr_scheduler": sched}
