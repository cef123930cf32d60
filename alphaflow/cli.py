"""`alphaflow <stage>`: argument parsing only; each subcommand calls one library function.

    alphaflow prepare   --params P [--split train|test]
    alphaflow encode    --params P [--part I --num-parts N] [--finalize]
    alphaflow train     --params P --run R
    alphaflow classifier --params P
    alphaflow reference --params P
    alphaflow sample    --params P --run R --weights ema|raw|phema-<σ_rel> --sampler S [--part I --num-parts N]
    alphaflow evaluate  --params P --run R --weights ema|raw|phema-<σ_rel> --sampler S
    alphaflow sample-evaluate --params P --run R   (eval.jobs run: every cell of R in one process)
    alphaflow report    --params P
    alphaflow export-npz --params P --run R --weights ema --sampler S --out FILE.npz   (ADM evaluator batch)
    alphaflow generate  --params P --run R [--weights W] | --checkpoint FILE [--model B/2] [--vae DIR]
                        --classes 207,360 --seeds 0-15 --nfe 1|2 --mode ode|consistency --out grid.png|DIR/
    alphaflow dvc-pipeline --params P [--check]   (dvc.yaml / pipelines/<profile>/dvc.yaml)
    alphaflow phema     --params P --run R --sigma-rel S [--sigma-rel S2 ...] [--step K]   (post-hoc EMA)
    alphaflow track-replay --params P --run R      (log what MLflow missed of the run's metrics.jsonl)
    alphaflow launch    --params P --stage train [--run R] [--executor slurm|local|debug] -- <stage args>
    alphaflow validate  --params P

Every subcommand takes `--set key.sub=value` overrides (YAML-typed) applied before validation.

A user error (alphaflow.errors.UserError: bad params, corrupt or missing input, a wrong weights file) ends
as one line `alphaflow: <message>` on stderr and exit code 2; ALPHAFLOW_DEBUG=1 adds its traceback.
Any other exception is an internal error and keeps Python's traceback.
"""

import argparse
import os
import sys
import traceback

from alphaflow.config import load_params
from alphaflow.errors import UserError

# Each subcommand imports the library it calls inside its function (lazily): a login node runs one blocked
# `alphaflow launch` per queued job, which must not load torch (tests/test_cli_errors.py).

USER_ERROR_EXIT = 2
DEBUG_ENV = "ALPHAFLOW_DEBUG"


def add_common(p):
    p.add_argument("--params", default="params/default.yaml", help="params profile (params/*.yaml)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a params key, e.g. --set defaults.steps=100 (repeatable)",
    )
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None, help="overrides params `device`")
    p.add_argument("--quiet", action="store_true", help="no progress bars (batch jobs)")


def device_of(args, params):
    choice = args.device or params.raw.get("device", "auto")
    return None if choice == "auto" else choice


def cmd_validate(args, params):
    print(f"{args.params}: valid ({len(params.run_names)} runs: {', '.join(params.run_names)})")


def cmd_prepare(args, params):
    from alphaflow.stages import prepare

    prepare(params, split=args.split)


def cmd_encode(args, params):
    from alphaflow.stages import encode

    encode(params, part=args.part, num_parts=args.num_parts, finalize=args.finalize, device=device_of(args, params))


def cmd_train(args, params):
    from alphaflow.evaluate import in_training_metrics
    from alphaflow.plots import plot_training_curves
    from alphaflow.train import train

    summary = train(
        params,
        args.run,
        device=device_of(args, params),
        quiet=args.quiet,
        stop_after=args.stop_after,
        tracking=not args.no_tracking,
        evaluate=in_training_metrics,
        plot_curves=plot_training_curves,
    )
    print(f"[alphaflow] train {args.run}: {summary}")


def cmd_classifier(args, params):
    from alphaflow.stages import classifier

    classifier(params, device=device_of(args, params))


def cmd_reference(args, params):
    from alphaflow.reference import reference

    reference(params, device=device_of(args, params))


