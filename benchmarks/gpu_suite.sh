#!/usr/bin/env bash
# GPU benchmark suite for scrcl-cli: one prepared script that a CUDA host runs unchanged.
#
#   bash benchmarks/gpu_suite.sh [RESULTS_DIR]        # SUITE=quick (default), full or short
#
# It runs, on the GPU, writing everything to RESULTS_DIR (default $OUT, else gpu_suite_results):
#   1. benchmarks/train_memory.py --device cuda: time and peak GPU memory of one training step
#      (forward + backward + Adam) against N, linear losses vs the dense N x N form in the same
#      run, H = 1500 (the reference width), G = 2000; the dense form runs until it is out of memory.
#   2. Full default training (every default: 100 epochs, H 1500) of scrcl-cli on pbmc_10x_4k_top2000 on
#      CUDA, wall time and s/epoch, next to a 3-epoch CPU run on the same host for the CPU s/epoch.
#   3. benchmarks/inference.py --device cuda: embed cells/s and peak memory, ONNX Runtime (CUDA
#      provider, verified) vs torch on CUDA, reusing the model trained in 2.
#   4. benchmarks/end_to_end.py --device cuda: `scrcl-cli train` (every default) + `cluster`
#      wall time and peak RSS against N (full suite: up to 1,000,000 cells), with log-log slopes.
# SUITE=scale: the GPU-marked graph and DDP tests (two processes sharing GPU 0 through gloo), the
#   training step at 40,000 cells against dense (SCALE_STEP=0 leaves it out), then every-default
#   `train` of SCALE_N (1,000,000) resampled cells with a timestamped --log-file, scored against
#   the source cells' types; BUDGET_S as for SUITE=short. SCALE_ARGS adds options to that `train`
#   (and to the minibatch and ooc ones), e.g. SCALE_ARGS="--matmul-precision high" for TF32.
# SUITE=minibatch: every-default `train` of MB_N (100,000) resampled cells full batch and with
#   --batch-size MB_BATCH (12,500), same seed, both scored against the source types and each other.
# SUITE=ooc: `train --out-of-core` of OOC_N (10,000,000) resampled cells on one GPU, every default
#   but OOC_EPOCHS (2) epochs: host peak RSS and anonymous memory, GPU peak, phases and seconds per
#   epoch. It first checks the local disk (the resampled file and three float32 (N, 2,000)
#   smoothed inputs: about 25 GB per million cells) and stops with the sizes when it is short.
#   BUDGET_S defaults to 14,400 s here (ten million cells take hours); OOC_N=2000000 needs 53 GB
#   free, which a machine with 64 GB of disk may have.
# SUITE=short fits a short GPU allocation (BUDGET_S seconds, default 540, checked before each step):
#   a. benchmarks/accuracy.py at the full defaults (H 1500, 100 epochs) on CUDA, three seeds, with the
#      baselines taken from BASELINES_JSON (a CPU run of `accuracy.py --json`), so the GPU host needs
#      no scanpy; ACC_JOBS (3) runs at once with ACC_THREADS (5) CPU threads each (six at once with
#      uncapped BLAS pools took 150-290 s per run in an earlier run, against about 22 s alone);
#      then the label-free embeddings go to embeddings_full.npz for CPU study;
#   b. the GPU-marked tests (same-seed CUDA determinism);
#   c. benchmarks/end_to_end.py --device cuda at 50,000 cells, if time is left.
# DEVICE=cpu ACC_ARGS="--quick --seeds 0" ACC_DATASETS=yan_rpkm rehearses it without a GPU.
# SUITE=ddp: scaling of `train --distributed` (torchrun, DDP) from 1 GPU to every GPU of the node
#   (1, 2, 4, ... processes), the same DDP_N resampled cells (default 200,000), DDP_EPOCHS (20) and
#   per-process batch DDP_BATCH (20,000) each time, so ideal scaling halves the training time with
#   each doubling; training seconds, speed-up and final loss per process count go to the summary.
#   Not run yet: README, "Multi-GPU training (torchrun)".
# Installs nothing except `pip install -e .[train,gpu]` when scrcl_cli, torch or onnxruntime-gpu
# is missing. Generated data and models go to $SCRCL_BENCH_DIR (default bench_gpu).
set -uo pipefail

