"""DeepSpeed checkpoints that load with `weights_only=True`, the `latest` pointer, and pruning.

`latest` is written by us, atomically, after a barrier that follows every rank's writes: a run
that crashed mid-save resumes from the previous, complete checkpoint. Besides DeepSpeed's files a
step directory holds `model.safetensors` (the full model, gathered even under ZeRO-3, for eval and
export without DeepSpeed) and `rng_rank{R}.pt` (each rank's random generators).
"""

from __future__ import annotations

import os
import pickle
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np

import torch

from navit_clip.errors import CheckpointError, InputError, MissingInputError
from navit_clip.train.manifest import checkpoint_problem, has_manifest


def deepspeed_safe_globals() -> list[type]:
    """The plain-data DeepSpeed classes pickled into ZeRO optimizer shards; only these (besides
    tensors and builtins) may be rebuilt when a checkpoint is loaded."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def safe_checkpoint_engine(config_params: Any):
    """DeepSpeed's torch checkpoint engine, but loading refuses to unpickle arbitrary objects.
    DeepSpeed is imported here, not with this module: eval and export read checkpoints without it."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class SafeCheckpointEngine(TorchCheckpointEngine):
        """Also remembers the files this rank saved, for the checkpoint's manifest."""

        def __init__(self, config_params: Any = None) -> None:
            super().__init__(config_params)
            self.written: list[str] = []

        def save(self, state_dict, path: str) -> None:  # noqa: ANN001 - DeepSpeed's signature
            self.written.append(str(path))
            super().save(state_dict, path)

        def load(self, path: str, map_location=None):  # noqa: ANN001 - DeepSpeed's signature
            return safe_load(path, map_location)

        def take_written(self) -> list[str]:
            """The files saved since the last call."""
            written, self.written = self.written, []
            return written

    return SafeCheckpointEngine(config_params=config_params)


_torch_load = torch.load  # torch's own, also while train/universal.py routes torch.load here


def safe_load(path: str | Path, map_location: Any = None, **options: Any) -> Any:
    """torch.load with weights_only=True; DeepSpeed's plain-data classes are allowed (importing
    DeepSpeed) only for a file that holds them, such as a ZeRO optimizer shard."""
    try:
        return _torch_load(path, map_location=map_location, weights_only=True, **options)
    except pickle.UnpicklingError:
        with torch.serialization.safe_globals(deepspeed_safe_globals()):
            return _torch_load(path, map_location=map_location, weights_only=True, **options)


def step_tag(step: int) -> str:
    """The checkpoint directory name of a training step."""
    return f"step{step}"


def tag_step(tag: str) -> int | None:
    """The step a checkpoint directory name stands for, or None if it is not a step tag."""
    return int(tag[4:]) if tag.startswith("step") and tag[4:].isdigit() else None


def write_latest(ckpt_dir: str | Path, tag: str) -> None:
    """Point `latest` at tag atomically: a crash leaves either the old or the new pointer."""
    ckpt_dir = Path(ckpt_dir)
    tmp = ckpt_dir / "latest.tmp"
    with open(tmp, "w") as f:
        f.write(tag)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, ckpt_dir / "latest")


def latest_tag(ckpt_dir: str | Path) -> str | None:
    """The tag of the last complete checkpoint in ckpt_dir, or None."""
    latest = Path(ckpt_dir) / "latest"
    if not latest.exists():
        return None
    tag = latest.read_text().strip()
    if not tag:
        raise InputError(f"{latest} is empty; write the name of a complete checkpoint directory (stepN) into it")
    if not (Path(ckpt_dir) / tag).is_dir():
        raise MissingInputError(f"{latest} names checkpoint {tag!r}, which is missing from {ckpt_dir}")
    return tag


def prune_checkpoints(ckpt_dir: str | Path, keep: int) -> list[str]:
    """Delete all but the `keep` newest complete checkpoints (those up to the one `latest` names).
    Directories newer than `latest` are a crashed save's leftovers; the next save of that step
    overwrites them, so they are neither counted nor deleted here."""
    ckpt_dir = Path(ckpt_dir)
    current = latest_tag(ckpt_dir)
    current_step = tag_step(current) if current is not None else None
    if current_step is None:
        return []
    complete = sorted((p for p in ckpt_dir.glob("step*")
                       if p.is_dir() and tag_step(p.name) is not None and tag_step(p.name) <= current_step),
                      key=lambda p: tag_step(p.name))
    removed = []
    for path in complete[:-keep]:
        shutil.rmtree(path)
        removed.append(path.name)
    return removed


MODEL_FILE = "model.safetensors"


def consolidated_state_dict(engine, stage: int) -> dict[str, torch.Tensor] | None:
    """The full model's weights (float32, on the CPU) on rank 0, None elsewhere. Under ZeRO-3 every
    rank must call this: parameters are gathered one at a time, so no rank ever holds more than
    one whole parameter beyond its own partition."""
    from navit_clip import dist

    module = engine.module
    state = module.state_dict() if dist.is_main() or stage == 3 else None
    if stage == 3:
        from deepspeed.runtime.zero import GatheredParameters

        for name, param in module.named_parameters():
            with GatheredParameters([param], modifier_rank=None):
                if dist.is_main():
                    state[name] = param.detach().clone()
    if not dist.is_main():
        return None
    return {k: (v.float() if v.is_floating_point() else v).detach().cpu().contiguous().clone()
            for k, v in state.items()}


