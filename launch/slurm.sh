#!/usr/bin/env bash
# Multi-node training under Slurm: one `accelerate launch` per node, ranks from Slurm's variables.
#   sbatch --nodes 2 --gpus-per-node 8 launch/slurm.sh recipes/pretrain.py --preset shakespeare
#SBATCH --job-name=gpt-distill
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
#SBATCH --output=runs/slurm-%j.out
set -euo pipefail

recipe=${1:?usage: sbatch launch/slurm.sh recipes/RECIPE.py [recipe flags...]}
shift

gpus_per_node=${SLURM_GPUS_ON_NODE:-$(nvidia-smi -L 2>/dev/null | wc -l)}
main_host=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
nodes=${SLURM_NNODES:-1}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}

# The run folder must be the same on every node: name it after the job unless --out is given.
out_flag=()
[[ " $* " == *" --out "* ]] || out_flag=(--out "runs/slurm-${SLURM_JOB_ID}")

srun --ntasks-per-node=1 bash -c "accelerate launch \
  --config_file launch/multi_node.yaml \
  --num_machines ${nodes} \
  --num_processes $((nodes * gpus_per_node)) \
  --machine_rank \${SLURM_NODEID} \
  --main_process_ip ${main_host} \
  --main_process_port 29500 \
  ${recipe} ${out_flag[*]} $*"
