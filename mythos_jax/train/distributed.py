"""Multi-process start-up: ``jax.distributed.initialize`` from flags or the environment.

Explicit flags (``--coordinator-address``, ``--num-processes``, ``--process-id``) win. Without
them, JAX's own auto-detection (``jax.distributed.initialize()``: the TPU metadata server,
SLURM, Open MPI) runs when the environment says this is a multi-process job:
``MYTHOS_JAX_DISTRIBUTED=1`` (set by ``tpu_setup/launch.sh`` on every TPU worker),
``JAX_COORDINATOR_ADDRESS``, Open MPI's ``OMPI_COMM_WORLD_SIZE``, ``SLURM_NTASKS`` > 1, or a
Cloud TPU VM that JAX's own cluster detection sees as one host of several (the GCE metadata
server's ``worker-network-endpoints``, or GKE's ``TPU_WORKER_HOSTNAMES``: a pod started with
``gcloud ... ssh --worker=all``, xpk or GKE joins without any variable of ours).
Otherwise the run is single-process (a single-host TPU VM needs nothing).
A coordinator whose address is loopback (``127.0.0.1``, ``localhost``, ``::1``: local runs,
``tpu_setup/launch.sh --local``) listens on that address only, not on every interface.
"""

from __future__ import annotations

import ipaddress
import os

import jax

CLUSTER_VARIABLES = ("MYTHOS_JAX_DISTRIBUTED", "JAX_COORDINATOR_ADDRESS", "OMPI_COMM_WORLD_SIZE")


def in_cluster_environment(environ=os.environ) -> bool:
    """True when the environment describes a multi-process job JAX can join by itself."""
    if any(environ.get(name) not in (None, "", "0") for name in CLUSTER_VARIABLES):
        return True
    return int(environ.get("SLURM_NTASKS", "1") or 1) > 1


def in_multi_host_tpu_slice() -> bool:
    """True on a Cloud TPU VM whose slice has several hosts, as JAX's TPU cluster detection
    reads it (GKE's worker host names, else the GCE metadata server); False off TPU VMs,
    where nothing is queried."""
    from jax._src.clusters import cloud_tpu_cluster

    for cluster in (cloud_tpu_cluster.GkeTpuCluster, cloud_tpu_cluster.GceTpuCluster):
        if cluster.is_env_present():
            return cluster.get_process_count() > 1
    return False


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, local_device_count: int | None = None) -> None:
    """Join the job (no-op for a single process). ``local_device_count``: fake CPU devices
    per process (tests and ``tpu_setup/launch.sh --local``)."""
    given = [coordinator_address is not None, num_processes is not None, process_id is not None]
    if any(given) and not all(given):
        raise ValueError("--coordinator-address, --num-processes and --process-id go together "
                         "(or give none and let the environment decide)")
    if local_device_count is not None:
        jax.config.update("jax_num_cpu_devices", local_device_count)
    if all(given):
        if not 0 <= process_id < num_processes:
            raise ValueError(f"--process-id must be in [0, {num_processes}), got {process_id}")
        if num_processes > 1:
            jax.distributed.initialize(coordinator_address=coordinator_address,
                                       num_processes=num_processes, process_id=process_id,
                                       initialization_timeout=120,
                                       coordinator_bind_address=bind_address(
                                           coordinator_address))
    elif in_cluster_environment() or in_multi_host_tpu_slice():
        address = os.environ.get("JAX_COORDINATOR_ADDRESS")
        jax.distributed.initialize(
            coordinator_bind_address=bind_address(address) if address else None)


def bind_address(coordinator_address: str) -> str | None:
    """Where the coordinator listens: ``coordinator_address`` itself when its host is
    loopback, else None (JAX's default, all interfaces, which the other hosts need)."""
    host, _, port = coordinator_address.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    return coordinator_address if loopback and port else None
