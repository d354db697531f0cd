"""The train stage (mnistgen.stages.train), except that rank DIE_RANK exits at once, as a killed process would, when it
reaches training step DIE_STEP, or with HANG=1 stops there without exiting, as a stuck one would
(tests/test_distributed.py starts it under torchrun).

Usage: torchrun ... tests/ddp_die.py <train.py's arguments>
"""

import os
import runpy
import time

from mnistgen import training

original = training.step


def step(model, x, optimizers, global_step, *args, **kwargs):
    if int(os.environ["RANK"]) == int(os.environ["DIE_RANK"]) and global_step == int(os.environ["DIE_STEP"]):
        if os.environ.get("HANG") == "1":
            time.sleep(3600)
        os._exit(3)  # no message, no cleanup: like an out-of-memory kill
    return original(model, x, optimizers, global_step, *args, **kwargs)


training.step = step  # train() looks `step` up in its module at each call
runpy.run_module("mnistgen.stages.train", run_name="__main__", alter_sys=True)
