"""Speed of mythos-jax against the PyTorch reference (open-mythos 0.5.0), fp32 on the CPU.

Same config, same weights, same batch, same machine, same process. Both sides run every one of
``n_loops`` recurrent iterations: ``act_threshold`` is set to 1e9 so that OpenMythos's ACT early
exit (``if halted.all(): break``) never fires. Measured:

* forward tokens/s: mythos-jax under ``jax.jit`` (pure function of the ``nnx.split`` state);
  open-mythos in ``eval()`` under ``torch.no_grad()``;
* training-step tokens/s: next-token cross-entropy, its gradient and one AdamW update
  (``optax.adamw`` in one jitted step with donated buffers / ``torch.optim.AdamW``, the same
  hyper-parameters); open-mythos in ``train()`` mode (dropout is 0, so deterministic);
* each as a fraction of this machine's fp32 matmul throughput measured in the same run (the
  larger of a jitted ``jnp.matmul`` and ``torch.matmul`` of large square matrices), using the
  analytic model FLOPs of :func:`mythos_jax.flop_count.flops`;
* the JAX compile time (trace + lower + XLA compile, ``jit(f).lower(...).compile()``);
* the largest |logit difference| between the two forwards and the difference of the first
  training loss, so a speed figure never comes from a model that computes something else.

    result = run_benchmark()                   # the default config (dim 256, 16 experts, ...)
    print(format_table(result))

Timings are medians over several calls after warm-up, the two sides taking turns in chunks so
that drifts of a (shared, virtual) machine hit both alike. torch keeps its default thread
count. Other processes on the machine spoil any such figure: the share of the CPU they used
while timing is recorded (``bench.timing.CpuMonitor``) and :func:`format_table` warns about
it.
"""

from __future__ import annotations

import functools
import statistics
import time
from typing import Any, Callable

import numpy as np

from mythos_jax.bench.presets import PRESET_SHAPES, benchmark_config
from mythos_jax.bench.timing import (CONTENTION_WARNING, CpuMonitor, interleaved, machine_info,
                                     measure_matmul_peak)
from mythos_jax.config import MythosConfig
from mythos_jax.flop_count import flops as count_flops

# AdamW hyper-parameters used on both sides: torch.optim.AdamW's defaults except a tiny lr.
# The timed steps train on one fixed batch; at lr 1e-3 the routing spreads out within a few
# steps (at init only 4-5 of 16 experts get tokens) and open-mythos's per-expert loop gets
# ~20% slower step after step. At 1e-6 the weights, and so the work per step, stay put; the
# optimizer's arithmetic does not depend on lr.
ADAMW = {"lr": 1e-6, "b1": 0.9, "b2": 0.999, "eps": 1e-8, "weight_decay": 0.01}


def build_models(cfg: MythosConfig, seed: int = 0, spread_routing: bool = False):
    """(open-mythos torch model, mythos-jax model) with the same weights: the torch model is
    built under ``torch.manual_seed(seed)`` and converted. At init every token routes to the
    same few experts (the loop embedding dominates the router input); ``spread_routing``
    moves the weights away from init (``interop.parity.perturb_openmythos``) so that tokens
    spread over the experts as in a trained model."""
    import torch

    from mythos_jax.interop.openmythos import config_to_torch, import_reference, load_state_dict
    from mythos_jax.interop.parity import perturb_openmythos

    torch.manual_seed(seed)
    torch_model = import_reference().OpenMythos(config_to_torch(cfg))
    if spread_routing:
        perturb_openmythos(torch_model, seed)
    return torch_model, load_state_dict(cfg, torch_model.state_dict(), seed=seed)


def next_token_loss_jax(logits, input_ids):
    """Mean next-token cross-entropy: logits[:, :-1] predict input_ids[:, 1:]."""
    import optax

    return optax.softmax_cross_entropy_with_integer_labels(
        logits[:, :-1], input_ids[:, 1:]).mean()


