#!/usr/bin/env bash
# Ray 2.60.0 for the GPU machine, small enough to carry (issue 14's Ray batch benchmark, bench/bench_ray_batch.py).
#
# Why: the GPU machine reaches no registry, so Ray travels with the command, and everything carried together must
# stay under 64 MiB; the ray-2.60.0 cp312 wheel alone is 79 MB. What a local cluster (`ray.init(include_dashboard=
# False)`, actors with or without GPUs, runtime_env env_vars) does not use is left out: the Java jars (33 MB), the
# dashboard's web client build (9 MB), the libraries on top of the core (rllib, tune, train, serve, data, llm:
# `ray/__init__.py` imports `ray.data` only when it is used), test folders and byte code. The three ELF files
# (_raylet.so, gcs_server, raylet: 116 MB with symbols) are stripped of their debug symbols (84 MB), and the tree
# goes into one xz tarball (xz compresses these binaries much better than the wheel's deflate). The vendored
# aiohttp of the runtime-env agent and psutil stay (the raylet starts that agent for every cluster).
# Ray's own requirements that the GPU machine lacks come as wheels beside it: jsonschema and what it needs
# (click, filelock, msgpack, packaging, protobuf, pyyaml, requests, attrs, typing-extensions are there).
#
#   bash bench/slim_ray.sh [OUT_DIR]            # default: <main checkout>/.whl/ray (a subfolder: `.whl/*.whl` skips it)
#   PYVER=3.11 bash bench/slim_ray.sh /tmp/ray311   # the same recipe for this machine's Python, to check it here
# On the GPU machine (after the usual `.whl/*.whl` install into /tmp/site):
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/ray/*.whl
#   python3 -c "import tarfile; tarfile.open('.whl/ray/ray-2.60.0-slim.tar.xz').extractall('/tmp/site', filter='tar')"
set -euo pipefail
PYVER=${PYVER:-3.12}
OUT=${1:-"$(cd "$(git rev-parse --git-common-dir)/.." && pwd)/.whl/ray"}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

# 1. The wheels for the target Python (ray's is tagged manylinux2014; rpds-py is compiled too).
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 -d "$WORK/wheels" \
    ray==2.60.0 jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1

# 2. Ray's tree without what a local cluster does not use.
python3 -m zipfile -e "$WORK"/wheels/ray-2.60.0-*.whl "$WORK/tree"
cd "$WORK/tree"
rm -rf ray/jars ray/dashboard/client ray/rllib ray/tune ray/train ray/serve ray/data ray/llm
find . -depth -type d \( -name tests -o -name __pycache__ \) -exec rm -rf {} +
strip --strip-unneeded ray/_raylet.so ray/core/src/ray/gcs/gcs_server ray/core/src/ray/raylet/raylet
chmod +x ray/core/src/ray/gcs/gcs_server ray/core/src/ray/raylet/raylet  # zipfile -e drops the exec bits

# 3. One xz tarball, and the dependencies' wheels beside it.
mkdir -p "$OUT"
rm -f "$OUT"/*.whl "$OUT"/ray-*.tar.xz
tar -cf - ray ray-2.60.0.dist-info | xz -9 -T2 > "$OUT/ray-2.60.0-slim.tar.xz"
cp "$WORK"/wheels/*.whl "$OUT"/
rm -f "$OUT"/ray-2.60.0-*.whl
du -ab "$OUT" | sort -n