def cmd_sample(args, params):
    from alphaflow.samples import sample_run

    sample_run(
        params,
        args.run,
        args.weights,
        args.sampler,
        part=args.part,
        num_parts=args.num_parts,
        device=device_of(args, params),
        quiet=args.quiet,
    )


def cmd_evaluate(args, params):
    from alphaflow.evaluate import evaluate_run

    evaluate_run(params, args.run, args.weights, args.sampler, device=device_of(args, params), quiet=args.quiet)


def cmd_sample_evaluate(args, params):
    from alphaflow.evaluate import sample_evaluate

    sample_evaluate(params, args.run, device=device_of(args, params), quiet=args.quiet)


def cmd_generate(args, params):
    from alphaflow.generate import run_generate

    device = device_of(args, params) if params is not None else (None if args.device in (None, "auto") else args.device)
    run_generate(args, params, device=device)


def cmd_export_npz(args, params):
    from alphaflow.samples import export_npz

    path, count = export_npz(params, args.run, args.weights, args.sampler, args.out, labels=not args.no_labels)
    if not args.quiet:
        print(f"[alphaflow] export-npz {args.run}/{args.weights}/{args.sampler}: {count} images → {path}")


def cmd_report(args, params):
    from alphaflow.report import report

    report(params)


def cmd_phema(args, params):
    from alphaflow.phema import write_posthoc

    for sigma_rel in args.sigma_rel:
        out, record = write_posthoc(params, args.run, sigma_rel, step=args.step)
        print(
            f"[alphaflow] phema {args.run}: σ_rel {sigma_rel:g} at step {record['step']} from "
            f"{len(record['snapshots'])} snapshot profiles → {out}"
        )


def cmd_dvc_pipeline(args, params):
    from alphaflow.config import ParamsError
    from alphaflow.dvc_pipeline import write

    if args.overrides:
        raise ParamsError("dvc-pipeline takes no --set: DVC reads the params file itself; edit the file instead")
    path, current = write(params, os.path.relpath(args.params), check=args.check)
    if args.check and not current:
        print(
            f"[alphaflow] {path} is not current for {args.params}: run `alphaflow dvc-pipeline --params {args.params}`",
            file=sys.stderr,
        )
        return 1
    print(
        f"[alphaflow] {path}: {'current' if current else 'written'} ({args.params}); run it with "
        f"`dvc repro{'' if str(path) == 'dvc.yaml' else ' ' + str(path)}`"
    )
    return 0


def cmd_track_replay(args, params):
    from alphaflow.tracking import replay_run

    run_id, sent, present = replay_run(params.tracking_uri(), params.profile, args.run, params.run_dir(args.run))
    print(
        f"[alphaflow] track-replay {args.run}: {sent} metric points logged to MLflow run {run_id} "
        f"({present} were there)"
    )


def cmd_plan(args, params):
    from alphaflow.plan import BENCH_DIR, format_plan, plan, profile_device

    # --device cpu|cuda, else a GPU when --gpu names one or the profile's resources request GPUs
    device = args.device if args.device in ("cpu", "cuda") else ("cuda" if args.gpu else profile_device(params))
    rows, notes = plan(
        params,
        device_type=device,
        gpu=args.gpu,
        gpus=args.gpus,
        threads=args.threads,
        bench_dir=args.bench or BENCH_DIR,
    )
    what = args.gpu or ("(no --gpu: a measured GPU, named under 'step costs')" if device == "cuda" else "")
    print(format_plan(rows, notes, f"{device} {what}".strip()))


def cmd_launch(args, params):
    from alphaflow.stages import launch_stage

    return launch_stage(
        params,
        args.stage,
        args.stage_args,
        params_path=args.params,
        overrides=args.overrides,
        executor=args.executor,
        run=args.run,
        array_parts=args.array_parts,
    )


def stage_parser(sub, name, fn, help_):
    p = sub.add_parser(name, help=help_)
    add_common(p)
    p.set_defaults(fn=fn)
    return p