def next_token_loss_torch(logits, input_ids):
    """Mean next-token cross-entropy (torch), the same loss as :func:`next_token_loss_jax`."""
    import torch.nn.functional as F

    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                           input_ids[:, 1:].reshape(-1))


def jax_forward_fn(model, n_loops: int):
    """(jitted forward(state, ids) -> logits, state): a pure ``jax.jit`` over ``nnx.split``."""
    import jax
    from flax import nnx

    model.eval()
    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, input_ids):
        return nnx.merge(graphdef, state)(input_ids, n_loops)

    return forward, state


def jax_train_step_fn(model, n_loops: int):
    """(jitted step(params, opt_state, rest, ids) -> (params, opt_state, loss), params,
    opt_state, rest). One step: loss, grad w.r.t. every ``nnx.Param`` and an ``optax.adamw``
    update with :data:`ADAMW`; params and opt_state are donated. ``params`` is a copy, so
    ``model`` stays usable."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    model.train()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    model.eval()
    params = jax.tree.map(jnp.copy, params)
    tx = optax.adamw(ADAMW["lr"], b1=ADAMW["b1"], b2=ADAMW["b2"], eps=ADAMW["eps"],
                     weight_decay=ADAMW["weight_decay"])
    opt_state = tx.init(params)

    def loss_fn(params, rest, input_ids):
        logits = nnx.merge(graphdef, params, rest)(input_ids, n_loops)
        return next_token_loss_jax(logits, input_ids)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, opt_state, rest, input_ids):
        loss, grads = jax.value_and_grad(loss_fn)(params, rest, input_ids)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step, params, opt_state, rest


def torch_train_step_fn(torch_model, input_ids, n_loops: int) -> Callable[[], float]:
    """step() -> loss: one open-mythos training step on ``input_ids`` (B, T) in ``train()``
    mode: the same loss, ``loss.backward()`` and a ``torch.optim.AdamW`` step with
    :data:`ADAMW`."""
    import torch

    torch_model.train()
    optimizer = torch.optim.AdamW(
        torch_model.parameters(), lr=ADAMW["lr"], betas=(ADAMW["b1"], ADAMW["b2"]),
        eps=ADAMW["eps"], weight_decay=ADAMW["weight_decay"])

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = next_token_loss_torch(torch_model(input_ids, n_loops=n_loops), input_ids)
        loss.backward()
        optimizer.step()
        return loss.item()

    return step


# ============================================================================ the benchmark
def _summary(times: list[float], tokens: int, flops_per_token: float,
             peak_flops: float) -> dict[str, Any]:
    median = statistics.median(times)
    tokens_per_s = tokens / median
    return {"median_s": median, "min_s": min(times), "times_s": times,
            "tokens_per_s": tokens_per_s,
            "achieved_flops": tokens_per_s * flops_per_token,
            "fraction_of_peak": tokens_per_s * flops_per_token / peak_flops}


def run_benchmark(cfg_overrides: dict | None = None, *, preset: str = "default",
                  batch: int | None = None, seq_len: int | None = None,
                  n_loops: int | None = None, iters: int | None = None,
                  train_iters: int | None = None, quick: bool = False, seed: int = 0,
                  spread_routing: bool = False,
                  train: bool = True, matmul_sizes: tuple[int, ...] | None = None,
                  log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Measure mythos-jax against open-mythos at one config; returns a JSON-able dict.

    ``preset`` picks the config and default batch shape (``bench.presets``: ``PRESETS``,
    ``PRESET_SHAPES``); ``cfg_overrides`` changes MythosConfig fields (e.g. ``moe_impl``,
    ``attn_type``). ``n_loops`` is the loop count of both sides (default: the preset's).
    ``iters`` / ``train_iters`` are the timed calls per side (defaults 20 / 10, ``quick``: 3 / 2);
    ``quick`` also shrinks the matmul-peak measurement. ``train=False`` skips the training step.
    ``spread_routing``: see :func:`build_models`. ``log`` receives progress lines.

    Keys: ``config``, ``spread_routing``, ``batch``, ``seq_len``, ``n_loops``,
    ``tokens_per_step``, ``machine``, ``peak`` (``timing.measure_matmul_peak``), ``flops``
    (forward/train per token + breakdown),
    ``parity`` (``max_abs_logit_diff``, ``loss_torch``, ``loss_jax``, ``loss_diff``),
    ``routing`` (open-mythos's expert loads at these weights), ``contention`` (CPU share of
    other processes while timing ``peak``, ``forward``, ``train``), ``forward`` and ``train``
    (None with ``train=False``): each ``{"torch": {...}, "jax": {..., "compile_s"},
    "speedup"}`` with ``tokens_per_s``, ``median_s``, ``min_s``, ``times_s``,
    ``achieved_flops``, ``fraction_of_peak``; ``wall_s``.
    """
    import jax.numpy as jnp
    import torch

    log = log or (lambda _msg: None)
    wall_start = time.perf_counter()
    shape = PRESET_SHAPES.get(preset, PRESET_SHAPES["default"])
    batch = shape["batch"] if batch is None else batch
    seq_len = shape["seq_len"] if seq_len is None else seq_len
    n_loops = shape["n_loops"] if n_loops is None else n_loops
    overrides = {"max_loop_iters": n_loops, **(cfg_overrides or {})}
    cfg = benchmark_config(preset, overrides, seq_len=seq_len)
    iters = (3 if quick else 20) if iters is None else iters
    train_iters = (2 if quick else 10) if train_iters is None else train_iters
    warmup = 1 if quick else 2
    if matmul_sizes is None:
        matmul_sizes = (512, 1024) if quick else (1024, 2048)
    tokens = batch * seq_len

    counts = count_flops(cfg, seq_len, n_loops)
    fwd_flops, train_flops = counts["forward"], counts["train"]

    log("measuring the fp32 matmul peak ...")
    contention: dict[str, float | None] = {}
    monitor = CpuMonitor()
    peak = measure_matmul_peak(matmul_sizes, repeats=3 if quick else 5)
    contention["peak"] = monitor.other_share()
    peak_flops = peak["peak_flops"]

    log("building the models ...")
    torch_model, jax_model = build_models(cfg, seed, spread_routing)
    ids_np = np.random.default_rng(seed).integers(0, cfg.vocab_size, (batch, seq_len))
    ids_torch = torch.from_numpy(ids_np.astype(np.int64))
    ids_jax = jnp.asarray(ids_np, dtype=jnp.int32)

    # ---------------------------------------------------------------- forward
    log("JAX forward: compiling ...")
    forward, state = jax_forward_fn(jax_model, n_loops)
    start = time.perf_counter()
    forward_compiled = forward.lower(state, ids_jax).compile()
    fwd_compile_s = time.perf_counter() - start
    jax_logits = np.asarray(forward_compiled(state, ids_jax))
    torch_model.eval()
    with torch.no_grad(), _RoutingProbe(torch_model, cfg) as routing:
        torch_logits = torch_model(ids_torch, n_loops=n_loops).numpy()
    max_logit_diff = float(np.max(np.abs(torch_logits - jax_logits)))

    def torch_forward():
        with torch.no_grad():
            torch_model(ids_torch, n_loops=n_loops)

    log("forward: timing ...")
    monitor = CpuMonitor()
    fwd_times = interleaved(
        {"jax": lambda: forward_compiled(state, ids_jax).block_until_ready(),
         "torch": torch_forward}, iters, warmup)
    contention["forward"] = monitor.other_share()

    # ---------------------------------------------------------------- train step
    jax_loss = torch_loss = None
    if train:
        log("JAX train step: compiling ...")
        step, params, opt_state, rest = jax_train_step_fn(jax_model, n_loops)
        start = time.perf_counter()
        step_compiled = step.lower(params, opt_state, rest, ids_jax).compile()
        train_compile_s = time.perf_counter() - start
        carry = {"params": params, "opt_state": opt_state}

        def jax_step():
            carry["params"], carry["opt_state"], loss = step_compiled(
                carry["params"], carry["opt_state"], rest, ids_jax)
            return float(loss)

        torch_step = torch_train_step_fn(torch_model, ids_torch, n_loops)
        jax_loss, torch_loss = jax_step(), torch_step()   # losses at the initial weights
        log("train step: timing ...")
        monitor = CpuMonitor()
        train_times = interleaved({"jax": jax_step, "torch": torch_step}, train_iters,
                                   max(warmup - 1, 0))
        contention["train"] = monitor.other_share()
        del carry

    # ---------------------------------------------------------------- figures
    def pair(torch_times, jax_times, flops_per_token, compile_s):
        t = _summary(torch_times, tokens, flops_per_token, peak_flops)
        j = _summary(jax_times, tokens, flops_per_token, peak_flops)
        j["compile_s"] = compile_s
        return {"torch": t, "jax": j, "speedup": j["tokens_per_s"] / t["tokens_per_s"]}

    result: dict[str, Any] = {
        "config": cfg.to_dict(), "preset": preset, "spread_routing": spread_routing,
        "batch": batch, "seq_len": seq_len,
        "n_loops": n_loops, "tokens_per_step": tokens, "quick": quick,
        "iters": {"forward": iters, "train": train_iters if train else 0, "warmup": warmup},
        "machine": machine_info(),
        "peak": peak,
        "flops": {"forward_per_token": fwd_flops, "train_per_token": train_flops,
                  "breakdown": counts["forward_breakdown"],
                  "note": "useful FLOPs = 2 x MACs of needed matmuls; full T x T attention "
                          "scores; MoE counts top-K routed + shared + router; train = 3 x "
                          "forward"},
        "parity": {"max_abs_logit_diff": max_logit_diff, "loss_torch": torch_loss,
                   "loss_jax": jax_loss,
                   "loss_diff": (abs(torch_loss - jax_loss) if train else None)},
        "routing": routing.summary(),
        "contention": contention,
        "forward": pair(fwd_times["torch"], fwd_times["jax"], fwd_flops, fwd_compile_s),
        "train": (pair(train_times["torch"], train_times["jax"], train_flops, train_compile_s)
                  if train else None),
    }
    result["wall_s"] = time.perf_counter() - wall_start
    return result


