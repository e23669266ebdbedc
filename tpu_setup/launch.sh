#!/usr/bin/env bash
# Run one `mythos-jax train` command on every worker of a TPU slice at once (each worker's
# jax.distributed.initialize() finds the others), or on N local CPU processes playing the
# workers: the same multi-process path, on 127.0.0.1.
#
#   tpu_setup/launch.sh --name NAME --zone ZONE --accelerator TYPE --workdir gs://B/RUN [options] [-- TRAIN_ARGS]
#   tpu_setup/launch.sh --local N [--workdir DIR] [options] [-- TRAIN_ARGS]
#
# TRAIN_ARGS go to `mythos-jax train` unchanged, e.g. -- --set steps=500 --set optim.lr=1e-4
#   --name NAME          TPU VM name                                [MYTHOS_TPU_NAME]
#   --zone ZONE          its zone                                   [MYTHOS_TPU_ZONE]
#   --project PROJECT    default: gcloud's configured project       [MYTHOS_TPU_PROJECT]
#   --accelerator TYPE   the slice's type, e.g. v5p-64 (checks --mesh) [MYTHOS_TPU_ACCELERATOR]
#   --config CONFIG      train preset, or a YAML/JSON file (on a TPU: its path from the
#                        workers' home); default mythos_1b, tiny with --local
#   --workdir DIR        checkpoints and metrics; on a TPU a gs:// path, where every worker
#                        writes (default with --local: runs/local)
#   --mesh SPEC          device mesh, e.g. data=2,fsdp=-1 (default: the config's); checked
#                        against the chips (the local devices with --local)
#   --logs DIR           where the logs land, one <worker>.log per worker or process
#                        (default logs/NAME; WORKDIR/logs with --local)
#   --detach             TPU: start the run in the background on the workers (it survives
#                        a closed laptop) and return; each worker logs to
#                        ~/mythos-logs/train.log
#   --collect            TPU: fetch every worker's log of a detached run into --logs
#   --delete-when-done   TPU: delete the slice (and its queued resource) once the run ends,
#                        finished or failed, so that it stops billing; a detached run's
#                        workers delete it themselves. Checkpoints in the gs:// workdir stay
#   --venv DIR           venv on the workers, from their home (mythos-venv, as install.sh
#                        makes it; a plain relative path); the command runs in the
#                        workers' home directory. Every value reaching the workers' shell
#                        is quoted
#   --local N            run N processes on this machine instead of on a TPU (the
#                        coordinator listens on 127.0.0.1 only)
#   --local-devices K    with --local: CPU devices per process (default 1)
#   --port PORT          with --local: coordinator port (default: a free one)
#   --dry-run            print the commands instead of running them
# [VARIABLE]: the environment variable the value defaults to. GCLOUD: the gcloud executable;
# MYTHOS_JAX: the mythos-jax executable for --local (default: mythos-jax on the PATH).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=tpu_setup/common.sh
source "$here/common.sh"

config=""                           # --config
workdir=""                          # --workdir
mesh=""                             # --mesh
logs=""                             # --logs
detach=0                            # --detach
collect=0                           # --collect
delete_when_done=0                  # --delete-when-done
remote_venv=mythos-venv             # --venv
local_processes=""                  # --local
local_devices=1                     # --local-devices
port=""                             # --port
mythos_jax=${MYTHOS_JAX:-mythos-jax}
remote_log=mythos-logs/train.log    # each worker's log of a detached run, from its home
train_extra=()                      # TRAIN_ARGS

while [[ $# -gt 0 ]]; do
  case $1 in
    --name) TPU_NAME=$(value "$@"); shift ;;
    --zone) ZONE=$(value "$@"); shift ;;
    --project) PROJECT=$(value "$@"); shift ;;
    --accelerator) ACCELERATOR=$(value "$@"); shift ;;
    --config) config=$(value "$@"); shift ;;
    --workdir) workdir=$(value "$@"); shift ;;
    --mesh) mesh=$(value "$@"); shift ;;
    --logs) logs=$(value "$@"); shift ;;
    --detach) detach=1 ;;
    --collect) collect=1 ;;
    --delete-when-done) delete_when_done=1 ;;
    --venv) remote_venv=$(value "$@"); shift ;;
    --local) local_processes=$(value "$@"); shift ;;
    --local-devices) local_devices=$(value "$@"); shift ;;
    --port) port=$(value "$@"); shift ;;
    --dry-run) DRY_RUN=1 ;;
    -h | --help) usage; exit 0 ;;
    --) shift; train_extra=("$@"); break ;;
    *) die "unknown argument '$1' (see --help; train arguments go after --)" ;;
  esac
  shift
done

