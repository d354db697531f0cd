#!/usr/bin/env bash
# What the paper-grade run (mnistgen paper) needs on a GPU box that has torch but not the rest, made ready here:
#   .whl/        wheels for the box's Python 3.12: pydantic (mnistgen.config) and great_expectations (the validate
#                stage), with those of their dependencies a typical torch image does not hold
#   .gpu_mnist/  the four MNIST files, from MNIST_MIRROR (a folder holding them)
# Both folders are git-ignored; copy them to the box beside the repository. Run from the repo root, on a machine
# with a package registry:  MNIST_MIRROR=/data/mnist bash benchmarks/paper_wheels.sh
set -euo pipefail
: "${MNIST_MIRROR:?set MNIST_MIRROR to a folder holding the four MNIST .gz files}"
rm -rf .whl && mkdir -p .whl .gpu_mnist
cp "$MNIST_MIRROR"/*.gz .gpu_mnist/
python -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_34_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d .whl "great_expectations==1.24.1" "pydantic==2.14.4" "ruamel.yaml==0.19.1"
# A torch image already has these (and its own builds of numpy, scipy and pandas must stay): copy only the rest.
for name in numpy scipy pandas jinja2 markupsafe attrs certifi charset_normalizer idna packaging pyparsing \
            python_dateutil requests urllib3 tqdm typing_extensions narwhals six; do
    rm -f .whl/"$name"-*.whl
done
ls .whl && du -sh .whl .gpu_mnist
