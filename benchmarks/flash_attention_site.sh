#!/usr/bin/env bash
# Packs the optional FlashAttention-4 package (flash-attn-4 and CUTLASS's Python DSL for CUDA 13, ~264 MB unpacked)
# for a GPU machine that reaches no package registry, in two parts that each fit a device call's 64 MiB carry:
# .fa4a/ (40 MiB) and .fa4b/ (the rest), both ignored by git. Run here, where pip reaches a registry:
#   bash benchmarks/flash_attention_site.sh
# then, on the GPU machine, two calls in a row (the second within the 30 s the machine stays warm):
#   carry [".fa4a"]:  mkdir -p /tmp/fa4 && cp .fa4a/fa4part.aa /tmp/fa4/
#   carry [".fa4b", ...]:  cat /tmp/fa4/fa4part.aa .fa4b/fa4part.ab | xz -d | tar -C /tmp -xf - &&
#     export PYTHONPATH=/tmp/fa4site:/tmp/fa4site/nvidia_cutlass_dsl/dsl_packages:$PYTHONPATH
# /tmp/fa4site stays on that machine until it is given back (NOTES.md, section 27).
set -euo pipefail
top=$(git rev-parse --show-toplevel)
cd "$top"
for folder in /.fa4a/ /.fa4b/; do grep -qxF "$folder" .git/info/exclude || echo "$folder" >> .git/info/exclude; done
wheels=$(mktemp -d)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform any -d "$wheels" \
  flash-attn-4==4.0.0b36 nvidia-cutlass-dsl==4.8.1 nvidia-cutlass-dsl-libs-base==4.8.1 \
  nvidia-cutlass-dsl-libs-core==4.8.1 nvidia-cutlass-dsl-libs-cu13==4.8.1 apache-tvm-ffi==0.1.15.post2 \
  torch-c-dlpack-ext==0.1.5 quack-kernels==0.6.5
site=$(mktemp -d)/fa4site
mkdir -p "$site"
for wheel in "$wheels"/*.whl; do
  if command -v unzip > /dev/null; then unzip -q -o "$wheel" -d "$site"; else python3 -m zipfile -e "$wheel" "$site"; fi
done
rm -rf .fa4a .fa4b && mkdir .fa4a .fa4b
tar -C "$(dirname "$site")" -cf - fa4site | xz -9 -T0 | split -b 40M - .fa4a/fa4part.
mv .fa4a/fa4part.ab .fa4b/
rm -rf "$wheels" "$(dirname "$site")"
du -sh .fa4a .fa4b
