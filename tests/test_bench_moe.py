"""experiments/bench_moe.py --quick in-process: its tables, and the structure and parity of its
--json figures (each dispatch strategy against OpenMythos's MoEFFN; the load-balance runs).
The load-balance check is structural: 12 steps are too few for the bias update to balance
the collapsed router reliably, so only that the two runs start alike and then part is
asserted, not which one ends better balanced."""

from __future__ import annotations

import importlib.util
import json
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quick_run_prints_the_table_and_writes_json(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location(
        "bench_moe", os.path.join(REPO, "experiments", "bench_moe.py"))
    bench_moe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_moe)
    out = tmp_path / "figures.json"
    assert bench_moe.main(["--quick", "--quiet", "--iters", "1", "--json", str(out)]) == 0

    stdout = capsys.readouterr().out
    for text in ("fwd vs torch", "fwd+bwd vs torch", "openmythos", "dense", "grouped",
                 "dropless", "capacity", "busiest expert", "no update", "bias rate 0.02",
                 "last step's load", "dropless grouped matmul 'auto'", "here: ragged_dot",
                 "figures written to"):
        assert text in stdout, text
    result = json.loads(out.read_text())
    rows = result["strategies"]
    assert set(rows) == {"openmythos", "dense", "grouped", "dropless", "capacity"}
    for side, row in rows.items():
        for name in ("forward", "fwd+bwd"):
            assert row[name]["tokens_per_s"] > 0 and row[name]["vs_torch"] > 0, (side, name)
    assert result["routing"]["capacity_dropped"] == 0          # so capacity matches too
    for side in ("dense", "grouped", "dropless", "capacity"):
        assert rows[side]["max_abs_diff_vs_torch"] < 1e-5, side

    balance = result["load_balance"]
    E, K, steps = balance["n_experts"], balance["top_k"], balance["steps"]
    assert (E, K, steps) == (16, 2, 12)
    data = balance["train_config"]["data"]
    tokens, loops = data["batch_size"] * data["seq_len"], balance["train_config"]["loops"]["n"]
    runs = balance["runs"]
    assert set(runs) == {"no_update", "bias_update"}
    assert (runs["no_update"]["rate"], runs["bias_update"]["rate"]) == (0.0, 0.02)
    for name, run in runs.items():
        assert len(run["max_over_mean"]) == steps, name
        assert all(1.0 <= r <= E / K for r in run["max_over_mean"]), name
        assert len(run["final_load"]) == E and sum(run["final_load"]) == tokens * K * loops, name
    # same initial state and batches: equal until the first bias update takes effect
    assert runs["no_update"]["max_over_mean"][0] == runs["bias_update"]["max_over_mean"][0]
    assert runs["no_update"]["max_over_mean"] != runs["bias_update"]["max_over_mean"]
