#!/usr/bin/env bash
# Download the wheels the GPU machine lacks (it has no network) into .whl/ (git-ignored).
# Target: CPython 3.12, manylinux x86_64. scripts/device_env.sh installs them there with
#   python3 -m pip install --no-index --no-deps --target /tmp/site .whl/*.whl
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=.whl
mkdir -p "$DEST"
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
           --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
PKGS=(
  hydra-core==1.3.8 omegaconf==2.3.1
  hydra-joblib-launcher==1.2.0 hydra-submitit-launcher==1.2.0 submitit==1.5.4
  flashinfer-python==0.5.3 apache-tvm-ffi==0.1.15.post2 nvidia-cudnn-frontend==1.32.0
  xformers==0.0.35
)
PY=${PYTHON:-python3}
for p in "${PKGS[@]}"; do
  name=$(echo "${p%%==*}" | tr - _)
  if ls "$DEST" | grep -qi "^${name}-"; then continue; fi
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLATFORMS[@]}" -d "$DEST" "$p"
done
# antlr4 4.9.3 (what omegaconf 2.3 needs) is published as an sdist only: build its pure-Python wheel here.
if ! ls "$DEST" | grep -qi '^antlr4_python3_runtime-'; then
  "$PY" -m pip wheel -q --no-deps -w "$DEST" antlr4-python3-runtime==4.9.3
fi
ls -la "$DEST"; du -sh "$DEST"
