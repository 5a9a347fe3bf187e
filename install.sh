#!/usr/bin/env bash
# Sets mmbench up in ./.venv: the Debian Fashion-MNIST package (data of the default
# preset), the package itself (editable) and Animal-MNIST (installed without its
# declared tensorflow dependency, which it does not need). `--dev` adds test tools (and
# Ray, about 80 MB to download, for the ray executor's test).
set -euo pipefail
cd "$(dirname "$0")"
extras=""
if [ "${1:-}" = "--dev" ]; then extras="[dev]"; fi

if [ ! -d /usr/share/datasets/fashion-mnist ]; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null \
      || echo "install.sh: warning: could not install dataset-fashion-mnist (the tiny preset needs it)" >&2
  else
    echo "install.sh: warning: run 'sudo apt-get install dataset-fashion-mnist' for the tiny preset" >&2
  fi
fi

if [ ! -x .venv/bin/python ]; then python3 -m venv .venv; fi
.venv/bin/python -m pip install -q --upgrade pip
# torch and torchvision are left to pip's resolver so they come as a matched pair
.venv/bin/python -m pip install -q -e ".${extras}"
.venv/bin/python -m pip install -q --no-deps "animal-mnist==0.4"
echo "install.sh: ready ($(.venv/bin/python -c 'import torch, torchvision; print("torch", torch.__version__, "torchvision", torchvision.__version__)'))"
