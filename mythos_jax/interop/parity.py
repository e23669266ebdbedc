"""Side-by-side check that a converted OpenMythos model gives OpenMythos's logits.

``perturb_openmythos`` moves a torch model's weights away from their init so that attention
is peaked, routing varies and positions halt at different loops (at init the N(0, 0.02)
projections give near-uniform attention, the loop embedding dominates the block input and
every token routes alike); ``parity_report`` converts such models and compares logits over
attention types, loop counts and sequence lengths; ``model_parity`` does the same for one
mythos-jax model (a trained one) against its PyTorch conversion.

Tolerances are relative to the largest reference value, in units of fp32's machine epsilon
(2**-23): the two sides run the same fp32 operations in different orders (fused einsums, sums
over experts and heads), and each of the ~10 blocks a forward goes through (prelude, every
loop, coda) adds a few ulps that peaked attention and the loops amplify. Observed on the
perturbed parity models: logits within 37 eps; gradients within 60 eps, except ``log_dt``'s
(one scalar summing cancelling terms over channels, positions and loops: 380 eps). A real
mistake (a RoPE offset, a wrong scale or mask, a routing flip, a dropped gradient path) is
off by 1e-3 or more.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mythos_jax import variants
from mythos_jax.config import MythosConfig

FP32_EPS = float(np.finfo(np.float32).eps)
LOGIT_RTOL = 128 * FP32_EPS    # max|logit diff| / max|logit| (about 1.5e-5)
GRAD_RTOL = 1024 * FP32_EPS    # per parameter: max|grad diff| / max|grad| (about 1.2e-4)


def parity_config(attn_type: str) -> MythosConfig:
    """The small config the parity checks use (odd vocab, 6 experts, 3 default loops)."""
    return variants.tiny_mla(attn_type=attn_type, max_seq_len=24, max_loop_iters=3,
                             vocab_size=211, n_experts=6, n_experts_per_tok=2)


def perturb_openmythos(model, seed: int) -> None:
    """Deterministically move a torch OpenMythos's weights away from their init (in place):
    norm weights, LTI parameters, injection B, router weights and bias, halting weights, the
    embedding, and every attention and FFN projection (prelude, recurrent and coda; routed
    and shared experts) to N(0, gain^2 / fan_in): gain 2 for attention, so that it is peaked
    (mean entropy well below the uniform one), 0.5 for the FFNs."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    rules = [(lambda n: n.endswith("norm.weight"), lambda t: 1.0 + _noise(t, gen, 0.3)),
             (lambda n: n.endswith("injection.log_A"), lambda t: _noise(t, gen, 1.0)),
             (lambda n: n.endswith("injection.log_dt"), lambda t: _noise(t, gen, 0.5)),
             (lambda n: n.endswith("injection.B"), lambda t: 0.1 + _noise(t, gen, 0.2)),
             (lambda n: n.endswith("router_bias"), lambda t: _noise(t, gen, 0.3)),
             (lambda n: n.endswith("router.weight"), lambda t: _noise(t, gen, 0.3)),
             (lambda n: n.endswith("act.halt.weight"), lambda t: _noise(t, gen, 0.02)),
             (lambda n: n.endswith("act.halt.bias"), lambda t: torch.full_like(t, 0.3)),
             (lambda n: n == "embed.weight", lambda t: _noise(t, gen, 1.0)),
             (lambda n: ".attn." in n and n.endswith(".weight"),
              lambda t: _noise(t, gen, 2.0 * t.shape[1] ** -0.5)),
             (lambda n: ".ffn." in n and n.endswith(".weight"),
              lambda t: _noise(t, gen, 0.5 * t.shape[1] ** -0.5))]
    with torch.no_grad():
        for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
            for matches, new_value in rules:
                if matches(name):
                    tensor.copy_(new_value(tensor))
                    break


def _noise(tensor, gen, scale):
    import torch

    return torch.randn(tensor.shape, generator=gen) * scale


