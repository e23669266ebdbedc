"""The ``mythos-jax`` model of EleutherAI's lm-evaluation-harness (registered on import).

    import mythos_jax.evaluation.lm_eval_model          # registers "mythos-jax"
    lm_eval.simple_evaluate(model="mythos-jax", model_args="checkpoint=runs/small,loops=4",
                            tasks=["lambada_openai"])
    lm = MythosLM.create_from_arg_string("checkpoint=ckpt/run1,exit=kl,max_loops=32")
    lm.loops = 8                                         # another depth, same weights

model_args: ``checkpoint`` (a training workdir, ``WORKDIR/checkpoints/N``, a model checkpoint
or OpenMythos ``.pt``/``.safetensors``), ``tokenizer`` ('bytes' or a tokenizer.json; default
the model's own), ``loops`` (a count; default the config's ``max_loop_iters``) or ``exit``
(act | kl | kl_entropy | delta) with ``max_loops`` (its bound) and ``threshold``,
``batch_size`` (default 8), ``max_length`` (default the model's ``max_seq_len``).

Tokenisation is that of lm-eval's causal HF model, so that scores compare with its models':
a context's trailing whitespace moves to the continuation, whose tokens are those of
``encode(context + continuation)`` past ``len(encode(context))`` (not ``encode(continuation)``:
under BPE its first token may merge with the context's end); an empty context is the EOS
id; inputs are left-truncated to ``max_length``. Rolling log-likelihoods use lm-eval's
disjoint windows of ``max_length`` (the first token conditioned on EOS). Generation is greedy
unless ``do_sample``; it stops at EOS, and the text is cut at the earliest ``until`` string.
``loops_used[task]`` collects the loops each request ran (mean over its windows or generated
tokens).
"""

from __future__ import annotations

import collections

import numpy as np
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import (get_rolling_token_windows, make_disjoint_window,
                           simple_parse_args_string)

from mythos_jax.evaluation.scoring import BUCKET_MIN, Scorer
from mythos_jax.inference.generate import bucket_length, decode_spec, generate
from mythos_jax.loops import LoopSpec

DEFAULT_BATCH = 8
DEFAULT_GEN_TOKENS = 256
SAMPLING_KEYS = ("until", "max_gen_toks", "do_sample", "temperature", "top_k", "top_p")


def loop_spec(loops: int | None = None, exit: str | None = None, max_loops: int | None = None,
              threshold: float | None = None) -> LoopSpec:
    """The depth of an evaluation: ``loops`` (a count; None: the config's), or an ``exit``
    rule bounded by ``max_loops`` (None: the config's) with its ``threshold``."""
    if exit is None:
        if max_loops is not None or threshold is not None:
            raise ValueError("max_loops and threshold go with an exit rule "
                             "(exit=act|kl|kl_entropy|delta)")
        return LoopSpec(loops)
    if loops is not None:
        raise ValueError("give loops (a fixed count) or exit with max_loops (its bound), "
                         "not both")
    spec = LoopSpec(max_loops, exit=exit)
    return spec if threshold is None else spec.replace(threshold=float(threshold))


