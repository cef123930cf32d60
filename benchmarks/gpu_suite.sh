#!/usr/bin/env bash
# Every GPU number of the project in one call of at most 8 minutes on one H100/H200, from the repository tree
# (PYTHONPATH=., no network, no Snakemake; the image's own torch):
#
#   bash benchmarks/gpu_suite.sh                                # writes benchmarks/results/ and its summary
#   bash benchmarks/gpu_suite.sh --archive "$OUT/gpu-suite.tgz"  # also packs every table and log into one file
#   bash benchmarks/gpu_suite.sh --smoke                        # the same on CPU with tiny shapes, into a
#                                                               # temporary folder (tests/test_benchmarks.py)
#
# Sections, each under its own time limit (a section past it is stopped and reported; the whole stays under
# BUDGET_S seconds):
#   step-B2        benchmarks/step_cost.py: B/2, batch 256, bf16: forward, FM, α-Flow, MeanFlow (tangent pass,
#                  torch.func.jvp split and fused), the official formulation, CFG teachers; ms, peak memory and
#                  MFU (analytic FLOPs, alphaflow.plan.dit_flops, against the device's named dense bf16 peak)
#   step-XL2       the same for XL/2 at batch 64 (per image, which is what `alphaflow plan` uses)
#   step-compiled  B/2 with torch.compile rows (FM, α-Flow, MeanFlow); its own table, not read by the plan
#   eval           benchmarks/eval_throughput.py: XL/2 sampling at 1 and 2 NFE, SD-VAE decoding at 256 px, FID
#                  Inception, DINOv2, CLIP and the demo classifier (random-init networks where the weights files
#                  are absent; the table says which)
#   train          benchmarks/train_check.py: a 200-step B/2 `alphaflow train` on synthetic data through the CLI
#                  (bf16 on CUDA), stopped at step 100 and resumed; losses finite
#   protocol       benchmarks/protocol_check.py: the official noise streams on the device (per-seed CUDA
#                  generators) bit-equal to the official code's; the released profile's sampling of XL/2
#                  (random init, bf16, per-seed generators) at 1 NFE and the 2-NFE consistency sampler, images/s
#
# The step-cost and throughput JSON tables land in the results folder (default benchmarks/results/, where
# `alphaflow plan` reads them), with gpu-suite.md, the summary. A failed section prints one line and the others
# go on; the exit status is 1 if any section failed.
#
# Packages the CUDA image lacks (jsonschema, torch-fidelity, diffusers and their own needs) travel as wheels
# (benchmarks/gpu_wheels.sh): where they cannot be imported, the *.whl in .whl/ (or $WHEELS) are installed with
# pip --no-index into a temporary folder first.
set -u
cd "$(dirname "$0")/.."

SMOKE=0
RESULTS=""
ARCHIVE=""
BUDGET_S=${BUDGET_S:-470}
while [ $# -gt 0 ]; do
  case "$1" in
    --smoke) SMOKE=1 ;;
    --results) RESULTS="$2"; shift ;;
    --archive) ARCHIVE="$2"; shift ;;
    -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
    *) echo "gpu_suite.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

PY=${PYTHON:-python3}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu-suite.XXXXXX")
if [ -z "$RESULTS" ]; then
  if [ "$SMOKE" = 1 ]; then RESULTS="$WORK/results"; else RESULTS=benchmarks/results; fi
fi
mkdir -p "$RESULTS" "$WORK/logs"
touch "$WORK/started"   # tables newer than this were written by this call
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1