def relative_error(got, want) -> float:
    """max|got - want| / max|want| (arrays of one shape); 0 when both are all zeros."""
    got, want = np.asarray(got), np.asarray(want)
    if got.shape != want.shape:
        raise ValueError(f"shapes differ: {got.shape} vs {want.shape}")
    scale = float(np.abs(want).max())
    diff = float(np.abs(got - want).max())
    return diff / scale if scale > 0 else (0.0 if diff == 0 else float("inf"))


def build_pair(attn_type: str, seed: int = 1):
    """(torch OpenMythos in eval mode with perturbed weights, its mythos-jax conversion)."""
    import torch

    from mythos_jax.interop.openmythos import config_to_torch, from_torch, import_reference

    torch.manual_seed(seed)
    torch_model = import_reference().OpenMythos(config_to_torch(parity_config(attn_type))).eval()
    perturb_openmythos(torch_model, seed=seed + 1)
    return torch_model, from_torch(torch_model)


def parity_report(attn_types=("mla", "gqa"), batch: int = 3, seed: int = 1) -> list[dict[str, Any]]:
    """Max |logit difference| per (attention, loops, seq_len), fp32 CPU, eval mode."""
    return compare_logits([build_pair(attn_type, seed) for attn_type in attn_types], batch)


def model_parity(jax_model, batch: int = 3) -> list[dict[str, Any]]:
    """``parity_report``'s rows for one mythos-jax model (a trained one) against its PyTorch
    OpenMythos conversion (``ValueError`` naming the options OpenMythos lacks)."""
    from mythos_jax.interop.files import require_openmythos_numerics
    from mythos_jax.interop.openmythos import to_torch

    require_openmythos_numerics(jax_model.cfg)
    jax_model.eval()
    return compare_logits([(to_torch(jax_model), jax_model)], batch)


def compare_logits(pairs, batch: int = 3) -> list[dict[str, Any]]:
    """Rows for each (torch model, JAX model) at 1, 2, max, max+3 loops, lengths 1 and max."""
    import jax.numpy as jnp
    import torch

    rows = []
    for torch_model, jax_model in pairs:
        cfg = jax_model.cfg
        for loops in (1, 2, cfg.max_loop_iters, cfg.max_loop_iters + 3):
            for seq_len in (1, cfg.max_seq_len):
                ids = torch.randint(0, cfg.vocab_size, (batch, seq_len),
                                    generator=torch.Generator().manual_seed(loops + seq_len))
                with torch.no_grad():
                    expected = torch_model(ids, n_loops=loops).numpy()
                got = np.asarray(jax_model(jnp.asarray(ids.numpy()), loops))
                rel = relative_error(got, expected)
                rows.append({"attn_type": cfg.attn_type, "loops": loops, "seq_len": seq_len,
                             "batch": batch, "max_abs_diff": float(np.abs(got - expected).max()),
                             "max_abs_logit": float(np.abs(expected).max()), "rel_diff": rel,
                             "ok": rel <= LOGIT_RTOL})
    return rows


def format_parity(rows: list[dict[str, Any]]) -> str:
    """The rows of ``compare_logits`` as a table under a header naming the tolerance."""
    lines = [f"parity with open-mythos 0.5.0 (fp32 CPU, tolerance {LOGIT_RTOL:.1e} "
             f"x max|logit|)",
             f"{'attn':>5} {'loops':>8} {'seq_len':>8} {'max|diff|':>10} {'max|logit|':>11} "
             f"{'relative':>9}  ok"]
    for r in rows:
        lines.append(f"{r['attn_type']:>5} {r['loops']:>8} {r['seq_len']:>8} "
                     f"{r['max_abs_diff']:>10.2e} {r['max_abs_logit']:>11.2f} "
                     f"{r['rel_diff']:>9.2e}  {'yes' if r['ok'] else 'NO'}")
    return "\n".join(lines)
