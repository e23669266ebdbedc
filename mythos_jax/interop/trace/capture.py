"""One forward, stage by stage, from either implementation, as NumPy fp32 (a ``StageTrace``).

``torch_trace`` reads OpenMythos (PyTorch) through forward hooks on its modules (``embed``,
``prelude.i``, ``recurrent.injection`` (h_t), ``recurrent.act`` (p_t),
``recurrent.block.ffn.router``, ``recurrent`` (the ACT sum), ``coda.i``, ``head``); nothing
of OpenMythos is modified. ``jax_trace`` is mythos-jax's traced forward (``trace=True``).
"""

from __future__ import annotations

import collections
import dataclasses

import numpy as np
from flax import nnx

LOOP_FIELDS = ("halt_p", "act_weight", "halted", "expert_ids", "expert_weights", "rho", "delta")


@dataclasses.dataclass
class StageTrace:
    """``stages``: name -> output in forward order: "embed", "prelude i", "loop t" (h after
    iteration t = 0..), "recurrent" (the ACT sum), "coda i" (B, T, D), "logits" (B, T, V).
    ``loops``: per iteration run (n, ...): halt_p, act_weight (B, T) fp32, halted (B, T) bool,
    expert_ids (B, T, K) sorted, expert_weights (B, T, K) in the same order, rho (n,),
    delta (n, B) ||h_t - h_{t-1}|| / ||h_t||."""
    stages: dict[str, np.ndarray]
    loops: dict[str, np.ndarray]

    @property
    def loops_run(self) -> int:
        return len(self.loops["rho"])


@nnx.jit(static_argnums=2)
def _traced_forward(model, ids, loops: int):
    return model(ids, loops, trace=True)


def jax_trace(model, ids: np.ndarray, loops: int) -> StageTrace:
    """mythos-jax's traced forward of ``ids`` (B, T) at ``loops`` (jitted once per model
    structure, shape and count; eval mode)."""
    model.eval()
    out = _traced_forward(model, np.asarray(ids, np.int32), loops)
    stages = {"embed": out.embed,
              **{f"prelude {i}": x for i, x in enumerate(out.prelude)},
              **{f"loop {t}": out.loops.h[t] for t in range(loops)},
              "recurrent": out.recurrent,
              **{f"coda {i}": x for i, x in enumerate(out.coda)},
              "logits": out.logits}
    records = {name: np.asarray(getattr(out.loops, name)) for name in LOOP_FIELDS}
    records["expert_ids"], records["expert_weights"] = _sorted_choices(
        records["expert_ids"], records["expert_weights"])
    return StageTrace({k: np.asarray(v, np.float32) for k, v in stages.items()}, records)


def torch_trace(model, ids: np.ndarray, loops: int, autocast: bool = False) -> StageTrace:
    """OpenMythos's forward of ``ids`` (B, T) at ``loops`` through forward hooks; under
    ``torch.autocast("cpu", bfloat16)`` with ``autocast``. OpenMythos stops early once every
    position halted (without a cache), so the trace's ``loops_run`` may be fewer."""
    import torch

    recurrent = model.recurrent
    prelude = [f"prelude {i}" for i in range(len(model.prelude))]
    coda = [f"coda {i}" for i in range(len(model.coda))]
    hooked = [("embed", model.embed), *zip(prelude, model.prelude), ("h", recurrent.injection),
              ("halt_p", recurrent.act), ("router", recurrent.block.ffn.router),
              ("recurrent", recurrent), *zip(coda, model.coda), ("logits", model.head)]
    seen = collections.defaultdict(list)

    def keep(name):
        return lambda module, inputs, output: seen[name].append(output.detach().float().numpy())

    handles = [module.register_forward_hook(keep(name)) for name, module in hooked]
    try:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            model(torch.as_tensor(np.asarray(ids, np.int64)), n_loops=loops)
            rho = float(recurrent.injection.get_A().abs().max())
    finally:
        for handle in handles:
            handle.remove()
    hs = seen["h"]
    stages = {name: seen[name][0] for name in ["embed", *prelude]}
    stages.update({f"loop {t}": h for t, h in enumerate(hs)})
    stages.update({name: seen[name][0] for name in ["recurrent", *coda, "logits"]})
    e = stages[(["embed"] + prelude)[-1]]                        # h_0, the loop's input
    records = _act_bookkeeping(np.stack(seen["halt_p"]), model.cfg.act_threshold)
    B, T = records["halt_p"].shape[1:]
    bias = recurrent.block.ffn.router_bias.detach().float().numpy()
    chosen, weights = _route(np.stack(seen["router"]), bias, model.cfg.n_experts_per_tok)
    records["expert_ids"], records["expert_weights"] = _sorted_choices(
        chosen.reshape(len(hs), B, T, -1), weights.reshape(len(hs), B, T, -1))
    records["rho"] = np.full((len(hs),), rho, np.float32)
    records["delta"] = np.stack([_relative_change(h, prev)
                                 for h, prev in zip(hs, [e] + hs[:-1])])
    return StageTrace(stages, records)


def _act_bookkeeping(halt_p: np.ndarray, threshold: float) -> dict[str, np.ndarray]:
    """OpenMythos's ACT rule (``RecurrentBlock.forward``) replayed on its probabilities
    (n, B, T): the weight of each h_t (0 once halted) and the halted flags after each step."""
    cumulative = np.zeros(halt_p.shape[1:], np.float32)
    halted = np.zeros(halt_p.shape[1:], bool)
    weights, flags = [], []
    for p in halt_p:
        running = ~halted
        weight = np.where(cumulative + p >= threshold, np.maximum(1.0 - cumulative, 0.0), p)
        weights.append(weight * running)
        cumulative = cumulative + p * running
        halted = halted | (cumulative >= threshold)
        flags.append(halted)
    return {"halt_p": halt_p, "act_weight": np.stack(weights).astype(np.float32),
            "halted": np.stack(flags)}


def _route(logits: np.ndarray, bias: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """OpenMythos ``MoEFFN``'s choice on recorded router logits (..., E): top-k of
    ``logits + bias``, weights the softmax scores of those experts renormalised."""
    ids = np.argsort(-(logits + bias), axis=-1, kind="stable")[..., :k]
    scores = np.exp(logits - logits.max(axis=-1, keepdims=True))
    chosen = np.take_along_axis(scores / scores.sum(axis=-1, keepdims=True), ids, axis=-1)
    return ids, chosen / chosen.sum(axis=-1, keepdims=True)


def _sorted_choices(ids: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Top-k choices (..., K) as sets: ids ascending, weights in the same order."""
    order = np.argsort(ids, axis=-1)
    return (np.take_along_axis(ids, order, axis=-1).astype(np.int32),
            np.take_along_axis(np.asarray(weights, np.float32), order, axis=-1))


def _relative_change(h: np.ndarray, previous: np.ndarray) -> np.ndarray:
    """||h - previous|| / ||h|| per sequence: (B, T, D) x 2 -> (B,)."""
    h, previous = h.astype(np.float64), previous.astype(np.float64)
    change = np.sqrt(np.sum(np.square(h - previous), axis=(1, 2)))
    return (change / np.maximum(np.sqrt(np.sum(np.square(h), axis=(1, 2))), 1e-30)
            ).astype(np.float32)