cd "$(dirname "$0")/.." || exit 1
RESULTS=${1:-${OUT:-gpu_suite_results}}
SUITE=${SUITE:-quick}
export SCRCL_BENCH_DIR=${SCRCL_BENCH_DIR:-bench_gpu}
mkdir -p "$RESULTS" "$SCRCL_BENCH_DIR"
SUMMARY="$RESULTS/summary.md"
PY=${PYTHON:-python}

say() { echo "[gpu_suite $(date +%H:%M:%S)] $*" | tee -a "$RESULTS/suite.log"; }

# ---- data: ../shared/data beside the checkout, or shared/data inside it
DATA=${SCRCL_DATA:-}
for d in ../shared/data shared/data; do
  if [ -z "$DATA" ] && [ -f "$d/pbmc_10x_4k_top2000.h5ad" ]; then DATA=$d; fi
done
if [ -z "$DATA" ]; then say "error: pbmc_10x_4k_top2000.h5ad not found (set SCRCL_DATA)"; exit 1; fi
SRC="$DATA/pbmc_10x_4k_top2000.h5ad"

# ---- environment
if ! $PY -c "import scrcl_cli, torch, onnxruntime" 2>/dev/null; then
  say "installing the project: pip install -e .[train,gpu]"
  $PY -m pip install -q -e ".[train,gpu]" || { say "error: pip install failed"; exit 1; }
fi
DEVICE=${DEVICE:-cuda}  # DEVICE=cpu rehearses SUITE=scale on a machine without a GPU
SCALE_ARGS=${SCALE_ARGS:-}
if [ "$DEVICE" = cuda ] && ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  say "error: torch sees no CUDA device; this suite needs a GPU"; exit 1
fi
{ nvidia-smi || true; } > "$RESULTS/nvidia-smi.txt" 2>&1
$PY -m scrcl_cli info > "$RESULTS/env.txt" 2>&1
nproc >> "$RESULTS/env.txt"; free -g >> "$RESULTS/env.txt"
git rev-parse HEAD >> "$RESULTS/env.txt" 2>/dev/null || true
say "suite=$SUITE results=$RESULTS data=$SRC"
{
  echo "# scrcl-cli GPU suite ($SUITE), $(date -u +%Y-%m-%dT%H:%MZ)"
  echo
  echo '```'; cat "$RESULTS/env.txt"; echo '```'
} > "$SUMMARY"