# ---------------------------------------------------------------------------- local
# Process i of N on this machine, coordinator 127.0.0.1:PORT, JAX on the CPU.
launch_local() {
  local n=$local_processes i pids=()
  [[ $n =~ ^[1-9][0-9]*$ ]] || die "--local needs a process count >= 1, got '$n'"
  [[ $local_devices =~ ^[1-9][0-9]*$ ]] ||
    die "--local-devices needs a device count >= 1, got '$local_devices'"
  config=${config:-tiny} workdir=${workdir:-runs/local}
  logs=${logs:-$workdir/logs}
  [[ -z $mesh ]] || check_mesh "$mesh" $((n * local_devices)) \
    "$n local processes x $local_devices CPU devices"
  [[ -n $port ]] || port=$(free_port)
  set_train_args "$config" "$workdir" "$mesh" ${train_extra[@]+"${train_extra[@]}"}
  run mkdir -p "$logs"
  # Ctrl-C or SIGTERM from here on: every trainer started so far gets SIGTERM, checkpoints and
  # exits (background processes of a script ignore Ctrl-C's SIGINT, and would run on holding
  # the lock). Set before the first start, so that no signal falls between a start and it.
  [[ $DRY_RUN == 1 ]] || trap 'stop_all "${pids[@]}"' INT TERM
  for ((i = 0; i < n && stopping == 0; i++)); do
    local cmd=(env JAX_PLATFORMS=cpu "$mythos_jax" "${TRAIN_ARGS[@]}"
      --coordinator-address "127.0.0.1:$port" --num-processes "$n" --process-id "$i"
      --local-devices "$local_devices")
    if [[ $DRY_RUN == 1 ]]; then
      echo "$(quote "${cmd[@]}") > $(quote "$logs/$i.log") 2>&1 &"
    else
      "${cmd[@]}" >"$logs/$i.log" 2>&1 &
      pids+=($!)
    fi
  done
  if [[ $DRY_RUN == 1 ]]; then
    echo wait
    return 0
  fi
  echo "$n processes on 127.0.0.1:$port, logs in $logs/<process>.log" >&2
  wait_all "${pids[@]}"
}

# stop_all PID...: send SIGTERM to the processes (a preemption: each saves, then exits 143).
stopping=0
stop_all() {
  stopping=1
  echo "stopping: SIGTERM to every process; each checkpoints and exits" >&2
  kill -TERM "$@" 2>/dev/null || true
}

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# wait_all PID...: wait for the processes; when one fails, stop the others (they would wait
# for it at their next collective forever), show its log's tail and exit 1.
wait_all() {
  local pids=("$@") i j status running failed=""
  while true; do
    running=0
    for i in "${!pids[@]}"; do
      [[ -n ${pids[i]} ]] || continue
      if kill -0 "${pids[i]}" 2>/dev/null; then
        running=1
        continue
      fi
      status=0
      wait "${pids[i]}" || status=$?
      pids[i]=""
      if [[ $status -ne 0 && -z $failed && ! ($stopping == 1 && $status == 143) ]]; then
        failed=$i
        echo "process $i failed (exit $status); the end of $logs/$i.log:" >&2
        tail -n 20 "$logs/$i.log" >&2
        for j in "${!pids[@]}"; do
          [[ -z ${pids[j]} ]] || kill "${pids[j]}" 2>/dev/null || true
        done
      fi
    done
    [[ $running == 1 ]] || break
    # A builtin wait on a background sleep, not a foreground sleep: a trapped signal ends
    # `wait` at once and its trap runs, while during a foreground command bash defers the
    # trap, and for SIGINT may drop it (it assumes the command caught the Ctrl-C itself).
    # The sleep holds none of our output pipes, so none stays open after we exit.
    sleep 0.5 >/dev/null 2>&1 &
    wait $! 2>/dev/null || true
  done
  [[ -z $failed ]] || exit 1
  if [[ $stopping == 1 ]]; then
    echo "all ${#pids[@]} processes stopped; rerun the same command to resume" >&2
    exit 143
  fi
  echo "all ${#pids[@]} processes finished" >&2
}

# ---------------------------------------------------------------------------- TPU
launch_tpu() {
  need_slice
  safe_relative --venv "$remote_venv"
  logs=${logs:-logs/$TPU_NAME}
  set_location_flags
  local ssh_all=("$GCLOUD" compute tpus tpu-vm ssh "$TPU_NAME" "${LOCATION_FLAGS[@]}" --worker=all)
  if [[ $collect == 1 ]]; then
    require_gcloud
    run mkdir -p "$logs"
    run "${ssh_all[@]}" --command="cat $remote_log" --output-directory="$logs"
    return 0
  fi
  local chips train
  chips=$(slice_chips)
  [[ -z $mesh ]] || check_mesh "$mesh" "$chips" "$ACCELERATOR ($chips chips)"
  need "$workdir" "--workdir gs://BUCKET/RUN"
  [[ $workdir == gs://* ]] || die "--workdir must be a gs:// path on a TPU (every worker" \
    "writes its shards of each checkpoint there), got '$workdir'"
  require_gcloud
  set_train_args "${config:-mythos_1b}" "$workdir" "$mesh" ${train_extra[@]+"${train_extra[@]}"}
  # MYTHOS_JAX_DISTRIBUTED=1: `train` joins the other workers through
  # jax.distributed.initialize() (mythos_jax/train/distributed.py).
  train="MYTHOS_JAX_DISTRIBUTED=1 $(quote "$remote_venv/bin/mythos-jax" "${TRAIN_ARGS[@]}")"
  if [[ $detach == 1 ]]; then
    [[ $delete_when_done == 0 ]] || train="sh -c $(quote "$train; $(remote_delete_slice)")"
    run "${ssh_all[@]}" --command="mkdir -p ${remote_log%/*} && nohup env $train > $remote_log 2>&1 < /dev/null &"
    echo "started; fetch the logs with: $0 --collect --name $TPU_NAME --zone $ZONE" >&2
    return 0
  fi
  run mkdir -p "$logs"
  echo "running on every worker of $TPU_NAME; logs: $logs/<worker>.log (tail -f $logs/0.log)" >&2
  local status=0
  run "${ssh_all[@]}" --command="$train" --output-directory="$logs" || status=$?
  if [[ $delete_when_done == 1 ]]; then
    echo "the run ended (exit $status): deleting $TPU_NAME (--delete-when-done)" >&2
    delete_slice
  fi
  return "$status"
}

if [[ -n $local_processes ]]; then launch_local; else launch_tpu; fi
