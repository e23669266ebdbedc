import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from mythos_jax import LoopSpec, OpenMythos, variants
from mythos_jax.interop.openmythos import config_to_torch, import_reference, to_torch_state_dict
from mythos_jax.layers.common import dropout
from mythos_jax.layers.norm import RMS_EPS, RMSNorm
from mythos_jax.layers.rope import apply_rope, rope_cos_sin
from jaxprs import eqns
from numerics import assert_close, relative_error

NORM_RTOL = 1e-6      # one fp32 rsqrt and two products, relative to max |output|
ROPE_RTOL = 1e-5      # fp32 rotations by angles up to 47 rad, relative to max |score|


@pytest.fixture(scope="module")
def mla_model():
    return OpenMythos(variants.tiny_mla(), rngs=nnx.Rngs(0))


def _ids(cfg, batch=2, seq=8, seed=0):
    return jax.random.randint(jax.random.key(seed), (batch, seq), 0, cfg.vocab_size)


@pytest.mark.parametrize("make", [variants.tiny_mla, variants.tiny_gqa])
def test_forward_shape_and_loops_matter(make):
    cfg = make(act_threshold=50.0)  # no position halts: every loop contributes
    model = OpenMythos(cfg, rngs=nnx.Rngs(0))
    ids = _ids(cfg)
    one, three = model(ids, 1), model(ids, 3)
    assert one.shape == (2, 8, cfg.vocab_size) and one.dtype == jnp.float32
    assert np.isfinite(np.asarray(three)).all()
    assert not np.allclose(one, three)
    beyond = model(ids, cfg.max_loop_iters + 3)  # LoRA index clamps, no error
    assert np.isfinite(np.asarray(beyond)).all()


def test_openmythos_n_loops_keyword_is_loops(mla_model):
    """Code ported from PyTorch calls ``model(ids, n_loops=4)``: the same logits as loops=4."""
    ids = _ids(mla_model.cfg)
    np.testing.assert_array_equal(mla_model(ids, n_loops=3), mla_model(ids, 3))
    with pytest.raises(ValueError, match="give loops or n_loops"):
        mla_model(ids, 3, n_loops=3)


def test_causal(mla_model):
    ids = _ids(mla_model.cfg, seq=10)
    changed = ids.at[:, 6:].set((ids[:, 6:] + 1) % mla_model.cfg.vocab_size)
    a, b = mla_model(ids), mla_model(changed)
    np.testing.assert_allclose(a[:, :6], b[:, :6], atol=1e-6)
    assert not np.allclose(a[:, 6:], b[:, 6:])


def test_every_rmsnorm_uses_openmythos_eps(mla_model):
    """Each of the model's RMSNorms, on inputs with mean(x^2) = 1e-6 (where eps = 1e-6 halves
    the output's square), equals the OpenMythos RMSNorm of the same name (eps 1e-6 in every
    one) and the formula at eps 1e-6, not at 1e-5; the norms are the same set in both."""
    reference = import_reference()
    torch_model = reference.OpenMythos(config_to_torch(mla_model.cfg))
    torch_norms = {name: m for name, m in torch_model.named_modules()
                   if isinstance(m, reference.RMSNorm)}
    ours = {".".join(map(str, path)): m for path, m in nnx.iter_graph(mla_model)
            if isinstance(m, RMSNorm)}
    assert ours.keys() == torch_norms.keys() and len(ours) == 14
    inputs = {dim: 1e-3 * np.asarray(jax.random.normal(jax.random.key(dim), (3, dim)))
              for dim in (64, 32, 16)}                     # dim, q_lora_rank, kv_lora_rank
    assert {m.eps for m in torch_norms.values()} == {RMS_EPS}
    for name, norm in ours.items():
        x = inputs[norm.weight.shape[0]]
        with torch.no_grad():
            want = torch_norms[name](torch.from_numpy(x)).numpy()
        assert_close(norm(jnp.asarray(x)), want, NORM_RTOL, name)
        mean_square = np.mean(np.square(x, dtype=np.float64), axis=-1, keepdims=True)
        weight = np.asarray(norm.weight[...])
        assert_close(x / np.sqrt(mean_square + RMS_EPS) * weight, want, NORM_RTOL, name)
        assert relative_error(x / np.sqrt(mean_square + 10 * RMS_EPS) * weight, want) > 0.1


# Initialisation against OpenMythos's, tensor by tensor (init only, no forward).
INIT_SIGMAS = 6.0        # sampling tolerance of every statistic below, in its standard errors
TAIL = 1.8               # |x - mean| > 1.8 std: 7% of a normal, none of a uniform
POOL_BELOW = 512         # random tensors smaller than this are redrawn POOL_DRAWS times
POOL_DRAWS = 4096


