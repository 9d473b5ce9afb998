#!/usr/bin/env bash
# Download, into .whl/ (ignored by git), the wheels that running the chapters under nbval needs on a GPU
# machine without a network whose Python has torch, Lightning, pytest and matplotlib but no Jupyter:
# jupytext, nbval, ipykernel and what they need. scripts/gpu_job.sh installs them to /tmp/site. PYVER is that
# machine's Python version (default 3.12).
#
#   bash scripts/fetch_gpu_wheels.sh           # here, with a network; then carry .whl
set -euo pipefail
cd "$(dirname "$0")/.."
PYVER="${PYVER:-3.12}"
rm -rf .whl && mkdir -p .whl
python3 -m pip download -q --only-binary=:all: --python-version "$PYVER" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any \
  -d .whl "jupytext==1.19.6" "nbval==0.11.0"
# Left out, as such a machine has them already: a second copy would shadow its own (its pytest plugins expect theirs).
for name in attrs coverage iniconfig markdown_it_py mdurl packaging pluggy psutil pygments pytest \
            python_dateutil pyyaml typing_extensions; do
  rm -f .whl/"$name"-[0-9]*.whl
done
echo "$(ls .whl | wc -l) wheels, $(du -sh .whl | cut -f1) in .whl/"