if [ "$SUITE" = short ] || [ "$SUITE" = scale ] || [ "$SUITE" = ddp ] || [ "$SUITE" = minibatch ] || [ "$SUITE" = ooc ]; then
  START=$SECONDS
  if [ "$SUITE" = ooc ]; then BUDGET_S=${BUDGET_S:-14400}; else BUDGET_S=${BUDGET_S:-540}; fi
  left() { echo $(( BUDGET_S - (SECONDS - START) )); }
  # run STEP_NAME WANTED_S CMD...: run CMD with at most min(WANTED_S, time left - 10 s)
  step() {
    local name=$1 want=$2; shift 2
    local l; l=$(left)
    local cap=$(( want < l - 10 ? want : l - 10 ))
    if [ "$cap" -lt 20 ]; then say "$name: skipped, ${l} s left"; echo "- $name: skipped (${l} s of the allocation left)" >> "$SUMMARY"; return; fi
    say "$name: up to ${cap} s"
    local t0=$SECONDS
    timeout --kill-after=5 "$cap" "$@" > "$RESULTS/$name.log" 2>&1
    local rc=$?
    say "$name: exit $rc after $(( SECONDS - t0 )) s"
    echo "- $name: exit $rc after $(( SECONDS - t0 )) s (limit ${cap} s)" >> "$SUMMARY"
  }
  steps_header() { echo >> "$SUMMARY"; echo "## Steps" >> "$SUMMARY"; echo >> "$SUMMARY"; }
  # timed_train NAME MODEL_DIR ARGS...: `scrcl-cli train ARGS -o MODEL_DIR` (a fresh folder) as the step
  # NAME with the time left less 15 s; wall time and memory peaks in RESULTS/NAME.json, the
  # timestamped phases in RESULTS/NAME_events.log.
  timed_train() {
    local name=$1 model=$2; shift 2
    rm -rf "$model"
    step "$name" $(( $(left) - 15 )) $PY benchmarks/benchutil.py --json "$RESULTS/$name.json" -- \
      scrcl-cli --log-file "$RESULTS/${name}_events.log" train "$@" -o "$model"
  }
  if [ "$SUITE" = ddp ]; then
    DDP_N=${DDP_N:-200000}; DDP_BATCH=${DDP_BATCH:-20000}; DDP_EPOCHS=${DDP_EPOCHS:-20}
    NPROC=${DDP_PROCS:-$($PY -c "import torch; print(torch.cuda.device_count())")}  # DEVICE=cpu DDP_PROCS=2: gloo rehearsal
    BIG="$SCRCL_BENCH_DIR/pbmc_${DDP_N}.h5ad"
    [ -f "$BIG" ] || $PY benchmarks/make_large.py -n "$DDP_N" -o "$BIG" --source "$SRC" > "$RESULTS/make_large.log" 2>&1
    steps_header
    W=1
    while [ "$W" -le "$NPROC" ]; do
      rm -rf "$SCRCL_BENCH_DIR/model_ddp_$W"
      step "ddp_w$W" "${DDP_STEP_S:-240}" $PY -m torch.distributed.run --standalone --nproc_per_node "$W" -m scrcl_cli \
        train "$BIG" -o "$SCRCL_BENCH_DIR/model_ddp_$W" --distributed --device "$DEVICE" --batch-size "$DDP_BATCH" \
        --epochs "$DDP_EPOCHS" --seed 0 --no-export -q
      W=$(( W * 2 ))
    done
    $PY - "$SCRCL_BENCH_DIR" >> "$SUMMARY" 2>&1 <<'EOF'
import json, sys
from pathlib import Path
rows = []
for d in sorted(Path(sys.argv[1]).glob("model_ddp_*"), key=lambda p: int(p.name.rsplit("_", 1)[1])):
    try:
        t = json.loads((d / "scrcl_model.json").read_text())["training"]
    except (OSError, ValueError, KeyError):
        continue
    rows.append((int(d.name.rsplit("_", 1)[1]), t))
print("\n## train --distributed: processes against training time\n")
print("| processes | device | batch per process | training s | speed-up | final loss |")
print("|---|---|---|---|---|---|")
base = rows[0][1]["seconds"] if rows and rows[0][0] == 1 else None
for w, t in rows:
    speed = f"{base / t['seconds']:.2f}" if base else "n/a"
    print(f"| {w} | {t['device']} | {t['batch_size']} | {t['seconds']:.1f} | {speed} | {t['final_loss'][0]:.4g} |")
EOF
    say "ddp suite done after $(( SECONDS - START )) s: $SUMMARY"
    exit 0
  fi
  if [ "$SUITE" = minibatch ]; then
    # Full batch against mini-batches where both fit: every-default `train` of MB_N (100,000)
    # resampled cells, once full batch and once with --batch-size MB_BATCH (12,500), same seed,
    # no ONNX export; both scored against the source cells' types and against each other.
    MB_N=${MB_N:-100000}; MB_BATCH=${MB_BATCH:-12500}
    BIG="$SCRCL_BENCH_DIR/pbmc_${MB_N}.h5ad"
    [ -f "$BIG" ] || $PY benchmarks/make_large.py -n "$MB_N" -o "$BIG" --source "$SRC" > "$RESULTS/make_large.log" 2>&1
    steps_header
    for run in full mini; do
      opt=(); [ "$run" = mini ] && opt=(--batch-size "$MB_BATCH")
      timed_train "train_$run" "$SCRCL_BENCH_DIR/model_mb_$run" "$BIG" --device "$DEVICE" --seed 0 --no-export -q \
        "${opt[@]}" $SCALE_ARGS
    done
    $PY - "$BIG" "$SCRCL_BENCH_DIR" "$RESULTS" >> "$SUMMARY" 2>&1 <<'EOF'
