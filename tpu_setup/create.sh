#!/usr/bin/env bash
# Create a Cloud TPU VM slice, directly or through a queued resource.
#
#   tpu_setup/create.sh --name NAME --zone ZONE --accelerator TYPE [options]
#
#   --name NAME          TPU VM name, also the queued resource's   [MYTHOS_TPU_NAME]
#   --zone ZONE          a zone offering TYPE, e.g. us-central2-b (v4),
#                        us-east5-a (v5p), us-east1-d (v6e)        [MYTHOS_TPU_ZONE]
#   --project PROJECT    default: gcloud's configured project      [MYTHOS_TPU_PROJECT]
#   --accelerator TYPE   v4-8 ... v4-4096, v5litepod-1 ... v5litepod-256,
#                        v5p-8 ... v5p-8192, v6e-1 ... v6e-256     [MYTHOS_TPU_ACCELERATOR]
#   --runtime VERSION    TPU VM image; default per generation: tpu-ubuntu2204-base (v4),
#                        v2-alpha-tpuv5-lite (v5e), v2-alpha-tpuv5 (v5p), v2-alpha-tpuv6e (v6e)
#   --spot               spot capacity: far cheaper, may be preempted at any time
#   --reserved           use your project's reservation
#   --queued             ask through a queued resource: it waits for capacity instead of
#                        failing when the zone has none
#   --valid-for DURATION with --queued: give up unless granted within DURATION, e.g. 6h
#   --mesh SPEC          the mesh you will train with (e.g. data=2,fsdp=-1): checked against
#                        the slice's chips before anything is created
#   --dry-run            print the gcloud command instead of running it
# [VARIABLE]: the environment variable the value defaults to. GCLOUD: the gcloud executable.
# The slice is billed from creation until tpu_setup/delete.sh: delete it when done.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=tpu_setup/common.sh
source "$here/common.sh"

runtime=""            # --runtime
capacity=on-demand    # --spot / --reserved
queued=0              # --queued
valid_for=""          # --valid-for
mesh=""               # --mesh

while [[ $# -gt 0 ]]; do
  case $1 in
    --name) TPU_NAME=$(value "$@"); shift ;;
    --zone) ZONE=$(value "$@"); shift ;;
    --project) PROJECT=$(value "$@"); shift ;;
    --accelerator) ACCELERATOR=$(value "$@"); shift ;;
    --runtime) runtime=$(value "$@"); shift ;;
    --spot) capacity=spot ;;
    --reserved) capacity=reserved ;;
    --queued) queued=1 ;;
    --valid-for) valid_for=$(value "$@"); shift ;;
    --mesh) mesh=$(value "$@"); shift ;;
    --dry-run) DRY_RUN=1 ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
  shift
done

need_slice
chips=$(slice_chips)
[[ -z $mesh ]] || check_mesh "$mesh" "$chips" "$ACCELERATOR ($chips chips)"
[[ -n $runtime ]] || runtime=$(runtime_version "$ACCELERATOR")
[[ -z $valid_for || $queued == 1 ]] || die "--valid-for needs --queued"
capacity_flags=()
[[ $capacity == on-demand ]] || capacity_flags=(--"$capacity")
require_gcloud
set_location_flags

if [[ $queued == 1 ]]; then
  validity=()
  [[ -z $valid_for ]] || validity=(--valid-until-duration="$valid_for")
  run "$GCLOUD" compute tpus queued-resources create "$TPU_NAME" --node-id="$TPU_NAME" \
    "${LOCATION_FLAGS[@]}" --accelerator-type="$ACCELERATOR" --runtime-version="$runtime" \
    ${capacity_flags[@]+"${capacity_flags[@]}"} ${validity[@]+"${validity[@]}"}
  echo "queued; the slice exists once this says ACTIVE:" \
    "$(quote "$GCLOUD" compute tpus queued-resources describe "$TPU_NAME" "${LOCATION_FLAGS[@]}")" >&2
else
  run "$GCLOUD" compute tpus tpu-vm create "$TPU_NAME" "${LOCATION_FLAGS[@]}" \
    --accelerator-type="$ACCELERATOR" --version="$runtime" \
    ${capacity_flags[@]+"${capacity_flags[@]}"}
fi
