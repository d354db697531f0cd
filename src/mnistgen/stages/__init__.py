"""The pipeline's stages, one module each, in dvc.yaml's order: prepare, validate, reference,
train, evaluate, report, promote. dvc.yaml runs each as `python -m mnistgen.stages.NAME` with every
path on the command line; each reads params.yaml, calls the library and writes its outputs whole."""