import csv, json, sys
from pathlib import Path
import anndata
from scrcl_cli.metrics import ari
big, bench, res = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
truth = anndata.read_h5ad(big, backed="r").obs["cell_type"].astype(str).to_numpy()  # evaluation only
print("\n| run | batch | K | ARI | training s | command s | peak GPU memory | peak host RSS |")
print("|---|---|---|---|---|---|---|---|")
preds = {}
for run in ("full", "mini"):
    try:
        m = json.loads((bench / f"model_mb_{run}" / "scrcl_model.json").read_text())
        w = json.loads((res / f"train_{run}.json").read_text())
        with open(bench / f"model_mb_{run}" / "train_clusters.csv") as fh:
            preds[run] = [row["cluster"] for row in csv.DictReader(fh)]
    except (OSError, ValueError, KeyError) as exc:
        print(f"| {run} | no result ({type(exc).__name__}) | | | | | | |")
        continue
    t = m["training"]
    print(f"| {run} | {t['batch_size'] or 'full'} | {m['clusters']['n_clusters']} | {ari(truth, preds[run]):.4f} | "
          f"{t['seconds']:.1f} | {w['wall_s']:.1f} | {(t.get('peak_gpu_bytes') or 0) / 2**30:.1f} GiB | "
          f"{w['peak_rss'] / 2**30:.1f} GiB |")
if len(preds) == 2:
    print(f"\nARI between the two clusterings: {ari(preds['full'], preds['mini']):.4f}")
EOF
    say "minibatch suite done after $(( SECONDS - START )) s: $SUMMARY"
    exit 0
  fi
  if [ "$SUITE" = ooc ]; then
    # Out of core on one GPU: the host's memory must not grow as N x G. A few epochs measure every
    # phase's memory (reading, graphs, smoothing to disk, steps, the whole-graph pass, clustering);
    # the peaks, not the accuracy, are the result.
    OOC_N=${OOC_N:-10000000}; OOC_EPOCHS=${OOC_EPOCHS:-2}
    BIG="$SCRCL_BENCH_DIR/pbmc_${OOC_N}.h5ad"
    steps_header
    # The scratch folder of an earlier run of this suite that a timeout killed (SIGKILL leaves it;
    # train itself removes it too, but only after this disk check).
    rm -rf "$SCRCL_BENCH_DIR"/.model_ooc.scrcl-tmp-*
    $PY - "$OOC_N" "$SCRCL_BENCH_DIR" "$BIG" >> "$SUMMARY" 2>&1 <<'EOF'
import os, shutil, sys
from scrcl_cli.config import TrainConfig
from scrcl_cli.training import scratch_bytes, scratch_powers
n, where, big = int(sys.argv[1]), sys.argv[2], sys.argv[3]
smoothed = scratch_bytes(n, 2000, scratch_powers(TrainConfig()))
data = 0 if os.path.exists(big) else 1300 * n  # the resampled file: about 1.3 kB per cell
free = shutil.disk_usage(where).free
print(f"- disk: {(smoothed + data) / 1e9:.1f} GB needed in {where} ({smoothed / 1e9:.1f} GB of smoothed "
      f"inputs, {data / 1e9:.1f} GB of resampled cells), {free / 1e9:.1f} GB free")
