"""Weights and configs between mythos-jax and OpenMythos (PyTorch, ``open-mythos==0.5.0``).

    model = from_torch(torch_model)                 # a live open_mythos.main.OpenMythos
    model = load_state_dict(cfg, state_dict)        # torch state_dict -> OpenMythos (JAX)
    sd = to_torch_state_dict(model)                 # loads into open_mythos OpenMythos(strict=True)
    torch_model = to_torch(model)                   # that OpenMythos, loaded, in eval mode

Files (``.pt`` read safely, ``.safetensors``) are ``mythos_jax.interop.files``.

Naming: the JAX parameter tree mirrors torch's module names, so one rule per leaf suffices:
a Linear ``X.weight`` (out, in) is the kernel ``X.kernel`` (in, out); the routed experts
``ffn.routed_experts.{e}.{gate,up,down}.weight`` are slices of the stacked ``ffn.{gate,up,down}``
kernels (E, in, out); ``embed.weight`` and ``lora.scale.weight`` are the plain arrays ``embed`` and
``lora.scale``; everything else keeps its name. ``head.weight`` is tied to ``embed.weight``; the
RoPE buffers ``freqs_cis``/``freqs_cis_mla`` are derived from the config (checked for shape only).
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import sys
import types
from typing import Any, Iterator

import jax
import numpy as np
from flax import nnx

from mythos_jax.config import MythosConfig
from mythos_jax.model import OpenMythos
from mythos_jax.moe.router import RouterBias

OPENMYTHOS_FIELDS = tuple(f.name for f in dataclasses.fields(MythosConfig))[
    : [f.name for f in dataclasses.fields(MythosConfig)].index("dropout") + 1]
_EXPERT_KERNELS = ("gate", "up", "down")


# ---------------------------------------------------------------------------- reference module
def import_reference() -> types.ModuleType:
    """``open_mythos.main`` from the installed open-mythos wheel.

    The wheel's package ``__init__`` imports its tokenizer, which needs ``transformers``. When
    that import fails, ``main.py`` is loaded on its own and registered as ``open_mythos.main``
    (under a bare ``open_mythos`` package) so that pickled checkpoints that name its classes
    still load.
    """
    try:
        return importlib.import_module("open_mythos.main")
    except ModuleNotFoundError as err:
        if err.name == "open_mythos":
            raise ImportError("open-mythos is not installed: pip install --no-deps "
                              "open-mythos==0.5.0 (and torch)") from err
    spec = importlib.util.find_spec("open_mythos")
    package = types.ModuleType("open_mythos")
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules["open_mythos"] = package
    main_spec = importlib.util.spec_from_file_location(
        "open_mythos.main", f"{package.__path__[0]}/main.py")
    main = importlib.util.module_from_spec(main_spec)
    sys.modules["open_mythos.main"] = main
    main_spec.loader.exec_module(main)
    package.main = main
    return main


def config_from_torch(torch_cfg: Any) -> MythosConfig:
    """An ``open_mythos.main.MythosConfig`` (or a dict of its fields) -> MythosConfig."""
    fields = torch_cfg if isinstance(torch_cfg, dict) else dataclasses.asdict(torch_cfg)
    return MythosConfig.from_dict(fields)


def config_to_torch(cfg: MythosConfig) -> Any:
    """MythosConfig -> ``open_mythos.main.MythosConfig`` (OpenMythos fields only)."""
    return import_reference().MythosConfig(**openmythos_fields(cfg))


def openmythos_fields(cfg: MythosConfig) -> dict[str, Any]:
    """The fields of ``cfg`` that ``open_mythos.main.MythosConfig`` has, as plain values
    (modes as their names: a saved PyTorch config must not need mythos-jax to load)."""
    fields = cfg.to_dict()
    return {k: fields[k] for k in OPENMYTHOS_FIELDS}


# ---------------------------------------------------------------------------- the naming rule
@dataclasses.dataclass(frozen=True)
class _Leaf:
    """One JAX array and the torch tensor(s) it corresponds to."""
    path: tuple                 # key path in nnx.to_pure_dict(state)
    torch_keys: tuple[str, ...]  # one key, or E keys for stacked routed experts
    layout: str                 # "same" | "transpose" | "stacked_transpose"


def _leaves(pure: dict) -> Iterator[_Leaf]:
    for key_path, value in jax.tree_util.tree_flatten_with_path(pure)[0]:
        path = tuple(getattr(k, "key", getattr(k, "idx", None)) for k in key_path)
        yield _leaf_rule(path, tuple(str(k) for k in path), value.shape)


def _leaf_rule(path: tuple, names: tuple[str, ...], shape: tuple[int, ...]) -> _Leaf:
    if names[-1] == "kernel":
        return _Leaf(path, (".".join(names[:-1] + ("weight",)),), "transpose")
    if names[-1] in _EXPERT_KERNELS and names[-2] == "ffn" and names[0] == "recurrent":
        prefix = ".".join(names[:-1])
        keys = tuple(f"{prefix}.routed_experts.{e}.{names[-1]}.weight" for e in range(shape[0]))
        return _Leaf(path, keys, "stacked_transpose")
    if names in (("embed",), ("recurrent", "lora", "scale")):
        return _Leaf(path, (".".join(names) + ".weight",), "same")
    return _Leaf(path, (".".join(names),), "same")


def _get(tree: dict, path: tuple):
    for key in path:
        tree = tree[key]
    return tree


def _set(tree: dict, path: tuple, value) -> None:
    for key in path[:-1]:
        tree = tree[key]
    tree[path[-1]] = value


def _torch_shapes(leaf: _Leaf, shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    if leaf.layout == "same":
        return [tuple(shape)]
    if leaf.layout == "transpose":
        return [tuple(reversed(shape))]
    return [tuple(reversed(shape[1:]))] * shape[0]


def _weight_state(model: OpenMythos) -> nnx.State:
    """The variables that hold weights: parameters and the router-bias buffer."""
    return nnx.state(model, nnx.Any(nnx.Param, RouterBias))


def _rope_buffer_shapes(cfg: MythosConfig) -> dict[str, tuple[int, int]]:
    return {"freqs_cis": (cfg.max_seq_len, cfg.head_dim // 2),
            "freqs_cis_mla": (cfg.max_seq_len, cfg.qk_rope_head_dim // 2)}


# ---------------------------------------------------------------------------- torch -> JAX
def load_state_dict(cfg: MythosConfig, state_dict: dict, *, seed: int = 0) -> OpenMythos:
    """Build an OpenMythos (JAX) from an OpenMythos torch ``state_dict``.

    Missing, unexpected and mis-shaped keys are all reported in one ``ValueError``.
    ``seed`` only seeds the dropout stream (weights all come from ``state_dict``).
    """
    _require_openmythos_weights(cfg)
    model = OpenMythos(cfg, rngs=nnx.Rngs(seed))
    state = _weight_state(model)
    pure = nnx.to_pure_dict(state)
    expected: dict[str, tuple[int, ...]] = {}
    leaves = list(_leaves(pure))
    for leaf in leaves:
        shape = _get(pure, leaf.path).shape
        expected.update(zip(leaf.torch_keys, _torch_shapes(leaf, shape)))
    expected["head.weight"] = expected["embed.weight"]
    expected.update(_rope_buffer_shapes(cfg))

    problems = [f"missing key {k!r} (expected shape {s})" for k, s in expected.items()
                if k not in state_dict]
    problems += [f"unexpected key {k!r}" for k in state_dict if k not in expected]
    problems += [f"key {k!r} has shape {tuple(state_dict[k].shape)}, expected {s}"
                 for k, s in expected.items()
                 if k in state_dict and tuple(state_dict[k].shape) != s]
    if not problems and not _same_tensor_values(state_dict["head.weight"],
                                                state_dict["embed.weight"]):
        problems.append("head.weight differs from embed.weight (OpenMythos ties them)")
    if problems:
        raise ValueError(f"state_dict does not match MythosConfig ({len(problems)} problem(s)):\n  "
                         + "\n  ".join(problems))

    for leaf in leaves:
        arrays = [_to_numpy(state_dict[k]) for k in leaf.torch_keys]
        if leaf.layout == "same":
            value = arrays[0]
        elif leaf.layout == "transpose":
            value = arrays[0].T
        else:
            value = np.stack([a.T for a in arrays])
        _set(pure, leaf.path, jax.numpy.asarray(value, dtype=jax.numpy.float32))
    nnx.replace_by_pure_dict(state, pure)
    nnx.update(model, state)
    return model


def from_torch(torch_model: Any) -> OpenMythos:
    """Convert a live ``open_mythos.main.OpenMythos`` (config and weights); anything else
    raises ``TypeError`` naming its type."""
    reference = import_reference().OpenMythos
    if not isinstance(torch_model, reference):
        raise TypeError(f"from_torch expects an open_mythos.main.OpenMythos module, got "
                        f"{type(torch_model).__module__}.{type(torch_model).__qualname__}")
    return load_state_dict(config_from_torch(torch_model.cfg), torch_model.state_dict())


# ---------------------------------------------------------------------------- JAX -> torch
def to_torch_state_dict(model: OpenMythos) -> dict:
    """A state_dict that ``open_mythos.main.OpenMythos(cfg).load_state_dict(sd, strict=True)``
    accepts. ``head.weight`` shares storage with ``embed.weight`` as in torch."""
    import torch

    _require_openmythos_weights(model.cfg)
    pure = nnx.to_pure_dict(_weight_state(model))
    state_dict: dict[str, torch.Tensor] = {}
    for leaf in _leaves(pure):
        value = np.asarray(_get(pure, leaf.path))
        if leaf.layout == "same":
            tensors = [value]
        elif leaf.layout == "transpose":
            tensors = [value.T]
        else:
            tensors = [expert.T for expert in value]
        for key, tensor in zip(leaf.torch_keys, tensors):
            state_dict[key] = torch.from_numpy(np.array(tensor, order="C", copy=True))
    state_dict["head.weight"] = state_dict["embed.weight"]
    cfg = model.cfg
    state_dict["freqs_cis"] = _torch_rope_table(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
    state_dict["freqs_cis_mla"] = _torch_rope_table(cfg.qk_rope_head_dim, cfg.max_seq_len,
                                                    cfg.rope_theta)
    return state_dict


def to_torch(model: OpenMythos) -> Any:
    """A live ``open_mythos.main.OpenMythos`` in eval mode with ``model``'s weights (strict)."""
    torch_model = import_reference().OpenMythos(config_to_torch(model.cfg))
    torch_model.load_state_dict(to_torch_state_dict(model), strict=True)
    return torch_model.eval()


