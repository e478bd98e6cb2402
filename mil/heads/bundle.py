"""A trained head in one self-contained file: architecture, weights, the feature standardisation it was
trained with, and the diagnosis names; enough to run it on any bag directory of the same encoder.

Saved atomically and loaded with ``weights_only=True`` (RELIABILITY.md promises 1 and 6).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mil.atomic import atomic_torch_save
from mil.errors import ConfigError
from mil.heads.common import MilHead
from mil.heads.registry import create_head
from mil.runs import load_checkpoint

BUNDLE_FORMAT = "cytomil-head/1"


def save_head_bundle(
    path: str | Path,
    *,
    head_name: str,
    head_kwargs: dict,
    state_dict: dict,
    in_dim: int,
    classes: list[str],
    shift: np.ndarray | float = 0.0,
    scale: np.ndarray | float = 1.0,
    covariate_shift: np.ndarray | None = None,
    covariate_scale: np.ndarray | None = None,
    meta: dict | None = None,
) -> Path:
    """Write the bundle; `state_dict` is the head's own (no 'head.' prefix), shift/scale z-score the features,
    covariate_shift/scale the (already encoded) covariates of a head built with covariate_dim=K."""
    payload = {
        "format": BUNDLE_FORMAT,
        "head": head_name,
        "head_kwargs": dict(head_kwargs),
        "in_dim": int(in_dim),
        "classes": list(classes),
        "state_dict": {k: v.detach().cpu() for k, v in state_dict.items()},
        "shift": torch.as_tensor(np.broadcast_to(np.asarray(shift, np.float64), (in_dim,)).copy()),
        "scale": torch.as_tensor(np.broadcast_to(np.asarray(scale, np.float64), (in_dim,)).copy()),
        "meta": dict(meta or {}),
    }
    if covariate_shift is not None:
        payload["covariate_shift"] = torch.as_tensor(np.asarray(covariate_shift, np.float64).copy())
        payload["covariate_scale"] = torch.as_tensor(np.asarray(covariate_scale, np.float64).copy())

    def readable(tmp: Path) -> None:
        load_head_bundle(tmp)

    atomic_torch_save(payload, path, readable)
    return Path(path)


@dataclass
class HeadBundle:
    head: MilHead
    name: str
    classes: list[str]
    shift: np.ndarray  # (D,)
    scale: np.ndarray  # (D,)
    meta: dict
    covariate_shift: np.ndarray | None = None  # (K,)
    covariate_scale: np.ndarray | None = None  # (K,)

    def _inputs(self, features: np.ndarray, covariates: np.ndarray | None):
        x = torch.as_tensor((np.asarray(features, np.float64) - self.shift) / self.scale, dtype=torch.float32)
        x = x[None]  # (1,N,D)
        mask = torch.ones(x.shape[:2], dtype=torch.bool)  # (1,N)
        cov = None
        if self.covariate_shift is not None:
            if covariates is None:
                raise ConfigError(f"head {self.name} was trained with covariates; pass the patient's covariates")
            # records carry float32 covariates (mil.heads.data.BagRecord): round the same way before scaling
            cov32 = np.asarray(covariates, np.float32).astype(np.float64).reshape(-1)
            z = (cov32 - self.covariate_shift) / self.covariate_scale
            cov = torch.as_tensor(z.astype(np.float32))[None]  # (1,K)
        return x, mask, cov

    @torch.no_grad()
    def predict(self, features: np.ndarray, covariates: np.ndarray | None = None) -> np.ndarray:
        """features (N,D) of one bag (and its encoded covariates (K,)) -> probabilities (C,)."""
        x, mask, cov = self._inputs(features, covariates)
        return torch.softmax(self.head(x, mask, cov).double(), dim=1)[0].numpy()

    @torch.no_grad()
    def attention(self, features: np.ndarray, covariates: np.ndarray | None = None) -> np.ndarray:
        """features (N,D) -> attention (N,) or (C,N)."""
        x, mask, cov = self._inputs(features, covariates)
        return self.head.attention(x, mask, cov)[0].numpy()

    @torch.no_grad()
    def predict_with_attention(self, features: np.ndarray, covariates: np.ndarray | None = None):
        """One pass: probabilities (C,) and attention (N,) or (C,N)."""
        x, mask, cov = self._inputs(features, covariates)
        logits, weights = self.head.forward_with_attention(x, mask, cov)
        return torch.softmax(logits.double(), dim=1)[0].numpy(), weights[0].numpy()


def load_head_bundle(path: str | Path) -> HeadBundle:
    fix = "give a head bundle that `mil compare` wrote (its models/ folder)"
    payload = load_checkpoint(path, what="head bundle", fix=fix)
    if not isinstance(payload, dict) or payload.get("format") != BUNDLE_FORMAT:
        raise ConfigError(f"{path} is not a head bundle ({BUNDLE_FORMAT}); `mil compare` writes them under models/")
    head = create_head(
        payload["head"], in_dim=payload["in_dim"], num_classes=len(payload["classes"]), **payload["head_kwargs"]
    )
    head.load_state_dict(payload["state_dict"])
    head.eval()
    return HeadBundle(
        head=head,
        name=payload["head"],
        classes=list(payload["classes"]),
        shift=payload["shift"].numpy(),
        scale=payload["scale"].numpy(),
        meta=dict(payload["meta"]),
        covariate_shift=payload["covariate_shift"].numpy() if "covariate_shift" in payload else None,
        covariate_scale=payload["covariate_scale"].numpy() if "covariate_scale" in payload else None,
    )
