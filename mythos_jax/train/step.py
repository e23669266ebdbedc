"""The training state and one jitted, sharded training step.

State is kept functional and checkpointable: ``TrainState`` holds plain nested dicts of arrays
(``nnx.to_pure_dict``) for the parameters (``nnx.Param``), the buffers (everything else: the
router bias, a dropout stream) and the optax state; the model graph (``graphdef``) is static.

    plan = build_plan(train_cfg, mesh)            # graphdef, optimizer, abstract state, shardings
    state = init_train_state(plan)                # parameters created directly in their shards
    step_fn = make_train_step(plan)               # jit with explicit in/out shardings
    state, metrics = step_fn(state, batch)        # batch: global arrays sharded over the batch axes

Loop counts are drawn inside the step from ``fold_in(key(seed), step)``, so a resumed run
draws the same counts as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mythos_jax.config import MythosConfig
from mythos_jax.model import OpenMythos
from mythos_jax.moe.router import update_router_biases
from mythos_jax.moe.stats import load_ratio
from mythos_jax.parallel import rules as rules_lib
from mythos_jax.schedules import sample_loops
from mythos_jax.train.config import TrainConfig
from mythos_jax.train.optim import build_optimizer, learning_rate



class TrainState(NamedTuple):
    step: jax.Array           # int32 (): optimizer updates done
    params: dict              # nnx.Param values, nested dict
    buffers: dict             # other model variables (router bias, rng streams), nested dict
    opt_state: Any            # optax state over ``params``
    nonfinite: jax.Array      # int32 (): non-finite steps in a row (each skipped)


@dataclasses.dataclass(frozen=True, eq=False)
class TrainPlan:
    """Everything static about a run: the model graph, optimizer, shapes and shardings
    (hashed by identity: compiled functions are cached per plan)."""
    cfg: TrainConfig
    model_cfg: MythosConfig
    mesh: Mesh
    graphdef: Any
    optimizer: optax.GradientTransformation
    abstract_state: TrainState        # ShapeDtypeStructs
    shardings: TrainState             # NamedSharding per leaf
    batch_sharding: NamedSharding
    rules: Any                        # logical axis -> mesh axes (parameters and activations)

    @contextlib.contextmanager
    def context(self):
        """The mesh and activation rules every jitted call of the run is traced under."""
        with jax.set_mesh(self.mesh), rules_lib.activation_rules(self.rules):
            yield


ACCELERATOR_PLATFORMS = ("tpu", "gpu")


def build_plan(cfg: TrainConfig, mesh: Mesh) -> TrainPlan:
    """Shapes and shardings of the run, without creating any array. Mixed precision: on a
    TPU/GPU mesh the model computes in bfloat16 (parameters stay fp32) unless ``model.dtype``
    is set. Parameters and activations follow the rules preset ``cfg.rules``."""
    model_cfg = cfg.model_config()
    if "dtype" not in cfg.model and mesh.devices.flat[0].platform in ACCELERATOR_PLATFORMS:
        model_cfg = model_cfg.replace(dtype="bfloat16")
    rules = rules_lib.rules_preset(cfg.rules)
    abstract_model = nnx.eval_shape(lambda: OpenMythos(model_cfg, rngs=nnx.Rngs(cfg.seed)))
    graphdef, params, buffers = nnx.split(abstract_model, nnx.Param, ...)
    param_shardings = nnx.to_pure_dict(rules_lib.state_shardings(params, mesh, rules))
    buffer_shardings = nnx.to_pure_dict(rules_lib.state_shardings(buffers, mesh, rules))
    params, buffers = nnx.to_pure_dict(params), nnx.to_pure_dict(buffers)
    optimizer = build_optimizer(cfg.optim, cfg.steps)
    abstract_opt = jax.eval_shape(optimizer.init, params)
    replicated = NamedSharding(mesh, PartitionSpec())
    opt_shardings = optax.tree_map_params(optimizer, lambda _, sharding: sharding, abstract_opt,
                                          param_shardings,
                                          transform_non_params=lambda _: replicated)
    scalar = jax.ShapeDtypeStruct((), jnp.int32)
    abstract = TrainState(scalar, params, buffers, abstract_opt, scalar)
    shardings = TrainState(replicated, param_shardings, buffer_shardings, opt_shardings,
                           replicated)
    return TrainPlan(cfg, model_cfg, mesh, graphdef, optimizer, abstract, shardings,
                     NamedSharding(mesh, batch_spec(mesh, cfg.data.batch_size)), rules)


def batch_axes(mesh_shape) -> tuple[str, ...]:
    """The data-like mesh axes of size > 1 (``parallel.rules.BATCH_MESH_AXES`` present in
    ``mesh_shape``)."""
    return tuple(axis for axis in rules_lib.BATCH_MESH_AXES if mesh_shape.get(axis, 1) > 1)


def batch_spec(mesh: Mesh, batch_size: int) -> PartitionSpec:
    """Batch rows split over the data-like mesh axes (those of size > 1 that divide it)."""
    axes, ways = [], 1
    for axis in batch_axes(mesh.shape):
        size = mesh.shape[axis]
        if batch_size % (ways * size) == 0:
            axes.append(axis)
            ways *= size
    return PartitionSpec(tuple(axes) if axes else None, None)


def init_train_state(plan: TrainPlan) -> TrainState:
    """A fresh state (``cfg.seed``), every array created directly in its shards."""
    def create():
        model = OpenMythos(plan.model_cfg, rngs=nnx.Rngs(plan.cfg.seed))
        _, params, buffers = nnx.split(model, nnx.Param, ...)
        params, buffers = nnx.to_pure_dict(params), nnx.to_pure_dict(buffers)
        return TrainState(jnp.int32(0), params, buffers, plan.optimizer.init(params),
                          jnp.int32(0))

    with plan.context():
        return jax.jit(create, out_shardings=plan.shardings)()


def model_from_state(plan: TrainPlan, state: TrainState) -> OpenMythos:
    """The OpenMythos module holding ``state``'s parameters and buffers."""
    return nnx.merge(plan.graphdef, state.params, state.buffers)