class _RoutingProbe:
    """Records, during one open-mythos forward, how unevenly the recurrent MoE routes.

    ``max_load_ratio``: the busiest expert's (token, slot) count over the mean N * K / E, the
    largest over all loop iterations (1.0 = perfectly balanced, E / K = every token on the
    same K experts). A dispatch with fixed per-expert capacity overflows when this exceeds its
    capacity factor; it also bounds how much open-mythos's skip-idle-experts loop saves.
    """

    def __init__(self, torch_model, cfg: MythosConfig):
        self.moe = torch_model.recurrent.block.ffn
        self.cfg = cfg
        self.ratios: list[float] = []
        self.active: list[int] = []

    def __enter__(self):
        def hook(_module, _inputs, logits):
            import torch

            k, n_experts = self.cfg.n_experts_per_tok, self.cfg.n_experts
            _, idx = (logits + self.moe.router_bias).topk(k, dim=-1)
            loads = torch.bincount(idx.flatten(), minlength=n_experts)
            self.ratios.append(float(loads.max()) / (logits.shape[0] * k / n_experts))
            self.active.append(int((loads > 0).sum()))

        self.handle = self.moe.router.register_forward_hook(hook)
        return self

    def __exit__(self, *exc):
        self.handle.remove()

    def summary(self) -> dict[str, Any]:
        return {"max_load_ratio": max(self.ratios) if self.ratios else None,
                "per_loop_max_load_ratio": self.ratios,
                "per_loop_active_experts": self.active, "loops": len(self.ratios)}


