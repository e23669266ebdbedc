"""lm-eval integration: the ``mythos-jax`` model's log-likelihoods against the model's own
unbatched forward (across padding buckets, truncation, a BPE merge over the context
boundary), rolling windows against the loss, generation stops, exit-rule loops, and the
``mythos-jax lm-eval`` command on the shipped local tasks."""

import json
import pathlib
import socket

import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from lm_eval.api.instance import Instance
from lm_eval.api.registry import get_model

from mythos_jax import OpenMythos, variants
from mythos_jax.checkpoints.model import save_model
from mythos_jax.cli import main
from mythos_jax.evaluation.lm_eval_model import MythosLM
from mythos_jax.inference.generate import generate
from mythos_jax.train.tokenizer import BYTES, load_vocab

TASKS = pathlib.Path(__file__).resolve().parent.parent / "experiments" / "lm_eval_tasks"
LOOPS = 2
MAX_LENGTH = 40


@pytest.fixture(scope="module")
def model():
    m = OpenMythos(variants.tiny_mla(vocab_size=258), rngs=nnx.Rngs(0))
    m.recurrent.act.halt.bias[...] = jnp.full((1,), -1.0)   # sequences halt at different loops
    m.eval()
    return m


@pytest.fixture(scope="module")
def lm(model):
    return MythosLM(model, BYTES, LOOPS, batch_size=3, max_length=MAX_LENGTH)


