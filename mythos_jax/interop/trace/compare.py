"""Two ``StageTrace``s of the same ids compared stage by stage; ``trace_parity`` runs
OpenMythos (PyTorch) and mythos-jax side by side in fp32, or in bf16 against their fp32
selves too."""

from __future__ import annotations

from typing import Any

import numpy as np

from mythos_jax.interop.trace.capture import StageTrace, jax_trace, torch_trace

DTYPES = ("float32", "bfloat16")
DEFAULT_TOLERANCE = {"float32": 1e-5, "bfloat16": 1e-2}   # on the relative difference


def stage_metrics(reference: np.ndarray, other: np.ndarray) -> dict[str, float]:
    """max |other - reference|, ||other - reference|| / ||reference|| and their cosine."""
    ref, oth = reference.astype(np.float64).ravel(), other.astype(np.float64).ravel()
    diff = oth - ref
    ref_norm, oth_norm = np.linalg.norm(ref), np.linalg.norm(oth)
    with np.errstate(invalid="ignore", divide="ignore"):
        relative = np.linalg.norm(diff) / ref_norm if ref_norm > 0 else np.linalg.norm(diff)
        cosine = ref @ oth / (ref_norm * oth_norm) if ref_norm * oth_norm > 0 else 1.0
    return {"max_abs_diff": float(np.max(np.abs(diff))), "rel_diff": float(relative),
            "cosine": float(cosine), "max_abs_ref": float(np.max(np.abs(ref)))}


def topk_agreement(reference_ids: np.ndarray, other_ids: np.ndarray) -> float:
    """Mean over tokens of |chosen by both| / K; ids (..., K) sets."""
    both = (reference_ids[..., :, None] == other_ids[..., None, :]).any(axis=-1)
    return float(np.mean(both))


def halting_loops(halted: np.ndarray) -> np.ndarray:
    """(n, B, T) halted flags after each loop -> (B, T) the loop a position halted at, -1 if
    it never did."""
    first = np.argmax(halted, axis=0)
    return np.where(halted.any(axis=0), first, -1)


def compare(reference: StageTrace, other: StageTrace, tolerance: float) -> dict[str, Any]:
    """One row per stage (in forward order; loops only one side ran are rows with
    ``missing``), the loop rows with the router's top-K agreement, the halted-flag agreement
    and both sides' relative change of h; ``first_over``: the first stage whose relative
    difference exceeds ``tolerance`` (or is not finite), None if none."""
    n = min(reference.loops_run, other.loops_run)
    longer = reference if reference.loops_run >= other.loops_run else other
    rows = []
    for name in longer.stages:
        row: dict[str, Any] = {"stage": name}
        if name not in reference.stages or name not in other.stages:
            row["missing"] = "reference" if name not in reference.stages else "other"
            rows.append(row)
            continue
        row.update(stage_metrics(reference.stages[name], other.stages[name]))
        row["over"] = not row["rel_diff"] <= tolerance
        if name.startswith("loop "):
            t = int(name.split()[1])
            ref, oth = reference.loops, other.loops
            row.update(topk_agreement=topk_agreement(ref["expert_ids"][t], oth["expert_ids"][t]),
                       halted_agreement=float(np.mean(ref["halted"][t] == oth["halted"][t])),
                       halt_p_max_diff=_max_abs_diff(ref["halt_p"][t], oth["halt_p"][t]),
                       act_weight_max_diff=_max_abs_diff(ref["act_weight"][t],
                                                         oth["act_weight"][t]),
                       rho_reference=float(ref["rho"][t]), rho_other=float(oth["rho"][t]),
                       delta_reference=float(np.mean(ref["delta"][t])),
                       delta_other=float(np.mean(oth["delta"][t])))
        rows.append(row)
    first_over = next((r["stage"] for r in rows if r.get("over")), None)
    same_halt = (halting_loops(reference.loops["halted"][:n])
                 == halting_loops(other.loops["halted"][:n]))
    return {"rows": rows, "first_over": first_over, "tolerance": tolerance,
            "halting_agreement": float(np.mean(same_halt)),
            "reference_loops": reference.loops_run, "other_loops": other.loops_run}


