#!/usr/bin/env bash
# Smoke-test an image the way Nextflow runs a task container.
#
#   containers/build.sh cpu       && containers/smoke.sh [cpu] [IMAGE]
#   containers/build.sh train-cpu && containers/smoke.sh train-cpu [IMAGE]
#
# 1. The model.
#    cpu:       trained on the host (needs scrcl-cli with torch, e.g. `pip install -e '.[train,cpu]'`)
#               on SMOKE_DATA: shared/data/mouse_bladder_top2000.h5ad next to the repository if
#               present, else the example packaged with scrcl-cli (700 PBMCs).
#    train-cpu: trained inside the image, `scrcl-cli train --device cpu` on the packaged example
#               (which also exports the ONNX encoders); nothing is needed on the host.
# 2. In the container, exactly like Nextflow's docker executor, with a read-only root on top and a
#    random non-root UID (SMOKE_UID to fix it):
#      podman --runtime runc run --rm --ulimit nofile=1024:1024 --ulimit nproc=1024:1024 \
#        --network none -u $uid:$uid --read-only -v $work:/work -w /work IMAGE /bin/bash -ue .command.sh
#    .command.sh checks `ps`, prints `scrcl-cli --version` and `scrcl-cli info`, (train-cpu: trains),
#    runs `embed` and `cluster`, and verifies the outputs with the image's own Python.
#    train-cpu, when the CPU image is in local storage as well: the CPU image clusters with the model
#    trained in the training image, the hand-over of the pipeline's train and cluster steps.
# 3. Exit codes: the task's exit code must be 0, a task with a bad input must exit 1 with one
#    `error:` line, and `--device cuda` must fail (non-zero), not fall back to the CPU.
# 4. Image metadata: no ENTRYPOINT, the default CMD prints the help, the OCI source and base labels
#    are set, the size is under the flavour's limit; cpu: no torch inside; train-cpu: torch is the
#    CPU build.
#
# Environment: IMAGE (default localhost/scrcl-cli:<version>[-train-cpu]), ARCHIVE (docker-archive
# loaded when the image is not in local storage), CPU_IMAGE (train-cpu: the CPU image for the hand-over,
# default localhost/scrcl-cli:<version>; skipped, saying so, when absent), SMOKE_DATA, MODEL_DIR (cpu:
# reuse a trained model instead of training), SMOKE_UID (uid:gid, default random in 10000-42767),
# KEEP=1 (keep the work directory), PODMAN (default "podman --runtime runc").
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"
version="$(sed -n 's/^__version__ *= *["'\'']\([^"'\'']*\)["'\''].*/\1/p' "$repo/scrcl_cli/_version.py")"
flavour=cpu
if [[ "${1:-}" == cpu || "${1:-}" == train-cpu ]]; then flavour="$1"; shift; fi
case "$flavour" in
    cpu) tag="$version"; max_mb=720 ;;
    train-cpu) tag="$version-train-cpu"; max_mb=1600 ;;
esac
IMAGE="${1:-${IMAGE:-localhost/scrcl-cli:$tag}}"
ARCHIVE="${ARCHIVE:-$here/out/scrcl-cli_$tag.tar}"
CPU_IMAGE="${CPU_IMAGE:-localhost/scrcl-cli:$version}"
uid=$((10000 + RANDOM))
SMOKE_UID="${SMOKE_UID:-$uid:$uid}"
read -r -a PODMAN <<<"${PODMAN:-podman --runtime runc}"
example="$repo/scrcl_cli/data/pbmc68k_reduced_700.h5ad"

