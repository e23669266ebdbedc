"""Shared by the experiment tests: run an experiment's --quick pipeline through the CLI."""

import json

from mythos_jax.cli import main


def run_quick(name, out, *flags):
    """``mythos-jax experiment NAME *flags --quick --out OUT``; the results it wrote, after
    checking the files and the recorded command."""
    assert main(["experiment", name, *flags, "--quick", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert (out / "table.md").read_text().startswith(results["date"])
    assert "| claim | ours | met |" in results["table"]
    assert results["quick"] is True and results["wall_s"] > 0
    assert results["command"] == " ".join(["mythos-jax experiment", name, *flags, "--quick",
                                           "--out", str(out)])
    return results
