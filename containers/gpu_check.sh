#!/usr/bin/env bash
# Verify on a GPU host that the scrcl-cli CUDA image really computes on the GPU.
#
#   containers/gpu_check.sh [IMAGE]        # IMAGE: a docker/podman reference or a .sif file
#
#   containers/gpu_check.sh scrcl-cli:0.1.0-cuda                 # docker --gpus all (or podman + CDI)
#   containers/gpu_check.sh scrcl-cli_0.1.0-cuda.sif             # apptainer/singularity exec --nv
#   ENGINE=podman containers/gpu_check.sh localhost/scrcl-cli:0.1.0-cuda
#
# Runs unchanged on any Linux host with an NVIDIA driver and one of docker (with the NVIDIA container
# toolkit), podman (with CDI: `nvidia-ctk cdi generate --output=/etc/cdi/nvidia.yaml`) or apptainer /
# singularity. The container runs as the calling user with a read-only root, like Nextflow/HPC do.
#
# Checks (each one must pass; exit 0 only if all do):
#   host    nvidia-smi works and the driver is >= 580.65.06 (CUDA 13 floor)
#   torch   torch.cuda.is_available(), a CUDA build, a matmul on the GPU that matches the CPU result
#   ORT     in a process that never imports torch: an InferenceSession with CUDAExecutionProvider
#           keeps it as its first provider, and ORT's profile shows the graph's nodes ran on it
#   CLI     `scrcl-cli info` lists a GPU; `scrcl-cli train --device cuda` and `scrcl-cli embed
#           --device cuda` on the bundled 700-cell example succeed (an explicit cuda request that
#           fell back to CPU exits non-zero), and the output has obsm['X_scrcl']
#
# Environment: ENGINE=docker|podman|apptainer|singularity (default: from IMAGE and what exists),
# GPU_FLAGS (override the engine's GPU flags), DRIVER_MIN (default 580.65.06), KEEP=1.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
version="$(sed -n 's/^__version__ *= *["'\'']\([^"'\'']*\)["'\''].*/\1/p' "$here/../scrcl_cli/_version.py" 2>/dev/null || true)"
IMAGE="${1:-${IMAGE:-scrcl-cli:${version:-0.1.0}-cuda}}"
DRIVER_MIN="${DRIVER_MIN:-580.65.06}"

log() { printf '[gpu_check %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "FAIL: $*"; exit 1; }

# --- host ---------------------------------------------------------------------------------------
command -v nvidia-smi >/dev/null || die "nvidia-smi not found: no NVIDIA driver on this host"
driver="$(nvidia-smi --query-gpu=driver_version --format=csv,noheader | head -1 | tr -d ' ')"
[[ -n "$driver" ]] || die "nvidia-smi shows no GPU"
nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv,noheader | sed 's/^/    host gpu| /' >&2
if [[ "$(printf '%s\n%s\n' "$DRIVER_MIN" "$driver" | sort -V | head -1)" != "$DRIVER_MIN" ]]; then
    die "host driver $driver is older than $DRIVER_MIN: the image's CUDA 13 runtime needs an R580+ driver"
fi
log "host driver $driver (>= $DRIVER_MIN)"

# --- engine ---------------------------------------------------------------------------------------
engine="${ENGINE:-}"
if [[ -z "$engine" ]]; then
    if [[ "$IMAGE" == *.sif ]]; then
        engine="$(command -v apptainer >/dev/null && echo apptainer || echo singularity)"
    elif command -v docker >/dev/null && docker info >/dev/null 2>&1; then
        engine=docker
    elif command -v podman >/dev/null; then
        engine=podman
    else
        die "no container engine found (docker, podman, apptainer)"
    fi
fi
command -v "$engine" >/dev/null || die "$engine not found"

work="$(mktemp -d "${TMPDIR:-/tmp}/scrcl-gpu-check.XXXXXX")"
chmod 0777 "$work"
cleanup() { if [[ "${KEEP:-0}" == 1 ]]; then log "kept $work"; else rm -rf "$work"; fi; }
trap cleanup EXIT

run_in_image() {  # run_in_image SCRIPT: bash -ue SCRIPT in /work inside the image, on the GPU
    local script="$1" uid gid
    uid="$(id -u)"; gid="$(id -g)"
    case "$engine" in
        docker)
            # shellcheck disable=SC2086
            docker run --rm ${GPU_FLAGS:---gpus all} -u "$uid:$gid" --read-only --tmpfs /tmp:exec \
                -v "$work:/work" -w /work "$IMAGE" /bin/bash -ue "$script" ;;
        podman)
            # shellcheck disable=SC2086
            podman run --rm ${GPU_FLAGS:---device nvidia.com/gpu=all --security-opt label=disable} \
                -u "$uid:$gid" --read-only -v "$work:/work" -w /work "$IMAGE" /bin/bash -ue "$script" ;;
        apptainer|singularity)
            # shellcheck disable=SC2086
            "$engine" exec ${GPU_FLAGS:---nv} --cleanenv -B "$work:/work" --pwd /work "$IMAGE" /bin/bash -ue "$script" ;;
        *) die "unknown ENGINE $engine" ;;
    esac
}

