#!/usr/bin/env bash
# One command for whoever is lent an accelerator (issue 22, item 5): the attacks' tests on the device,
# bench_attack at the device's lanes, the JAX half of bench_optimality, and Table 1's attack over all
# 60,000 training images of the six zoo models; one report at the end. Budget: under 8 minutes on one GPU.
#
#   scripts/device_check.sh [--quick] [--workdir DIR] [--data-dir DIR]
#
# --quick: small sizes, a smoke test that also runs on a CPU. --workdir: where models and results go
# (default runs/device_check). Models missing in WORKDIR/models are trained first, inside the step
# that needs them and within its time limit: bring them (the six of Table 1, FC100-100-10, ConvNet,
# ReluCNN) in WORKDIR/models to keep to 8 minutes. --data-dir: the folder
# holding fashion_mnist/ (default $JAXADV_DATA_DIR). Each step has its own time limit; a failed or
# timed-out step is reported and the next one still runs. Exit status: the number of failed steps.
set -u
cd "$(dirname "$0")/.."
quick=0
workdir=runs/device_check
data_dir=${JAXADV_DATA_DIR:-}
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) quick=1 ;;
    --workdir) workdir=${2:?--workdir needs a folder}; shift ;;
    --data-dir) data_dir=${2:?--data-dir needs a folder}; shift ;;
    *) echo "device_check.sh: error: unknown argument $1 (usage: [--quick] [--workdir DIR] [--data-dir DIR])" >&2
       exit 2 ;;
  esac
  shift
done
if [ -z "$data_dir" ] || [ ! -d "$data_dir/fashion_mnist" ]; then
  echo "device_check.sh: error: no Fashion-MNIST: pass --data-dir DIR (a folder holding fashion_mnist/)" >&2
  exit 2
fi
export JAXADV_DATA_DIR=$data_dir PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} OMP_WAIT_POLICY=PASSIVE
python=${PYTHON:-python}
logs=$workdir/device_check_logs
mkdir -p "$logs"

if [ $quick = 1 ]; then
  bench_attack=(--num-images 64 --scipy-images 4 --repeats 1 --no-optax --baseline-commit none)
  optimality=(--quick)
  table1=(--quick)
  limits=(300 300 300 300)
else
  bench_attack=(--num-images 1000 --scipy-images 8 --repeats 2 --no-optax --baseline-commit none)
  optimality=(--num-images 100)
  table1=(--split train --num-images 60000)
  limits=(150 60 120 150)
fi
tests=()
for t in tests/test_attacks.py tests/test_minnorm.py tests/test_advlib_reference.py \
         tests/test_metrics.py; do
  [ -f "$t" ] && tests+=("$t")
done

names=("attack tests" "bench_attack" "bench_optimality --jax-only" "Table 1, 60,000 training images")
commands=(
  "$python -m pytest -q -x -p no:cacheprovider ${tests[*]}"
  "$python scripts/bench_attack.py --workdir $workdir ${bench_attack[*]}"
  "$python scripts/bench_optimality.py --jax-only --workdir $workdir --out-dir $workdir/bench_optimality ${optimality[*]}"
  "$python -m experiments.table1 --workdir $workdir ${table1[*]}"
)
status=()
seconds=()
failed=0
start_all=$SECONDS
"$python" -c 'import jax; print("devices:", jax.devices())' 2>&1 | tee "$logs/devices.log"
for i in "${!names[@]}"; do
  echo "=== ${names[$i]}: ${commands[$i]} (limit ${limits[$i]} s)"
  start=$SECONDS
  timeout "${limits[$i]}" ${commands[$i]} > "$logs/step$i.log" 2>&1
  rc=$?
  seconds[$i]=$((SECONDS - start))
  if [ $rc = 0 ]; then status[$i]=ok; elif [ $rc = 124 ]; then status[$i]="timed out"; else status[$i]="failed ($rc)"; fi
  [ $rc = 0 ] || failed=$((failed + 1))
  tail -n 3 "$logs/step$i.log"
done

echo
echo "# device_check report ($(date -u +%FT%TZ), $((SECONDS - start_all)) s in all; logs in $logs)"
cat "$logs/devices.log"
for i in "${!names[@]}"; do
  echo
  echo "## ${names[$i]}: ${status[$i]}, ${seconds[$i]} s"
  echo '```'
  echo "${commands[$i]}"
  case $i in
    0) tail -n 5 "$logs/step$i.log" ;;
    1) grep -iE "gradients/s|share|images/s|ratio|lanes" "$logs/step$i.log" | tail -n 25 ;;
    2) sed -n '/^## /,$p' "$logs/step$i.log" | grep -v "^wrote" ;;
    3) grep -E "^\||^#|success" "$logs/step$i.log" | tail -n 20 ;;
  esac
  echo '```'
done
exit $failed