sys.exit(0 if smoothed + data < 0.95 * free else 3)
EOF
    DISK_RC=$?
    if [ "$DISK_RC" -eq 3 ]; then
      say "ooc: not enough local disk for $OOC_N cells (see $SUMMARY); lower OOC_N or point SCRCL_BENCH_DIR at a larger disk"
      exit 1
    elif [ "$DISK_RC" -ne 0 ]; then
      say "ooc: the disk check failed (see $SUMMARY)"; exit 1
    fi
    [ -f "$BIG" ] || step make_large $(( $(left) - 60 )) $PY benchmarks/make_large.py -n "$OOC_N" -o "$BIG" --source "$SRC"
    timed_train train_ooc "$SCRCL_BENCH_DIR/model_ooc" "$BIG" --device "$DEVICE" --seed 0 --out-of-core \
      --epochs "$OOC_EPOCHS" --no-export $SCALE_ARGS
    $PY - "$SCRCL_BENCH_DIR/model_ooc" "$RESULTS/train_ooc.json" >> "$SUMMARY" 2>&1 <<'EOF'
import json, sys
model, run = sys.argv[1:3]
r = json.load(open(run))
print(f"\ntrain --out-of-core: exit {r['returncode']}, {r['wall_s']:.1f} s wall, peak host RSS "
      f"{r['peak_rss'] / 2**30:.1f} GiB, peak anonymous memory {r.get('peak_anon', 0) / 2**30:.1f} GiB")
m = json.load(open(f"{model}/scrcl_model.json"))
t = m["training"]
e = m["config"]["epochs"]
print(f"\n{t['n_cells']} cells: {e} epochs on batches of {t['batch_size'] or 'every cell (full batch)'}, "
      f"training {t['seconds']:.1f} s ({t['seconds'] / e:.1f} s per epoch) on {t['device']}, "
      f"peak GPU memory {(t.get('peak_gpu_bytes') or 0) / 2**30:.1f} GiB; K {m['clusters']['n_clusters']}")
EOF
    grep -E "phases" "$RESULTS/train_ooc_events.log" | tail -n 1 >> "$SUMMARY"
    say "ooc suite done after $(( SECONDS - START )) s: $SUMMARY"
    exit 0
  fi
  if [ "$SUITE" = scale ]; then
    # Scaling in one allocation: the N = 40,000 step against dense, then every-default `train` on
    # SCALE_N (default 1,000,000) cells. The cells are resampled on the CPU while the GPU runs
    # the step benchmark; --log-file timestamps each phase of the training command.
    SCALE_N=${SCALE_N:-1000000}
    BIG="$SCRCL_BENCH_DIR/pbmc_${SCALE_N}.h5ad"
    $PY benchmarks/make_large.py -n "$SCALE_N" -o "$BIG" --source "$SRC" > "$RESULTS/make_large.log" 2>&1 &
    MK=$!
    steps_header
    # The CUDA graph algebra against scipy, and DDP with two processes sharing GPU 0 (gloo)
    # against one process's gradient averaging.
    step gpu_checks 90 $PY -m pytest -q -s -m gpu -p no:cacheprovider tests/test_graphs.py tests/test_distributed.py \
      tests/test_training.py
    if [ "${SCALE_STEP:-1}" != 0 ]; then  # SCALE_STEP=0 leaves the 40k step benchmark out
      step train_memory_40k "${STEP_S:-150}" $PY benchmarks/train_memory.py --device "$DEVICE" --hidden-dim "${STEP_H:-1500}" \
        --out-dim 16 --sizes "${STEP_SIZES:-40000}" --parts step --steps 3 --child-timeout 100 --source "$SRC" \
        --json "$RESULTS/train_memory_40k.jsonl" --md "$RESULTS/train_memory_40k.md"
    fi
    wait "$MK"; say "make_large: exit $? ($(tail -n 1 "$RESULTS/make_large.log"))"
    timed_train train_scale "$SCRCL_BENCH_DIR/model_scale" "$BIG" --device "$DEVICE" --seed 0 $SCALE_ARGS
    cp "$SCRCL_BENCH_DIR/model_scale/scrcl_model.json" "$RESULTS/model_scale_manifest.json" 2>/dev/null
    $PY - "$BIG" "$SCRCL_BENCH_DIR/model_scale" "$RESULTS/train_scale.json" >> "$SUMMARY" 2>&1 <<'EOF'
