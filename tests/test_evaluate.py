"""The held-out evaluation: token-weighted over real tokens, padding counts for nothing.

A small text corpus whose held-out split has fewer windows than ``data.eval_examples`` (so the
eval batches end in padding rows, then whole padding batches): ``evaluate`` must give the same
numbers for 1, 2 or 32 batches, equal to a float64 recomputation over exactly the held-out
windows, and the same again on a 4-device data-parallel mesh (its global sums)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mythos_jax.parallel.mesh import make_mesh
from mythos_jax.train import data
from mythos_jax.train.config import load_train_config
from mythos_jax.train.evaluate import evaluate
from mythos_jax.train.step import build_plan, init_train_state, model_from_state


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    for i in range(8):     # documents of different lengths: the last window of each is short
        (folder / f"doc{i}.txt").write_bytes(b"line %d of a small corpus\n" % i * (2 + i))
    overrides = ["data.source=text", f"data.paths=['{folder}/*.txt']",
                 "data.eval_fraction=0.25", "data.batch_size=4", "data.eval_examples=128",
                 "eval.loops=[1,3]"]
    yield overrides
    data._store.cache_clear()


def _float64_heldout_means(cfg, model, n_loops):
    """Loss and token accuracy over every scored token of every held-out window, and exact
    match over the windows, in float64 from the model's logits; straight from the packed
    held-out stream, not through ``eval_batches``."""
    stream = data.lm_streams(cfg.data)[1]
    nll_sum = right_sum = tokens = exact = 0.0
    for index in range(stream.num_windows):
        window, filled = stream.window(index)
        inputs, targets = window[:-1], window[1:]
        mask = np.arange(stream.seq_len) < filled - 1
        logits = np.asarray(model(jnp.asarray(inputs[None]), n_loops)[0], np.float64)
        shifted = logits - logits.max(-1, keepdims=True)
        log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
        nll = -log_probs[np.arange(len(targets)), targets]
        right = logits.argmax(-1) == targets
        nll_sum += nll[mask].sum()
        right_sum += right[mask].sum()
        tokens += mask.sum()
        exact += bool(right[mask].all())
    return {"loss": nll_sum / tokens, "accuracy": right_sum / tokens,
            "exact_match": exact / stream.num_windows, "tokens": tokens,
            "sequences": stream.num_windows}


def test_heldout_eval_is_token_weighted_and_padding_changes_nothing(small_corpus):
    cfg = load_train_config("tiny", small_corpus)
    stream = data.lm_streams(cfg.data)[1]
    assert stream.num_windows % cfg.data.batch_size, "the last real batch must hold padding"
    real_batches = -(-stream.num_windows // cfg.data.batch_size)
    assert 2 <= real_batches < 32
    lengths = [stream.window(i)[1] for i in range(stream.num_windows)]
    assert len(set(lengths)) > 1, "windows of different lengths: weighting matters"

    plan = build_plan(cfg, make_mesh(cfg.mesh))
    state = init_train_state(plan)
    model = model_from_state(plan, state)
    model.eval()
    everything = evaluate(plan, state, n_batches=real_batches)
    with_padding = evaluate(plan, state, n_batches=32)
    for n_loops in cfg.eval.loops:
        want = _float64_heldout_means(cfg, model, n_loops)
        for name, value in want.items():
            np.testing.assert_allclose(everything["heldout"][n_loops][name], value, rtol=1e-5,
                                       err_msg=f"{name} at {n_loops} loops")
        assert with_padding["heldout"][n_loops] == everything["heldout"][n_loops]


def test_heldout_eval_is_the_same_on_a_data_parallel_mesh(small_corpus):
    cfg = load_train_config("tiny", small_corpus)
    sharded = load_train_config("tiny", small_corpus + ["mesh=data=4"])
    plan = build_plan(cfg, make_mesh(cfg.mesh))
    state = init_train_state(plan)
    plan4 = build_plan(sharded, make_mesh(sharded.mesh, jax.devices()[:4]))
    state4 = jax.device_put(state, plan4.shardings)
    one, four = evaluate(plan, state, n_batches=32), evaluate(plan4, state4, n_batches=32)
    for n_loops in cfg.eval.loops:
        for name, value in one["heldout"][n_loops].items():
            np.testing.assert_allclose(four["heldout"][n_loops][name], value, rtol=1e-6,
                                       err_msg=f"{name} at {n_loops} loops")
