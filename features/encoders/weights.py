"""Loading weights from local files: .pth/.pt/.bin (torch.load weights_only) or .safetensors, with sha256.

Checkpoints in the wild wrap the state dict ('state_dict', 'model', 'teacher', ...) and prefix its keys
('module.' from DDP, 'model.' from Lightning, 'backbone.'); these helpers peel both off so any of them
loads into the bare architecture, and they say which keys did not fit instead of loading silently.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch

from mil.errors import ConfigError, InputError

TORCH_SUFFIXES = {".pth", ".pt", ".bin", ".ckpt"}
SAFETENSORS_SUFFIXES = {".safetensors"}
# Containers that training code commonly wraps a state dict in, tried in this order.
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module", "teacher", "student", "net")
COMMON_PREFIXES = ("module.", "model.", "_orig_mod.", "backbone.", "encoder.")


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def read_checkpoint(path: str | Path) -> object:
    """The raw object of a checkpoint file (a dict for torch files, a flat tensor dict for safetensors)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"weights file {path} does not exist; pass the path of a .pth/.pt or .safetensors file")
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    if suffix in TORCH_SUFFIXES:
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # pickle errors come in many types; the message is what matters
            raise InputError(
                f"cannot load {path} with torch.load(weights_only=True): {e}. Save plain tensors "
                f"(torch.save(model.state_dict(), path)) or convert the file to .safetensors"
            ) from e
    raise InputError(f"weights file {path} has suffix {suffix!r}; use .pth, .pt, .bin, .ckpt or .safetensors")


def unwrap_state_dict(obj: object, path: str | Path = "<checkpoint>") -> dict[str, torch.Tensor]:
    """Find the tensor dict inside common checkpoint wrappers."""
    for _ in range(3):  # wrappers nest at most a couple of levels (e.g. {"teacher": {"state_dict": ...}})
        if not isinstance(obj, Mapping):
            break
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return dict(obj)
        inner = next((obj[k] for k in WRAPPER_KEYS if k in obj and isinstance(obj[k], Mapping)), None)
        if inner is None:
            break
        obj = inner
    if isinstance(obj, Mapping):
        tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if tensors:
            return tensors
    raise InputError(f"{path} holds no state dict (a mapping of parameter names to tensors)")


def strip_prefixes(
    state: dict[str, torch.Tensor], prefixes: Iterable[str] = COMMON_PREFIXES
) -> dict[str, torch.Tensor]:
    """Remove a prefix shared by every key, repeatedly ('module.model.x' -> 'x')."""
    prefixes = tuple(prefixes)
    changed = True
    while changed and state:
        changed = False
        for prefix in prefixes:
            if all(k.startswith(prefix) for k in state):
                state = {k[len(prefix) :]: v for k, v in state.items()}
                changed = True
    return state


def load_state_dict_file(path: str | Path) -> tuple[dict[str, torch.Tensor], str]:
    """(state dict with common wrappers removed, sha256 of the file)."""
    state = unwrap_state_dict(read_checkpoint(path), path)
    return state, sha256_file(path)


def load_into(
    model: torch.nn.Module,
    state: dict[str, torch.Tensor],
    *,
    path: str | Path,
    ignore_prefixes: Iterable[str] = (),
) -> torch.nn.Module:
    """Load `state` strictly into `model`, dropping keys under `ignore_prefixes` (e.g. the classifier).

    Missing or mismatched keys are an error that lists them: a half-loaded encoder would produce
    plausible but meaningless embeddings. A model built on the meta device (no random init, which
    costs seconds for a ViT-L) gets the file's tensors assigned; returns the loaded model.
    """
    ignore = tuple(ignore_prefixes)
    state = strip_prefixes(state)
    expected = model.state_dict()
    state = {k: v for k, v in state.items() if not (ignore and k.startswith(ignore)) or k in expected}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = sorted(
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in set(state) & set(expected)
        if state[k].shape != expected[k].shape
    )
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys, e.g. {missing[:5]}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys, e.g. {unexpected[:5]}")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatches, e.g. {mismatched[:3]}")
    if problems:
        raise ConfigError(
            f"weights {path} do not fit {type(model).__name__}: " + "; ".join(problems) + ". Check that the "
            "encoder name's architecture matches the checkpoint (e.g. resnet50.file for a ResNet-50 state dict)"
        )
    # Cast to the model's dtypes: a float16 checkpoint must not turn the encoder into a float16 model.
    state = {k: v.to(expected[k].dtype) for k, v in state.items()}
    on_meta = any(t.is_meta for t in expected.values())
    model.load_state_dict(state, strict=True, assign=on_meta)
    return model


def build_without_init(build: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """`build()` on the meta device (skipping random init) when every tensor comes from the state dict.

    Models that create non-persistent buffers in __init__ (relative position indices, rotary tables)
    would keep those on the meta device; for them the model is built normally instead.
    """
    with torch.device("meta"):
        model = build()
    persistent = set(model.state_dict())
    if any(t.is_meta for name, t in model.named_buffers() if name not in persistent):
        return build()
    return model