def _torch_init(cfg, seed: int) -> tuple[dict[str, np.ndarray], "torch.nn.Module"]:
    torch.manual_seed(seed)
    model = import_reference().OpenMythos(config_to_torch(cfg))
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}, model


def _pooled_draws(cfg, torch_model, name: str) -> tuple[np.ndarray, np.ndarray]:
    """POOL_DRAWS fresh draws of one small tensor (a Linear bias, which OpenMythos's
    ``_init_weights`` leaves at torch's default): ours from the model's init vmapped over seeds
    (only that leaf is computed), OpenMythos's from its module's ``reset_parameters``."""
    assert name.endswith(".bias"), f"{name}: no cheap way to redraw it in torch"
    path = name.split(".")            # biases keep their torch name in our tree

    def leaf(key):
        value = nnx.to_pure_dict(nnx.state(OpenMythos(cfg, rngs=nnx.Rngs(key))))
        for part in path:
            value = value[part]
        return value

    ours = jax.jit(jax.vmap(leaf))(jax.random.split(jax.random.key(1), POOL_DRAWS))
    module = torch_model.get_submodule(name.rsplit(".", 1)[0])
    reference = []
    for _ in range(POOL_DRAWS):
        module.reset_parameters()
        reference.append(module.bias.detach().numpy().copy())
    return np.asarray(ours).ravel(), np.stack(reference).ravel()


def _assert_same_distribution(name: str, ours: np.ndarray, ref: np.ndarray) -> None:
    """Mean, std and (n >= 4096) the tail fraction beyond TAIL std agree within INIT_SIGMAS
    standard errors of two samples of these sizes."""
    n, m = ours.size, ref.size
    mean, std = float(ref.mean()), float(ref.std())
    assert abs(ours.mean() - mean) <= INIT_SIGMAS * np.hypot(ours.std() / n ** 0.5,
                                                             std / m ** 0.5), name
    kurtosis = float(np.mean((ref - mean) ** 4)) / std ** 4       # 3 normal, 1.8 uniform
    relative_se = np.sqrt((kurtosis - 1) / 4 * (1 / n + 1 / m))   # of std_ours / std_ref
    assert abs(ours.std() / std - 1) <= INIT_SIGMAS * relative_se, (name, ours.std(), std)
    if min(n, m) >= 4096:
        tails = [float(np.mean(np.abs(x - mean) > TAIL * std)) for x in (ours, ref)]
        p = max(np.mean(tails), 1 / min(n, m))
        assert abs(tails[0] - tails[1]) <= INIT_SIGMAS * np.sqrt(p * (1 - p) * (1 / n + 1 / m)
                                                                 ), (name, tails)


@pytest.mark.parametrize("attn_type", ["mla", "gqa"])
def test_initialisation_matches_openmythos_for_every_tensor(attn_type):
    """Every tensor of a dim-512 model against OpenMythos's, named by the converter's map:
    those equal in two OpenMythos inits (norms, LTI, router bias) bit for bit, the random
    ones in distribution (mean, std, tails; the halt bias pooled over 4096 redraws)."""
    cfg = variants.tiny_mla(attn_type=attn_type, dim=512, n_heads=4, lora_rank=32,
                            max_loop_iters=16)
    (ref, torch_model), (other, _) = _torch_init(cfg, 0), _torch_init(cfg, 1)
    ours = {k: v.numpy() for k, v in to_torch_state_dict(OpenMythos(cfg, rngs=nnx.Rngs(0))
                                                         ).items()}
    assert ours.keys() == ref.keys()
    pooled = 0
    for name, value in ref.items():
        assert ours[name].shape == value.shape and ours[name].dtype == value.dtype, name
        if np.array_equal(value, other[name]):                       # a constant
            np.testing.assert_array_equal(ours[name], value, err_msg=name)
        elif value.size < POOL_BELOW:
            draws, ref_draws = _pooled_draws(cfg, torch_model, name)
            assert ref_draws.min() <= ours[name].min() and ours[name].max() <= ref_draws.max()
            _assert_same_distribution(name, draws, ref_draws)
            pooled += 1
        else:
            _assert_same_distribution(name, ours[name].ravel(), value.ravel())
    assert pooled == 1                                     # recurrent.act.halt.bias