# --- checks inside the image ------------------------------------------------------------------------
cat >"$work/check_torch.py" <<'EOF'
import sys
import torch

print(f"torch {torch.__version__}, CUDA runtime {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}")
if not torch.version.cuda:
    sys.exit("FAIL torch: not a CUDA build")
if not torch.cuda.is_available():
    sys.exit("FAIL torch: torch.cuda.is_available() is False (no --gpus/--nv, or the driver is too old)")
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"cuda:{i} {p.name}, {p.total_memory / 2**30:.1f} GiB, capability {p.major}.{p.minor}")
g = torch.Generator().manual_seed(0)
a = torch.randn(512, 512, generator=g, dtype=torch.float64)
gpu = (a.cuda() @ a.cuda()).cpu()
torch.cuda.synchronize()
err = (gpu - a @ a).abs().max().item()
if err > 1e-6:
    sys.exit(f"FAIL torch: GPU matmul differs from CPU by {err}")
print(f"PASS torch: matmul on {torch.cuda.get_device_name(0)} (max diff {err:.1e})")
EOF

cat >"$work/check_ort.py" <<'EOF'
# Never imports torch: ONNX Runtime must find CUDA/cuDNN on its own (as `scrcl-cli embed` does).
import glob
import json
import os
import sys

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

dists = []
import importlib.metadata as md
for name in ("onnxruntime", "onnxruntime-gpu"):
    try:
        dists.append(f"{name} {md.version(name)}")
    except md.PackageNotFoundError:
        pass
print(f"onnxruntime {ort.__version__} ({', '.join(dists)}), device {ort.get_device()}")
print(f"available providers: {ort.get_available_providers()}")
names = [d.split()[0] for d in dists]
if "onnxruntime-gpu" not in names:
    sys.exit("FAIL ORT: onnxruntime-gpu is not installed")
if "onnxruntime" in names:
    sys.exit("FAIL ORT: plain onnxruntime is installed next to onnxruntime-gpu and hides its CUDA provider")

x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 256])
y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 64])
w = np.random.default_rng(0).standard_normal((256, 64)).astype(np.float32)
graph = helper.make_graph(
    [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["y"])],
    "gpu_check", [x], [y], [helper.make_tensor("w", TensorProto.FLOAT, w.shape, w.ravel())])
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
model.ir_version = 9
onnx.checker.check_model(model)

opts = ort.SessionOptions()
opts.enable_profiling = True
opts.profile_file_prefix = os.path.join(os.getcwd(), "ort_profile")
sess = ort.InferenceSession(model.SerializeToString(), sess_options=opts,
                            providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
print(f"session providers: {sess.get_providers()}")
if sess.get_providers()[0] != "CUDAExecutionProvider":
    sys.exit("FAIL ORT: CUDAExecutionProvider could not be created (silent CPU fallback); see the [E:]/[W:] lines above")
xin = np.random.default_rng(1).standard_normal((1024, 256)).astype(np.float32)
out = sess.run(None, {"x": xin})[0]
profile = sess.end_profiling()
err = float(np.abs(out - np.maximum(xin @ w, 0)).max())
if err > 1e-2:
    sys.exit(f"FAIL ORT: result differs from numpy by {err}")
events = json.load(open(profile))
ops = {(e.get("args") or {}).get("op_name"): (e.get("args") or {}).get("provider")
       for e in events if e.get("cat") == "Node" and (e.get("args") or {}).get("provider")}
print(f"ORT profile, op -> provider: {ops}")
if not ops or any(p != "CUDAExecutionProvider" for p in ops.values()):
    sys.exit("FAIL ORT: not every node ran on CUDAExecutionProvider")
print("PASS ORT: MatMul+Relu ran on CUDAExecutionProvider")
EOF

cat >"$work/check.command.sh" <<'EOF'
#!/bin/bash -ue
export HOME=/work   # what nf-core GPU modules do; nothing may need to write into the image
echo "== scrcl-cli --version: $(scrcl-cli --version)"
echo "== scrcl-cli info"; scrcl-cli info | tee info.txt
grep -q '^torch GPUs: none' info.txt && { echo "FAIL CLI: scrcl-cli info sees no GPU"; exit 1; }
echo "== torch"; python check_torch.py
echo "== onnxruntime (no torch in the process)"; python check_ort.py
echo "== CLI on the GPU"
example="$(python -c 'from importlib import resources; print(resources.files("scrcl_cli") / "data" / "pbmc68k_reduced_700.h5ad")')"
scrcl-cli train "$example" -o model --epochs 3 --hidden-dim 32 --out-dim 8 --device cuda
scrcl-cli embed "$example" -m model -o embedded.h5ad --device cuda
python -c 'import anndata, sys; a = anndata.read_h5ad("embedded.h5ad"); print("X_scrcl", a.obsm["X_scrcl"].shape); sys.exit(0 if "X_scrcl" in a.obsm else 1)'
echo "PASS CLI: train + embed with --device cuda"
EOF

log "image $IMAGE via $engine"
if run_in_image check.command.sh; then
    log "PASS: the CUDA image sees the GPU; torch and ONNX Runtime (CUDAExecutionProvider) compute on it"
else
    rc=$?
    KEEP=1
    die "exit code $rc (work dir kept: $work)"
fi