# ---------------------------------------------------------------------------- loss
def token_terms(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-token cross-entropy (fp32) and whether the argmax is the target: logits (B, T, V),
    targets (B, T) -> two (B, T) arrays."""
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    return nll, jnp.argmax(logits, axis=-1) == targets


def token_loss(logits: jax.Array, targets: jax.Array, mask: jax.Array):
    """Masked mean cross-entropy and accuracy: logits (B, T, V), targets/mask (B, T)."""
    nll, right = token_terms(logits, targets)
    weight = mask.astype(jnp.float32)
    total = jnp.maximum(jnp.sum(weight), 1.0)
    return jnp.sum(nll * weight) / total, jnp.sum(right * weight) / total


def _moe_terms(info) -> dict[str, jax.Array]:
    """The step's router statistics (``loops.LoopInfo.moe``)."""
    moe = info.moe
    return {"aux_loss": moe.aux_loss, "z_loss": moe.z_loss, "dropped": moe.dropped,
            "expert_load": moe.load}


def make_loss_fn(plan: TrainPlan):
    """loss(params, buffers, batch, counts) -> (total, (metrics, new buffers))."""
    cfg = plan.cfg
    schedule = cfg.loops.build()

    def loss_fn(params, buffers, batch, counts):
        model = nnx.merge(plan.graphdef, params, buffers)
        logits, info, _ = model(batch["inputs"], schedule.loop_spec(counts), return_info=True)
        ce, accuracy = token_loss(logits, batch["targets"], batch["loss_mask"])
        terms = _moe_terms(info)
        total = (ce + cfg.optim.aux_loss_weight * terms["aux_loss"]
                 + cfg.optim.z_loss_weight * terms["z_loss"]
                 + cfg.optim.ponder_weight * jnp.mean(info.ponder_cost))
        metrics = {"loss": total, "ce": ce, "accuracy": accuracy,
                   "ponder": jnp.mean(info.ponder_cost),
                   "loops": jnp.mean(info.loops_run.astype(jnp.float32)),
                   "state_rms": jnp.mean(info.state_rms), **terms}
        return total, (metrics, nnx.to_pure_dict(nnx.state(model, nnx.Not(nnx.Param))))

    return loss_fn


def _accumulated_grads(loss_fn, params, buffers, batch, counts, accum: int):
    """Gradients averaged over ``accum`` micro-batches (a scan; one micro-batch when 1)."""
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if accum == 1:
        (_, (metrics, buffers)), grads = grad_fn(params, buffers, batch, counts)
        return grads, metrics, buffers

    def split(x):
        return x.reshape((accum, x.shape[0] // accum) + x.shape[1:])

    micro = jax.tree.map(split, batch)
    micro_counts = split(counts) if counts.ndim else jnp.broadcast_to(counts, (accum,))

    def body(carry, xs):
        grads_sum, buffers = carry
        micro_batch, micro_count = xs
        (_, (metrics, buffers)), grads = grad_fn(params, buffers, micro_batch, micro_count)
        return (jax.tree.map(jnp.add, grads_sum, grads), buffers), metrics

    zeros = jax.tree.map(jnp.zeros_like, params)
    (grads, buffers), metrics = jax.lax.scan(body, (zeros, buffers), (micro, micro_counts))
    return (jax.tree.map(lambda g: g / accum, grads),
            jax.tree.map(lambda m: jnp.mean(m, axis=0), metrics), buffers)


def _update_router_bias(plan: TrainPlan, params: dict, buffers: dict, load: jax.Array,
                        rate: float) -> dict:
    """The buffers after the aux-loss-free balancing step on every ``RouterBias``."""
    model = update_router_biases(nnx.merge(plan.graphdef, params, buffers), load, rate)
    return nnx.to_pure_dict(nnx.state(model, nnx.Not(nnx.Param)))


def _all_finite(tree) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def batch_fingerprint(inputs: jax.Array) -> jax.Array:
    """A position-weighted checksum of the token ids (uint32): equal batches, equal prints;
    lets a resumed run's log show that no batch was repeated or skipped."""
    weights = jnp.arange(1, inputs.size + 1, dtype=jnp.uint32).reshape(inputs.shape)
    return jnp.sum(inputs.astype(jnp.uint32) * weights, dtype=jnp.uint32)


def make_train_step(plan: TrainPlan):
    """The jitted step ``(state, batch) -> (state, metrics)``; a non-finite loss or gradient
    leaves parameters, optimizer state and buffers unchanged and counts the skip."""
    cfg = plan.cfg
    schedule = cfg.loops.build()
    loss_fn = make_loss_fn(plan)
    lr_schedule = learning_rate(cfg.optim, cfg.steps)
    base_key = jax.random.key(cfg.seed)

    def step_fn(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        batch_size = batch["inputs"].shape[0]
        key = jax.random.fold_in(base_key, state.step)
        counts = sample_loops(schedule, state.step, key, batch_size)
        grads, metrics, buffers = _accumulated_grads(loss_fn, state.params, state.buffers,
                                                     batch, counts, cfg.optim.grad_accum)
        updates, opt_state = plan.optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        if cfg.optim.router_bias_rate > 0:
            buffers = _update_router_bias(plan, params, buffers, metrics["expert_load"],
                                          cfg.optim.router_bias_rate)
        finite = jnp.isfinite(metrics["loss"]) & _all_finite(grads)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
        new_state = TrainState(
            step=state.step + 1,
            params=keep(params, state.params),
            buffers=keep(buffers, state.buffers),
            opt_state=keep(opt_state, state.opt_state),
            nonfinite=jnp.where(finite, 0, state.nonfinite + 1))
        model = nnx.merge(plan.graphdef, new_state.params, new_state.buffers)
        metrics.update(grad_norm=optax.tree.norm(grads), lr=lr_schedule(state.step),
                       batch_fingerprint=batch_fingerprint(batch["inputs"]),
                       finite=finite, nonfinite_streak=new_state.nonfinite,
                       rho_A=jnp.max(jnp.abs(model.recurrent.injection.get_A())))
        metrics["load_max_over_mean"] = load_ratio(metrics["expert_load"])
        return new_state, metrics

    jitted = jax.jit(step_fn, in_shardings=(plan.shardings, plan.batch_sharding),
                     out_shardings=(plan.shardings, None), donate_argnums=(0,))

    def run(state: TrainState, batch: dict):
        with plan.context():
            return jitted(state, batch)

    run.jitted = jitted
    return run
