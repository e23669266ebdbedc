#!/usr/bin/env bash
# Install mythos-jax on every worker of a TPU VM slice: a Python >= 3.12 venv (made by uv,
# since TPU VM images ship an older Python), jax[tpu] and this project at a git ref.
#
#   tpu_setup/install.sh --name NAME --zone ZONE [options]
#
#   --name NAME          TPU VM name                                [MYTHOS_TPU_NAME]
#   --zone ZONE          its zone                                   [MYTHOS_TPU_ZONE]
#   --project PROJECT    default: gcloud's configured project       [MYTHOS_TPU_PROJECT]
#   --ref REF            commit, branch or tag; default: this checkout's HEAD commit (push
#                        it first, or use --copy)
#   --repo URL           git URL the workers clone; default: this checkout's 'origin'
#                        (credentials in it, user:token@, are removed: use --copy for a
#                        private repository)
#   --copy               send REF from this checkout as a git archive over scp instead of
#                        cloning (private repositories, unpushed commits)
#   --jax SPEC           the JAX requirement; default jax[tpu]==0.12.0.1, the version the
#                        test suite runs (jax[tpu] brings the matching libtpu); it must
#                        agree with tpu_setup/constraints.txt
#   --python VERSION     Python of the venv, >= 3.12 (default 3.12, which the
#                        constraints were resolved for)
#   --dir DIR            source directory on the workers, from their home (mythos-jax)
#   --venv DIR           venv on the workers, from their home (mythos-venv)
#                        (both plain relative paths: no ., .., ~, leading /, globs or
#                        spaces)
#   --dry-run            print the commands instead of running them
# [VARIABLE]: the environment variable the value defaults to. GCLOUD: the gcloud executable.
# Every worker gets the same versions: uv at UV_VERSION (set below; its versioned installer,
# into ~/.mythos-uv/VERSION), then the packages under tpu_setup/constraints.txt, which pins
# every dependency (gcsfs and google-cloud-storage included: gs:// workdirs need them).
# Every value in the workers' script is quoted.
# Safe to rerun: it updates the checkout and the venv in place.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=tpu_setup/common.sh
source "$here/common.sh"

ref=""                          # --ref
repo=""                         # --repo
copy=0                          # --copy
jax_spec="jax[tpu]==0.12.0.1"   # --jax
python_version=3.12             # --python
UV_VERSION=0.13.8               # the uv every worker installs (pinned)
remote_dir=mythos-jax           # --dir
remote_venv=mythos-venv         # --venv

while [[ $# -gt 0 ]]; do
  case $1 in
    --name) TPU_NAME=$(value "$@"); shift ;;
    --zone) ZONE=$(value "$@"); shift ;;
    --project) PROJECT=$(value "$@"); shift ;;
    --ref) ref=$(value "$@"); shift ;;
    --repo) repo=$(value "$@"); shift ;;
    --copy) copy=1 ;;
    --jax) jax_spec=$(value "$@"); shift ;;
    --python) python_version=$(value "$@"); shift ;;
    --dir) remote_dir=$(value "$@"); shift ;;
    --venv) remote_venv=$(value "$@"); shift ;;
    --dry-run) DRY_RUN=1 ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
  shift
done

need_slice
safe_relative --dir "$remote_dir"
safe_relative --venv "$remote_venv"
[[ $python_version =~ ^3\.(1[2-9]|[2-9][0-9])$ ]] ||
  die "--python must be 3.12 or newer, got '$python_version'"
checkout=$(cd "$here/.." && pwd)
[[ -n $ref ]] || ref=$(git -C "$checkout" rev-parse HEAD 2>/dev/null) ||
  die "give --ref (this is not a git checkout)"
[[ $ref != -* ]] || die "--ref must not start with '-' (git would read it as an option): '$ref'"
if [[ $copy == 0 && -z $repo ]]; then
  repo=$(git -C "$checkout" config --get remote.origin.url) ||
    die "give --repo URL (this checkout has no 'origin' remote) or --copy"
fi
[[ $copy == 1 ]] || repo=$(without_credentials "$repo")
require_gcloud
set_location_flags

# The source, then the script every worker runs (in its home directory); every value in it
# is quoted.
dir=$(quote "$remote_dir")
venv=$(quote "$remote_venv")
uv_dir=.mythos-uv/$UV_VERSION
if [[ $copy == 1 ]]; then
  archive=$(mktemp "${TMPDIR:-/tmp}/mythos-jax-src.XXXXXX")
  trap 'rm -f "$archive"' EXIT
  run git -C "$checkout" archive --format=tar.gz --output="$archive" "$ref"
  run "$GCLOUD" compute tpus tpu-vm scp "$archive" "$TPU_NAME:mythos-jax-src.tar.gz" \
    "${LOCATION_FLAGS[@]}" --worker=all
  get_source="rm -rf -- $dir && mkdir -p -- $dir
tar -xzf mythos-jax-src.tar.gz -C $dir && rm -f mythos-jax-src.tar.gz"
else
  get_source="[ -d $dir/.git ] || git clone --quiet -- $(quote "$repo") $dir
git -C $dir fetch --quiet -- origin $(quote "$ref")
git -C $dir checkout --quiet --detach FETCH_HEAD"
fi
remote_script="set -euo pipefail
[ -x $uv_dir/uv ] || curl -LsSf https://astral.sh/uv/$UV_VERSION/install.sh | env UV_INSTALL_DIR=\"\$HOME/$uv_dir\" UV_NO_MODIFY_PATH=1 sh
$get_source
$uv_dir/uv venv --quiet --allow-existing --python $(quote "$python_version") $venv
$uv_dir/uv pip install --quiet --python $venv/bin/python -c $dir/tpu_setup/constraints.txt $(quote "$jax_spec") gcsfs google-cloud-storage -e $dir
$venv/bin/mythos-jax --version"
run "$GCLOUD" compute tpus tpu-vm ssh "$TPU_NAME" "${LOCATION_FLAGS[@]}" --worker=all \
  --command="$remote_script"
