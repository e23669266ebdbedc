#!/usr/bin/env bash
# Delete a TPU VM slice (or its queued resource with it): billing stops when this finishes.
#
#   tpu_setup/delete.sh --name NAME --zone ZONE [--queued] [--dry-run]
#
# A slice made through a queued resource (create.sh --queued) is found and deleted with it.
#
#   --name NAME          TPU VM name                                [MYTHOS_TPU_NAME]
#   --zone ZONE          its zone                                   [MYTHOS_TPU_ZONE]
#   --project PROJECT    default: gcloud's configured project       [MYTHOS_TPU_PROJECT]
#   --queued             delete the queued resource and its slice without looking first
#   --dry-run            print the gcloud command instead of running it
# [VARIABLE]: the environment variable the value defaults to. GCLOUD: the gcloud executable.
# Checkpoints in the gs:// workdir stay; the workers' disks go.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=tpu_setup/common.sh
source "$here/common.sh"

queued=0   # --queued

while [[ $# -gt 0 ]]; do
  case $1 in
    --name) TPU_NAME=$(value "$@"); shift ;;
    --zone) ZONE=$(value "$@"); shift ;;
    --project) PROJECT=$(value "$@"); shift ;;
    --queued) queued=1 ;;
    --dry-run) DRY_RUN=1 ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
  shift
done

need_slice
require_gcloud
set_location_flags
if [[ $queued == 1 ]]; then
  run "$GCLOUD" compute tpus queued-resources delete "$TPU_NAME" "${LOCATION_FLAGS[@]}" \
    --force --quiet
else
  delete_slice
fi
