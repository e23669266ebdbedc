"""mythos-jax plan: the accelerator table, mesh and argument errors, the analytic estimate,
the compile-time out-of-memory report, and one real ahead-of-time compile for a TPU topology
(tiny model on a v4-8; needs the libtpu wheel, no TPU)."""

import importlib.util
import json
import math
import os
import re

import pytest

from mythos_jax.plan import memory, report, topology
from mythos_jax.cli import main


@pytest.fixture(autouse=True)
def _restore_environment():
    """plan sets libtpu's variables (TPU_WORKER_HOSTNAMES, ...) for its process; keep them
    out of later tests and their subprocesses."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.mark.parametrize("name, chips, topology_name, hosts, bounds", [
    ("v4-8", 4, "v4:2x2x1", 1, (2, 2, 1)),
    ("v4-32", 16, "v4:2x2x4", 4, (2, 2, 1)),
    ("v5p-64", 32, "v5:2x4x4", 8, (2, 2, 1)),
    ("v5litepod-8", 8, "v5e:2x4", 1, (2, 4, 1)),
    ("v5litepod-16", 16, "v5e:4x4", 4, (2, 2, 1)),
    ("v6e-1", 1, "v6e:1x1", 1, (1, 1, 1)),
    ("v6e-256", 256, "v6e:16x16", 64, (2, 2, 1)),
])
def test_accelerator_table(name, chips, topology_name, hosts, bounds):
    acc = topology.accelerator(name)
    assert (acc.chips, acc.topology, acc.hosts, acc.chips_per_host_bounds) == (
        chips, topology_name, hosts, bounds)
    assert name in topology.accelerator_types()


@pytest.mark.parametrize("name", ["v4-6", "v5p-63", "v6e-2", "v7-8", "v5e-16", "v4", "v4-08"])
def test_unknown_accelerator_lists_the_known_ones(name):
    with pytest.raises(ValueError, match=f"unknown TPU accelerator type '{name}'.*v5p-64"):
        topology.accelerator(name)


def run_plan(capsys, *args):
    code = main(["plan", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_mesh_that_does_not_match_the_topology_is_an_error(capsys):
    code, out, err = run_plan(capsys, "--variant", "tiny_mla", "--topology", "v4-8", "--mesh",
                              "data=8", "--analytic")
    assert code == 2 and out == ""
    assert "mesh 'data=8' does not match v4-8 (4 chips" in err and "needs 8 devices" in err


@pytest.mark.parametrize("args, message", [
    (["--topology", "v4-7"], "unknown TPU accelerator type 'v4-7'"),
    (["--seq-len", "65"], "--seq-len must be in [1, 64]"),
    (["--batch", "6"], "batch 6 does not split over the batch axes ('data',)"),
    (["--variant", "mythos_2b"], "unknown variant 'mythos_2b'"),
])
def test_argument_errors(capsys, args, message):
    base = {"--variant": "tiny_mla", "--topology": "v4-8", "--mesh": "data=4"}
    for flag, value in zip(args[::2], args[1::2]):
        base[flag] = value
    code, _, err = run_plan(capsys, *[x for kv in base.items() for x in kv], "--analytic")
    assert code == 2 and message in err


def test_analytic_estimate_is_labelled_and_counts_the_shards(capsys, tmp_path):
    out_json = tmp_path / "plan.json"
    code, out, _ = run_plan(capsys, "--variant", "tiny_mla", "--topology", "v5p-64", "--mesh",
                            "data=8,fsdp=4", "--analytic", "--json", str(out_json))
    assert code == 0
    assert out.splitlines()[0] == "analytic estimate, not compiled: --analytic given"
    result = json.loads(out_json.read_text())
    assert result["method"] == "analytic" and result["fits"] is True
    assert result["batch"] == 32 and result["mesh"]["fsdp"] == 4
    # fp32 parameters (and a few buffers); AdamW keeps two moments: about 2x the parameters.
    assert result["parameters"] <= 4 * result["n_params"] + 1024
    assert math.isclose(result["optimizer"], 2 * result["parameters"], rel_tol=0.01)
    assert result["temporaries"] > result["parameters"]
    assert result["total"] == sum(result[k] for k in ("parameters", "optimizer", "batch_bytes",
                                                      "temporaries", "generated_code"))


def test_fsdp_splits_the_parameters(capsys):
    replicated, sharded = (memory.plan_memory(
        memory.PlanSpec("tiny_mla", {}, batch=4, seq_len=16, loops=2),
        topology.accelerator("v4-8"), mesh, analytic=True) for mesh in ("data=4", "fsdp=4"))
    assert 0 <= replicated.parameters - 4 * replicated.n_params < 1024   # + router bias
    assert sharded.parameters < 0.5 * replicated.parameters


def test_without_a_tpu_compiler_it_falls_back_to_the_estimate(capsys, monkeypatch):
    def no_libtpu(acc):
        raise RuntimeError("Unable to initialize backend 'tpu': no libtpu\nmore detail")

    monkeypatch.setattr(memory, "topology_devices", no_libtpu)
    code, out, _ = run_plan(capsys, "--variant", "tiny_mla", "--topology", "v4-8")
    assert code == 0
    assert out.splitlines()[0] == ("analytic estimate, not compiled: no TPU compiler on this "
                                   "host (RuntimeError: Unable to initialize backend 'tpu': "
                                   "no libtpu)")


def test_compile_time_out_of_memory_message_is_parsed():
    message = ("RESOURCE_EXHAUSTED: E1000: CompileTimeHbmOom: Ran out of memory on HBM, the "
               "total memory required for HLO temporaries (51.23G) exceeds available HBM "
               "(30.75G). HLO module: jit_step.")
    match = memory._OOM.search(message)
    assert memory._human_bytes(*match.group(1, 2)) == int(51.23 * 2 ** 30)


def test_report_says_when_it_does_not_fit():
    plan = memory.MemoryPlan(
        variant="mythos_1b", accelerator="v4-8", topology="v4:2x2x1", chips=4, hosts=1,
        mesh={"data": 1, "fsdp": 4, "tensor": 1, "expert": 1}, rules="default", batch=4,
        seq_len=4096, loops=16, backprop_depth=None, dtype="bfloat16", loop_remat="full",
        moe_impl="grouped", attention_impl="xla", n_params=10 ** 9, method="compiled",
        reason=None, parameters=2 ** 30, optimizer=2 ** 31, batch_bytes=0,
        temporaries=int(51.23 * 2 ** 30), generated_code=0, hbm_usable=int(30.75 * 2 ** 30),
        hbm_nominal=32 * 2 ** 30, compiler_message="RESOURCE_EXHAUSTED: ...",
        compile_seconds=3.0, libtpu="0.0.50.1")
    text = report.format_plan(plan)
    assert not plan.fits and "DOES NOT FIT" in text and "compiler: RESOURCE_EXHAUSTED" in text
    assert re.search(r"temporaries +51\.23\n", text) and re.search(r"total +54\.23\n", text)


def test_compiles_for_a_tpu_topology_on_this_host(capsys, tmp_path):
    """Never skipped: the test venv has libtpu (requirements-test.txt's jax[tpu])."""
    assert importlib.util.find_spec("libtpu") is not None, (
        "libtpu is not installed; requirements-test.txt provides it through jax[tpu] "
        "(bash .ci/venv.sh builds that venv)")
    out_json = tmp_path / "plan.json"
    code, out, err = run_plan(capsys, "--variant", "tiny_mla", "--topology", "v4-8", "--mesh",
                              "data=2,fsdp=2", "--seq-len", "32", "--loops", "2",
                              "--attention-impl", "xla", "--json", str(out_json))
    assert code == 0, err
    assert out.startswith("compiled for v4:2x2x1 by libtpu ")
    result = json.loads(out_json.read_text())
    analytic = memory.plan_memory(
        memory.PlanSpec("tiny_mla", {"dtype": "bfloat16", "loop_remat": "full",
                                     "attention_impl": "xla"}, batch=4, seq_len=32, loops=2),
        topology.accelerator("v4-8"), "data=2,fsdp=2", analytic=True)
    assert result["method"] == "compiled" and result["fits"]
    assert result["parameters"] == analytic.parameters     # both from the same shardings
    assert result["temporaries"] > 0 and result["generated_code"] > 0
    assert math.isclose(result["hbm_usable"], 30.75 * 2 ** 30, rel_tol=1e-9)
