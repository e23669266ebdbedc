"""A KV cache shared across loop depths (Huginn-style): memory saved vs change in predictions.

Trains a small MLA model for a few hundred steps with the trainer on built-in data (byte-level
Python standard library source, the ``stdlib`` data source), then decodes held-out text
teacher-forced twice, with the full per-depth
cache and with ``depth_slots`` shared slots, and reports the cache bytes per token and the mean
KL(full || shared) of the next-token distributions (and how often the argmax agrees).

    python experiments/shared_depth_cache.py [--steps 300] [--json out.json] [--quick]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mythos_jax.bench.timing import write_json
from mythos_jax.checkpoints.training import Checkpointer
from mythos_jax.inference.cache import cache_values_per_token, init_cache
from mythos_jax.inference.generate import compiled_decoder
from mythos_jax.loops import LoopSpec
from mythos_jax.parallel.mesh import make_mesh
from mythos_jax.train import data as data_lib
from mythos_jax.train import trainer
from mythos_jax.train.config import load_train_config
from mythos_jax.train.step import build_plan, model_from_state


def teacher_forced_logits(model, ids: np.ndarray, prompt: int, n_loops: int,
                          depth_slots: int | None) -> np.ndarray:
    """Next-token log-probs at positions prompt-1 .. T-2, decoding one true token at a time
    with the jitted steps of ``generate``."""
    batch, length = ids.shape
    graphdef, state = nnx.split(model)
    decoder = compiled_decoder(graphdef, LoopSpec(n_loops))
    cache = init_cache(model.cfg, batch, length, depth_slots or n_loops,
                       shares_depths=depth_slots is not None)
    _, logits, cache, _ = decoder.prefill(state, jnp.asarray(ids[:, :prompt]), cache, None)
    out = [logits]
    for t in range(prompt, length - 1):
        _, logits, cache, _ = decoder.step(state, jnp.asarray(ids[:, t]), cache, None)
        out.append(logits)
    return np.asarray(jax.nn.log_softmax(jnp.stack(out, axis=1)))


def run(steps: int, quick: bool, seed: int = 0) -> dict:
    n_loops, length = 4, 96
    cfg = load_train_config("tiny", [
        f"steps={steps}", f"seed={seed}", "model.max_seq_len=128",
        f"model.max_loop_iters={n_loops}", f"data.seq_len={length}",
        f"data.batch_size={8 if quick else 16}", "loops.schedule=fixed", f"loops.n={n_loops}",
        f"loops.max_loops={n_loops}", "optim.lr=1e-3", "optim.warmup_steps=0",
        f"checkpoint.every={steps}", "log.every=1", "log.tensorboard=false"])
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as workdir:
        trainer.train(cfg, workdir)
        losses = [m["loss"] for m in trainer.read_metrics(workdir) if "loss" in m]
        plan = build_plan(cfg, make_mesh(cfg.mesh))
        checkpointer = Checkpointer(workdir, plan)
        try:
            model = model_from_state(plan, checkpointer.restore())
        finally:
            checkpointer.close()
    train_s = time.perf_counter() - start
    model.eval()
    ids = data_lib.eval_batches(cfg.data, "heldout")[0]["inputs"][:8]    # (8, 96) held out
    full = teacher_forced_logits(model, ids, 32, n_loops, None)
    rows = []
    for slots in (n_loops, 2, 1):
        shared = teacher_forced_logits(model, ids, 32, n_loops, slots)
        kl = np.sum(np.exp(full) * (full - shared), axis=-1)
        targets = ids[:, 32:96]
        rows.append({
            "depth_slots": slots,
            "cache_values_per_token": cache_values_per_token(model.cfg, slots),
            "cache_saving": 1 - cache_values_per_token(model.cfg, slots)
            / cache_values_per_token(model.cfg, n_loops),
            "mean_kl": float(kl.mean()), "max_kl": float(kl.max()),
            "argmax_agreement": float((full.argmax(-1) == shared.argmax(-1)).mean()),
            "nll_full": float(-np.take_along_axis(full, targets[..., None], -1).mean()),
            "nll_shared": float(-np.take_along_axis(shared, targets[..., None], -1).mean())})
    return {"config": plan.model_cfg.to_dict(), "steps": steps, "train_s": train_s,
            "loss_first": losses[0], "loss_last": float(np.mean(losses[-20:])),
            "n_loops": n_loops, "rows": rows}


def format_result(r: dict) -> str:
    lines = [f"tiny_mla byte-level model, {r['steps']} trainer steps on stdlib source "
             f"({r['train_s']:.0f} s): loss {r['loss_first']:.2f} -> {r['loss_last']:.2f}; "
             f"{r['n_loops']} loops; 8 held-out sequences, 64 teacher-forced decode steps",
             f"{'depth slots':>11} {'values/token':>12} {'saved':>6} {'mean KL':>9} "
             f"{'max KL':>8} {'argmax agree':>12} {'NLL':>6}"]
    for row in r["rows"]:
        lines.append(f"{row['depth_slots']:>11} {row['cache_values_per_token']:>12} "
                     f"{100 * row['cache_saving']:>5.0f}% {row['mean_kl']:>9.2e} "
                     f"{row['max_kl']:>8.2e} {100 * row['argmax_agreement']:>11.1f}% "
                     f"{row['nll_shared']:>6.3f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--quick", action="store_true", help="20 steps, smaller data (smoke test)")
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args(argv)
    result = run(20 if args.quick else args.steps, args.quick)
    print(format_result(result))
    write_json(result, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
