#!/usr/bin/env bash
# Run `mythos-jax train` as one process of a multi-node NVIDIA GPU job. Start it once per node
# (one process drives all of its node's GPUs), e.g. in a SLURM batch script:
#
#   srun --ntasks-per-node=1 tpu_setup/gpu_launch.sh --workdir /shared/run1 [-- TRAIN_ARGS]
#   tpu_setup/gpu_launch.sh --coordinator node0:12345 --num-processes 4 --process-id 2 ...
#
# Under SLURM the coordinator, process count and process id come from its variables
# (SLURM_JOB_NODELIST's first host, SLURM_NTASKS, SLURM_PROCID); the flags win.
#   --coordinator HOST:PORT  process 0's address (default from SLURM, port --port)
#   --port PORT              coordinator port when the host comes from SLURM (12345)
#   --num-processes N        processes in the job (default SLURM_NTASKS)
#   --process-id I           this process, 0 ... N-1 (default SLURM_PROCID)
#   --config CONFIG          train preset or YAML/JSON file (default mythos_1b)
#   --workdir DIR            checkpoints and metrics, on storage every node sees (a shared
#                            filesystem or gs://)
#   --mesh SPEC              device mesh over all GPUs, e.g. data=2,fsdp=-1 (default: the
#                            config's)
#   --dry-run                print the command instead of running it
# TRAIN_ARGS after -- go to `mythos-jax train` unchanged. MYTHOS_JAX: the mythos-jax
# executable (default: mythos-jax on the PATH).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=tpu_setup/common.sh
source "$here/common.sh"

coordinator=""                          # --coordinator
port=12345                              # --port
num_processes=${SLURM_NTASKS:-}         # --num-processes
process_id=${SLURM_PROCID:-}            # --process-id
config=mythos_1b                        # --config
workdir=""                              # --workdir
mesh=""                                 # --mesh
mythos_jax=${MYTHOS_JAX:-mythos-jax}
train_extra=()                          # TRAIN_ARGS

while [[ $# -gt 0 ]]; do
  case $1 in
    --coordinator) coordinator=$(value "$@"); shift ;;
    --port) port=$(value "$@"); shift ;;
    --num-processes) num_processes=$(value "$@"); shift ;;
    --process-id) process_id=$(value "$@"); shift ;;
    --config) config=$(value "$@"); shift ;;
    --workdir) workdir=$(value "$@"); shift ;;
    --mesh) mesh=$(value "$@"); shift ;;
    --dry-run) DRY_RUN=1 ;;
    -h | --help) usage; exit 0 ;;
    --) shift; train_extra=("$@"); break ;;
    *) die "unknown argument '$1' (see --help; train arguments go after --)" ;;
  esac
  shift
done

if [[ -z $coordinator && -n ${SLURM_JOB_NODELIST:-} ]]; then
  command -v scontrol >/dev/null || die "SLURM_JOB_NODELIST is set but scontrol is missing"
  coordinator="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1):$port"
fi
need "$coordinator" "--coordinator HOST:PORT (not running under SLURM)"
[[ $coordinator =~ ^[^:]+:[0-9]+$ ]] || die "--coordinator must be HOST:PORT, got '$coordinator'"
need "$num_processes" "--num-processes N (not running under SLURM)"
need "$process_id" "--process-id I (not running under SLURM)"
need "$workdir" "--workdir DIR"
[[ $num_processes =~ ^[1-9][0-9]*$ ]] ||
  die "--num-processes must be an integer >= 1, got '$num_processes'"
if [[ ! $process_id =~ ^[0-9]+$ ]] || ((process_id >= num_processes)); then
  die "--process-id must be in 0..$((num_processes - 1)), got '$process_id'"
fi

set_train_args "$config" "$workdir" "$mesh" ${train_extra[@]+"${train_extra[@]}"}
run "$mythos_jax" "${TRAIN_ARGS[@]}" --coordinator-address "$coordinator" \
  --num-processes "$num_processes" --process-id "$process_id"
