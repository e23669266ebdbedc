# shellcheck shell=bash
# Shared by the tpu_setup scripts (sourced, never run): errors, argument checks, dry-run
# execution, the TPU accelerator table, the mesh check and the `mythos-jax train` arguments.
#
# Variables set here (the scripts' flags change them):
#   TPU_NAME, ZONE, PROJECT, ACCELERATOR  the slice: name, zone, project (empty: gcloud's
#             configured one) and accelerator type; they start from the environment
#             variables MYTHOS_TPU_NAME, MYTHOS_TPU_ZONE, MYTHOS_TPU_PROJECT and
#             MYTHOS_TPU_ACCELERATOR, so that one `export` serves create/install/launch/delete
#   DRY_RUN   1: print commands instead of running them (--dry-run)
#   GCLOUD    the gcloud executable: $GCLOUD from the environment, else gcloud
# Written for bash >= 3.2 (macOS's /bin/bash) so that it runs from a laptop.

TPU_NAME=${MYTHOS_TPU_NAME:-}
ZONE=${MYTHOS_TPU_ZONE:-}
PROJECT=${MYTHOS_TPU_PROJECT:-}
ACCELERATOR=${MYTHOS_TPU_ACCELERATOR:-}
DRY_RUN=0
GCLOUD=${GCLOUD:-gcloud}
MESH_AXES="data fsdp tensor expert"   # mythos_jax.parallel.mesh.MESH_AXES

# usage: print the calling script's header comment (its documentation).
usage() {
  sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
}

die() {
  echo "error: $*" >&2
  exit 2
}