import csv, json, sys
import anndata
from scrcl_cli.metrics import ari, nmi
big, model, run = sys.argv[1:4]
r = json.load(open(run))
print(f"\ntrain command: {r['wall_s']:.1f} s wall, peak host RSS {r['peak_rss'] / 2**30:.1f} GiB")
truth = anndata.read_h5ad(big, backed="r").obs["cell_type"].astype(str).to_numpy()  # evaluation only
with open(f"{model}/train_clusters.csv") as fh:
    pred = [row["cluster"] for row in csv.DictReader(fh)]
m = json.load(open(f"{model}/scrcl_model.json"))
print(f"\ntrain on {len(pred)} cells: K {m['clusters']['n_clusters']} ({m['clusters']['method']}) for "
      f"{len(set(truth))} source types, ARI {ari(truth, pred):.4f}, NMI {nmi(truth, pred):.4f}; "
      f"training {m['training']['seconds']} s on {m['training']['device']}, batch {m['training']['batch_size']}, "
      f"peak GPU memory {(m['training'].get('peak_gpu_bytes') or 0) / 2**30:.1f} GiB")
EOF
    # `cluster` of the same cells with the model just trained (ONNX Runtime on the host's CPU cores),
    # timed apart from `train`, then scored the same way.
    if [ "$(left)" -ge 90 ] && [ -f "$SCRCL_BENCH_DIR/model_scale/scrcl_model.json" ]; then
      step cluster_scale $(( $(left) - 15 )) $PY benchmarks/benchutil.py --json "$RESULTS/cluster_scale.json" -- \
        scrcl-cli --log-file "$RESULTS/cluster_scale_events.log" cluster "$BIG" -m "$SCRCL_BENCH_DIR/model_scale" \
        -o "$SCRCL_BENCH_DIR/clustered_scale.h5ad" --overwrite
      $PY - "$BIG" "$SCRCL_BENCH_DIR/clustered_scale.h5ad" "$RESULTS/cluster_scale.json" >> "$SUMMARY" 2>&1 <<'EOF'
import json, sys
import anndata
from scrcl_cli.metrics import ari
big, out, run = sys.argv[1:4]
truth = anndata.read_h5ad(big, backed="r").obs["cell_type"].astype(str).to_numpy()  # evaluation only
pred = anndata.read_h5ad(out, backed="r").obs["scrcl_cluster"].astype(str).to_numpy()
r = json.load(open(run))
print(f"\ncluster of {len(pred)} cells with that model: {r['wall_s']:.1f} s wall, peak RSS "
      f"{r['peak_rss'] / 2**30:.1f} GiB, ARI {ari(truth, pred):.4f}")