def weight_set(name):
    """--weights: ema, raw or phema-<σ_rel> (as params eval.weights writes them)."""
    from alphaflow.config import weight_set_problem

    problem = weight_set_problem(name)
    if problem:
        raise argparse.ArgumentTypeError(f"{name!r}: {problem}")
    return name


def build_parser():
    ap = argparse.ArgumentParser(
        prog="alphaflow", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = ap.add_subparsers(dest="command", required=True)

    stage_parser(sub, "validate", cmd_validate, "validate a params profile")

    p = stage_parser(sub, "prepare", cmd_prepare, "images → uint8 shards + manifest")
    p.add_argument("--split", choices=["train", "test"], default="train")

    p = stage_parser(sub, "encode", cmd_encode, "images → posterior latent shards (+ statistics)")
    p.add_argument("--part", type=int, default=0)
    p.add_argument("--num-parts", type=int, default=1)
    p.add_argument("--finalize", action="store_true", help="only merge finished parts (manifest + statistics)")

    p = stage_parser(sub, "train", cmd_train, "train (or resume) one run")
    p.add_argument("--run", required=True)
    p.add_argument("--stop-after", type=int, default=None, help="stop (with a checkpoint) after this step")
    p.add_argument("--no-tracking", action="store_true", help="skip MLflow (metrics.jsonl only)")

    stage_parser(sub, "classifier", cmd_classifier, "train the small CNN whose features give the demo metric")

    stage_parser(sub, "reference", cmd_reference, "reference feature statistics of held-out real images")

    for name, fn, help_ in (
        ("sample", cmd_sample, "generate images from a run"),
        ("evaluate", cmd_evaluate, "metrics of generated images"),
    ):
        p = stage_parser(sub, name, fn, help_)
        p.add_argument("--run", required=True)
        p.add_argument("--weights", type=weight_set, required=True, help="ema, raw or phema-<σ_rel> (post-hoc EMA)")
        p.add_argument("--sampler", required=True, help="a sampler name from params eval.samplers")
        if name == "sample":
            p.add_argument("--part", type=int, default=0)
            p.add_argument("--num-parts", type=int, default=1)

    p = stage_parser(
        sub,
        "sample-evaluate",
        cmd_sample_evaluate,
        "sample and evaluate every cell of a run in one process (eval.jobs: run), keeping the current ones",
    )
    p.add_argument("--run", required=True)

    p = stage_parser(
        sub,
        "export-npz",
        cmd_export_npz,
        "a finished sample set as an ADM evaluator batch .npz (arr_0 uint8 N×H×W×3, arr_1 labels)",
    )
    p.add_argument("--run", required=True)
    p.add_argument("--weights", type=weight_set, required=True, help="ema, raw or phema-<σ_rel> (post-hoc EMA)")
    p.add_argument("--sampler", required=True, help="a sampler name from params eval.samplers")
    p.add_argument("--out", required=True, help="the .npz to write")
    p.add_argument("--no-labels", action="store_true", help="only arr_0 (no arr_1 labels)")

    p = stage_parser(
        sub,
        "generate",
        cmd_generate,
        "images from a run or a weights file (a PNG grid or one PNG per seed), like DiT's sample.py",
    )
    p.add_argument("--run", default=None, help="a run of --params (its final checkpoint)")
    p.add_argument(
        "--weights",
        type=weight_set,
        default="ema",
        help="ema, raw or phema-<σ_rel>; with an official .pt snapshot: ema or raw",
    )
    p.add_argument(
        "--checkpoint",
        default=None,
        help="a .safetensors of this project's DiT weights, or an official α-Flow .pt snapshot",
    )
    p.add_argument(
        "--model",
        default=None,
        help="--checkpoint .safetensors: the DiT preset (default: the preset whose shapes the weights have)",
    )
    p.add_argument("--model-overrides", default=None, help="JSON preset overrides, e.g. '{\"depth\": 1}'")
    p.add_argument(
        "--vae",
        default=None,
        help="--checkpoint: SD-VAE directory or official sd_vae_ft_ema.pt "
        "(default: pixel space, for 1 or 3 latent channels)",
    )
    p.add_argument("--classes", default="0", help="class labels, taken cyclically by the seeds, e.g. 207,360,387,974")
    p.add_argument("--seeds", default="0-15", help="seeds: inclusive ranges and lists, e.g. 0-15 or 1,4,7-9")
    p.add_argument("--nfe", type=int, choices=[1, 2], default=1, help="1: t_steps [1, 0]; 2: [1, 0.5, 0]")
    p.add_argument("--mode", choices=["ode", "consistency"], default="ode")
    p.add_argument(
        "--protocol",
        choices=["alphaflow", "default"],
        default="alphaflow",
        help="noise streams and uint8 rounding (alphaflow: the official code's)",
    )
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--nrow", type=int, default=None, help="images per grid row (default: min(N, 8))")
    p.add_argument("--out", required=True, help="grid.png, or a folder ending in / for one PNG per seed")
    p.set_defaults(params=None)  # --checkpoint needs no profile; --run needs --params

    stage_parser(sub, "report", cmd_report, "tables (MD/CSV/TeX) and plots")

    p = stage_parser(
        sub, "phema", cmd_phema, "post-hoc EMA: reconstruct the weights of any σ_rel from a run's snapshots"
    )
    p.add_argument("--run", required=True)
    p.add_argument("--sigma-rel", type=float, action="append", required=True, help="relative EMA width, e.g. 0.07")
    p.add_argument("--step", type=int, default=None, help="reconstruct at this earlier step (default: the last)")

    p = stage_parser(
        sub,
        "dvc-pipeline",
        cmd_dvc_pipeline,
        "write the profile's DVC pipeline (dvc.yaml or pipelines/<profile>/dvc.yaml) from the DAG",
    )
    p.add_argument("--check", action="store_true", help="only compare: exit 1 when the file is not current")

    p = stage_parser(sub, "track-replay", cmd_track_replay, "log what MLflow missed of a run's metrics.jsonl")
    p.add_argument("--run", required=True)

    p = stage_parser(sub, "plan", cmd_plan, "estimated device-hours and wall time of every run (measured step costs)")
    p.add_argument("--gpu", default=None, help="GPU name as measured, e.g. H200")
    p.add_argument("--gpus", type=int, default=None, help="GPUs per run (default: the run's SLURM resources)")
    p.add_argument("--threads", type=int, default=None, help="CPU: the measured thread count to use")
    p.add_argument(
        "--bench",
        default=None,
        help="folder of the measured JSON tables (default: the package's copy of benchmarks/results)",
    )

    p = stage_parser(sub, "launch", cmd_launch, "run a stage as a submitit job (SLURM, local, debug)")
    p.add_argument(
        "--stage",
        required=True,
        choices=["prepare", "encode", "train", "classifier", "reference", "sample", "evaluate"],
    )
    p.add_argument("--run", default=None, help="run name (train: per-run resources)")
    p.add_argument(
        "--executor", choices=["slurm", "local", "debug", "none"], default=None, help="overrides params `executor`"
    )
    p.add_argument(
        "--array-parts",
        type=int,
        default=None,
        help="data-parallel stages: one array task per part (adds --part I --num-parts N)",
    )
    p.add_argument("stage_args", nargs=argparse.REMAINDER, help="-- then the stage's own arguments")
    return ap


def main(argv=None):
    args = build_parser().parse_args(argv)
    if getattr(args, "stage_args", None) and args.stage_args[0] == "--":
        args.stage_args = args.stage_args[1:]
    try:
        params = load_params(args.params, args.overrides) if args.params is not None else None
        return args.fn(args, params) or 0
    except UserError as err:
        return report_user_error(err)


def report_user_error(err):
    """Prints `alphaflow: <message>` (after the traceback when $ALPHAFLOW_DEBUG is set); returns exit code 2."""
    if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
        traceback.print_exc()
    print(f"alphaflow: {err}", file=sys.stderr)
    return USER_ERROR_EXIT


if __name__ == "__main__":
    sys.exit(main())
