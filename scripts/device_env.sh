# Source at the start of every GPU-machine command (it has no network):
#   source scripts/device_env.sh
# Installs the carried wheels (.whl/, from scripts/download_wheels.sh) into /tmp/site, puts the project
# on PYTHONPATH, and points FlashInfer's JIT cache at .cache/flashinfer so it can be carried between calls.
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "device_env: wheel install failed" >&2; return 1 2>/dev/null || exit 1; }
fi
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
export FLASHINFER_WORKSPACE_BASE=$PWD/.cache
mkdir -p .cache
