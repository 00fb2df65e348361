#!/usr/bin/env bash
# Creates (or reuses) a Cloud TPU VM / pod slice, installs b2t_jax on every worker and starts training on
# every worker. With --dry-run it only prints the gcloud commands. The HDF5 data_dir must be readable on
# every worker (a local copy or a gcsfuse mount); the workdir may be a gs:// path (orbax and clu write there).
# Every value reaches the workers verbatim (quoted for their shell; no remote ~ or $VAR expansion), relative
# paths from the b2t_jax checkout in the home folder.
#
#   tools/launch_tpu_pod.sh --name=b2t --zone=us-central2-b --accelerator=v4-32 \
#       --workdir=gs://BUCKET/runs/triple --data_dir=/mnt/t15/hdf5_data_final [--config=configs/tpu_v4.py] \
#       [--repo=https://github.com/ORG/b2t_jax.git] [--ref=main] [--runtime=tpu-ubuntu2204-base] [--dry-run] \
#       [-- --config.train.num_steps=1000 ...extra flags for b2t_jax.main]
set -euo pipefail

name="" zone="" accelerator="v4-8" runtime="tpu-ubuntu2204-base" workdir="" data_dir=""
config="configs/tpu_v4.py" repo="" ref="main" dry_run=0 extra=()
usage() { sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }
while [ $# -gt 0 ]; do
  case "$1" in
    --name=*) name="${1#*=}" ;;
    --zone=*) zone="${1#*=}" ;;
    --accelerator=*) accelerator="${1#*=}" ;;
    --runtime=*) runtime="${1#*=}" ;;
    --workdir=*) workdir="${1#*=}" ;;
    --data_dir=*) data_dir="${1#*=}" ;;
    --config=*) config="${1#*=}" ;;
    --repo=*) repo="${1#*=}" ;;
    --ref=*) ref="${1#*=}" ;;
    --dry-run) dry_run=1 ;;
    -h|--help) usage 0 ;;
    --) shift; extra=("$@"); break ;;
    *) echo "unknown argument: $1" >&2; usage 2 ;;
  esac
  shift
done
for v in name zone workdir data_dir; do
  if [ -z "${!v}" ]; then echo "--$v is required" >&2; usage 2; fi
done
for v in ref repo; do  # they reach git as arguments: one starting with '-' would be read as an option
  if [[ "${!v}" == -* ]]; then echo "--$v=${!v}: must not start with '-'" >&2; exit 2; fi
done
if [ -z "$repo" ]; then
  repo=$(git -C "$(dirname "$0")/.." remote get-url origin 2>/dev/null || true)
  [ -n "$repo" ] || { echo "--repo is required (no git remote 'origin' to default to)" >&2; exit 2; }
fi

run() {  # print the command (copy-pasteable); run it unless --dry-run
  local shown=() a
  for a in "$@"; do
    if [[ "$a" =~ ^[[:alnum:]_./:=,@%+-]+$ ]]; then shown+=("$a"); else shown+=("${a@Q}"); fi
  done
  echo "${shown[*]}"
  [ "$dry_run" = 1 ] || "$@"
}

tpu=(gcloud compute tpus tpu-vm)
if [ "$dry_run" = 1 ] || ! "${tpu[@]}" describe "$name" --zone="$zone" >/dev/null 2>&1; then
  run "${tpu[@]}" create "$name" --zone="$zone" --accelerator-type="$accelerator" --version="$runtime"
fi

# The remote shell parses --command again: every word that carries a value is quoted for it (printf %q), so a
# mesh shape like (4,2), a path with spaces or a --ref holding shell syntax arrive as one literal argument each.
quote() { local s; printf -v s '%q ' "$@"; printf '%s' "${s% }"; }
q_ref=$(quote "$ref") q_repo=$(quote "$repo")
install="set -e; if [ -d b2t_jax ]; then git -C b2t_jax fetch -q origin && git -C b2t_jax checkout -q $q_ref"
install+=" && git -C b2t_jax pull -q; else git clone -q -b $q_ref $q_repo b2t_jax; fi;"
install+=" cd b2t_jax && python3 -m pip install -q -e . 'jax[tpu]==0.10.2'"
run "${tpu[@]}" ssh "$name" --zone="$zone" --worker=all --command="$install"

# Every worker runs the same command; jax.distributed.initialize() finds the slice's coordinator itself.
main=$(quote python3 -m b2t_jax.main "--config=$config" "--workdir=$workdir" "--config.data.data_dir=$data_dir" \
  --config.distributed=True ${extra[@]+"${extra[@]}"})
train="cd b2t_jax && nohup $main > train.log 2>&1 &"
run "${tpu[@]}" ssh "$name" --zone="$zone" --worker=all --command="$train"
echo "# follow worker 0: ${tpu[*]} ssh $name --zone=$zone --worker=0 --command='tail -f b2t_jax/train.log'"
