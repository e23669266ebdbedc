"""mythos-jax against open-mythos 0.5.0 (PyTorch, CPU, fp32, eval mode, dropout 0): logits, and
the gradients of the training loss w.r.t. every parameter.

The torch models get weights moved away from their init (``perturb_openmythos``: attention
and FFN projections, norm weights, LTI parameters, injection B, router, halting weights,
embedding). What that buys is asserted, so the parity below covers those paths: attention is
peaked (entropy well below uniform, so RoPE, scale and mask errors show), tokens route to
different experts, positions halt at different loops, and one case makes OpenMythos's
whole-batch early ``break`` fire. Tolerances are relative to max|reference|
(``LOGIT_RTOL``, ``GRAD_RTOL`` in ``mythos_jax.interop.parity``).
"""

from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx

from mythos_jax.interop.openmythos import (config_to_torch, import_reference, load_state_dict,
                                           to_torch_state_dict)
from mythos_jax.interop.parity import GRAD_RTOL, LOGIT_RTOL, build_pair, relative_error
from mythos_jax.train.step import token_loss

BATCH = 3
MAX_ENTROPY_FRACTION = 0.5   # mean attention entropy / its value under uniform attention
BREAK_SEED = 8               # ids (BATCH, max_seq_len) that all halt within 6 loops
GRAD_BATCH = 2


@pytest.fixture(scope="module", params=["mla", "gqa"])
def models(request):
    return build_pair(request.param)


def _ids(cfg, batch, seq_len, seed):
    return torch.randint(0, cfg.vocab_size, (batch, seq_len),
                         generator=torch.Generator().manual_seed(seed))


def _torch_logits_and_trace(torch_model, ids, n_loops):
    """Logits, plus what hooks saw: the halting probabilities of every loop run ("p", one
    (B, T) per loop), router logits ("router") and attention probabilities ("attention", one
    (B, H, T, T) per attention call: the 4-d softmaxes of OpenMythos's attention)."""
    recorded = {"p": [], "router": [], "attention": []}
    softmax = F.softmax

    def recording_softmax(x, *args, **kwargs):
        out = softmax(x, *args, **kwargs)
        if out.ndim == 4:
            recorded["attention"].append(out.detach().clone())
        return out

    act = torch_model.recurrent.act.register_forward_hook(
        lambda m, i, o: recorded["p"].append(o.detach().clone()))
    router = torch_model.recurrent.block.ffn.router.register_forward_hook(
        lambda m, i, o: recorded["router"].append(o.detach().clone()))
    try:
        with torch.no_grad(), mock.patch.object(F, "softmax", recording_softmax):
            logits = torch_model(ids, n_loops=n_loops).numpy()
    finally:
        act.remove()
        router.remove()
    return logits, recorded


def _halting_loops(probabilities, threshold):
    """Loop (1-based) at which each position halts under OpenMythos's rule; 0 = never."""
    cumulative = torch.zeros_like(probabilities[0])
    halted_at = torch.zeros_like(probabilities[0], dtype=torch.long)
    for loop, p in enumerate(probabilities, start=1):
        running = halted_at == 0
        cumulative = cumulative + p * running.float()
        halted_at[running & (cumulative >= threshold)] = loop
    return halted_at


def _entropy_fraction(attention):
    """Mean over attention calls, batch, heads and query positions t >= 1 of the entropy of
    the attention probabilities over their log(t + 1), its value for uniform (causal)
    attention."""
    probs = torch.stack(attention)                        # (calls, B, H, T, T)
    entropy = -(probs * torch.log(probs.clamp_min(1e-30))).sum(-1)[..., 1:]
    uniform = torch.log(torch.arange(2, probs.shape[-1] + 1, dtype=torch.float32))
    return float((entropy / uniform).mean())


@pytest.mark.parametrize("n_loops", [1, 2, 3, 6])
@pytest.mark.parametrize("seq_len", [1, 24])
def test_logits_match(models, n_loops, seq_len):
    torch_model, jax_model = models
    cfg = jax_model.cfg
    ids = _ids(cfg, BATCH, seq_len, n_loops * 100 + seq_len)
    expected, trace = _torch_logits_and_trace(torch_model, ids, n_loops)
    got = np.asarray(jax_model(jnp.asarray(ids.numpy()), n_loops))
    assert got.shape == (BATCH, seq_len, cfg.vocab_size)
    assert relative_error(got, expected) <= LOGIT_RTOL

    if seq_len > 1 and n_loops == 6:
        # The weights really exercise attention, ACT and routing: attention is peaked,
        # halted positions halt at different loops, and tokens pick different experts,
        # with the router bias changing some choices.
        calls = cfg.prelude_layers + len(trace["p"]) + cfg.coda_layers
        assert len(trace["attention"]) == calls
        assert _entropy_fraction(trace["attention"]) <= MAX_ENTROPY_FRACTION
        halted_at = _halting_loops(trace["p"], cfg.act_threshold)
        assert len(torch.unique(halted_at[halted_at > 0])) >= 2, halted_at
        logits = torch.cat(trace["router"])
        bias = torch_model.recurrent.block.ffn.router_bias
        picks = torch.sort((logits + bias).topk(cfg.n_experts_per_tok).indices, dim=-1).values
        unbiased = torch.sort(logits.topk(cfg.n_experts_per_tok).indices, dim=-1).values
        assert len(torch.unique(picks, dim=0)) >= 3
        assert (picks != unbiased).any()