@pytest.fixture(scope="module")
def checkpoint(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("lm_eval") / "model"
    save_model(model, path)
    return str(path)


def _requests(kind: str, args: list[tuple], task: str = "task") -> list[Instance]:
    return [Instance(kind, {}, a, i, (task, i, 1)) for i, a in enumerate(args)]


@nnx.jit
def _logprobs(model, ids):
    """The model's own forward of one unpadded sequence (T,) -> log-probabilities (T, V)."""
    return jax.nn.log_softmax(model(ids[None], LOOPS)[0], axis=-1)


def _reference(model, context: list[int], continuation: list[int], max_length: int = MAX_LENGTH):
    """(log-likelihood, greedy) of ``continuation`` after ``context`` from one unpadded
    forward of the last max_length + 1 tokens but the final one."""
    tokens = (context + continuation)[-(max_length + 1):]
    logprobs = _logprobs(model, jnp.asarray(tokens[:-1]))
    rows = range(len(tokens) - 1 - len(continuation), len(tokens) - 1)
    picked = [float(logprobs[t, tokens[t + 1]]) for t in rows]
    greedy = all(int(jnp.argmax(logprobs[t])) == tokens[t + 1] for t in rows)
    return sum(picked), greedy


def test_loglikelihood_equals_the_unbatched_forward_across_buckets_and_truncation(lm, model):
    """Contexts of 0 to 52 bytes in batches of 3: rows of 23, 31 and 56 tokens share a forward
    (bucket 40 = max_length, the longest left-truncated), then rows of 8 and 3 (bucket 16);
    an empty context is the EOS id; a context's trailing whitespace is scored with the
    continuation."""
    text = "def main(argv):\n    return sorted(set(argv), key=len)  # ok"
    pairs = [(text[:n], text[n:n + k]) for n, k in [(5, 3), (17, 6), (30, 1), (52, 4), (0, 3)]]
    results = lm.loglikelihood(_requests("loglikelihood", pairs))
    assert pairs[1][0].endswith(" ")
    for (context, continuation), (logprob, greedy) in zip(pairs, results):
        stripped = context.rstrip()
        ids = list(stripped.encode()) or [BYTES.eos_id]
        moved = context[len(stripped):] + continuation
        expected, expected_greedy = _reference(model, ids, list(moved.encode()))
        assert logprob == pytest.approx(expected, abs=1e-5), (context, continuation)
        assert greedy == expected_greedy


def test_a_continuation_merged_with_the_context_is_split_as_lm_eval_does(model, tmp_path):
    """Under a BPE tokenizer where "ab" is one token, context "yya" + continuation "byyab":
    the continuation is encode("yyabyyab") past the context's 3 tokens, not encode("byyab")."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(["ab ab ab ab xy y"] * 20, trainers.BpeTrainer(
        vocab_size=6, special_tokens=["<|endoftext|>"]))
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    vocab = load_vocab(str(tmp_path / "tokenizer.json"))
    ab, y = tokenizer.token_to_id("ab"), tokenizer.token_to_id("y")
    assert ab is not None and vocab.size <= model.cfg.vocab_size

    bpe_lm = MythosLM(model, vocab, LOOPS, batch_size=2, max_length=MAX_LENGTH)
    context, continuation = bpe_lm._encode_pair("yya", "byyab")
    assert context == [y, y, tokenizer.token_to_id("a")] and continuation == [y, y, ab]
    assert bpe_lm._encode("byyab") != continuation
    (logprob, greedy), = bpe_lm.loglikelihood(_requests("loglikelihood", [("yya", "byyab")]))
    assert (logprob, greedy) == pytest.approx(_reference(model, context, continuation), abs=1e-5)


def test_loglikelihood_rolling_equals_the_loss_times_tokens(lm, model):
    """An 86-byte text in windows of 40 (the first after EOS, each later one with a full
    40-token context) against the cross-entropy of those windows' forwards."""
    text = ("import os\nfor name in sorted(os.listdir('.')):\n"
            "    print(name, os.path.getsize(name))\n")
    tokens = list(text.encode())
    padded = [BYTES.eos_id] + tokens
    expected = 0.0
    for first in range(0, len(tokens), MAX_LENGTH):         # tokens first..end-1 predicted
        end = min(first + MAX_LENGTH, len(tokens))
        inputs = padded[max(0, end - MAX_LENGTH):end]
        targets = padded[max(0, end - MAX_LENGTH) + 1:end + 1]
        logprobs = _logprobs(model, jnp.asarray(inputs))
        losses = -jnp.take_along_axis(logprobs, jnp.asarray(targets)[:, None], axis=-1)[:, 0]
        expected -= float(losses[-(end - first):].mean()) * (end - first)
    total, empty = lm.loglikelihood_rolling(_requests("loglikelihood_rolling",
                                                      [(text,), ("",)]))
    assert len(tokens) > 2 * MAX_LENGTH
    assert total == pytest.approx(expected, abs=1e-4) and empty == 0.0


def test_generate_until_stops_at_every_until_string_and_at_max_gen_toks(lm, model):
    """Against greedy ``generate`` of 12 tokens (the shapes lm uses: batch 3, a 28-token
    prompt budget, so nothing more is compiled)."""
    prompt = "def f(x):\n    return"
    greedy = generate(model, [list(prompt.encode())] * 3, 12, LOOPS, temperature=0.0,
                      eos_id=BYTES.eos_id, max_len=MAX_LENGTH)
    tokens = greedy.tokens[0, :greedy.lengths[0]]
    full = BYTES.decode(tokens)
    assert len(full) >= 8, full
    stops = [full[6:8], full[3:4]]
    args = [(prompt, {"until": [], "max_gen_toks": 12}),
            (prompt, {"until": stops, "max_gen_toks": 12}),
            (prompt, {"until": full[6:8], "max_gen_toks": 12}),
            (prompt, {"until": [], "max_gen_toks": 4})]
    texts = lm.generate_until(_requests("generate_until", args))
    assert texts[0] == full
    assert texts[1] == full[:min(full.find(s) for s in stops)]
    assert texts[2] == full[:full.find(full[6:8])]
    assert texts[3] == BYTES.decode(tokens[:4])


def test_exit_rule_reports_the_loops_each_task_used(checkpoint):
    """From model_args, as lm-eval makes it: ACT exit bounded by 8 loops."""
    exit_lm = get_model("mythos-jax").create_from_arg_string(
        f"checkpoint={checkpoint},exit=act,max_loops=8,batch_size=2,max_length=32")
    assert (exit_lm.loops.exit, exit_lm.loops.count, exit_lm.batch_size) == ("act", 8, 2)
    exit_lm.loglikelihood(_requests("loglikelihood", [("while Tr", "ue:"), ("x", " = 1")],
                                    task="mc"))
    exit_lm.generate_until(_requests("generate_until", [("import o", {"max_gen_toks": 3})],
                                     task="gen"))
    used = dict(exit_lm.loops_used)
    assert set(used) == {"mc", "gen"} and len(used["mc"]) == 2 and len(used["gen"]) == 1
    values = used["mc"] + used["gen"]
    assert all(1 <= v <= 8 for v in values) and min(values) < 8


def test_model_args_refuse_an_exit_bound_without_an_exit_rule(checkpoint):
    with pytest.raises(ValueError, match="max_loops and threshold go with an exit rule"):
        MythosLM.create_from_arg_string(f"checkpoint={checkpoint},max_loops=8")


def test_cli_prints_the_task_by_depth_table_json_and_plot_offline(checkpoint, tmp_path,
                                                                   monkeypatch, capsys):
    def no_network(*args):
        raise OSError("the network is off in this test")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.chdir(tmp_path)                      # task data found from any directory
    code = main(["lm-eval", "--checkpoint", checkpoint, "--include-path", str(TASKS),
                 "--tasks", "mythos_syntax_mc,mythos_complete_gen", "--loops", "1,2",
                 "--limit", "3", "--batch-size", "16", "--max-length", "48",
                 "--json", "out.json", "--plot", "out.png"])
    assert code == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["task", "metric", "loops=1", "loops=2"]
    rows = {line.split()[0]: line.split()[1:] for line in lines[1:3]}
    assert set(rows) == {"mythos_syntax_mc", "mythos_complete_gen"}
    assert [rows[task][0] for task in sorted(rows)] == ["exact_match", "acc"]
    written = json.loads((tmp_path / "out.json").read_text())
    assert [d["depth"] for d in written["depths"]] == ["loops=1", "loops=2"]
    for depth, column in zip(written["depths"], (1, 2)):
        assert set(depth["metrics"]) == set(rows)
        assert depth["mean_loops"] == {task: float(column) for task in rows}
        for task, cells in rows.items():
            main_metric = depth["metrics"][task][depth["main"][task]]
            assert float(cells[column]) == pytest.approx(main_metric, abs=5e-5)
    assert (tmp_path / "out.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("change, message", [
    ({"--tasks": "no_such_task"}, "error: unknown task(s) no_such_task: not in --include-path"),
    ({"--checkpoint": "/no/such/model"}, "error: /no/such/model: no such file or directory"),
])
def test_cli_bad_task_or_checkpoint_is_a_one_line_error(checkpoint, capsys, change, message):
    args = {"--checkpoint": checkpoint, "--include-path": str(TASKS),
            "--tasks": "mythos_syntax_mc", "--loops": "1"} | change
    assert main(["lm-eval", *[x for pair in args.items() for x in pair]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(message) and len([l for l in err if "error" in l]) == 1
