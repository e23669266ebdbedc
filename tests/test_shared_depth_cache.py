"""experiments/shared_depth_cache.py --quick: a KV cache shared across loop depths."""

import importlib.util
import json
import os

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                      "experiments", "shared_depth_cache.py")


def test_shared_cache_saves_memory_and_reports_kl(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("shared_depth_cache", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "shared.json"
    assert script.main(["--quick", "--json", str(out)]) == 0
    assert "depth slots" in capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["loss_last"] < result["loss_first"]              # it trained
    by_slots = {row["depth_slots"]: row for row in result["rows"]}
    full = by_slots[result["n_loops"]]
    assert full["mean_kl"] == 0.0 and full["argmax_agreement"] == 1.0
    one = by_slots[1]
    assert one["cache_saving"] == 0.5     # tiny_mla: 1 + 4 + 1 layer-depths -> 1 + 1 + 1
    assert one["mean_kl"] > 0.0 and one["max_kl"] >= one["mean_kl"]
