#!/usr/bin/env bash
# Multi-node GPU: one process per node, each driving all the node's GPUs (a jax "process" spans
# its local devices). Two ways to start it:
#
# 1. SLURM (jax.distributed.initialize() reads SLURM_* by itself):
#      sbatch --nodes=4 --ntasks-per-node=1 --gpus-per-node=8 launch/gpu_multinode.sh \
#          vita-jax train --config=stage1_3 --config.mesh_shape.fsdp=-1 --workdir /shared/run1
#
# 2. Without a scheduler: run this script on every node with the same coordinator and its own rank:
#      COORDINATOR=10.0.0.1:1234 NUM_NODES=4 NODE_RANK=0 launch/gpu_multinode.sh vita-jax train ...
#      COORDINATOR=10.0.0.1:1234 NUM_NODES=4 NODE_RANK=1 launch/gpu_multinode.sh vita-jax train ...
#
# The work dir must be on a file system every node sees.
set -euo pipefail
if [[ -n "${SLURM_JOB_ID:-}" && -z "${COORDINATOR:-}" ]]; then
    exec srun --ntasks-per-node=1 "$@"
fi
: "${COORDINATOR:?set COORDINATOR=host:port (node 0), or run under SLURM}"
: "${NUM_NODES:?set NUM_NODES}"
: "${NODE_RANK:?set NODE_RANK (0 .. NUM_NODES-1)}"
export JAX_COORDINATOR_ADDRESS=$COORDINATOR JAX_NUM_PROCESSES=$NUM_NODES JAX_PROCESS_ID=$NODE_RANK
exec "$@"