WHEELS=${WHEELS:-.whl}
if ls "$WHEELS"/*.whl >/dev/null 2>&1 && ! "$PY" -c "import jsonschema, torch_fidelity, diffusers" >/dev/null 2>&1; then
  if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$WORK/site" "$WHEELS"/*.whl \
      >"$WORK/logs/wheels.log" 2>&1; then
    export PYTHONPATH="$PYTHONPATH:$WORK/site"
    echo "wheels: installed $(ls "$WHEELS"/*.whl | wc -l) from $WHEELS"
  else
    echo "wheels: pip install from $WHEELS FAILED (see $WORK/logs/wheels.log); going on without them"
  fi
fi

START=$(date +%s)
FAILED=()
STATUS=()

# run NAME LIMIT_S COMMAND...: one section under min(LIMIT_S, what is left of BUDGET_S), one line of outcome.
run() {
  local name=$1 limit=$2; shift 2
  local left=$(( BUDGET_S - ($(date +%s) - START) ))
  if [ "$left" -lt 15 ]; then
    STATUS+=("| $name | skipped: the ${BUDGET_S} s budget is spent |"); FAILED+=("$name")
    echo "[$name] SKIPPED: the ${BUDGET_S} s budget is spent"; return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  local t0=$(date +%s) code
  echo "[$name] started (limit ${limit} s)"
  timeout -k 10 "$limit" "$@" >"$WORK/logs/$name.log" 2>&1
  code=$?
  local took=$(( $(date +%s) - t0 ))
  if [ "$code" = 0 ]; then
    STATUS+=("| $name | ok, ${took} s |"); echo "[$name] ok in ${took} s"
  else
    local why="exit $code"
    [ "$code" = 124 ] || [ "$code" = 137 ] && why="stopped at its ${limit} s limit"
    local last; last=$(grep -v '^\s*$' "$WORK/logs/$name.log" | tail -n 1 | cut -c1-200)
    STATUS+=("| $name | FAILED ($why) after ${took} s: ${last//|/\\|} |"); FAILED+=("$name")
    echo "[$name] FAILED ($why) after ${took} s: $last"
  fi
}

if [ "$SMOKE" = 1 ]; then
  DEVICE=cpu
  STEP="--input-size 8 --channels 4 --num-classes 10 --warmup 1 --iters 1 --repeats 1 --threads 2"
  run step-B2 120 "$PY" benchmarks/step_cost.py --model N/4 --batch 4 $STEP --out "$RESULTS"
  run step-XL2 120 "$PY" benchmarks/step_cost.py --model T/4 --batch 4 --no-cfg $STEP --out "$RESULTS"
  STATUS+=("| step-compiled | skipped in --smoke (inductor's first compile takes minutes on a CPU) |")
  run eval 150 "$PY" benchmarks/eval_throughput.py --device cpu --threads 2 --tiny --repeats 1 \
    --sections sample vae inception dinov2 clip classifier --model T/4 --input-size 8 --channels 4 \
    --nfe 1 2 --n 8 --n-features 2 --sample-batch 8 --batch 2 --resolution 32 --out "$RESULTS"
  run train 150 "$PY" benchmarks/train_check.py --device cpu --tiny --out "$WORK/train"
  run protocol 60 "$PY" benchmarks/protocol_check.py --device cpu --tiny --out "$RESULTS"
else
  DEVICE=cuda
  if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" >"$WORK/logs/cuda.log" 2>&1; then
    echo "no CUDA device here ($PY: $(tail -n 1 "$WORK/logs/cuda.log"; "$PY" -c 'import torch; print("torch", torch.__version__)' 2>&1 | tail -n 1)): every GPU section is skipped; use --smoke on a CPU"
    exit 1
  fi
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >"$WORK/logs/gpu.txt" 2>&1 || true
  echo "device: $(head -n 1 "$WORK/logs/gpu.txt")"
  LATENT="--input-size 32 --channels 4 --num-classes 1000 --bf16"
  run step-B2 90 "$PY" benchmarks/step_cost.py --model B/2 --batch 256 $LATENT --repeats 3 --iters 5 --budget-s 45 \
    --out "$RESULTS"
  run step-XL2 90 "$PY" benchmarks/step_cost.py --model XL/2 --batch 64 $LATENT --repeats 3 --iters 3 --budget-s 40 \
    --out "$RESULTS"
  run step-compiled 100 "$PY" benchmarks/step_cost.py --model B/2 --batch 256 $LATENT --repeats 2 --iters 5 \
    --only fm --no-cfg --compile --budget-s 20 --out "$WORK/compiled"
  run eval 75 "$PY" benchmarks/eval_throughput.py --device cuda --bf16 --repeats 2 \
    --sections sample vae inception dinov2 clip classifier --model XL/2 $LATENT --nfe 1 2 \
    --n 2048 --n-features 1024 --n-vae 256 --sample-batch 256 --batch 128 --resolution 256 --out "$RESULTS"
  run train 100 "$PY" benchmarks/train_check.py --device cuda --model B/2 --steps 200 --batch 64 --out "$WORK/train"
  run protocol 45 "$PY" benchmarks/protocol_check.py --device cuda --model XL/2 --bf16 --n 1024 --batch 256 \
    --out "$RESULTS"
fi

# The summary: every section's outcome, then the tables it wrote.
SUMMARY="$RESULTS/gpu-suite.md"
{
  echo "# benchmarks/gpu_suite.sh$([ "$SMOKE" = 1 ] && echo " --smoke"), $(date -u +%Y-%m-%d), $DEVICE"
  echo
  [ -f "$WORK/logs/gpu.txt" ] && echo "Device: $(head -n 1 "$WORK/logs/gpu.txt")" && echo
  echo "| section | outcome |"
  echo "|---|---|"
  printf '%s\n' "${STATUS[@]}"
  for md in "$RESULTS"/${DEVICE}-*.md "$WORK"/compiled/*.md "$RESULTS"/eval-${DEVICE}*.md "$RESULTS"/protocol-${DEVICE}.md; do
    [ -f "$md" ] && [ "$md" -nt "$WORK/started" ] && { echo; cat "$md"; }
  done
  if [ -f "$WORK/train/train-check.json" ]; then
    echo; echo "Training through the CLI (benchmarks/train_check.py):"; echo
    "$PY" - "$WORK/train/train-check.json" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"{r['model']}, {r['steps']} steps at batch {r['batch']} on {r['device']}: " + ", ".join(
    f"{k} {v['seconds']} s (exit {v['returncode']})" for k, v in r["calls"].items()))
print(f"median {r['steps_per_s_median'] or float('nan'):.2f} steps/s; loss {r['losses']['first']} → {r['losses']['last']}")
for check, ok in r["checks"].items():
    print(f"- {'ok' if ok else 'FAILED'}: {check}")
EOF
  fi
} >"$SUMMARY"
cp "$WORK/train/train-check.json" "$RESULTS/" 2>/dev/null || true
echo "summary: $SUMMARY ($(( $(date +%s) - START )) s)"

if [ -n "$ARCHIVE" ]; then
  mkdir -p "$WORK/pack/results" && cp "$RESULTS"/*.md "$RESULTS"/*.json "$WORK/pack/results/" 2>/dev/null
  cp -r "$WORK/logs" "$WORK/pack/" && cp -r "$WORK/compiled" "$WORK/pack/" 2>/dev/null
  tar -czf "$ARCHIVE" -C "$WORK/pack" . && echo "archive: $ARCHIVE"
fi

if [ "${#FAILED[@]}" -gt 0 ]; then
  echo "failed sections: ${FAILED[*]} (logs in $WORK/logs)"
  exit 1
fi
case "$RESULTS" in "$WORK"/*) ;; *) rm -rf "$WORK" ;; esac   # all went well: the logs are not needed
