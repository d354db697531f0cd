"""`mnistgen sweep MODEL --trials N`: a worker of a shared Optuna study on the validation split (mnistgen.sweep)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from .. import sweep as search
from .. import training
from ..config import ParamsError, RunParams, read_params, section, validate_section
from ..utils import StageError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="mnistgen sweep", description=search.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model", help="a key of params.yaml's models section with a sweep.space entry")
    parser.add_argument(
        "--trials",
        type=int,
        required=True,
        help="trials this worker runs (a study's total: the sum over its workers; 0: only report the study)",
    )
    parser.add_argument("--study", help="study name (default: <model>-sweep)")
    parser.add_argument(
        "--storage",
        default=os.environ.get("MNISTGEN_OPTUNA_STORAGE") or search.DEFAULT_STORAGE,
        help="Optuna storage URL (default: $MNISTGEN_OPTUNA_STORAGE, else %(default)s)",
    )
    parser.add_argument(
        "--worker", type=int, default=0, help="this worker's number: its sampler seed is sweep.sampler_seed + worker"
    )
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--data", type=Path, default=Path("data/prepared"), help="prepared splits (train and val are read)")
    parser.add_argument("--evaluator", type=Path, help="the trained evaluator folder (GAN families), e.g. models/evaluator")
    parser.add_argument("--out", type=Path, help="write the summary (best value, params, -S overrides) here as JSON")
    args = parser.parse_args(argv)
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        params = read_params(args.params)
        settings, base = search.load_space(params, args.model)
        run_params = validate_section(RunParams, section(params, "train"), "train")
        name = args.study or f"{args.model}-sweep"
        started = time.perf_counter()
        objective = search.Objective(
            args.model, base, settings, run_params, args.data, args.evaluator, None, name
        )  # data first: fail before the study
        study, objective.parent_run_id = search.open_study(name, args.storage, args.model, settings, args.worker)

        def progress(study, trial) -> None:
            shown = f"{trial.value:.4g}" if trial.value is not None else "-"
            print(
                f"sweep {name} worker {args.worker}: trial {trial.number} {trial.state.name} {objective.name} {shown} {trial.params}",
                flush=True,
            )

        study.optimize(objective, n_trials=args.trials, catch=(training.DivergenceError,), callbacks=[progress])
        out = search.summarize(study, args.model, objective.parent_run_id)
    except (ParamsError, StageError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=2) + "\n")
    best = (
        f"best trial {out['best_trial']} {objective.name} {out['best_value']:.4g}"
        if "best_value" in out
        else "no trial completed"
    )
    print(
        f"sweep {name}: {args.trials} trials by worker {args.worker} in {time.perf_counter() - started:.0f} s; "
        f"study: {out['trials']} trials {out['states']}, {best}"
    )
    if "command" in out:
        print(out["command"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
