#!/usr/bin/env bash
# Create, set up, run training on, and delete a Cloud TPU VM pod slice (every host runs one process).
#
#   launch/tpu_pod.sh [--dry-run] ACTION [options] [-- extra train flags]
#
# ACTION   create | setup | run | delete
# Options (each also readable from the environment variable in brackets):
#   --name NAME           TPU VM name                         [TPU_NAME]      (default gmem-jax)
#   --project PROJECT     GCP project                         [GCP_PROJECT]   (required)
#   --zone ZONE           e.g. us-central2-b                  [TPU_ZONE]      (required)
#   --accelerator TYPE    e.g. v4-32, v5litepod-16            [TPU_TYPE]      (default v4-32)
#   --version RUNTIME     TPU VM software version             [TPU_RUNTIME]   (default tpu-ubuntu2204-base)
#   --spot                create a Spot (preemptible) slice   [TPU_SPOT=1]
#   --config FILE         training config, relative to the repo root      [CONFIG]   (run: required)
#   --workdir gs://...    checkpoints/metrics; every host must reach it   [WORKDIR]  (run: required)
#   --remote-dir DIR      where the code lives on the hosts   [REMOTE_DIR]    (default gmem_jax, under $HOME)
#   --dry-run             print the commands instead of running them      [DRY_RUN=1]
# GMEM_DISTRIBUTED=1 makes gmem_jax.training.distributed.maybe_initialize() call jax.distributed.initialize(),
# which finds the coordinator and process ids of the slice itself.
set -euo pipefail

die() { echo "tpu_pod.sh: $*" >&2; exit 2; }

# Print a command copy-pastably (dry run) or run it.
run() {
  if [[ "${DRY_RUN:-0}" == 1 ]]; then
    local out=() a
    for a in "$@"; do
      if [[ "$a" =~ ^[A-Za-z0-9_./:=@%+,~-]+$ ]]; then out+=("$a"); else out+=("'${a//\'/\'\\\'\'}'"); fi
    done
    echo "${out[*]}"
  else
    "$@"
  fi
}

NAME=${TPU_NAME:-gmem-jax}; PROJECT=${GCP_PROJECT:-}; ZONE=${TPU_ZONE:-}; TYPE=${TPU_TYPE:-v4-32}
RUNTIME=${TPU_RUNTIME:-tpu-ubuntu2204-base}; SPOT=${TPU_SPOT:-0}; CONFIG=${CONFIG:-}; WORKDIR=${WORKDIR:-}
REMOTE_DIR=${REMOTE_DIR:-gmem_jax}; ACTION=""; EXTRA=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --spot) SPOT=1 ;;
    --name|--project|--zone|--accelerator|--version|--config|--workdir|--remote-dir)
      [[ $# -ge 2 ]] || die "$1 needs a value"
      case "$1" in
        --name) NAME=$2 ;; --project) PROJECT=$2 ;; --zone) ZONE=$2 ;; --accelerator) TYPE=$2 ;;
        --version) RUNTIME=$2 ;; --config) CONFIG=$2 ;; --workdir) WORKDIR=$2 ;; --remote-dir) REMOTE_DIR=$2 ;;
      esac
      shift ;;
    --) shift; EXTRA=("$@"); break ;;
    create|setup|run|delete) ACTION=$1 ;;
    *) die "unknown argument '$1'; see the header of launch/tpu_pod.sh for usage" ;;
  esac
  shift
done
[[ -n "$ACTION" ]] || die "no action given: use one of create, setup, run, delete"
[[ -n "$PROJECT" ]] || die "no GCP project: pass --project or set GCP_PROJECT"
[[ -n "$ZONE" ]] || die "no zone: pass --zone or set TPU_ZONE"
TPU=(gcloud compute tpus tpu-vm)
WHERE=("--project=$PROJECT" "--zone=$ZONE")

case "$ACTION" in
  create)
    args=("${TPU[@]}" create "$NAME" "${WHERE[@]}" "--accelerator-type=$TYPE" "--version=$RUNTIME")
    [[ "$SPOT" == 1 ]] && args+=(--spot)
    run "${args[@]}"
    ;;
  setup)  # ship this checkout (without .git) to every host and install it with the TPU extra
    REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
    run tar --exclude=.git --exclude=__pycache__ -czf /tmp/gmem_jax_src.tgz -C "$REPO" .
    run "${TPU[@]}" scp /tmp/gmem_jax_src.tgz "$NAME:gmem_jax_src.tgz" "${WHERE[@]}" --worker=all
    run "${TPU[@]}" ssh "$NAME" "${WHERE[@]}" --worker=all \
      "--command=mkdir -p $REMOTE_DIR && tar -xzf gmem_jax_src.tgz -C $REMOTE_DIR && cd $REMOTE_DIR && python3 -m pip install -q -e \".[tpu]\""
    ;;
  run)
    [[ -n "$CONFIG" ]] || die "run needs --config (or CONFIG)"
    [[ "$WORKDIR" == gs://* ]] || die "--workdir must be a gs:// path that every TPU host can reach (got '${WORKDIR}')"
    train="cd $REMOTE_DIR && GMEM_DISTRIBUTED=1 python3 -m gmem_jax.train --config=$CONFIG --workdir=$WORKDIR"
    for a in "${EXTRA[@]+"${EXTRA[@]}"}"; do train+=" $(printf '%q' "$a")"; done
    run "${TPU[@]}" ssh "$NAME" "${WHERE[@]}" --worker=all "--command=$train"
    ;;
  delete)
    run "${TPU[@]}" delete "$NAME" "${WHERE[@]}" --quiet
    ;;
esac