def test_recurrence_is_one_scan_with_shared_weights(mla_model):
    graphdef, state = nnx.split(mla_model)

    def forward(state, ids, n_loops):
        return nnx.merge(graphdef, state)(ids, n_loops)

    ids = _ids(mla_model.cfg)
    jaxpr = jax.make_jaxpr(lambda s, i: forward(s, i, 11))(state, ids)
    scans = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "scan"]
    assert len(scans) == 1 and scans[0].params["length"] == 11
    scan = scans[0]
    # The only per-loop arrays are the loop indices and the per-loop expert-load carry: the
    # block's weights enter as scan constants (broadcast to every iteration), never stacked.
    shapes = [v.aval.shape for v in scan.invars]
    assert sorted(s for s in shapes if s[:1] == (11,)) == [(11,), (11, mla_model.cfg.n_experts)]
    block_size = sum(x.size for x in jax.tree.leaves(nnx.state(mla_model.recurrent.block)))
    assert sum(int(np.prod(s)) for s in shapes) > block_size
    # The traced program does not grow with the loop count.
    small = jax.make_jaxpr(lambda s, i: forward(s, i, 2))(state, ids)
    assert len(small.jaxpr.eqns) == len(jaxpr.jaxpr.eqns)


def test_dropout_follows_train_and_eval():
    model = OpenMythos(variants.tiny_mla(dropout=0.2), rngs=nnx.Rngs(0))
    ids = _ids(model.cfg)
    train_a, train_b = model(ids), model(ids)
    assert not np.allclose(train_a, train_b)          # a fresh mask per call
    model.eval()
    eval_a, eval_b = model(ids), model(ids)
    np.testing.assert_array_equal(eval_a, eval_b)
    no_dropout = OpenMythos(variants.tiny_mla(), rngs=nnx.Rngs(0))
    np.testing.assert_allclose(eval_a, no_dropout(ids), atol=1e-6)  # same weights, same seed


def test_dropout_zeroes_at_its_rate_and_rescales_the_rest():
    """Inverted dropout: the fraction zeroed is the rate within 5 binomial sigmas, kept
    values are scaled by 1 / (1 - rate), and without a key (eval) nothing changes."""
    rate, size = 0.3, 200_000
    x = jnp.full((size,), 2.0)
    out = np.asarray(dropout(x, rate, jax.random.key(0)))
    assert abs((out == 0).mean() - rate) <= 5 * np.sqrt(rate * (1 - rate) / size)
    np.testing.assert_allclose(out[out != 0], 2.0 / (1 - rate), rtol=1e-6)
    np.testing.assert_array_equal(dropout(x, rate, None), x)


def _random_mask_shapes(model, ids) -> collections.Counter:
    """Shapes of the random bits drawn by one forward (1 loop): one array per dropout mask."""
    graphdef, state = nnx.split(model)
    jaxpr = jax.make_jaxpr(lambda s, i: nnx.merge(graphdef, s)(i, 1))(state, ids)
    return collections.Counter(tuple(e.outvars[0].aval.shape) for e in eqns(jaxpr.jaxpr)
                               if e.primitive.name == "random_bits")


@pytest.mark.parametrize("attn_type", ["mla", "gqa"])
def test_dropout_masks_the_attention_probabilities_and_the_residual_branches(attn_type,
                                                                             monkeypatch):
    """In training, one mask per attention's probabilities (B, H, T, S) and two per block on
    its residual branches (B, T, D), nothing else: the tensors OpenMythos's dropouts see in
    training (F.dropout recorded); in eval no random bits at all. v_head_dim 8 makes the
    attention's pre-projection output (B, T, H * 8) differ in shape from the branch."""
    cfg = variants.tiny_mla(attn_type=attn_type, dropout=0.1, v_head_dim=8)
    ids = _ids(cfg)
    B, T = ids.shape
    model = OpenMythos(cfg, rngs=nnx.Rngs(0))
    masks = _random_mask_shapes(model, ids)
    if attn_type == "gqa":      # (B, kv_heads, groups, T, S) -> (B, H, T, S)
        masks = collections.Counter({(s[0], s[1] * s[2], *s[3:]) if len(s) == 5 else s: n
                                     for s, n in masks.items()})
    blocks = cfg.prelude_layers + 1 + cfg.coda_layers
    assert masks == {(B, cfg.n_heads, T, T): blocks, (B, T, cfg.dim): 2 * blocks}

    seen = collections.Counter()
    torch_dropout = torch.nn.functional.dropout

    def recorded(x, p=0.5, training=True, inplace=False):
        if training and p > 0:
            seen[tuple(x.shape)] += 1
        return torch_dropout(x, p, training, inplace)

    monkeypatch.setattr(torch.nn.functional, "dropout", recorded)
    torch_model = import_reference().OpenMythos(config_to_torch(cfg)).train()
    with torch.no_grad():
        torch_model(torch.from_numpy(np.array(ids)).long(), n_loops=1)
    assert seen == masks
    model.eval()
    assert _random_mask_shapes(model, ids) == {}


