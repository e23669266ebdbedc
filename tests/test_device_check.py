"""experiments/device_check.py --dry-run, in-process: every step of the device plan runs at
tiny sizes on CPU and reports (errors against the references small, every implementation
present, the training step finite), and the time budget skips the steps it has no time for."""

import importlib.util
import json
import math
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def device_check():
    spec = importlib.util.spec_from_file_location(
        "device_check", os.path.join(REPO, "experiments", "device_check.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dry_run_runs_the_whole_plan(device_check, tmp_path, capsys):
    path = tmp_path / "check.json"
    assert device_check.main(["--dry-run", "--json", str(path)]) == 0
    result = json.loads(path.read_text())
    assert result["dry_run"] and result["skipped"] == []
    failures = {name: result[name].get("failure") for name in (
        "kernel_tests", "attention", "moe", "train_step", "decode_speed", "flash_speed")
        if isinstance(result[name], dict) and "failure" in result[name]}
    assert not failures, failures
    assert not result["kernel_tests"]["ran"]
    assert all(name in result["kernel_tests"]["command"] for name in device_check.KERNEL_TESTS)
    attention = result["attention"]
    assert {row["impl"] for row in attention} == {"xla", "pallas", "tokamax"}
    for row in attention:                              # bf16 inputs vs the fp32 reference
        assert max(row["out"], row["left_padded"], row["worst_grad"]) < 3e-2, row
    assert {row["via"] for row in attention if row["impl"] == "tokamax"} == {"tokamax xla"}
    assert {row["impl"] for row in result["flash_speed"]} == {"xla", "pallas", "tokamax"}
    assert all(row["fwd_tflops"] > 0 and row["fwd+bwd_tflops"] > 0
               for row in result["flash_speed"])
    assert {row["impl"] for row in result["decode_speed"]} == {"kernel", "xla"}
    moe = {row["choice"]: row for row in result["moe"]}
    assert set(moe) == {"ragged_dot", "tokamax", "megablox"}
    for choice, row in moe.items():
        assert row["runs"] == choice and row["error"] < 5e-2 and row["fwd_bwd_tflops"] > 0
    train = result["train_step"]
    assert math.isfinite(train["loss"]) and train["step_s"] > 0 and train["mfu"] is None
    stdout = capsys.readouterr().out
    for text in ("[dry run", "kernel tests: not run", "flash bf16 TFLOP/s", "moe tokamax",
                 "train step tiny_mla", "figures written to"):
        assert text in stdout, text
    assert result["table"] in stdout


def test_steps_past_the_budget_are_skipped(device_check, tmp_path):
    path = tmp_path / "check.json"
    assert device_check.main(["--dry-run", "--budget-s", "0", "--json", str(path)]) == 0
    result = json.loads(path.read_text())
    assert result["skipped"] == ["kernel_tests", "attention", "moe", "train_step",
                                 "decode_speed", "flash_speed"]
    assert "skipped (time budget): kernel_tests, attention" in result["table"]
