#!/usr/bin/env bash
# Smoke-test the CPU image the way Nextflow runs a task container.
#
#   containers/build.sh cpu && containers/smoke.sh [IMAGE]
#
# 1. On the host (needs scrcl-cli with torch, e.g. `pip install -e '.[train,cpu]'`): train a small
#    model on a real dataset from shared/data.
# 2. In the container, exactly like Nextflow's docker executor, with a read-only root on top:
#      podman --runtime runc run --rm --ulimit nofile=1024:1024 --ulimit nproc=1024:1024 \
#        --network none -u 4242:4242 --read-only -v $work:/work -w /work IMAGE /bin/bash -ue .command.sh
#    .command.sh checks `ps`, prints `scrcl-cli --version` and `scrcl-cli info`, runs `embed` and
#    `cluster`, and verifies the outputs with the image's own Python.
# 3. Exit codes: the task's exit code must be 0, a task with a bad input must exit 1 with one
#    `error:` line, and `--device cuda` in the CPU image must fail (non-zero), not fall back.
# 4. Image metadata: no ENTRYPOINT, the default CMD prints the help, no torch inside.
#
# Environment: IMAGE (default localhost/scrcl-cli:<version>), ARCHIVE (docker-archive loaded when the
# image is not in local storage), SMOKE_DATA (default shared/data/mouse_bladder_top2000.h5ad next to
# the repository), MODEL_DIR (reuse a trained model instead of training), SMOKE_UID (default 4242:4242),
# KEEP=1 (keep the work directory), PODMAN (default "podman --runtime runc").
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"
version="$(sed -n 's/^__version__ *= *["'\'']\([^"'\'']*\)["'\''].*/\1/p' "$repo/scrcl_cli/_version.py")"
IMAGE="${1:-${IMAGE:-localhost/scrcl-cli:$version}}"
ARCHIVE="${ARCHIVE:-$here/out/scrcl-cli_$version.tar}"
SMOKE_UID="${SMOKE_UID:-4242:4242}"
read -r -a PODMAN <<<"${PODMAN:-podman --runtime runc}"

shared=""
for d in "${SHARED_DIR:-}" "$repo/../shared" "$repo/shared"; do
    if [[ -n "$d" && -d "$d/data" ]]; then shared="$(cd "$d" && pwd)"; break; fi
done
SMOKE_DATA="${SMOKE_DATA:-${shared:+$shared/data/mouse_bladder_top2000.h5ad}}"

failures=0
log() { printf '[smoke %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
ok() { log "PASS: $*"; }
bad() { log "FAIL: $*"; failures=$((failures + 1)); }
die() { log "ERROR: $*"; exit 1; }

[[ -n "$SMOKE_DATA" && -f "$SMOKE_DATA" ]] || die "no dataset: set SMOKE_DATA (looked for shared/data/mouse_bladder_top2000.h5ad)"
command -v "${PODMAN[0]}" >/dev/null || die "${PODMAN[0]} not found"

if ! "${PODMAN[@]}" image exists "$IMAGE"; then
    [[ -f "$ARCHIVE" ]] || die "image $IMAGE not in local storage and no archive at $ARCHIVE (run containers/build.sh cpu)"
    log "loading $ARCHIVE"
    "${PODMAN[@]}" load -q -i "$ARCHIVE" >/dev/null
fi

work="$(mktemp -d "${TMPDIR:-/tmp}/scrcl-smoke.XXXXXX")"
cleanup() { if [[ "${KEEP:-0}" == 1 ]]; then log "kept $work"; else rm -rf "$work"; fi; }
trap cleanup EXIT

# --- 1. model trained on the host --------------------------------------------------------------
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
# Nextflow's work dir belongs to the user that runs the task (uid 4242 here).
chown -R "$SMOKE_UID" "$work" 2>/dev/null || chmod -R a+rwX "$work"

run_task() {  # run_task NAME: run $work/NAME.command.sh the Nextflow way; prints nothing, returns its exit code
    local name="$1"
    "${PODMAN[@]}" run --rm --ulimit nofile=1024:1024 --ulimit nproc=1024:1024 --network none \
        -u "$SMOKE_UID" --read-only -v "$work:/work" -w /work \
        "$IMAGE" /bin/bash -ue "$name.command.sh" >"$work/$name.out" 2>"$work/$name.err"
}

# --- 2. the task -------------------------------------------------------------------------------
cat >"$work/verify.py" <<'EOF'
import sys
import anndata
import numpy as np
import pandas as pd

src = anndata.read_h5ad("input.h5ad")
emb = anndata.read_h5ad("embedded.h5ad")
clu = anndata.read_h5ad("clustered.h5ad")
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
markers = pd.read_csv("markers.csv")
if markers.empty:
    problems.append("markers.csv is empty")
print(f"input {src.n_obs} cells x {src.n_vars} genes; X_scrcl {clu.obsm['X_scrcl'].shape}; "
      f"{clu.obs['scrcl_cluster'].nunique()} clusters; markers.csv {markers.shape[0]} rows")
if problems:
    print("\n".join(problems), file=sys.stderr)
    sys.exit(1)
EOF

cat >"$work/task.command.sh" <<'EOF'
#!/bin/bash -ue
# what Nextflow needs from the image
command -v ps
ps -o pid=,user=,comm= -p $$ > ps.txt
for tool in awk sed grep date tail tee; do command -v "$tool" > /dev/null; done
id -u > uid.txt
scrcl-cli --version > version.txt
scrcl-cli info > info.txt
scrcl-cli --quiet embed input.h5ad -m model -o embedded.h5ad
scrcl-cli --quiet cluster input.h5ad -m model -o clustered.h5ad --markers markers.csv
python - <<'PY'
import importlib.util, sys
sys.exit("torch is installed in the CPU image" if importlib.util.find_spec("torch") else 0)
PY
python verify.py > verify.txt
EOF

log "task: embed + cluster in $IMAGE (-u $SMOKE_UID, --read-only, --network none)"
t0=$SECONDS
if run_task task; then
    ok "task exit code 0 ($((SECONDS - t0)) s)"
else
    rc=$?
    bad "task exit code $rc"
    sed 's/^/    stderr| /' "$work/task.err" | tail -30 >&2
fi
for f in ps.txt uid.txt version.txt info.txt embedded.h5ad clustered.h5ad markers.csv verify.txt; do
    [[ -s "$work/$f" ]] || bad "missing output $f"
done
if [[ -s "$work/version.txt" ]]; then
    v="$(cat "$work/version.txt")"
    if [[ "$v" == "$version" ]]; then ok "scrcl-cli --version -> $v"; else bad "scrcl-cli --version printed '$v', expected '$version'"; fi
fi
[[ -s "$work/ps.txt" ]] && ok "ps works: $(tr -s ' ' <"$work/ps.txt")"
[[ -s "$work/uid.txt" ]] && ok "ran as uid $(cat "$work/uid.txt")"
[[ -s "$work/info.txt" ]] && sed 's/^/    info| /' "$work/info.txt" >&2
[[ -s "$work/verify.txt" ]] && ok "outputs: $(cat "$work/verify.txt")"
owner="$(stat -c %u:%g "$work/clustered.h5ad" 2>/dev/null || true)"
[[ -z "$owner" || "$owner" == "$SMOKE_UID" ]] || bad "clustered.h5ad is owned by $owner, expected $SMOKE_UID"

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

cat >"$work/nocuda.command.sh" <<'EOF'
#!/bin/bash -ue
scrcl-cli --quiet embed input.h5ad -m model -o cuda.h5ad --device cuda
EOF
set +e; run_task nocuda; rc=$?; set -e
if [[ "$rc" != 0 ]]; then
    ok "--device cuda in the CPU image -> exit $rc: $(grep -m1 '^error:' "$work/nocuda.err" || tail -1 "$work/nocuda.err")"
else
    bad "--device cuda in the CPU image exited 0 (silent CPU fallback)"
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
size="$("${PODMAN[@]}" image inspect --format '{{.Size}}' "$IMAGE")"
log "image $IMAGE: $((size / 1000000)) MB"
(( size < 600000000 )) || bad "image is $((size / 1000000)) MB, target < 600 MB"

if (( failures )); then
    log "smoke test FAILED ($failures problems); outputs in $work"
    KEEP=1
    exit 1
fi
log "smoke test passed"
