"""experiments/bench_attention.py --quick --mode speed, in-process: its error table and JSON
figures, and its speed path (interpret mode on this CPU: only that it runs and reports)."""

import importlib.util
import json
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quick_run_reports_small_errors_and_runs_the_speed_path(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location(
        "bench_attention", os.path.join(REPO, "experiments", "bench_attention.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    path = tmp_path / "figures.json"
    assert bench.main(["--quick", "--mode", "speed", "--iters", "1", "--json", str(path)]) == 0
    stdout = capsys.readouterr().out
    for text in ("kernels interpreted", "attention_impl 'auto'", "here: xla", "max |error|", "the times mean nothing", "TFLOP/s",
                 "achieved bandwidth", "figures written to"):
        assert text in stdout, text
    result = json.loads(path.read_text())
    assert {(r["kernel_style"], r["dtype"]) for r in result["errors"]} == {
        (s, d) for s in ("gpu", "tpu") for d in ("float32", "bfloat16")}
    for row in result["errors"]:
        tolerance = 1e-5 if row["dtype"] == "float32" else 2e-2
        worst = max(row["flash_out"], row["flash_left_padded_out"], row["decode_out"],
                    *row["flash_grads"].values())
        assert worst < tolerance, row
    assert not result["speed_is_meaningful"]
    assert {r["impl"] for r in result["flash_speed"]} == {"kernel", "xla",
                                                          "dot_product_attention"}
    assert all("error" not in r and r["fwd+bwd_tflops"] > 0 for r in result["flash_speed"])
    assert {r["impl"] for r in result["decode_speed"]} == {"kernel", "xla"}
