"""Multi-view crops for self-supervised pretraining: lightly's SimCLR and DINO transforms, set for stained smears.

Why these settings (lightly's defaults are for photographs):
- no grayscale and no solarisation: the stain's colour is what tells an eosinophil's orange granules from a
  basophil's purple ones; a photograph's identity survives grayscale, a cell type's does not;
- a small hue jitter (0.04, not 0.2) and moderate brightness/contrast/saturation: stains and scanners vary in
  strength and white balance, not in which dye is which;
- vertical flips and 90-degree rotations: a smear has no up;
- crops of at least 40% of the cell crop (lightly's SimCLR default is 8%): a cell crop is already tight around one
  cell, so a tiny crop is cytoplasm or background without the nucleus;
- less blur, with small sigmas: crops are 64 to 96 px, not 224.

Every draw is reproducible: the view of crop i in epoch e depends on (seed, epoch, i) only (lightly's transforms
draw from torch's and numpy's global generators, which are seeded for the call and restored after), so a resumed
run sees the same views as an uninterrupted one, with any number of loader workers.
"""

from __future__ import annotations

import contextlib
import random

import numpy as np
import torch

from mil.pretrain.config import PretrainConfig


def view_transform(config: PretrainConfig, *, mean, std):
    """lightly's multi-view transform for `config.method`: PIL image -> list of (3, s, s) normalised tensors."""
    normalize = {"mean": list(mean), "std": list(std)}
    colour = dict(cj_prob=0.8, cj_strength=config.colour_strength, cj_bright=0.8, cj_contrast=0.8, cj_sat=0.6)
    geometry = dict(hf_prob=0.5, vf_prob=0.5, rr_prob=0.5, rr_degrees=None)  # rr_degrees None: multiples of 90
    sigmas = (0.1, max(0.2, config.crop_size / 64))
    if config.method == "simclr":
        from lightly.transforms import SimCLRTransform

        return SimCLRTransform(
            input_size=config.crop_size,
            min_scale=config.min_scale,
            cj_hue=config.hue,
            random_gray_scale=0.0,
            gaussian_blur=config.blur,
            sigmas=sigmas,
            normalize=normalize,
            **colour,
            **geometry,
        )
    from lightly.transforms import DINOTransform

    local = max(16, config.crop_size // 2)
    return DINOTransform(
        global_crop_size=config.crop_size,
        global_crop_scale=(config.min_scale, 1.0),
        local_crop_size=local,
        local_crop_scale=(min(0.15, config.min_scale / 2), config.min_scale),
        n_local_views=config.local_views,
        cj_hue=config.hue,
        random_gray_scale=0.0,
        gaussian_blur=(config.blur, config.blur / 2, config.blur),
        sigmas=sigmas,
        solarization_prob=0.0,
        normalize=normalize,
        **colour,
        **geometry,
    )


@contextlib.contextmanager
def seeded(seed: int):
    """torch's, numpy's and Python's global generators seeded for the block, and restored after it."""
    torch_state, np_state, py_state = torch.get_rng_state(), np.random.get_state(), random.getstate()
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)
    try:
        yield
    finally:
        torch.set_rng_state(torch_state)
        np.random.set_state(np_state)
        random.setstate(py_state)


class ViewDataset(torch.utils.data.Dataset):
    """(N, S, S, 3) uint8 crops -> a list of views per crop, seeded per (seed, epoch, item)."""

    def __init__(self, *, crops: np.ndarray, transform, seed: int) -> None:
        self.crops, self.transform, self.seed = crops, transform, int(seed)

    def __len__(self) -> int:
        return len(self.crops)

    def __getitem__(self, item: int | tuple[int, int]) -> list[torch.Tensor]:
        from PIL import Image

        # The sampler (mil.classifier.resume.EpochSampler) sends (index, epoch): the epoch travels with the index.
        i, epoch = item if isinstance(item, tuple) else (item, 0)
        with seeded(self.seed * 1_000_003 + epoch * 100_003 + i):
            return list(self.transform(Image.fromarray(self.crops[i])))  # [(3, s, s)] * views
