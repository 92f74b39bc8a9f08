#!/usr/bin/env bash
# TPU pod: run the same command on every worker of a Cloud TPU VM slice. jax.distributed.initialize()
# finds the coordinator, the number of processes and this worker's id in the TPU environment
# (vita_jax.parallel.maybe_initialize_distributed calls it when TPU_WORKER_HOSTNAMES is set).
#
#   TPU_NAME=my-v5p-64 ZONE=us-east5-a launch/tpu_pod.sh \
#       vita-jax train --config=stage1_2 --config.mesh_shape.fsdp=-1 --workdir gs://bucket/run1
#
# One-time set-up on every worker (the same ssh fan-out):
#   launch/tpu_pod.sh bash -c 'git clone <this repo> vita_jax && cd vita_jax && pip install -e ".[gcs]" "jax[tpu]"'
# The work dir must be shared by all workers (a gs:// bucket or an NFS path): orbax writes one
# checkpoint from every host's shards; metrics.jsonl and TensorBoard come from process 0. A gs:// work
# dir needs gcsfs (the [gcs] extra): every other file goes through vita_jax/paths.py (etils.epath).
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME to the TPU VM name}"
: "${ZONE:?set ZONE to its zone}"
PROJECT_FLAG=${PROJECT:+--project=$PROJECT}
REPO_DIR=${REPO_DIR:-vita_jax}
CMD=$(printf '%q ' "$@")
exec gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" $PROJECT_FLAG --worker=all \
    --command="cd $REPO_DIR && $CMD"