EOF
    fi
    if [ "$(left)" -ge 80 ]; then
      step gpu_tests $(( $(left) - 10 )) $PY -m pytest -q -s -m gpu -p no:cacheprovider tests/test_determinism.py
    fi
    say "scale suite done after $(( SECONDS - START )) s: $SUMMARY"
    exit 0
  fi
  BASE=${BASELINES_JSON:-$DATA/../accuracy_baselines.json}
  steps_header
  # Three scrcl-cli runs at once, five CPU threads each (--threads caps the BLAS pools too): their
  # CPU phases (reading, graphs, export, k-means) overlap the short GPU phases of the others. The
  # datasets that cannot train at full width on a 2-core CPU go first.
  ACC_JOBS=${ACC_JOBS:-3}; ACC_THREADS=${ACC_THREADS:-5}
  ACC_DATASETS=${ACC_DATASETS:-cite_cbmc_top2000 worm_neuron pbmc_10x_4k_top2000 baron_human_subset2142 mouse_bladder_2100 mouse_bladder_top2000 pbmc68k_reduced_700 pollen_log_simlr yan_rpkm}
  ACC_WORK="$SCRCL_BENCH_DIR/accuracy_full"
  rm -rf "$ACC_WORK"
  step accuracy_full "${ACC_S:-420}" $PY benchmarks/accuracy.py --data-dir "$DATA" --baselines-from "$BASE" --device "$DEVICE" \
    --datasets $ACC_DATASETS --jobs "$ACC_JOBS" --threads "$ACC_THREADS" --keep --workdir "$ACC_WORK" \
    ${ACC_ARGS:-} --json "$RESULTS/accuracy_full.json" --output "$RESULTS/accuracy_full.md"
  # The label-free runs' embeddings, so that cluster-count rules can be studied at full width on a CPU.
  $PY - "$ACC_WORK/outputs" "$RESULTS/embeddings_full.npz" >> "$RESULTS/suite.log" 2>&1 <<'EOF'
import sys
from pathlib import Path
import anndata as ad
import numpy as np
arrays = {}
for f in sorted(Path(sys.argv[1]).glob("*_free.h5ad")):
    a = ad.read_h5ad(f)
    for key in a.obsm:
        arrays[f"{f.stem}:{key}"] = np.asarray(a.obsm[key], dtype=np.float16)
    arrays[f"{f.stem}:obs_names"] = np.asarray(a.obs_names, dtype=str)
    arrays[f"{f.stem}:scrcl_cluster"] = np.asarray(a.obs["scrcl_cluster"].astype(str), dtype=str)
np.savez_compressed(sys.argv[2], **arrays)
print(f"embeddings: {len(arrays)} arrays -> {sys.argv[2]}")
EOF
  step gpu_tests 90 $PY -m pytest -q -s -m gpu -p no:cacheprovider tests/test_determinism.py
  if [ "$(left)" -ge 150 ]; then
    step end_to_end 200 $PY benchmarks/end_to_end.py --device "$DEVICE" --sizes 50000 --source "$SRC" \
      --timeout 180 --json "$RESULTS/end_to_end_cuda.json" --md "$RESULTS/end_to_end_cuda.md"
  fi
  say "short suite done after $(( SECONDS - START )) s: $SUMMARY"
  exit 0
fi

if [ "$SUITE" = full ]; then
  TRAIN_SIZES=5000,10000,20000,30000,40000,50000,80000,160000,320000,640000,1000000
  INF_SIZES=10000,50000,200000,1000000
  CHILD_TIMEOUT=900
  E2E_SIZES=5000,20000,80000,320000,1000000
  E2E_TIMEOUT=3600
else
  TRAIN_SIZES=5000,10000,20000,40000,80000,160000
  INF_SIZES=10000,50000,200000
  CHILD_TIMEOUT=420
  E2E_SIZES=5000,20000,80000
  E2E_TIMEOUT=1200
fi

# ---- 1. training step: linear vs dense, on the GPU
say "1/4 training step memory and time (train_memory.py --device cuda)"
$PY benchmarks/train_memory.py --device cuda --hidden-dim 1500 --out-dim 16 --sizes "$TRAIN_SIZES" \
  --dense-max 60000 --steps 3 --child-timeout "$CHILD_TIMEOUT" --source "$SRC" \
  --json "$RESULTS/train_memory_cuda.jsonl" --md "$RESULTS/train_memory_cuda.md" \
  2>&1 | tee "$RESULTS/train_memory_cuda.log"
{ echo; echo "## 1. Training step, CUDA"; echo; cat "$RESULTS/train_memory_cuda.md" 2>/dev/null || echo "(failed, see train_memory_cuda.log)"; } >> "$SUMMARY"

