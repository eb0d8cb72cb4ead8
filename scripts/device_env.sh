# Source at the start of every GPU-machine command (it has no network):
#   source scripts/device_env.sh
# - installs the carried wheels (.whl/, from scripts/download_wheels.sh) into /tmp/site and puts it and the
#   project on PYTHONPATH;
# - removes xformers' CUDA extension (built for torch 2.10; it cannot load on the machine's torch 2.11) so
#   xformers takes its no-extension path; its Triton split-K operator does not need it;
# - points FlashInfer's JIT workspace at ./.cache/flashinfer (FLASHINFER_WORKSPACE_BASE=$PWD) and installs
#   previously built FlashInfer modules from .cache/flashinfer_aot.tar.gz as FlashInfer AOT modules
#   (flashinfer/data/aot/<name>/<name>.so, which FlashInfer loads before trying to JIT-compile), so a
#   carried cache is used without ninja re-checking source timestamps or paths.
# Provenance: the machine's copy of .git can be older than this checkout's HEAD, so pass the commit from
# here (DEFT_GIT_COMMIT=<sha of this checkout> in the command line), not $(git rev-parse HEAD) there.
# End a command with `deft_pack_flashinfer_cache "$OUT"` to send the built modules back (<= 15 MiB parts:
# flashinfer_aot.tar.gz.part-aa, -ab, ...); here, `cat <files_at>/flashinfer_aot.tar.gz.part-* >
# .cache/flashinfer_aot.tar.gz` and pass carry [".whl", ".cache"] to the next call.
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "device_env: wheel install failed" >&2; return 1 2>/dev/null || exit 1; }
  rm -f /tmp/site/xformers/_C.so
fi
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
export FLASHINFER_WORKSPACE_BASE=$PWD   # FlashInfer appends .cache/flashinfer/<version>/<arch>/
mkdir -p .cache
if [ -f .cache/flashinfer_aot.tar.gz ] && [ -d /tmp/site/flashinfer ]; then
  mkdir -p /tmp/site/flashinfer/data/aot
  tar -xzf .cache/flashinfer_aot.tar.gz -C /tmp/site/flashinfer/data/aot \
    && echo "device_env: FlashInfer modules from cache: $(ls /tmp/site/flashinfer/data/aot | tr '\n' ' ')"
fi

# Triton's and Inductor's compile caches (DeFT and baseline Triton kernels, FlexAttention's compiled shapes) live
# under .cache too; a previous call's caches come back from .cache/compile_cache.tgz (made by
# deft_pack_compile_cache DEST, which writes DEST/compile_cache.tgz: copy it into .cache/ here).
export TRITON_CACHE_DIR=$PWD/.cache/triton
export TORCHINDUCTOR_CACHE_DIR=$PWD/.cache/inductor
if [ -f .cache/compile_cache.tgz ]; then
  tar -xzf .cache/compile_cache.tgz -C .cache && echo "device_env: compile caches from .cache/compile_cache.tgz"
fi

deft_pack_compile_cache() {  # deft_pack_compile_cache DEST: Triton + Inductor caches -> DEST/compile_cache.tgz
  local dest=${1:?destination folder}
  tar -czf "$dest/compile_cache.tgz" -C .cache $(cd .cache && ls -d triton inductor 2>/dev/null) \
    && echo "deft_pack_compile_cache: $(du -h "$dest/compile_cache.tgz" | cut -f1) packed"
}

deft_pack_flashinfer_cache() {  # deft_pack_flashinfer_cache DEST: built FlashInfer modules -> DEST/flashinfer_aot.tar.gz.part-*
  local dest=${1:?destination folder} stage
  stage=$(mktemp -d)
  for so in .cache/flashinfer/*/*/cached_ops/*/*.so /tmp/site/flashinfer/data/aot/*/*.so; do
    [ -f "$so" ] || continue
    mkdir -p "$stage/$(basename "$(dirname "$so")")" && cp -n "$so" "$stage/$(basename "$(dirname "$so")")/"
  done
  if [ -n "$(ls "$stage")" ]; then
    tar -czf - -C "$stage" . | split -b 15M - "$dest/flashinfer_aot.tar.gz.part-"
    echo "deft_pack_flashinfer_cache: $(ls "$stage" | wc -l) modules, $(du -ch "$dest"/flashinfer_aot.tar.gz.part-* | tail -1 | cut -f1) packed"
  fi
  rm -rf "$stage"
}