def test_whole_batch_early_break_gives_the_same_logits(models):
    """OpenMythos stops looping once every position has halted; our scan runs all 6 loops with
    halted positions masked. The break fires here (fewer ACT calls than loops) and the logits
    still match."""
    torch_model, jax_model = models
    cfg, n_loops = jax_model.cfg, 6
    ids = _ids(cfg, BATCH, cfg.max_seq_len, BREAK_SEED)
    expected, trace = _torch_logits_and_trace(torch_model, ids, n_loops)
    loops_run = len(trace["p"])                   # one ACT call per loop iteration run
    halted_at = _halting_loops(trace["p"], cfg.act_threshold)
    assert loops_run < n_loops and (halted_at > 0).all() and halted_at.max() == loops_run
    assert len(torch.unique(halted_at)) >= 2, halted_at
    got = np.asarray(jax_model(jnp.asarray(ids.numpy()), n_loops))
    assert relative_error(got, expected) <= LOGIT_RTOL


def _torch_grads_in_jax_layout(torch_model, cfg) -> dict:
    """Every torch parameter's ``.grad``, put through the converter (``load_state_dict``): the
    pure dict of the ``nnx.Param`` values of a model holding the gradients. Buffers (router
    bias, RoPE tables) keep their values; ``head.weight`` is ``embed.weight`` (tied: its one
    gradient holds both uses)."""
    params = dict(torch_model.named_parameters())
    buffers = dict(torch_model.named_buffers())
    assert not [name for name, p in params.items() if p.grad is None]
    state_dict = {**buffers, **{name: p.grad for name, p in params.items()}}
    state_dict["head.weight"] = state_dict["embed.weight"]
    grads = load_state_dict(cfg, state_dict)
    # The converter maps every torch parameter, and nothing else, onto a JAX leaf.
    assert set(to_torch_state_dict(grads)) - set(buffers) - {"head.weight"} == set(params)
    return nnx.to_pure_dict(nnx.state(grads, nnx.Param))


def test_training_loss_gradients_match_for_every_parameter(models):
    """OpenMythos's training loss is plain next-token cross-entropy (its training script cuts
    seq_len + 1 windows into inputs and targets shifted by one and takes ``F.cross_entropy``
    over all positions; no MoE aux loss, z-loss or ponder loss). Ours is the trainer's
    ``token_loss`` with a full mask (its aux, z and ponder weights default to 0). Gradients of
    that loss w.r.t. every parameter at ``max_loop_iters`` loops, with ACT active: positions
    halt at two or more different loops, so gradient flows through both ACT weights (p before
    a position's halting loop, the remainder 1 - cumulative p on it) and none after it."""
    torch_model, jax_model = models
    cfg = jax_model.cfg
    window = _ids(cfg, GRAD_BATCH, cfg.max_seq_len + 1, 5)
    inputs, targets = window[:, :-1], window[:, 1:]

    halting = []
    hook = torch_model.recurrent.act.register_forward_hook(
        lambda m, i, o: halting.append(o.detach().clone()))
    try:
        logits = torch_model(inputs, n_loops=cfg.max_loop_iters)
        torch_loss = F.cross_entropy(logits.reshape(-1, cfg.vocab_size), targets.reshape(-1))
        torch_loss.backward()
        expected = _torch_grads_in_jax_layout(torch_model, cfg)
    finally:
        hook.remove()
        torch_model.zero_grad(set_to_none=True)
    halted_at = _halting_loops(halting, cfg.act_threshold)
    assert len(torch.unique(halted_at[halted_at > 0])) >= 2, halted_at

    graphdef, params, rest = nnx.split(jax_model, nnx.Param, ...)

    jax_inputs, jax_targets = jnp.asarray(inputs.numpy()), jnp.asarray(targets.numpy())

    def loss(params):
        out = nnx.merge(graphdef, params, rest)(jax_inputs, cfg.max_loop_iters)
        return token_loss(out, jax_targets, jnp.ones_like(jax_targets))[0]

    value, grads = jax.jit(jax.value_and_grad(loss))(params)
    assert relative_error(value, torch_loss.item()) <= LOGIT_RTOL

    flat_got = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(grads))[0]
    flat_want = jax.tree_util.tree_flatten_with_path(expected)[0]
    errors = {}
    for (path, got), (want_path, want) in zip(flat_got, flat_want, strict=True):
        name = jax.tree_util.keystr(path)
        assert path == want_path and np.abs(want).max() > 0, name
        errors[name] = relative_error(got, want)
    worst = max(errors, key=errors.get)
    assert errors[worst] <= GRAD_RTOL, f"worst {worst}: {errors[worst]:.2e}"


def test_round_trip_is_bitwise(models):
    torch_model, jax_model = models
    state_dict = to_torch_state_dict(jax_model)
    rebuilt = import_reference().OpenMythos(config_to_torch(jax_model.cfg))
    rebuilt.load_state_dict(state_dict, strict=True)
    original = torch_model.state_dict()
    assert set(rebuilt.state_dict()) == set(original)
    for key, tensor in rebuilt.state_dict().items():
        assert tensor.dtype == original[key].dtype, key
        assert torch.equal(tensor, original[key]), key
    assert rebuilt.head.weight.data_ptr() == rebuilt.embed.weight.data_ptr()


def test_default_loop_count_is_max_loop_iters(models):
    torch_model, jax_model = models
    ids = torch.randint(0, jax_model.cfg.vocab_size, (2, 8))
    with torch.no_grad():
        expected = torch_model(ids).numpy()
    assert relative_error(jax_model(jnp.asarray(ids.numpy())), expected) <= LOGIT_RTOL


@pytest.mark.parametrize("thing", [torch.nn.Linear(2, 2), {"cfg": None}])
def test_from_torch_refuses_what_is_not_an_openmythos_module(thing):
    from mythos_jax.interop.openmythos import from_torch

    with pytest.raises(TypeError, match=f"expects an open_mythos.main.OpenMythos module, got "
                                        f".*{type(thing).__qualname__}"):
        from_torch(thing)