def test_rope_scores_depend_only_on_the_position_difference():
    """<R_m q, R_n k> over positions 0..47 is a Toeplitz matrix (a function of m - n), equal
    to <q, k> on the diagonal and varying with m - n; rotations keep the norm."""
    dim, length, shift = 16, 48, 17
    q, k = (jax.random.normal(jax.random.key(i), (dim,)) for i in (1, 2))
    cos, sin = rope_cos_sin(jnp.arange(length), dim, 10000.0)
    q_rot, k_rot = (apply_rope(jnp.broadcast_to(v, (1, length, 1, dim)), cos, sin)[0, :, 0]
                    for v in (q, k))
    scores = np.asarray(q_rot @ k_rot.T)                       # (m, n)
    assert_close(scores[shift:, shift:], scores[:-shift, :-shift], ROPE_RTOL)
    assert_close(np.diag(scores), np.full(length, float(q @ k)), ROPE_RTOL)
    assert np.ptp(scores[:, 0]) > 0.25 * np.abs(scores).max()      # RoPE does rotate
    assert_close(jnp.linalg.norm(q_rot, axis=-1), jnp.full(length, jnp.linalg.norm(q)),
                 ROPE_RTOL)


def test_the_model_stores_no_rope_table():
    """RoPE's cos/sin come from positions at every call: the only non-parameter state is the
    router's bias, and no array has a positions axis (max_seq_len 97 is no other size)."""
    model = OpenMythos(variants.tiny_mla(max_seq_len=97), rngs=nnx.Rngs(0))
    others = jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Not(nnx.Param)))
    assert [jax.tree_util.keystr(path) for path, _ in others] == [
        "['recurrent']['block']['ffn']['router_bias'].value"]
    assert not any(97 in leaf.shape for leaf in jax.tree.leaves(nnx.state(model)))


def test_gradients_reach_every_parameter(mla_model):
    ids = _ids(mla_model.cfg, seq=12)
    cfg = mla_model.cfg.replace(act_threshold=50.0)
    model = OpenMythos(cfg, rngs=nnx.Rngs(0))

    def loss(m):
        logits = m(ids[:, :-1], 2)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), ids[:, 1:, None], -1))

    grads = nnx.grad(loss)(model)
    for path, g in jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(grads))[0]:
        assert np.isfinite(np.asarray(g)).all(), path
        assert float(jnp.abs(g).sum()) > 0, jax.tree_util.keystr(path)


# ---------------------------------------------------------------- errors at the API boundary
def test_out_of_vocab_ids_raise(mla_model):
    vocab = mla_model.cfg.vocab_size
    with pytest.raises(ValueError, match=r"outside \[0, vocab_size=256\).*max 256"):
        mla_model(jnp.array([[1, vocab]]))
    with pytest.raises(ValueError, match="min -1"):
        mla_model(np.array([[-1, 3]]))


def test_out_of_vocab_ids_raise_under_jit_with_host_checks(mla_model):
    forward = nnx.jit(lambda m, ids: m(ids, host_checks=True))
    good = forward(mla_model, jnp.array([[1, 2]]))
    assert np.isfinite(np.asarray(good)).all()
    with pytest.raises(Exception, match="vocab_size=256"):
        jax.block_until_ready(forward(mla_model, jnp.array([[1, 999]])))


def test_a_jitted_training_step_holds_no_host_callback():
    """Traced ids, traced per-sequence counts, truncated backprop: the default forward and
    backward hold no host callback; ``host_checks=True`` adds the id and count checks."""
    model = OpenMythos(variants.tiny_mla(), rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)

    def jaxpr(host_checks):
        def loss(s, ids, counts):
            spec = LoopSpec(counts, backprop_depth=2)
            return jnp.mean(nnx.merge(graphdef, s)(ids, spec, host_checks=host_checks) ** 2)
        return str(jax.make_jaxpr(jax.grad(loss))(state, jnp.zeros((2, 8), jnp.int32),
                                                  jnp.array([3, 5], jnp.int32)))

    assert "callback" not in jaxpr(False)
    assert "debug_callback" in jaxpr(True)


def test_bad_shapes_and_types_raise(mla_model):
    with pytest.raises(ValueError, match="max_seq_len 64"):
        mla_model(jnp.zeros((1, 65), jnp.int32))
    with pytest.raises(ValueError, match=r"shape \(batch, seq_len\)"):
        mla_model(jnp.zeros((5,), jnp.int32))
    with pytest.raises(ValueError, match="integer token ids"):
        mla_model(jnp.zeros((1, 4), jnp.float32))
    with pytest.raises(TypeError, match="MythosConfig"):
        OpenMythos({"dim": 64}, rngs=nnx.Rngs(0))