failures=0
log() { printf '[smoke %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
ok() { log "PASS: $*"; }
bad() { log "FAIL: $*"; failures=$((failures + 1)); }
die() { log "ERROR: $*"; exit 1; }

if [[ "$flavour" == cpu ]]; then
    shared=""
    for d in "${SHARED_DIR:-}" "$repo/../shared" "$repo/shared"; do
        if [[ -n "$d" && -d "$d/data" ]]; then shared="$(cd "$d" && pwd)"; break; fi
    done
    if [[ -z "${SMOKE_DATA:-}" ]]; then
        if [[ -n "$shared" && -f "$shared/data/mouse_bladder_top2000.h5ad" ]]; then
            SMOKE_DATA="$shared/data/mouse_bladder_top2000.h5ad"
        else
            SMOKE_DATA="$example"
        fi
    fi
    [[ -f "$SMOKE_DATA" ]] || die "no dataset at SMOKE_DATA=$SMOKE_DATA"
fi
command -v "${PODMAN[0]}" >/dev/null || die "${PODMAN[0]} not found"

if ! "${PODMAN[@]}" image exists "$IMAGE"; then
    [[ -f "$ARCHIVE" ]] || die "image $IMAGE not in local storage and no archive at $ARCHIVE (run containers/build.sh $flavour)"
    log "loading $ARCHIVE"
    "${PODMAN[@]}" load -q -i "$ARCHIVE" >/dev/null
fi

work="$(mktemp -d "${TMPDIR:-/tmp}/scrcl-smoke.XXXXXX")"
cleanup() { if [[ "${KEEP:-0}" == 1 ]]; then log "kept $work"; else rm -rf "$work"; fi; }
trap cleanup EXIT

# --- 1. the model ------------------------------------------------------------------------------
if [[ "$flavour" == cpu ]]; then
    cp "$SMOKE_DATA" "$work/input.h5ad"
    if [[ -n "${MODEL_DIR:-}" ]]; then
        cp -r "$MODEL_DIR" "$work/model"
    else
        command -v scrcl-cli >/dev/null || die "scrcl-cli not on the host PATH: pip install -e '.[train,cpu]' (or set MODEL_DIR)"
        log "training on the host: $(basename "$SMOKE_DATA")"
        t0=$SECONDS
        scrcl-cli --quiet train "$work/input.h5ad" -o "$work/model" --epochs 3 --hidden-dim 32 --out-dim 8 \
            || die "host training failed"
        log "host training took $((SECONDS - t0)) s"
    fi
fi
# Nextflow's work dir belongs to the user that runs the task.
chown -R "$SMOKE_UID" "$work" 2>/dev/null || chmod -R a+rwX "$work"

run_task() {  # run_task NAME [IMAGE]: run $work/NAME.command.sh the Nextflow way; prints nothing, returns its exit code
    local name="$1" image="${2:-$IMAGE}"
    "${PODMAN[@]}" run --rm --ulimit nofile=1024:1024 --ulimit nproc=1024:1024 --network none \
        -u "$SMOKE_UID" --read-only -v "$work:/work" -w /work \
        "$image" /bin/bash -ue "$name.command.sh" >"$work/$name.out" 2>"$work/$name.err"
}

# --- 2. the task -------------------------------------------------------------------------------
cat >"$work/verify.py" <<'EOF'
import sys
import anndata
import numpy as np
import pandas as pd

prefix = sys.argv[1] if len(sys.argv) > 1 else ""
src = anndata.read_h5ad("input.h5ad")
emb = anndata.read_h5ad(f"{prefix}embedded.h5ad")
clu = anndata.read_h5ad(f"{prefix}clustered.h5ad")
problems = []
for name, ad in (("embedded", emb), ("clustered", clu)):
    if ad.n_obs != src.n_obs or list(ad.obs_names) != list(src.obs_names):
        problems.append(f"{name}: cells differ from the input")
    x = ad.obsm.get("X_scrcl")
    if x is None:
        problems.append(f"{name}: no obsm['X_scrcl']")
    elif x.shape[0] != src.n_obs or x.shape[1] < 1 or not np.isfinite(np.asarray(x)).all():
        problems.append(f"{name}: bad obsm['X_scrcl'] {getattr(x, 'shape', None)}")
if "scrcl_cluster" not in clu.obs:
    problems.append("clustered: no obs['scrcl_cluster']")
else:
    c = clu.obs["scrcl_cluster"]
    if not isinstance(c.dtype, pd.CategoricalDtype) or c.isna().any():
        problems.append(f"clustered: obs['scrcl_cluster'] is {c.dtype} with {int(c.isna().sum())} missing")
markers = pd.read_csv(f"{prefix}markers.csv")
if markers.empty:
    problems.append("markers.csv is empty")
print(f"input {src.n_obs} cells x {src.n_vars} genes; X_scrcl {clu.obsm['X_scrcl'].shape}; "
      f"{clu.obs['scrcl_cluster'].nunique()} clusters; markers.csv {markers.shape[0]} rows")
if problems:
    print("\n".join(problems), file=sys.stderr)
    sys.exit(1)
EOF

{
    cat <<'EOF'
#!/bin/bash -ue
# what Nextflow needs from the image
command -v ps
ps -o pid=,user=,comm= -p $$ > ps.txt
for tool in awk sed grep date tail tee; do command -v "$tool" > /dev/null; done
id -u > uid.txt
scrcl-cli --version > version.txt
scrcl-cli info > info.txt
EOF
    if [[ "$flavour" == train-cpu ]]; then
        cat <<'EOF'
python - <<'PY'
import importlib.resources, shutil, sys
import torch
if torch.version.cuda is not None or not torch.__version__.endswith("+cpu"):
    sys.exit(f"torch {torch.__version__} (CUDA {torch.version.cuda}) is not the CPU build")
shutil.copyfile(str(importlib.resources.files("scrcl_cli") / "data" / "pbmc68k_reduced_700.h5ad"), "input.h5ad")
PY
scrcl-cli --quiet train input.h5ad -o model --device cpu --epochs 3 --hidden-dim 32 --out-dim 8 --out-h5ad trained.h5ad
EOF
    else
        cat <<'EOF'
python - <<'PY'
import importlib.util, sys
sys.exit("torch is installed in the CPU image" if importlib.util.find_spec("torch") else 0)
PY
EOF
    fi
    cat <<'EOF'
scrcl-cli --quiet embed input.h5ad -m model -o embedded.h5ad
scrcl-cli --quiet cluster input.h5ad -m model -o clustered.h5ad --markers markers.csv
python verify.py > verify.txt
EOF
} >"$work/task.command.sh"

log "task ($flavour): $([[ "$flavour" == train-cpu ]] && echo 'train + ')embed + cluster in $IMAGE (-u $SMOKE_UID, --read-only, --network none)"
t0=$SECONDS
if run_task task; then
    ok "task exit code 0 ($((SECONDS - t0)) s)"
else
    rc=$?
    bad "task exit code $rc"
    sed 's/^/    stderr| /' "$work/task.err" | tail -30 >&2
fi
outputs=(ps.txt uid.txt version.txt info.txt embedded.h5ad clustered.h5ad markers.csv verify.txt)
[[ "$flavour" == train-cpu ]] && outputs+=(input.h5ad trained.h5ad model/scrcl_model.json model/encoder_fused.onnx)
for f in "${outputs[@]}"; do
    [[ -s "$work/$f" ]] || bad "missing output $f"
done
if [[ -s "$work/version.txt" ]]; then
    v="$(cat "$work/version.txt")"
    if [[ "$v" == "$version" ]]; then ok "scrcl-cli --version -> $v"; else bad "scrcl-cli --version printed '$v', expected '$version'"; fi
fi
[[ -s "$work/ps.txt" ]] && ok "ps works: $(tr -s ' ' <"$work/ps.txt")"
[[ -s "$work/uid.txt" ]] && ok "ran as uid $(cat "$work/uid.txt")"
[[ -s "$work/info.txt" ]] && sed 's/^/    info| /' "$work/info.txt" >&2
[[ "$flavour" == train-cpu && -s "$work/model/scrcl_model.json" ]] \
    && ok "trained in the image: $(cd "$work/model" && echo encoder_*.onnx | wc -w) ONNX encoders, $(($(wc -l <"$work/model/loss_log.csv") - 1)) epochs logged"
[[ -s "$work/verify.txt" ]] && ok "outputs: $(cat "$work/verify.txt")"
owner="$(stat -c %u:%g "$work/clustered.h5ad" 2>/dev/null || true)"
[[ -z "$owner" || "$owner" == "$SMOKE_UID" ]] || bad "clustered.h5ad is owned by $owner, expected $SMOKE_UID"

# The pipeline trains in the training image and clusters in the CPU image: same model format?
if [[ "$flavour" == train-cpu ]]; then
    if "${PODMAN[@]}" image exists "$CPU_IMAGE"; then
        cat >"$work/handover.command.sh" <<'EOF'
#!/bin/bash -ue
scrcl-cli --quiet embed input.h5ad -m model -o handover_embedded.h5ad
scrcl-cli --quiet cluster input.h5ad -m model -o handover_clustered.h5ad --markers handover_markers.csv
python verify.py handover_ > handover_verify.txt
EOF
        if run_task handover "$CPU_IMAGE" && [[ -s "$work/handover_verify.txt" ]]; then
            ok "the CPU image $CPU_IMAGE embeds and clusters with the model trained here: $(cat "$work/handover_verify.txt")"
        else
            bad "the CPU image $CPU_IMAGE cannot use the model trained in $IMAGE"
            sed 's/^/    stderr| /' "$work/handover.err" | tail -20 >&2
        fi
    else
        log "SKIP: train -> cluster hand-over: the CPU image $CPU_IMAGE is not in local storage (containers/build.sh cpu)"
    fi
fi

# --- 3. exit codes of failing tasks ------------------------------------------------------------
cat >"$work/badinput.command.sh" <<'EOF'
#!/bin/bash -ue
scrcl-cli embed does-not-exist.h5ad -m model -o never.h5ad
EOF
set +e; run_task badinput; rc=$?; set -e
if [[ "$rc" == 1 ]] && grep -q '^error:' "$work/badinput.err"; then
    ok "missing input -> exit 1, $(grep -m1 '^error:' "$work/badinput.err")"
elif [[ "$rc" == 2 ]]; then
    ok "missing input -> exit 2 (usage error): $(tail -1 "$work/badinput.err")"
else
    bad "missing input -> exit $rc (expected 1 or 2)"; tail -5 "$work/badinput.err" >&2
fi
[[ ! -e "$work/never.h5ad" ]] || bad "a failed run left never.h5ad behind"

if [[ "$flavour" == train-cpu ]]; then
    cat >"$work/nocuda.command.sh" <<'EOF'
#!/bin/bash -ue
scrcl-cli --quiet train input.h5ad -o cuda_model --device cuda --epochs 1 --hidden-dim 32 --out-dim 8
EOF
else
    cat >"$work/nocuda.command.sh" <<'EOF'
#!/bin/bash -ue
scrcl-cli --quiet embed input.h5ad -m model -o cuda.h5ad --device cuda
EOF
fi
set +e; run_task nocuda; rc=$?; set -e
if [[ "$rc" != 0 ]]; then
    ok "--device cuda in the $flavour image -> exit $rc: $(grep -m1 '^error:' "$work/nocuda.err" || tail -1 "$work/nocuda.err")"
else
    bad "--device cuda in the $flavour image exited 0 (silent CPU fallback)"
fi

# --- 4. image metadata -------------------------------------------------------------------------
entrypoint="$("${PODMAN[@]}" image inspect --format '{{json .Config.Entrypoint}}' "$IMAGE")"
if [[ "$entrypoint" == "null" || "$entrypoint" == "[]" ]]; then ok "no ENTRYPOINT"; else bad "ENTRYPOINT is $entrypoint"; fi
if "${PODMAN[@]}" run --rm --ulimit nofile=1024:1024 --ulimit nproc=1024:1024 --network none -u "$SMOKE_UID" \
        --read-only "$IMAGE" >"$work/cmd.out" 2>&1 && grep -q 'Usage:' "$work/cmd.out"; then
    ok "default CMD prints the help"
else
    bad "default CMD failed: $(head -3 "$work/cmd.out")"
fi
label() { "${PODMAN[@]}" image inspect --format "{{index .Labels \"org.opencontainers.image.$1\"}}" "$IMAGE"; }
src="$(label source)" base_name="$(label base.name)" base_digest="$(label base.digest)"
if [[ "$src" == https://* && -n "$base_name" && "$base_digest" == sha256:* ]]; then
    ok "labels: source $src, base $base_name@$base_digest"
else
    bad "labels: source '$src' (want https://...), base.name '$base_name', base.digest '$base_digest' (want sha256:...)"
fi
size="$("${PODMAN[@]}" image inspect --format '{{.Size}}' "$IMAGE")"
log "image $IMAGE: $((size / 1000000)) MB"
(( size < max_mb * 1000000 )) || bad "image is $((size / 1000000)) MB, target < $max_mb MB"

if (( failures )); then
    log "smoke test FAILED ($failures problems); outputs in $work"
    KEEP=1
    exit 1
fi
log "smoke test ($flavour) passed"