# value FLAG "$@": the argument after FLAG, or die when it is missing.
value() {
  [[ $# -ge 2 && -n $2 && $2 != --* ]] || die "$1 needs a value"
  printf '%s' "$2"
}

# need VALUE WHAT: die "missing WHAT" when VALUE is empty.
need() {
  [[ -n $1 ]] || die "missing $2"
}

# need_slice: die unless the slice's name and zone are known.
need_slice() {
  need "$TPU_NAME" "--name NAME (or export MYTHOS_TPU_NAME)"
  need "$ZONE" "--zone ZONE (or export MYTHOS_TPU_ZONE)"
}

# slice_chips: chips of ACCELERATOR (which must be given), or die.
slice_chips() {
  need "$ACCELERATOR" "--accelerator TYPE (or export MYTHOS_TPU_ACCELERATOR)"
  accelerator_chips "$ACCELERATOR"
}

# quote WORD...: the words as one shell-safe line, single-quoted only where needed (after
# the = of a --flag=value word, so that a printed command reads like a typed one).
quote() {
  local word flag out=""
  for word in "$@"; do
    flag=""
    if [[ $word =~ ^--[a-z-]+= ]]; then
      flag=${BASH_REMATCH[0]}
      word=${word#"$flag"}
    fi
    if [[ ! $word =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
      word="'${word//\'/\'\\\'\'}'"
    fi
    out+="${out:+ }$flag$word"
  done
  printf '%s\n' "$out"
}

# run CMD...: run it, or print it when DRY_RUN=1.
run() {
  if [[ $DRY_RUN == 1 ]]; then quote "$@"; else "$@"; fi
}

# safe_relative FLAG VALUE: die unless VALUE is a plain relative path (from the workers'
# home) that a remote shell cannot misread: letters, digits and _ . - in /-separated parts,
# none of them . or .. or starting with -; no ~, no absolute path, no glob, no space.
safe_relative() {
  local part
  local -a parts
  [[ $2 =~ ^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*$ ]] ||
    die "$1 must be a relative path of letters, digits, '_', '.', '-' and '/', got '$2'"
  IFS=/ read -r -a parts <<<"$2"
  for part in "${parts[@]}"; do
    [[ $part != . && $part != .. && $part != -* ]] ||
      die "$1 must not contain '.', '..' or a part starting with '-', got '$2'"
  done
}

# without_credentials URL: URL with any user:password@ (or a token as the user of an
# http(s) URL) removed, with a warning on stderr; other URLs unchanged.
without_credentials() {
  local url=$1
  if [[ $url =~ ^([A-Za-z][A-Za-z0-9+.-]*://)([^/@]*)@(.*)$ ]]; then
    local scheme=${BASH_REMATCH[1]} user=${BASH_REMATCH[2]} rest=${BASH_REMATCH[3]}
    if [[ $scheme == http://* || $scheme == https://* ]]; then
      url=$scheme$rest
    elif [[ $user == *:* ]]; then
      url=$scheme${user%%:*}@$rest
    fi
    [[ $url == "$1" ]] || echo "warning: removed the credentials from the repository URL" \
      "(they would reach every worker's command line and .git/config); a private" \
      "repository needs --copy" >&2
  fi
  printf '%s' "$url"
}

# require_gcloud: die before anything happens when gcloud is not installed (dry runs only
# print commands, they need no gcloud).
require_gcloud() {
  [[ $DRY_RUN == 1 ]] && return 0
  command -v "$GCLOUD" >/dev/null 2>&1 || die "gcloud not found (looked for '$GCLOUD'):" \
    "install the Google Cloud CLI (https://cloud.google.com/sdk/docs/install), then run" \
    "'gcloud auth login' and 'gcloud config set project PROJECT'"
}

# set_location_flags: LOCATION_FLAGS=(the --zone/--project flags every TPU command takes).
set_location_flags() {
  LOCATION_FLAGS=(--zone="$ZONE")
  [[ -z $PROJECT ]] || LOCATION_FLAGS+=(--project="$PROJECT")
}

# delete_slice: delete TPU_NAME, through its queued resource when it has one (a queued
# resource's slice deleted alone leaves the resource behind); billing stops when it returns.
delete_slice() {
  local delete_queued=("$GCLOUD" compute tpus queued-resources delete "$TPU_NAME" "${LOCATION_FLAGS[@]}"
    --force --quiet)
  local delete_vm=("$GCLOUD" compute tpus tpu-vm delete "$TPU_NAME" "${LOCATION_FLAGS[@]}" --quiet)
  if [[ $DRY_RUN == 1 ]]; then
    echo "$(quote "${delete_queued[@]}") || $(quote "${delete_vm[@]}")"
  elif "$GCLOUD" compute tpus queued-resources describe "$TPU_NAME" "${LOCATION_FLAGS[@]}" \
      >/dev/null 2>&1; then
    echo "$TPU_NAME came through a queued resource: deleting it with its slice" >&2
    "${delete_queued[@]}"
  else
    "${delete_vm[@]}"
  fi
}

# remote_delete_slice: the shell text of delete_slice for a worker's own shell (a detached
# run's guard: the worker has gcloud, and this laptop may be closed).
remote_delete_slice() {
  echo "$(quote gcloud compute tpus queued-resources delete "$TPU_NAME" "${LOCATION_FLAGS[@]}" \
    --force --quiet) || $(quote gcloud compute tpus tpu-vm delete "$TPU_NAME" \
    "${LOCATION_FLAGS[@]}" --quiet)"
}

# ---------------------------------------------------------------------------- accelerators
# accelerator_chips TYPE: chips in a slice of gcloud accelerator type TYPE, or die. The same
# table as mythos_jax/plan/topology.py (tests/test_tpu_setup.py checks that they agree):
# v4-N and v5p-N count TensorCores (2 per chip) and need 4 to 2048 / 4096 chips; v5litepod-N
# and v6e-N count chips, 1 or 4 to 256. Chip counts are powers of two.
accelerator_chips() {
  local type=$1 family=${1%-*} number=${1##*-} per_chip min max chips
  case $family in
    v4) per_chip=2 min=4 max=2048 ;;
    v5p) per_chip=2 min=4 max=4096 ;;
    v5litepod | v6e) per_chip=1 min=1 max=256 ;;
    *) per_chip=0 ;;
  esac
  if [[ $per_chip -gt 0 && $number =~ ^[1-9][0-9]*$ ]] && ((number % per_chip == 0)); then
    chips=$((number / per_chip))
    if ((chips >= min && chips <= max && (chips & (chips - 1)) == 0 && chips != 2)); then
      echo "$chips"
      return 0
    fi
  fi
  die "unknown TPU accelerator type '$type'; use v4-8 ... v4-4096, v5litepod-1/4/8/16 ..." \
    "v5litepod-256, v5p-8 ... v5p-8192, v6e-1/4/8/16 ... v6e-256 (chip counts are powers of 2)"
}

# runtime_version TYPE: the TPU VM image for JAX on that generation (Cloud TPU docs,
# "TPU software versions").
runtime_version() {
  case ${1%-*} in
    v4) echo "tpu-ubuntu2204-base" ;;
    v5litepod) echo "v2-alpha-tpuv5-lite" ;;
    v5p) echo "v2-alpha-tpuv5" ;;
    v6e) echo "v2-alpha-tpuv6e" ;;
  esac
}

# check_mesh SPEC DEVICES WHAT: die unless mesh SPEC (e.g. data=2,fsdp=-1) covers exactly
# DEVICES devices; the rules of mythos_jax.parallel.mesh.parse_mesh_spec.
check_mesh() {
  local spec=$1 devices=$2 what=$3 part axis size product=1 rest="" seen=" "
  local -a parts
  IFS=, read -r -a parts <<<"$spec"
  for part in "${parts[@]}"; do
    part=${part// /}
    [[ -n $part ]] || continue
    axis=${part%%=*} size=${part#*=}
    [[ $part == *=* && " $MESH_AXES " == *" $axis "* ]] ||
      die "mesh '$spec': expected AXIS=SIZE with AXIS one of: $MESH_AXES; got '$part'"
    [[ $seen != *" $axis "* ]] || die "mesh '$spec': axis '$axis' given twice"
    seen+="$axis "
    if [[ $size == -1 ]]; then
      [[ -z $rest ]] || die "mesh '$spec': only one axis may be -1"
      rest=$axis
    elif [[ $size =~ ^[0-9]+$ ]] && ((10#$size >= 1)); then
      product=$((product * 10#$size))
    else
      die "mesh '$spec': the size of '$axis' must be an integer >= 1 or -1, got '$size'"
    fi
  done
  if [[ -n $rest ]]; then
    ((devices % product == 0)) ||
      die "mesh '$spec' does not match $what: $devices devices do not divide by $product"
  else
    ((product == devices)) ||
      die "mesh '$spec' does not match $what: it needs $product devices, there are $devices"
  fi
}

# ---------------------------------------------------------------------------- training
# set_train_args CONFIG WORKDIR MESH [EXTRA...]: TRAIN_ARGS=(the arguments of `mythos-jax`),
# shared by the TPU, local and GPU launchers so that all three run the same command.
set_train_args() {
  TRAIN_ARGS=(train --config "$1" --workdir "$2")
  [[ -z $3 ]] || TRAIN_ARGS+=(--set "mesh=$3")
  shift 3
  TRAIN_ARGS+=("$@")
}