# ---- 2. full default training on CUDA, and the CPU s/epoch on the same host
say "2/4 full default training on CUDA"
MODEL="$SCRCL_BENCH_DIR/model_pbmc4k_default_cuda"
rm -rf "$MODEL"
$PY benchmarks/benchutil.py --json "$RESULTS/train_full_cuda.json" -- scrcl-cli train "$SRC" -o "$MODEL" \
  --device cuda --seed 0 -q > "$RESULTS/train_full_cuda.log" 2>&1 || say "CUDA training failed"
say "2/4 CPU reference on this host: 3 epochs, default architecture"
rm -rf "$SCRCL_BENCH_DIR/model_pbmc4k_cpu3"
$PY benchmarks/benchutil.py --json "$RESULTS/train_cpu3.json" -- scrcl-cli train "$SRC" \
  -o "$SCRCL_BENCH_DIR/model_pbmc4k_cpu3" --device cpu --epochs 3 --seed 0 --no-export -q \
  > "$RESULTS/train_cpu3.log" 2>&1 || say "CPU training failed"
$PY - "$MODEL" "$SCRCL_BENCH_DIR/model_pbmc4k_cpu3" "$RESULTS" >> "$SUMMARY" <<'EOF'
import json, sys
from pathlib import Path
gpu, cpu, res = map(Path, sys.argv[1:4])
print("\n## 2. Full default training, pbmc_10x_4k_top2000 (4,271 cells, 2,000 genes, H 1500, 500 epochs)\n")
print("| run | device | epochs | training s | s/epoch | command wall s | peak host RSS |")
print("|---|---|---|---|---|---|---|")
for model, tfile, label in ((gpu, res / "train_full_cuda.json", "default"), (cpu, res / "train_cpu3.json", "--epochs 3")):
    try:
        run = json.loads(tfile.read_text())
        m = json.loads((model / "scrcl_model.json").read_text())
        t = m["training"]; e = m["config"]["epochs"]
        print(f"| scrcl-cli train {label} | {t['device']} | {e} | {t['seconds']:.1f} | {t['seconds'] / e:.4f} | "
              f"{run['wall_s']:.1f} | {run['peak_rss'] / 2**30:.2f} GiB |")
    except Exception as exc:  # keep the suite going; the log has the details
        print(f"| scrcl-cli train {label} | failed ({type(exc).__name__}: {exc}) | | | | | |")
EOF

# ---- 3. inference on the GPU: ONNX Runtime CUDA provider vs torch CUDA
say "3/4 inference (inference.py --device cuda)"
INF_MODEL="$MODEL"
[ -f "$MODEL/scrcl_model.json" ] || INF_MODEL=""
$PY benchmarks/inference.py --device cuda --sizes "$INF_SIZES" ${INF_MODEL:+--model "$INF_MODEL"} \
  --child-timeout "$CHILD_TIMEOUT" --source "$SRC" \
  --json "$RESULTS/inference_cuda.jsonl" --md "$RESULTS/inference_cuda.md" 2>&1 | tee "$RESULTS/inference_cuda.log"
{ echo; echo "## 3. Inference, CUDA"; echo; cat "$RESULTS/inference_cuda.md" 2>/dev/null || echo "(failed, see inference_cuda.log)"; } >> "$SUMMARY"

# ---- 4. end to end: train (every default) + cluster against N on the GPU
say "4/4 end to end (end_to_end.py --device cuda, CLI defaults)"
$PY benchmarks/end_to_end.py --device cuda --sizes "$E2E_SIZES" --source "$SRC" --timeout "$E2E_TIMEOUT" \
  --json "$RESULTS/end_to_end_cuda.json" --md "$RESULTS/end_to_end_cuda.md" 2>&1 | tee "$RESULTS/end_to_end_cuda.log"
{ echo; echo "## 4. End to end, CUDA"; echo; cat "$RESULTS/end_to_end_cuda.md" 2>/dev/null || echo "(failed, see end_to_end_cuda.log)"; } >> "$SUMMARY"

say "done: $SUMMARY"
