"""Memory and compilation of the loop drivers, read from the compiled programs.

``memory_analysis().temp_size_in_bytes`` of ``jax.jit(f).lower(...).compile()`` is
deterministic for a given program, so the bounds below are exact checks, not timings:

* inference: the static scan at 64 loops needs <= 1.1x the temp memory of 4 loops; the
  run-time count (``lax.while_loop``) is one program for every count, no bigger than the
  4-loop scan, compiled once for n = 2, 5, 11 and equal to the static path;
* training with ``backprop_depth=4``: the step built for ``Fixed(64)`` needs <= 1.1x the temp
  memory of ``Fixed(8)``; a step taking the count(s) as an argument compiles once whatever
  count is drawn (scalar, and per sequence);
* full backprop (``max_loops=M``) with ``loop_remat="full"``: each extra loop adds about one
  hidden state (B*T*dim*4 bytes) plus the (B, T) ACT bookkeeping; ``"none"`` grows much more.

Shapes are tiny (``tiny_mla``, batch 2, seq 32): the point is how memory scales with the
loop count, which the shapes do not change.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mythos_jax import OpenMythos, variants
from mythos_jax.loops import LoopSpec
from mythos_jax.schedules import Fixed, Uniform

BATCH, SEQ = 2, 32


def _config(**overrides):
    # act_threshold 50: no position halts, so every loop changes the output. No prelude or
    # coda layer: they are outside the loop and only slow the compiles down.
    return variants.tiny_mla(act_threshold=50.0, prelude_layers=0, coda_layers=0, **overrides)


def _split(cfg):
    model = OpenMythos(cfg, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return graphdef, params, rest


def _batch(cfg):
    ids = jax.random.randint(jax.random.key(0), (BATCH, SEQ), 0, cfg.vocab_size)
    targets = jax.random.randint(jax.random.key(1), (BATCH, SEQ), 0, cfg.vocab_size)
    return ids, targets


# LLVM at -O0: the CPU compiles take half the time. Buffer assignment, and so every figure
# of memory_analysis(), is decided on the HLO before LLVM runs, so the temp bytes are those
# of the default -O2 program (experiments/bench_memory.py measures with the defaults).
_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


def _temp_bytes(jitted, *args) -> int:
    """Temp bytes of the compiled program; the executable is shared with ``jitted``'s calls."""
    return jitted.lower(*args).compile().memory_analysis().temp_size_in_bytes


def _temp_bytes_all(programs) -> list[int]:
    return [_temp_bytes(jitted, *args) for jitted, args in programs]


def _hidden_bytes(cfg) -> int:
    """One hidden state (B, T, dim) in fp32."""
    return BATCH * SEQ * cfg.dim * 4


def _loss_fn(graphdef, rest, **loop_kwargs):
    """Next-token cross-entropy of the model, a pure function of (params, ids, targets, n)."""
    def loss(params, ids, targets, n_loops):
        logits = nnx.merge(graphdef, params, rest)(ids, LoopSpec(n_loops, **loop_kwargs))
        log_p = jax.nn.log_softmax(logits)
        return -jnp.mean(jnp.take_along_axis(log_p, targets[..., None], axis=-1))
    return loss


# ------------------------------------------------------------------------------- inference
@pytest.fixture(scope="module")
def inference():
    """The static scan jitted for n = 2, 4, 5, 11, 64 and the run-time-count forward, all
    compiled up front; their temp bytes."""
    cfg = _config()
    graphdef, params, rest = _split(cfg)
    ids, _ = _batch(cfg)

    def static_forward(n):
        return _jit(lambda p, i: nnx.merge(graphdef, p, rest)(i, n))

    static = {n: static_forward(n) for n in (2, 4, 5, 11, 64)}
    run_time = _jit(lambda p, i, n: nnx.merge(graphdef, p, rest)(i, n))
    temps = _temp_bytes_all([(f, (params, ids)) for f in static.values()]
                            + [(run_time, (params, ids, jnp.int32(4)))])
    return dict(params=params, ids=ids, static=static, run_time=run_time,
                static_temp=dict(zip(static, temps)), run_time_temp=temps[-1])


def test_inference_static_scan_memory_is_constant(inference):
    at4, at64 = inference["static_temp"][4], inference["static_temp"][64]
    print(f"\ninference static scan temp: 4 loops {at4} B, 64 loops {at64} B "
          f"(ratio {at64 / at4:.3f})")
    assert at4 > 0
    assert at64 <= 1.1 * at4, (at4, at64)


