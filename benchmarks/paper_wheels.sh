#!/usr/bin/env bash
# What the paper-grade run (mnistgen.commands.paper) needs on a GPU box and the box lacks, made ready here:
#   .whl/        wheels for the box's Python 3.12: pydantic (mnistgen.config) and great_expectations (the validate
#                stage) with those of their dependencies the box's image does not hold (device README, KINDS.md)
#   .gpu_mnist/  the four MNIST files: ../shared does not travel to the box
# Both folders are git-ignored; name them in the device call's `carry`. Run from the repo root, on a machine with
# a package registry:  bash benchmarks/paper_wheels.sh
set -euo pipefail
rm -rf .whl && mkdir -p .whl .gpu_mnist
cp "${MNIST_MIRROR:-../shared/mnist}"/*.gz .gpu_mnist/
python -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_34_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d .whl "great_expectations==1.24.1" "pydantic==2.14.4" "ruamel.yaml==0.19.1"
# The box already has these (and its own builds of numpy, scipy and pandas must stay): carry only the rest.
for name in numpy scipy pandas jinja2 markupsafe attrs certifi charset_normalizer idna packaging pyparsing \
            python_dateutil requests urllib3 tqdm typing_extensions narwhals six; do
    rm -f .whl/"$name"-*.whl
done
ls .whl && du -sh .whl .gpu_mnist
