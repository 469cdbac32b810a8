#!/usr/bin/env bash
# One node, several GPUs, started by torchrun (one process per GPU).
#
# Usage:
#   GPUS=4 CONFIG=configs/experiments/cifar10_diffusion.yaml experiments/launch_torchrun.sh [extra CLI args...]
#   e.g. GPUS=8 experiments/launch_torchrun.sh --data.batch_size=16 --trainer.max_steps=100000
#
# Environment (defaults):
#   GPUS    number of GPUs = processes on this node        (all visible GPUs, per nvidia-smi)
#   CONFIG  experiment recipe; several: CONFIG="a.yaml b.yaml"   (configs/experiments/cifar10_diffusion.yaml)
#   STAGE   LightningCLI subcommand: fit, validate, test      (fit)
#
# Lightning recognises torchrun's environment (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR) and does not
# spawn processes itself; --trainer.devices must then equal --nproc_per_node. The global batch is
# data.batch_size x GPUS: lower data.batch_size (or raise the lr) to keep the single-GPU recipe's numbers.
# --standalone picks a free rendezvous port on localhost, so two jobs on one machine do not collide.
set -euo pipefail

cd "$(dirname "$0")/.."

if [[ -z "${GPUS:-}" ]]; then
    GPUS=$(nvidia-smi --list-gpus 2>/dev/null | wc -l || true)
    GPUS=${GPUS:-0}
fi
if [[ "$GPUS" -lt 1 ]]; then
    echo "launch_torchrun.sh: no GPU found; set GPUS=N (for CPU DDP use --trainer.accelerator=cpu)" >&2
    exit 1
fi
CONFIG=${CONFIG:-configs/experiments/cifar10_diffusion.yaml}
STAGE=${STAGE:-fit}

config_args=()
for c in $CONFIG; do
    config_args+=(--config "$c")
done

# One CPU thread pool per process, not GPUS x all cores (DataLoader workers are separate processes).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}

exec torchrun --standalone --nproc_per_node="$GPUS" -m experiments.train "$STAGE" "${config_args[@]}" \
    --trainer.devices="$GPUS" --trainer.num_nodes=1 --trainer.strategy=ddp "$@"
