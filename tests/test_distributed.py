"""Multi-process start-up: a loopback coordinator binds to loopback only; flags go together
and win; without them the environment (SLURM, Open MPI, tpu_setup/launch.sh) decides."""

import jax
import pytest

from mythos_jax.train import distributed


@pytest.mark.parametrize("address, bound", [
    ("127.0.0.1:1234", "127.0.0.1:1234"), ("localhost:99", "localhost:99"),
    ("[::1]:5000", "[::1]:5000"), ("127.3.2.1:8", "127.3.2.1:8"),
    ("10.0.0.2:1234", None), ("node0:1234", None), ("[2001:db8::1]:1", None),
    ("127.0.0.1", None),
])
def test_bind_address_is_the_coordinator_only_when_loopback(address, bound):
    assert distributed.bind_address(address) == bound


@pytest.fixture
def calls(monkeypatch):
    seen = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kwargs: seen.append(kwargs))
    return seen


def test_local_coordinator_listens_on_loopback(calls):
    distributed.initialize("127.0.0.1:4321", 2, 0)
    assert calls[0]["coordinator_bind_address"] == "127.0.0.1:4321"
    distributed.initialize("node0:4321", 2, 1)
    assert calls[1]["coordinator_bind_address"] is None      # other hosts must reach it


@pytest.fixture
def cluster_env(monkeypatch):
    """monkeypatch, with none of the variables that make a run multi-process set."""
    for name in (*distributed.CLUSTER_VARIABLES, "SLURM_NTASKS"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.mark.parametrize("name, value, joins", [
    (None, None, False),
    ("SLURM_NTASKS", "4", True),
    ("SLURM_NTASKS", "1", False),              # a one-task SLURM job
    ("SLURM_NTASKS", "", False),
    ("OMPI_COMM_WORLD_SIZE", "2", True),
    ("MYTHOS_JAX_DISTRIBUTED", "1", True),     # what tpu_setup/launch.sh sets on TPU workers
    ("MYTHOS_JAX_DISTRIBUTED", "0", False),
    ("MYTHOS_JAX_DISTRIBUTED", "", False),
    ("JAX_COORDINATOR_ADDRESS", "10.0.0.2:1234", True),
])
def test_without_flags_the_environment_decides_whether_to_join(calls, cluster_env, name, value,
                                                              joins):
    """No flags: JAX's own detection (``initialize()`` with no address, so it reads SLURM,
    Open MPI or the TPU metadata) runs exactly when the environment names a multi-process
    job; otherwise nothing is initialised (a single process)."""
    if name is not None:
        cluster_env.setenv(name, value)
    assert distributed.in_cluster_environment() is joins
    distributed.initialize()
    assert calls == ([{"coordinator_bind_address": None}] if joins else [])


def test_flags_win_over_the_environment(calls, cluster_env):
    cluster_env.setenv("SLURM_NTASKS", "4")
    distributed.initialize("node0:1234", 1, 0)            # one process: nothing to join
    distributed.initialize("node0:1234", 2, 1)
    assert calls == [{"coordinator_address": "node0:1234", "num_processes": 2, "process_id": 1,
                      "initialization_timeout": 120, "coordinator_bind_address": None}]


def test_environment_coordinator_on_loopback_binds_there(calls, monkeypatch):
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "localhost:7000")
    distributed.initialize()
    assert calls == [{"coordinator_bind_address": "localhost:7000"}]


def test_partial_flags_are_refused(calls):
    with pytest.raises(ValueError, match="go together"):
        distributed.initialize("127.0.0.1:1", 2)
    assert calls == []