def new_file_mode() -> int:
    """The mode `open()` gives a new file (0o666 less the umask), read without changing the umask."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except OSError:
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def save_model_file(engine, tag_dir: Path, stage: int) -> str | None:
    """Write tag_dir/model.safetensors from rank 0 (atomically: a temporary file, then rename) with
    the permissions of the other checkpoint files (safetensors creates its file 0600) -> its name
    on rank 0, None elsewhere."""
    from safetensors.torch import save_file

    state = consolidated_state_dict(engine, stage)
    if state is None:
        return None
    tag_dir.mkdir(parents=True, exist_ok=True)
    tmp = tag_dir / (MODEL_FILE + ".tmp")
    save_file(state, str(tmp))
    os.chmod(tmp, new_file_mode())
    os.replace(tmp, tag_dir / MODEL_FILE)
    return MODEL_FILE


def rng_state() -> dict[str, Any]:
    """This process's random generators as plain tensors and lists (loadable with weights_only)."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {"torch": torch.get_rng_state(), "numpy": [torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
             "python": [version, list(internal), gauss_next]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_rng_state(tag_dir: Path, rank: int) -> str:
    """Write this rank's generators -> the file's name."""
    tag_dir.mkdir(parents=True, exist_ok=True)
    tmp = tag_dir / f"rng_rank{rank}.pt.tmp"
    torch.save(rng_state(), tmp)
    os.replace(tmp, tag_dir / f"rng_rank{rank}.pt")
    return f"rng_rank{rank}.pt"


def load_rng_state(tag_dir: Path, rank: int) -> bool:
    """Restore this rank's generators; False if the checkpoint has none for it (an older one)."""
    path = tag_dir / f"rng_rank{rank}.pt"
    if not path.exists():
        return False
    set_rng_state(torch.load(path, map_location="cpu", weights_only=True))
    return True


def load_model_state(ckpt_dir: str | Path, tag: str | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """Model weights and client state (step, data position, config) of a checkpoint, loaded with
    safetensors / weights_only=True. The weights come from model.safetensors (any ZeRO stage); a
    checkpoint without it (written before that file existed) falls back to rank 0's DeepSpeed
    file, which holds the full module for ZeRO stages 0-2 only."""
    ckpt_dir = Path(ckpt_dir)
    tag = tag or latest_tag(ckpt_dir)
    if tag is None:
        raise MissingInputError(f"no complete checkpoint in {ckpt_dir} (no 'latest' file)")
    # rank 0's DeepSpeed file carries the client state; ZeRO-3 names it per data-parallel rank
    names = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")
    path = next((ckpt_dir / tag / n for n in names if (ckpt_dir / tag / n).exists()), None)
    if path is None:
        raise MissingInputError(f"checkpoint {tag} in {ckpt_dir} has neither {' nor '.join(names)}")
    model_file = ckpt_dir / tag / MODEL_FILE
    if has_manifest(ckpt_dir / tag):
        problem = checkpoint_problem(ckpt_dir / tag, only=(path.name, MODEL_FILE))
        if problem:
            raise CheckpointError(f"checkpoint {tag} is damaged: {problem}; choose an earlier one with --tag stepN")
    state = safe_load(path, map_location="cpu")
    client = {k: state[k] for k in ("step", "data", "config") if k in state}
    if model_file.exists():
        from safetensors.torch import load_file

        return load_file(str(model_file)), client
    if path.name != names[0]:
        raise MissingInputError(f"checkpoint {tag} in {ckpt_dir} is a ZeRO-3 checkpoint without {MODEL_FILE}")
    return state["module"], client


def load_trained_model(run_dir: str | Path, tag: str | None = None):
    """-> (NaViTCLIP in eval mode, Config, step) from a training run directory."""
    from navit_clip.config import Config, config_from_dict
    from navit_clip.data.text import CLIP_BPE, TOKENIZER_FILE
    from navit_clip.model.clip import NaViTCLIP

    ckpt_dir = Path(run_dir) / "checkpoints"
    weights, client = load_model_state(ckpt_dir, tag)
    if "config" not in client:
        raise InputError(f"checkpoint in {ckpt_dir} carries no navit-clip config")
    cfg = config_from_dict(Config, client["config"]).validate()
    kept = Path(run_dir) / TOKENIZER_FILE
    if cfg.model.text.tokenizer != CLIP_BPE and kept.exists():  # the run's copy, wherever the run lies now
        cfg.model.text.tokenizer = str(kept.absolute())
    model = NaViTCLIP(cfg.model)
    model.load_state_dict(weights, strict=True)
    return model.eval(), cfg, int(client.get("step", 0))