# ============================================================================ the table
def format_table(result: dict[str, Any]) -> str:
    """A plain-text table of :func:`run_benchmark`'s result: a header (peak, config, shape,
    FLOPs, parity) and one row per measurement (forward, train step)."""
    cfg = result["config"]
    peak = result["peak"]
    m = result["machine"]
    header = [
        f"fp32 matmul peak: {peak['peak_flops'] / 1e9:.1f} GFLOP/s "
        f"(jax {peak['jax_matmul_flops'] / 1e9:.1f}, torch {peak['torch_matmul_flops'] / 1e9:.1f})"
        f" on {m['cpu']}, {m['cpu_count']} cores, torch threads {m['torch_threads']}",
        f"config [{result['preset']}]: {cfg['attn_type']} dim={cfg['dim']} heads={cfg['n_heads']}"
        f" experts={cfg['n_experts']} top-{cfg['n_experts_per_tok']}"
        f" shared={cfg['n_shared_experts']} expert_dim={cfg['expert_dim']}"
        f" vocab={cfg['vocab_size']} prelude/coda={cfg['prelude_layers']}/{cfg['coda_layers']}"
        f" moe_impl={cfg['moe_impl']}"
        f" weights={'moved from init (spread routing)' if result['spread_routing'] else 'init'}",
        f"batch {result['batch']} x {result['seq_len']}, {result['n_loops']} loops (no ACT exit);"
        f" model {result['flops']['forward_per_token'] / 1e6:.2f} MFLOP/token forward,"
        f" x3 train",
        f"parity: max |logit diff| {result['parity']['max_abs_logit_diff']:.2e}"
        + (f", |loss diff| {result['parity']['loss_diff']:.2e}"
           if result["parity"]["loss_diff"] is not None else ""),
    ]
    routing = result.get("routing") or {}
    if routing.get("max_load_ratio") is not None:
        active = routing.get("per_loop_active_experts") or [cfg["n_experts"]]
        header.append(f"routing (these weights, this batch, open-mythos side): busiest expert "
                      f"gets up to {routing['max_load_ratio']:.1f}x the mean load; "
                      f"{min(active)}-{max(active)} of {cfg['n_experts']} experts used per loop")
    contention = {k: v for k, v in (result.get("contention") or {}).items() if v is not None}
    if contention:
        header.append("CPU busy with other processes while timing: " + ", ".join(
            f"{k} {100 * v:.0f}%" for k, v in contention.items()))
        if max(contention.values()) > CONTENTION_WARNING:
            header.append("WARNING: other processes used this machine during the run; "
                          "the figures are not trustworthy, rerun on an idle machine")
    cols = ("", "torch tok/s", "jax tok/s", "speedup", "torch %peak", "jax %peak",
            "jax compile s")
    rows = []
    for name, key in (("forward", "forward"), ("train step", "train")):
        r = result.get(key)
        if not r:
            continue
        rows.append((name, f"{r['torch']['tokens_per_s']:,.0f}", f"{r['jax']['tokens_per_s']:,.0f}",
                     f"{r['speedup']:.2f}x", f"{100 * r['torch']['fraction_of_peak']:.1f}%",
                     f"{100 * r['jax']['fraction_of_peak']:.1f}%",
                     f"{r['jax']['compile_s']:.1f}"))
    widths = [max(len(str(row[i])) for row in (cols, *rows)) for i in range(len(cols))]
    lines = ["  ".join(str(c).rjust(w) if i else str(c).ljust(w)
                       for i, (c, w) in enumerate(zip(row, widths))) for row in (cols, *rows)]
    rule = "-" * len(lines[0])
    return "\n".join(header + [rule, lines[0], rule, *lines[1:], rule])