@register_model("mythos-jax")
class MythosLM(LM):
    """``model`` (an ``OpenMythos``) read in ``vocab`` (a ``train.tokenizer.Vocab``), run at
    ``loops`` (a count or a LoopSpec; settable between evaluations)."""

    def __init__(self, model, vocab, loops: LoopSpec | int | None = None,
                 batch_size: int = DEFAULT_BATCH, max_length: int | None = None):
        super().__init__()
        cfg = model.cfg
        max_length = cfg.max_seq_len if max_length is None else max_length
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        if not isinstance(max_length, int) or not 2 <= max_length <= cfg.max_seq_len:
            raise ValueError(f"max_length must be an int in [2, the model's max_seq_len="
                             f"{cfg.max_seq_len}], got {max_length!r}")
        if vocab.eos_id >= cfg.vocab_size:
            raise ValueError(f"the vocabulary's EOS id {vocab.eos_id} (an empty context, the "
                             f"first rolling window) is outside the model's vocab_size "
                             f"{cfg.vocab_size}")
        model.eval()
        self.model, self.vocab = model, vocab
        self.batch_size, self.max_length = batch_size, max_length
        self.loops_used: dict[str, list[float]] = collections.defaultdict(list)
        self.loops = loops

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        """``checkpoint=SRC,loops=4,batch_size=8`` (see the module docstring)."""
        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None):
        """The model_args as a dict; lm-eval's ``device`` and ``max_batch_size`` are
        ignored (JAX's default device, a fixed batch size)."""
        args = {**arg_dict, **{k: v for k, v in (additional_config or {}).items()
                               if v is not None}}
        args.pop("device", None)
        args.pop("max_batch_size", None)
        if isinstance(args.get("batch_size"), str) and args["batch_size"].isdigit():
            args["batch_size"] = int(args["batch_size"])   # lm-eval's CLI passes it as text
        return cls.from_checkpoint(**args)

    @classmethod
    def from_checkpoint(cls, checkpoint: str, loops: int | None = None, exit: str | None = None,
                        max_loops: int | None = None, threshold: float | None = None,
                        tokenizer: str | None = None, batch_size: int = DEFAULT_BATCH,
                        max_length: int | None = None) -> "MythosLM":
        """The model stored at ``checkpoint`` in its own vocabulary (or ``tokenizer``)."""
        from mythos_jax.checkpoints.load import load_model_and_source, prompt_vocab

        spec = loop_spec(loops, exit, max_loops, threshold)
        model, _ = load_model_and_source(checkpoint)
        vocab = prompt_vocab(checkpoint, model.cfg.vocab_size, tokenizer)
        return cls(model, vocab, spec, batch_size, max_length)

    @property
    def loops(self) -> LoopSpec:
        return self._spec

    @loops.setter
    def loops(self, loops: LoopSpec | int | None) -> None:
        self._spec = decode_spec(self.model.cfg, loops)
        self._scorer = Scorer(self.model, self._spec, self.batch_size, self.max_length)

    @property
    def tokenizer_name(self) -> str:
        return self.vocab.name

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """(sum of the continuation's log-probabilities, whether it is the greedy one) per
        ``(context, continuation)`` request."""
        scores = self._scorer([self._encode_pair(*r.args) for r in requests])
        self._record(requests, [[s.loops] for s in scores])
        results = [(s.logprob, s.greedy) for s in scores]
        for request, result in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", request.args, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """The log-likelihood of each ``(text,)`` request, in disjoint windows."""
        owners, windows = [], []
        for i, request in enumerate(requests):
            for window in get_rolling_token_windows(self._encode(request.args[0]),
                                                    self.vocab.eos_id, self.max_length, 1):
                owners.append(i)
                windows.append(make_disjoint_window(window))
        totals, loops = [0.0] * len(requests), [[] for _ in requests]
        for owner, score in zip(owners, self._scorer(windows)):
            totals[owner] += score.logprob
            loops[owner].append(score.loops)
        self._record(requests, loops)
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """The continuation of each ``(context, gen_kwargs)`` request, batched by settings,
        longest prompt first."""
        groups = collections.defaultdict(list)
        for i, request in enumerate(requests):
            groups[_sampling(request.args[1])].append(i)
        texts, loops = [""] * len(requests), [[] for _ in requests]
        for settings, members in groups.items():
            prompts = {i: self._encode(requests[i].args[0]) or [self.vocab.eos_id]
                       for i in members}
            members.sort(key=lambda i: -len(prompts[i]))
            for first in range(0, len(members), self.batch_size):
                chunk = members[first:first + self.batch_size]
                for i, text, used in zip(chunk, *self._generate(
                        [prompts[i] for i in chunk], *settings)):
                    texts[i], loops[i] = text, used
        self._record(requests, loops)
        for request, text in zip(requests, texts):
            self.cache_hook.add_partial("generate_until", request.args, text)
        return texts

    def _generate(self, prompts: list[list[int]], until: tuple[str, ...], max_gen_toks: int,
                  temperature: float, top_k: int | None, top_p: float | None):
        """(texts, loops per generated token) of one batch, prompt + new tokens <=
        max_length: a prompt keeps at most its last max_length - min(max_gen_toks,
        max_length // 2) tokens; shorter prompts leave room for up to ``max_gen_toks``."""
        keep = self.max_length - min(max_gen_toks, self.max_length // 2)
        prompts = [p[-keep:] for p in prompts]
        width = bucket_length(max(len(p) for p in prompts), keep, BUCKET_MIN)
        new = min(max_gen_toks, self.max_length - width)
        padded = prompts + [prompts[0]] * (self.batch_size - len(prompts))
        out = generate(self.model, padded, new, self._spec, temperature=temperature,
                       top_k=top_k, top_p=top_p, eos_id=self.vocab.eos_id,
                       max_len=width + new)
        texts, loops = [], []
        for b in range(len(prompts)):
            length = out.lengths[b]
            text = self.vocab.decode(out.tokens[b, :length])
            ends = [text.find(stop) for stop in until if stop and stop in text]
            texts.append(text[:min(ends, default=len(text))])
            loops.append(out.loops[b, :length].tolist())
        return texts, loops

    def _encode(self, text: str) -> list[int]:
        return [int(t) for t in self.vocab.encode_batch([text])[0]]

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(context ids, continuation ids) as lm-eval's causal HF model splits them."""
        if not context:
            return [self.vocab.eos_id], self._encode(continuation)
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        context_ids = self._encode(context)
        return context_ids, self._encode(context + continuation)[len(context_ids):]

    def _record(self, requests, loops: list[list[int]]) -> None:
        """Adds each request's mean loops to ``loops_used`` under its task."""
        for request, used in zip(requests, loops):
            if used:
                self.loops_used[request.task_name].append(float(np.mean(used)))


def _sampling(gen_kwargs: dict) -> tuple:
    """lm-eval's generation kwargs -> (until, max_gen_toks, temperature, top_k, top_p);
    greedy unless ``do_sample``."""
    unknown = sorted(set(gen_kwargs) - set(SAMPLING_KEYS))
    if unknown:
        raise ValueError(f"generation_kwargs {unknown} are not supported (supported: "
                         f"{', '.join(SAMPLING_KEYS)})")
    until = gen_kwargs.get("until") or ()
    until = (until,) if isinstance(until, str) else tuple(until)
    max_gen_toks = int(gen_kwargs.get("max_gen_toks", DEFAULT_GEN_TOKENS))
    if max_gen_toks < 1:
        raise ValueError(f"max_gen_toks must be >= 1, got {max_gen_toks}")
    temperature = float(gen_kwargs.get("temperature", 1.0)) if gen_kwargs.get("do_sample") \
        else 0.0
    return until, max_gen_toks, temperature, gen_kwargs.get("top_k"), gen_kwargs.get("top_p")
