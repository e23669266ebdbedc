"""What the experiments' pod presets share (``harness.PodPreset``): the slice, the training
recipe at scale and the model shapes, ~100M-1B parameters.

Every preset is planned (``mythos-jax plan --experiment NAME``) and run on one TPU VM slice,
``TOPOLOGY`` (4 chips, one host: the harness runs there as one process), all chips FSDP, bf16
compute with fp32 parameters, micro-batches accumulated into ``BATCH`` sequences per update.
The language-model experiments read ``arrayrecord`` shards written by ``prepare-data`` with a
tokenizer of at most ``VOCAB`` tokens, at ``CORPUS`` (relative to where the run starts) unless
``--set data.paths=[...]`` says otherwise::

    mythos-jax prepare-data --input 'corpus/**/*.jsonl' --output corpus --tokenizer tok.json
    mythos-jax experiment looped_vs_standard --pod --set 'data.paths=[corpus]'
"""

from __future__ import annotations

TOPOLOGY = "v4-8"
MESH = "fsdp=-1"
BASE = "mythos_1b"      # the training preset: bf16, loop_remat=full, AdamW, warmup 2000
VOCAB = 32000
CORPUS = "corpus"
SEQ_LEN = 2048
BATCH = 64              # sequences per update: 131,072 tokens
GRAD_ACCUM = 8          # micro-batches of 8 sequences (2 per chip on a v4-8)

TRAINING = (f"mesh={MESH}", f"optim.grad_accum={GRAD_ACCUM}", "log.every=50",
            "log.progress=false", "checkpoint.every=1000", "eval.every=0")
LM_DATA = ("data.source=arrayrecord", f"data.paths=[{CORPUS}]", f"data.seq_len={SEQ_LEN}",
           f"data.batch_size={BATCH}", "data.eval_examples=1024", "eval.batches=16",
           f"model.vocab_size={VOCAB}", f"model.max_seq_len={SEQ_LEN}")

# mythos_1b's attention (dim 2048, 16 heads, MLA ranks 512/256) with a dense SwiGLU of
# 5632 channels in place of its MoE: ~42M parameters per layer, ~65M in the embedding.
DENSE_MYTHOS_1B = ("model.variant=mythos_1b", "model.n_experts=1", "model.n_experts_per_tok=1",
                   "model.n_shared_experts=0", "model.expert_dim=5632")
# mythos_1b itself: 64 experts of 2048 (top-4) + 2 shared in the loop, 1.06B parameters.
MOE_MYTHOS_1B = ("model.variant=mythos_1b",)