def test_inference_run_time_count_compiles_once(inference):
    params, ids, static, run_time = (inference[k] for k in ("params", "ids", "static",
                                                            "run_time"))
    at4, one_program = inference["static_temp"][4], inference["run_time_temp"]
    print(f"\ninference run-time count temp (any count): {one_program} B; "
          f"static 4 loops {at4} B")
    assert one_program <= 1.1 * at4, (at4, one_program)
    for n in (2, 5, 11):
        dynamic = run_time(params, ids, jnp.int32(n))
        np.testing.assert_allclose(dynamic, static[n](params, ids), rtol=0, atol=1e-5,
                                   err_msg=f"n_loops={n}")
    assert run_time._cache_size() == 1


# ---------------------------------------------------------- training, truncated backprop
def _train_step_for(graphdef, rest, schedule):
    """A jitted step that draws its counts from ``schedule`` (a static part of the program)."""
    loss = _loss_fn(graphdef, rest, backprop_depth=schedule.backprop_depth,
                    max_loops=schedule.max_loops)

    def step(params, ids, targets, key, step_no):
        counts = schedule.sample(step_no, key, ids.shape[0])
        return jax.value_and_grad(loss)(params, ids, targets, counts)
    return _jit(step)


def test_truncated_backprop_memory_does_not_depend_on_depth():
    cfg = _config()
    graphdef, params, rest = _split(cfg)
    ids, targets = _batch(cfg)
    args = (params, ids, targets, jax.random.key(2), jnp.int32(0))
    at8, at64 = _temp_bytes_all(
        [(_train_step_for(graphdef, rest, Fixed(n, backprop_depth=4)), args) for n in (8, 64)])
    print(f"\ntraining backprop_depth=4 temp: Fixed(8) {at8} B, Fixed(64) {at64} B "
          f"(ratio {at64 / at8:.3f})")
    assert at8 > 0
    assert at64 <= 1.1 * at8, (at8, at64)


def test_training_step_compiles_once_whatever_depth():
    cfg = _config()
    graphdef, params, rest = _split(cfg)
    ids, targets = _batch(cfg)
    step = _jit(jax.value_and_grad(_loss_fn(graphdef, rest, backprop_depth=4)))
    # One program for a scalar count and one for per-sequence counts (B,), compiled up front.
    scalar_temp, per_sequence_temp = _temp_bytes_all(
        [(step, (params, ids, targets, jnp.int32(3))),
         (step, (params, ids, targets, jnp.zeros((BATCH,), jnp.int32)))])
    scalar_losses = [float(step(params, ids, targets, jnp.int32(n))[0]) for n in (3, 8, 40)]
    assert np.isfinite(scalar_losses).all() and len(set(scalar_losses)) == 3, scalar_losses
    assert step._cache_size() == 1
    draws = Uniform(1, 64, backprop_depth=4, per_sequence=True)
    counts = [jnp.array([3, 40], jnp.int32)] + [draws.sample(s, jax.random.key(s), BATCH)
                                                for s in range(3)]
    assert len({tuple(np.asarray(c)) for c in counts}) == len(counts)
    for c in counts:
        assert np.isfinite(float(step(params, ids, targets, c)[0]))
    assert step._cache_size() == 2          # no program beyond the two compiled up front
    print(f"\ntraining backprop_depth=4, count as an argument: {scalar_temp} B (scalar), "
          f"{per_sequence_temp} B (per sequence), for any count")


# ---------------------------------------------------------------- training, full backprop
def test_full_backprop_with_remat_grows_by_one_hidden_state_per_loop():
    """Temp bytes of the gradient with the count traced and max_loops 8 and 16; growth per
    loop = (temp16 - temp8) / 8."""
    programs = []
    for remat in ("full", "none"):
        cfg = _config(loop_remat=remat)
        graphdef, params, rest = _split(cfg)
        ids, targets = _batch(cfg)
        programs += [(_jit(jax.grad(_loss_fn(graphdef, rest, max_loops=m))),
                      (params, ids, targets, jnp.int32(3))) for m in (8, 16)]
    full8, full16, none8, none16 = _temp_bytes_all(programs)
    full_growth, none_growth = (full16 - full8) / 8, (none16 - none8) / 8
    hidden = _hidden_bytes(cfg)
    # What else one iteration must keep for the backward pass: the (B, T) part of the ACT
    # carry (cumulative_p, halted, expected_loops) and the per-position values recomputed
    # from it (p, weight, the running mask), fp32 at most. 16 such (B, T) arrays is a
    # generous allowance (a quarter of a hidden state at dim 64).
    small = 16 * BATCH * SEQ * 4
    print(f"\nfull backprop temp, max_loops 8 -> 16: loop_remat='full' {full8} -> {full16} B, "
          f"{full_growth:.0f} B/loop; 'none' {none8} -> {none16} B, {none_growth:.0f} B/loop; "
          f"one hidden state B*T*dim*4 = {hidden} B, bound {hidden + small} B/loop")
    assert full_growth > 0
    assert full_growth <= hidden + small, (full_growth, hidden, small)
    assert none_growth > 4 * full_growth, (none_growth, full_growth)
