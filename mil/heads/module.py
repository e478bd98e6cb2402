"""The LightningModule that trains one head, and batched evaluation of full bags."""

from __future__ import annotations

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader

from mil.auroc import auroc_ovr
from mil.heads.common import MilHead
from mil.heads.data import BagDataset, BagRecord, LengthBucketSampler, length_batches, packed_collate, pad_collate

# Padded cells per validation forward pass: one pass for a typical validation split, bounded memory for big ones.
VAL_CELLS_PER_BATCH = 32768


class HeadModule(L.LightningModule):
    """AdamW + class-weighted cross-entropy on packed (real cells only), length-bucketed batches; validation
    of all validation bags at each epoch end."""

    def __init__(
        self, head: MilHead, *, train: list[BagRecord], val: list[BagRecord], config, class_weights: torch.Tensor
    ) -> None:
        super().__init__()
        # One optimiser and one plain step: manual optimisation skips the closure and hook machinery of
        # Lightning's automatic loop (measured ~3% of a CPU training step); DDP, precision and resume still apply.
        self.automatic_optimization = False
        self.head = head
        self.train_records, self.val_records = train, val
        self.config = config
        self.register_buffer("class_weights", class_weights, persistent=False)
        self.history: list[dict] = []
        self._train_loss = [0.0, 0]
        self._val_batches: list[tuple[list[int], dict]] | None = None
        self._val_metrics: dict = {}

    def _data_epoch(self) -> int:
        return self.current_epoch

    def train_dataloader(self) -> DataLoader:
        data = BagDataset(
            self.train_records,
            max_cells=self.config.max_cells_train,
            seed=self.config.seed,
            epoch_source=self._data_epoch,
        )
        sampler = LengthBucketSampler(
            data.lengths(),
            batch_size=self.config.batch_size,
            shuffle=True,
            seed=self.config.seed,
            num_replicas=self.trainer.world_size,
            rank=self.trainer.global_rank,
            epoch_source=self._data_epoch,
        )
        return DataLoader(data, batch_sampler=sampler, collate_fn=packed_collate, num_workers=0)

    def configure_optimizers(self):
        params = [p for p in self.head.parameters() if p.requires_grad]
        # The fused kernel updates all parameters in one pass (~3x faster than the per-tensor loop on CPU).
        fused = all(p.dtype in (torch.float32, torch.bfloat16, torch.float16) for p in params)
        return torch.optim.AdamW(params, lr=self.config.lr, weight_decay=self.config.weight_decay, fused=fused or None)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        if batch_idx == 0:
            # Dropout draws from a stream fixed by (seed, epoch, rank), so a resumed epoch replays exactly.
            torch.manual_seed(self.config.seed * 1_000_003 + self.current_epoch * 7919 + self.global_rank)
            self._train_loss = [0.0, 0]
        # Packed batch: the real cells only, no padded (B, N, D) copy (see MilHead.forward_packed).
        logits = self.head.forward_packed(
            batch["cells"], batch["bag"], batch["cell"], batch["mask"], batch.get("covariates")
        ).float()  # (B, C) fp32 loss always
        loss = torch.nn.functional.cross_entropy(logits, batch["target"], weight=self.class_weights)
        size = len(batch["target"])
        self._train_loss[0] += float(loss.detach()) * size  # logged once per epoch: a per-step self.log costs ~5%
        self._train_loss[1] += size
        optimizer = self.optimizers()
        optimizer.zero_grad()
        self.manual_backward(loss)
        optimizer.step()
        return loss

    def transfer_batch_to_device(self, batch: dict, device: torch.device, dataloader_idx: int) -> dict:
        # Lightning's generic walk over the batch is measurable per step; our batches are flat dicts of tensors.
        return batch if device.type == "cpu" else {key: value.to(device) for key, value in batch.items()}

    def on_train_epoch_end(self) -> None:
        # Validation runs here, not in Lightning's evaluation loop: a whole loop (dataloader, hooks, mode
        # switches, per-batch logging) per epoch cost more than the forward pass over the validation bags.
        # Keys logged in this hook are visible to EarlyStopping and RunCheckpoint (Lightning calls the
        # monitoring callbacks after the module's on_train_epoch_end). Every rank validates all bags, so
        # the metrics agree across ranks without gathering.
        total, count = self._train_loss
        self.log("train_loss", total / max(count, 1), sync_dist=True)
        if self.val_records:
            loss, auroc = self.validate()
            self._val_metrics = {"val_loss": loss, "val_auroc": auroc}
            self.log("val_loss", loss, sync_dist=True)
            self.log("val_auroc", auroc if np.isfinite(auroc) else 0.0, sync_dist=True)
        self._close_epoch()

    def validate(self) -> tuple[float, float]:
        """Class-weighted loss and macro AUROC over all validation bags, in few large masked batches."""
        if self._val_batches is None:  # packed once: the validation bags never change
            batches = length_batches(self.val_records, max_cells=VAL_CELLS_PER_BATCH, collate=packed_collate)
            self._val_batches = list(batches)
        was_training = self.head.training
        self.head.eval()
        try:
            with torch.inference_mode(), self.trainer.precision_plugin.forward_context():
                logits = torch.cat([self._logits(batch).float().cpu() for _, batch in self._val_batches])  # (V, C)
        finally:
            self.head.train(was_training)
        targets = torch.cat([batch["target"] for _, batch in self._val_batches])  # (V,)
        loss = float(torch.nn.functional.cross_entropy(logits, targets, weight=self.class_weights.cpu()))
        per_class = auroc_ovr(targets.numpy(), torch.softmax(logits, dim=1).numpy())  # NaN: class absent or alone
        return loss, float(np.nanmean(per_class)) if np.isfinite(per_class).any() else float("nan")

    def _logits(self, batch: dict) -> torch.Tensor:
        cells, bag, cell, mask = (batch[key].to(self.device) for key in ("cells", "bag", "cell", "mask"))
        covariates = batch["covariates"].to(self.device) if "covariates" in batch else None
        return self.head.forward_packed(cells, bag, cell, mask, covariates)  # (B, C)

    def _close_epoch(self) -> None:
        """Record this epoch once (checkpoint saves and epoch-end hooks may both ask, in either order)."""
        total, count = self._train_loss
        entry = {"epoch": int(self.current_epoch), "train_loss": total / count if count else float("nan")}
        entry.update(self._val_metrics)
        if self.history and self.history[-1]["epoch"] == entry["epoch"]:
            self.history[-1] = entry
        else:
            self.history.append(entry)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        self._close_epoch()
        checkpoint["history"] = {"epochs": [dict(e) for e in self.history]}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.history = [dict(e) for e in checkpoint.get("history", {}).get("epochs", [])]


@torch.no_grad()
def evaluate_bags(
    head: MilHead, records: list[BagRecord], *, batch_size: int = 8
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Softmax probabilities (len(records), C) in record order and attention per patient (real cells only)."""
    head.eval()
    device = next(head.parameters()).device
    probs = np.zeros((len(records), head.num_classes), dtype=np.float64)
    attention: dict[str, np.ndarray] = {}
    data = BagDataset(records)
    sampler = LengthBucketSampler(data.lengths(), batch_size=batch_size, shuffle=False)
    for indices in sampler:
        batch = pad_collate([data[i] for i in indices])
        covariates = batch["covariates"].to(device) if "covariates" in batch else None
        logits, weights = head.forward_with_attention(batch["x"].to(device), batch["mask"].to(device), covariates)
        probs[indices] = torch.softmax(logits.double(), dim=1).cpu().numpy()
        for row, index in enumerate(indices):
            n = len(records[index].features)
            attention[records[index].patient_id] = weights[row, ..., :n].cpu().numpy().astype(np.float32)
    return probs, attention
