"""mythos-jax against open-mythos 0.5.0 (PyTorch, CPU, fp32, eval mode, dropout 0).

The torch models get weights moved away from their init (``perturb_openmythos``: norm weights,
LTI parameters, injection B, router bias, halting weights, embedding) so that routing varies
between tokens and positions halt at different loops; both facts are asserted, so the parity
below covers those paths.
"""

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from mythos_jax.interop.openmythos import config_to_torch, import_reference, to_torch_state_dict
from mythos_jax.interop.parity import TOLERANCE, build_pair

BATCH = 3


@pytest.fixture(scope="module", params=["mla", "gqa"])
def models(request):
    return build_pair(request.param)


def _torch_logits_and_trace(torch_model, ids, n_loops):
    """Logits, plus per-position halting loop and per-token expert choices from hooks."""
    recorded = {"p": [], "router": []}
    act = torch_model.recurrent.act.register_forward_hook(
        lambda m, i, o: recorded["p"].append(o.detach().clone()))
    router = torch_model.recurrent.block.ffn.router.register_forward_hook(
        lambda m, i, o: recorded["router"].append(o.detach().clone()))
    try:
        with torch.no_grad():
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


@pytest.mark.parametrize("n_loops", [1, 2, 3, 6])
@pytest.mark.parametrize("seq_len", [1, 24])
def test_logits_match(models, n_loops, seq_len):
    torch_model, jax_model = models
    cfg = jax_model.cfg
    ids = torch.randint(0, cfg.vocab_size, (BATCH, seq_len),
                        generator=torch.Generator().manual_seed(n_loops * 100 + seq_len))
    expected, trace = _torch_logits_and_trace(torch_model, ids, n_loops)
    got = np.asarray(jax_model(jnp.asarray(ids.numpy()), n_loops))
    assert got.shape == (BATCH, seq_len, cfg.vocab_size)
    assert np.abs(got - expected).max() <= TOLERANCE

    if seq_len > 1 and n_loops == 6:
        # The weights really exercise ACT and routing: positions halt at different loops
        # (some never within 6 loops would also do), and tokens pick different experts,
        # with the router bias changing some choices.
        halted_at = _halting_loops(trace["p"], cfg.act_threshold)
        assert len(torch.unique(halted_at)) >= 2, halted_at
        logits = torch.cat(trace["router"])
        bias = torch_model.recurrent.block.ffn.router_bias
        picks = torch.sort((logits + bias).topk(cfg.n_experts_per_tok).indices, dim=-1).values
        unbiased = torch.sort(logits.topk(cfg.n_experts_per_tok).indices, dim=-1).values
        assert len(torch.unique(picks, dim=0)) >= 3
        assert (picks != unbiased).any()


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
    assert np.abs(np.asarray(jax_model(jnp.asarray(ids.numpy()))) - expected).max() <= TOLERANCE


@pytest.mark.parametrize("thing", [torch.nn.Linear(2, 2), {"cfg": None}])
def test_from_torch_refuses_what_is_not_an_openmythos_module(thing):
    from mythos_jax.interop.openmythos import from_torch

    with pytest.raises(TypeError, match=f"expects an open_mythos.main.OpenMythos module, got "
                                        f".*{type(thing).__qualname__}"):
        from_torch(thing)
