"""Training run folders, shared by every trainer (attention heads, cell classifier, detector).

A run folder holds ``run.json`` (a fingerprint of everything that decides the weights, and the config),
``checkpoints/last.ckpt`` and ``best.ckpt`` (written atomically by ``write_checkpoint``) and ``finished.json``.
``prepare_run_dir`` tells a trainer whether to reuse a finished run, resume from ``last.ckpt`` or start afresh;
``epoch_seed`` gives the per-(seed, epoch) random streams that make a resumed epoch replay exactly
(RELIABILITY promise 2); a checkpoint written inside an epoch keeps ``global_rng_state()`` to go on from there.
Nothing here imports Lightning.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

from mil.atomic import atomic_torch_save, atomic_write_text
from mil.errors import InputError

CHECKPOINT_DIR = "checkpoints"
# Config fields that never change the weights: a rerun that only changes them still resumes.
NOT_FINGERPRINTED = ("verbose", "resume", "enable_progress_bar", "wandb", "wandb_project")
RUN_FILE = "run.json"
FINISHED_FILE = "finished.json"


def run_digest(settings: dict, initial) -> hashlib._Hash:
    """A sha256 started with what every trainer's run fingerprint holds: ``settings`` (JSON, sorted keys) and the
    initial weights of the module ``initial``. The trainer adds its training data and takes ``hexdigest()``."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    for key, tensor in initial.state_dict().items():
        digest.update(key.encode())
        digest.update(tensor.detach().cpu().numpy().tobytes())
    return digest


def weight_settings(config) -> dict:
    """A config dataclass as a dict, without the fields in NOT_FINGERPRINTED."""
    return {k: v for k, v in asdict(config).items() if k not in NOT_FINGERPRINTED}


def prepare_run_dir(run_dir: Path, fingerprint: str, config) -> str:
    """The state of a training run folder for this run: 'finished' (reuse it), 'resume' (continue from
    last.ckpt) or 'fresh'. ``fingerprint`` hashes everything that decides the weights; a folder holding another
    fingerprint (or ``config.resume`` False) has its stale checkpoints removed. ``config`` needs ``resume`` and
    ``to_dict()``; run.json records both."""
    run_file, ckpt_dir = run_dir / RUN_FILE, run_dir / CHECKPOINT_DIR
    previous = json.loads(run_file.read_text()) if run_file.exists() else None
    same = config.resume and previous is not None and previous.get("fingerprint") == fingerprint
    if same and (run_dir / FINISHED_FILE).exists() and (ckpt_dir / "last.ckpt").exists():
        return "finished"
    if not same:
        for stale in [run_dir / FINISHED_FILE, *ckpt_dir.glob("*.ckpt"), *(run_dir / "csv").glob("*")]:
            stale.unlink(missing_ok=True)
    atomic_write_text(run_file, json.dumps({"fingerprint": fingerprint, "config": config.to_dict()}, indent=2))
    return "resume" if same and (ckpt_dir / "last.ckpt").exists() else "fresh"


def write_checkpoint(path: str | Path, checkpoint: dict) -> None:
    """Atomic write of a checkpoint dict, re-read with weights_only=True before the rename (RELIABILITY 1, 6)."""
    import torch

    Path(path).parent.mkdir(parents=True, exist_ok=True)

    def readable(tmp) -> None:
        torch.load(tmp, map_location="cpu", weights_only=True)

    atomic_torch_save(checkpoint, path, readable)


def load_checkpoint(path: str | Path, *, what: str, fix: str, map_location="cpu"):
    """``torch.load(path, weights_only=True)`` whose every failure is an InputError naming ``what`` (e.g. "head
    bundle"), the file and ``fix``: a file holding pickled Python objects is refused without running them
    (RELIABILITY 6), and a truncated or foreign file says so; no UnpicklingError traceback. torch's own message is
    not passed on: it suggests ``weights_only=False``, which would run whatever the file holds."""
    import pickle
    import warnings

    import torch

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{what} {path} does not exist; {fix}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Detected pickle protocol 4": the refusal below says it better
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        lines = [line.strip() for line in str(e).splitlines()]
        detail = next((line for line in lines if line.startswith(("Trying to load", "Unsupported"))), "")
        raise InputError(
            f"{what} {path} is no file of tensors and plain values (it holds other pickled Python objects, or is "
            f"no torch file) and was refused unread{f' ({detail})' if detail else ''}: nothing untrusted is "
            f"unpickled. {fix[0].upper()}{fix[1:]}"
        ) from None
    except Exception as e:  # truncated archive, a text file, another format: torch raises many types
        raise InputError(f"{what} {path} is not a readable checkpoint ({type(e).__name__}); {fix}") from None


def epoch_seed(seed: int, epoch: int, stream: int) -> int:
    """One seed per (run seed, epoch, stream): stream 0 orders the data, stream 1 drives dropout (and any other
    draw from torch's global generator). Nothing random then depends on how many epochs this process has run."""
    return seed * 1_000_003 + epoch * 7919 + stream * 104_729


def global_rng_state() -> dict:
    """torch's global RNG states (CPU, and every CUDA device once CUDA is in use): what dropout and other draws
    of the next training step depend on. Saved by a checkpoint written inside an epoch."""
    import torch

    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_global_rng_state(state: dict) -> None:
    import torch

    torch.set_rng_state(state["cpu"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
