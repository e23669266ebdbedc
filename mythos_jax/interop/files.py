"""OpenMythos weight files: ``.pt`` (read without running code from it) and ``.safetensors``.

    model = load_openmythos_file("step_0001000.pt")     # or "model.safetensors"
    save_openmythos_file(model, "exported.pt")           # or "exported.safetensors"

A ``.pt`` is OpenMythos's training-script payload ``{"step", "model", "optimizer", "cfg",
"vocab_size"}``. It is read with ``torch.load(weights_only=True)``, allowing only tensors,
plain containers and ``open_mythos.main.MythosConfig``: a pickle that names anything else
(``os.system``...) is refused before it is unpickled. A ``.safetensors`` file holds the
OpenMythos ``state_dict`` (``head.weight`` stored beside ``embed.weight``) with the OpenMythos
config as JSON in the metadata key ``mythos_config``; it is read without torch.
"""

from __future__ import annotations

import json
import re

from mythos_jax.interop.openmythos import (config_from_torch, config_to_torch,
                                           import_reference, load_state_dict,
                                           openmythos_fields, to_torch_state_dict)
from mythos_jax.config import MythosConfig
from mythos_jax.model import OpenMythos
from mythos_jax.modes import ACTMode

TORCH_SUFFIXES = (".pt", ".pth")
SAFETENSORS_SUFFIX = ".safetensors"
CONFIG_METADATA_KEY = "mythos_config"
ALLOWED_GLOBALS = ("open_mythos.main.MythosConfig",)


def is_openmythos_file(path: str) -> bool:
    """Whether ``path`` names an OpenMythos weight file by its suffix."""
    return str(path).endswith(TORCH_SUFFIXES + (SAFETENSORS_SUFFIX,))


def load_openmythos_file(path: str) -> OpenMythos:
    """A ``.pt``/``.pth`` or ``.safetensors`` OpenMythos checkpoint -> OpenMythos (JAX).
    ``ValueError`` naming ``path`` for a file that is not one (or that needs code to load)."""
    path = str(path)
    if path.endswith(SAFETENSORS_SUFFIX):
        return _load_safetensors(path)
    payload = _safe_torch_load(path)
    if not isinstance(payload, dict) or "model" not in payload or "cfg" not in payload:
        keys = sorted(payload) if isinstance(payload, dict) else type(payload).__name__
        raise ValueError(f"{path}: expected an OpenMythos checkpoint dict with 'model' and "
                         f"'cfg', got {keys}")
    return _with_path(path, lambda: load_state_dict(config_from_torch(payload["cfg"]),
                                                    payload["model"]))


def save_openmythos_file(model: OpenMythos, path: str) -> None:
    """Write ``model`` as OpenMythos weights; the suffix picks the format. A ``.pt`` holds
    ``{"step": 0, "model", "cfg", "vocab_size"}`` (no optimizer state). A model whose
    options change OpenMythos's logits (parameters it lacks, another ACT read-out) raises
    ``ValueError`` naming them."""
    require_openmythos_numerics(model.cfg)
    torch = _import_torch(path)
    state_dict = to_torch_state_dict(model)
    if str(path).endswith(SAFETENSORS_SUFFIX):
        from safetensors.numpy import save_file

        config = json.dumps(openmythos_fields(model.cfg), sort_keys=True)
        save_file({k: v.numpy() for k, v in state_dict.items()}, path,
                  metadata={CONFIG_METADATA_KEY: config})
        return
    torch.save({"step": 0, "model": state_dict, "cfg": config_to_torch(model.cfg),
                "vocab_size": model.cfg.vocab_size}, path)


def require_openmythos_numerics(cfg: MythosConfig) -> None:
    """``ValueError`` naming what makes OpenMythos compute other logits from these weights
    (parameters it lacks: ``to_torch_state_dict`` names those)."""
    if cfg.act != ACTMode.OPENMYTHOS:
        raise ValueError(f"this model reads out the loop with act={cfg.act!r}, OpenMythos with "
                         "its ACT-weighted sum: PyTorch would compute other logits (train "
                         "with model.act=openmythos, or take the weights alone from "
                         "mythos_jax.interop.openmythos.to_torch_state_dict)")


def _safe_torch_load(path: str):
    """``torch.load(weights_only=True)`` allowing OpenMythos's MythosConfig and no other
    class or function; what the pickle asks for beyond that is named in the ValueError."""
    import pickle

    torch = _import_torch(path)
    config_class = import_reference().MythosConfig
    try:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:       # not a zip checkpoint: torch.load below reports what it finds
        unsafe = []
    refused = [name for name in unsafe if name not in ALLOWED_GLOBALS]
    if not refused:
        try:
            with torch.serialization.safe_globals([config_class]):
                return torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError) as err:  # foreign/broken
            refused = re.findall(r"GLOBAL (\S+)", str(err))
            if not refused:
                raise ValueError(f"{path}: cannot read as an OpenMythos checkpoint "
                                 f"({_first_line(err)})") from None
    raise ValueError(f"{path}: refusing to load: it needs {', '.join(refused)}, which an "
                     "OpenMythos checkpoint does not contain (only tensors, containers and "
                     "open_mythos.main.MythosConfig are allowed, so nothing in it can run)")


def _load_safetensors(path: str) -> OpenMythos:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="np") as f:
            metadata = f.metadata() or {}
            state_dict = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path}: cannot read as a safetensors file ({err})") from None
    if CONFIG_METADATA_KEY not in metadata:
        raise ValueError(f"{path}: no {CONFIG_METADATA_KEY!r} in the safetensors metadata "
                         "(write the file with `mythos-jax convert ... out.safetensors`)")
    try:
        fields = json.loads(metadata[CONFIG_METADATA_KEY])
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: metadata {CONFIG_METADATA_KEY!r} is not JSON: {err}") from None
    return _with_path(path, lambda: load_state_dict(config_from_torch(fields), state_dict))


def _import_torch(path: str):
    try:
        import torch
    except ImportError as err:
        raise ImportError(f"{path}: OpenMythos weight files need torch (pip install torch): "
                          f"{err}") from err
    return torch


def _with_path(path: str, build):
    """``build()``, with ``path`` prefixed to a ValueError (config or state_dict mismatch)."""
    try:
        return build()
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from err


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[0] if lines else ''}"