def _max_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64))))


def trace_parity(torch_model=None, jax_model=None, ids=None, loops: int | None = None, *,
                 dtype: str = "float32", tolerance: float | None = None, batch: int = 2,
                 seq_len: int | None = None, seed: int = 0) -> dict[str, Any]:
    """OpenMythos and mythos-jax side by side on the same ids (B, T), stage by stage.

    Give either model or both: a live ``open_mythos.main.OpenMythos`` (converted when
    ``jax_model`` is None) and/or a mythos-jax ``OpenMythos`` (converted to PyTorch when
    ``torch_model`` is None). ``ids`` default: ``batch`` x ``seq_len`` (default
    min(16, max_seq_len)) random tokens from ``seed``; ``loops`` default
    ``cfg.max_loop_iters``. The models given are put in eval mode; mythos-jax's fp32 run
    uses fp32 compute whatever its ``cfg.dtype``. ``dtype="bfloat16"`` adds OpenMythos under
    ``torch.autocast`` against mythos-jax's bf16 compute, and each against its fp32 self
    (listed first, the fp32 pair last). Returns a JSON-able dict:
    ``comparisons`` (each: name, ``compare``'s rows, first_over, halting_agreement), ``ok``
    (no stage of the first comparison over ``tolerance``)."""
    from mythos_jax.interop.files import require_openmythos_numerics
    from mythos_jax.interop.openmythos import from_torch, to_torch

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if torch_model is None and jax_model is None:
        raise ValueError("trace_parity needs torch_model, jax_model or both")
    if jax_model is None:
        jax_model = from_torch(torch_model)
    if torch_model is None:
        require_openmythos_numerics(jax_model.cfg)
        torch_model = to_torch(jax_model)
    torch_model.eval()
    cfg = jax_model.cfg
    loops = cfg.max_loop_iters if loops is None else loops
    if ids is None:
        shape = (batch, min(16, cfg.max_seq_len) if seq_len is None else seq_len)
        ids = np.random.default_rng(seed).integers(0, cfg.vocab_size, shape)
    ids = np.asarray(ids)
    tolerance = DEFAULT_TOLERANCE[dtype] if tolerance is None else tolerance
    if cfg.dtype != "float32":                     # its fp32 self: the same parameters
        jax_model = with_compute_dtype(jax_model, "float32")
    torch32, jax32 = torch_trace(torch_model, ids, loops), jax_trace(jax_model, ids, loops)
    fp32 = ("mythos-jax vs OpenMythos, fp32", torch32, jax32,
            tolerance if dtype == "float32" else DEFAULT_TOLERANCE["float32"])
    pairs = [fp32]
    if dtype == "bfloat16":
        torch16 = torch_trace(torch_model, ids, loops, autocast=True)
        jax16 = jax_trace(with_compute_dtype(jax_model, "bfloat16"), ids, loops)
        pairs = [("mythos-jax bf16 vs OpenMythos bf16 (autocast)", torch16, jax16, tolerance),
                 ("OpenMythos bf16 vs its fp32", torch32, torch16, tolerance),
                 ("mythos-jax bf16 vs its fp32", jax32, jax16, tolerance), fp32]
    comparisons = [{"name": name, **compare(ref, other, tol)} for name, ref, other, tol in pairs]
    return {"dtype": dtype, "loops": loops, "ids_shape": list(ids.shape),
            "attn_type": str(cfg.attn_type), "comparisons": comparisons,
            "ok": comparisons[0]["first_over"] is None}


def with_compute_dtype(model, dtype: str):
    """A copy of a mythos-jax model with the same parameters and ``cfg.dtype = dtype``."""
    from flax import nnx

    from mythos_jax.model import OpenMythos

    copy = OpenMythos(model.cfg.replace(dtype=dtype), rngs=nnx.Rngs(0))
    nnx.update(copy, nnx.state(model))
    return copy
