"""Multi-process start-up: a loopback coordinator binds to loopback only; flags go together
and win; without them the environment (SLURM, Open MPI, tpu_setup/launch.sh, a Cloud TPU VM's
metadata server or GKE's variables, faked here) decides."""

import http.server
import threading

import jax
import pytest
from jax._src.clusters import cloud_tpu_cluster

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


TPU_VARIABLES = ("TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES", "TPU_PROCESS_ADDRESSES_PATH",
                 "TPU_WORKER_ID", "MEGASCALE_NUM_SLICES", "MEGASCALE_SLICE_ID",
                 "TPU_SKIP_MDS_QUERY", "GCE_METADATA_IP")


@pytest.fixture
def cluster_env(monkeypatch):
    """monkeypatch, with none of the variables that make a run multi-process set."""
    for name in (*distributed.CLUSTER_VARIABLES, "SLURM_NTASKS", *TPU_VARIABLES):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.fixture
def metadata_server():
    """A fake GCE metadata server on loopback: ``answers[key]`` is the text of
    ``/computeMetadata/v1/instance/attributes/<key>`` (404 when absent); ``asked`` the keys."""
    answers, asked = {}, []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            key = self.path.rsplit("/", 1)[-1]
            asked.append(key)
            body = answers.get(key)
            self.send_response(200 if body is not None else 404)
            self.end_headers()
            self.wfile.write((body or "").encode())

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"127.0.0.1:{server.server_port}", answers, asked
    server.shutdown()


@pytest.mark.parametrize("endpoints, joins", [("10.0.0.1,10.0.0.2", True), ("10.0.0.1", False),
                                              ("w-0:0:10.0.0.1,w-1:1:10.0.0.2", True)])
def test_a_tpu_vm_joins_its_slice_from_the_metadata_server(calls, cluster_env, metadata_server,
                                                            endpoints, joins):
    """On a Cloud TPU VM (faked) started without any variable of ours (gcloud ssh
    --worker=all), the metadata server's worker list decides: several hosts join the job."""
    address, answers, asked = metadata_server
    cluster_env.setattr(cloud_tpu_cluster, "running_in_cloud_tpu_vm", True)
    cluster_env.setenv("GCE_METADATA_IP", address)
    answers.update({"agent-worker-number": "1", "worker-network-endpoints": endpoints,
                    "tpu-env": "ACCELERATOR_TYPE: 'v4-16'"})
    assert distributed.in_multi_host_tpu_slice() is joins
    distributed.initialize()
    assert calls == ([{"coordinator_bind_address": None}] if joins else [])
    assert "worker-network-endpoints" in asked


def test_a_gke_tpu_pod_joins_from_its_worker_host_names(calls, cluster_env):
    cluster_env.setattr(cloud_tpu_cluster, "running_in_cloud_tpu_vm", True)
    for name, value in (("TPU_WORKER_HOSTNAMES", "pod-0,pod-1,pod-2,pod-3"),
                        ("TPU_WORKER_ID", "2"), ("MEGASCALE_NUM_SLICES", "1")):
        cluster_env.setenv(name, value)
    distributed.initialize()
    assert calls == [{"coordinator_bind_address": None}]


def test_off_a_tpu_vm_no_metadata_is_asked(calls, cluster_env, metadata_server):
    address, _, asked = metadata_server
    cluster_env.setenv("GCE_METADATA_IP", address)
    cluster_env.setenv("TPU_WORKER_HOSTNAMES", "a,b")      # not a TPU VM: ignored
    assert not distributed.in_multi_host_tpu_slice()
    distributed.initialize()
    assert calls == [] and asked == []


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
