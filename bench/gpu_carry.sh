#!/usr/bin/env bash
# Packs what the lent GPU machine lacks for `python -m bench.gpu` into .gpu-carry/site.tar.xz (~30 MiB).
#
# That machine has torch, torchvision, pyarrow, pandas, pillow, pytest, nvidia-ml-py (see the device notes)
# but no Ray, pycocotools or jsonschema, and it reaches no package registry. Run this here, once, from the
# repository root, then name .gpu-carry in the run's `carry`:
#
#     bash bench/gpu_carry.sh                 # [PYTHON_VERSION, default 3.12: the GPU image's python3]
#     # device run, carry [".gpu-carry"]:
#     mkdir -p /tmp/site && tar -xJf .gpu-carry/site.tar.xz -C /tmp/site && export PYTHONPATH=/tmp/site:$PWD \
#       && PYTHONUNBUFFERED=1 python3 -m bench.gpu --device cuda --out-dir $OUT
#
# Ray's wheel (79 MB) is over the 64 MiB a call may carry: its Java jars, RLlib, Serve, LLM and the
# dashboard's web client (none used by a local Ray Data job without dashboard) are left out.
set -euo pipefail
cd "$(dirname "$0")/.."
PYVER="${1:-3.12}"
PY="${PYTHON:-.venv/bin/python}"
test -x "$PY" || PY=python3
DEST="${GPU_CARRY_DEST:-.gpu-carry}"  # another folder (absolute) only to try the packing elsewhere
if [ "$DEST" = .gpu-carry ]; then
  EXCLUDE="$(git rev-parse --git-common-dir)/info/exclude"
  grep -qxF "/$DEST/" "$EXCLUDE" 2>/dev/null || echo "/$DEST/" >>"$EXCLUDE"  # ignored: never committed
fi
rm -rf "$DEST" && mkdir -p "$DEST/wheels" "$DEST/site"
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$DEST/wheels" "ray==2.60.0" "pycocotools>=2.0.8" jsonschema jsonschema-specifications referencing rpds-py
for wheel in "$DEST"/wheels/*.whl; do
  unzip -q -o "$wheel" -d "$DEST/site"
done
rm -rf "$DEST"/site/ray/jars "$DEST"/site/ray/rllib "$DEST"/site/ray/serve "$DEST"/site/ray/llm \
  "$DEST"/site/ray/dashboard/client/build
tar -C "$DEST/site" -cJf "$DEST/site.tar.xz" .
rm -rf "$DEST/site" "$DEST/wheels"
ls -l "$DEST/site.tar.xz"