def _torch_rope_table(dim: int, max_len: int, theta: float):
    """OpenMythos's ``precompute_rope_freqs`` (complex64 (max_len, dim/2)), same torch ops."""
    import torch

    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    angles = torch.outer(torch.arange(max_len, dtype=torch.float32), freqs)
    return torch.polar(torch.ones_like(angles), angles)


def _require_openmythos_weights(cfg: MythosConfig) -> None:
    if not cfg.has_openmythos_weights:
        raise ValueError("this MythosConfig has parameters or math OpenMythos does not have "
                         f"(injection={cfg.injection!r}, prelude_norm={cfg.prelude_norm}, "
                         f"readout={cfg.readout}, loop_embed_scale={cfg.loop_embed_scale}, "
                         f"positions={cfg.positions!r}); only injection='openmythos' without "
                         "prelude_norm/readout, loop_embed_scale=1.0 and positions='rope' "
                         "(OpenMythos has RoPE in every layer) converts to or from PyTorch")


def _to_numpy(tensor) -> np.ndarray:
    """A torch tensor or a numpy array (safetensors) as float32 numpy."""
    if isinstance(tensor, np.ndarray):
        return tensor.astype(np.float32, copy=False)
    return tensor.detach().to("cpu").float().numpy()


def _same_tensor_values(a, b) -> bool:
    return a.shape == b.shape and bool((a == b).all())
