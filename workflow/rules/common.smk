# Paths, the params each rule's output depends on, and the command line of a stage (shared by every rule file).
#
# A rule's `params: reads=` is alphaflow.provenance.stage_reads: the params values its output depends on.
# Snakemake re-runs a job whose `reads` changed (its params trigger) and everything downstream of it; the
# stage itself compares the same values (its fingerprint) with what produced an existing output. The shell
# command is built once at parse time (wildcards as placeholders), so where or how a stage runs (executor,
# resources, --set overrides of other keys) never re-runs anything.
import shlex

from alphaflow.config import eval_jobs, validate_eval_jobs
from alphaflow.presets import PRESETS
from alphaflow.provenance import stage_reads

GPU_STAGES = {"encode", "train", "classifier", "reference", "sample", "evaluate"}
DATA = P.raw["data"]["name"]
WEIGHTS = P.raw["eval"]["weights"]
SAMPLERS = list(P.samplers)
RUNS = P.run_names
# Scheduling order when cores are scarce: the critical path (data → latents → training) first, so the
# long training jobs start at once and sampling/evaluation of finished runs fill the idle cores.
PRIORITY = {"encode": 40, "train": 30, "classifier": 20, "reference": 20}


def train_priority(w):
    """30 + (0, 1]: the costliest training first (longest-processing-time order keeps cores busy)."""
    return PRIORITY["train"] + train_cost(w.run) / max(map(train_cost, RUNS))


def train_cost(run):
    """Relative compute of a run: steps × batch × depth × width² × tokens (patch² per token)."""
    cfg = P.run(run)
    arch = {**PRESETS[cfg.model], **cfg.model_overrides}
    return cfg.steps * cfg.batch_size * arch["depth"] * arch["hidden_size"] ** 2 / arch["patch_size"] ** 2
EVAL_JOBS = eval_jobs(P.raw["eval"])
validate_eval_jobs(P.raw, EXECUTOR)  # eval.jobs run: the in-process executor only
RUN_CELLS = [(w, s) for r, w, s in P.evaluation_cells() if r == RUNS[0]]  # the same cells for every run
NEEDS_CLASSIFIER = any(m in ("fd_classifier", "is_classifier") for m in P.raw["eval"]["metrics"])


def data_manifest(split):
    return f"{P.data_dir(split)}/manifest.json"


LATENTS = f"{P.latent_dir()}/manifest.json"
CLASSIFIER = str(P.classifier_path())    # the paths the stages write (alphaflow.config.Params)
REFERENCE = str(P.reference_marker())


def final_state(run):
    return f"{P.run_dir(run)}/checkpoints/final/state.json"


def literal(text):
    """Text that Snakemake's shell formatting must leave alone (braces in --set values)."""
    return text.replace("{", "{{").replace("}", "}}")


def stage_cmd(stage, args="", run=None, parts=1):
    """`alphaflow <stage> ...` in-process, or `alphaflow launch` through submitit for GPU stages.
    `args` and `run` may hold wildcard placeholders ({wildcards.run}); the rest is taken literally."""
    common = literal(f"--params {shlex.quote(PARAMS_FILE)}" + "".join(f" --set {shlex.quote(o)}" for o in OVERRIDES))
    if EXECUTOR == "none" or stage not in GPU_STAGES:
        if parts > 1:  # sequential parts, same files as the array job would write
            return " && ".join(f"alphaflow {stage} {common} --quiet {args} --part {i} --num-parts {parts}"
                               for i in range(parts))
        return f"alphaflow {stage} {common} --quiet {args}".strip()
    launch = f"alphaflow launch {common} --stage {stage} --executor {EXECUTOR}"
    if run:
        launch += f" --run {run}"
    if parts > 1:
        launch += f" --array-parts {parts}"
    return f"{launch} -- --quiet {args}".strip()


def stage_shell(cmd, threads=True):
    """The rule's shell line: the command with its log (and the rule's thread count for OpenMP)."""
    omp = "OMP_NUM_THREADS={threads} " if threads else ""
    return f"{omp}{cmd} > {{log}} 2>&1"


# Inputs and outputs of the train, sample and evaluate rules.
def train_inputs(w):
    released = P.checkpoint_file(w.run)
    if released is not None:
        return [str(released), data_manifest("train")]
    inputs = [LATENTS]
    if P.run(w.run).eval_every:  # in-training FD_clf needs the classifier and its reference statistics
        inputs += [CLASSIFIER, REFERENCE]
    source = P.run(w.run).init_from
    if P.init_file(w.run) is not None:
        inputs.append(str(P.init_file(w.run)))
    elif source:
        inputs.append(final_state(source))
    return inputs


def run_cells_reads(w):
    """What a run's sample_evaluate job reads: every cell's sample and evaluate reads."""
    return {f"{weights}/{sampler}": {"sample": stage_reads(P, "sample", weights=weights, sampler=sampler),
                                     "evaluate": stage_reads(P, "evaluate", weights=weights)}
            for weights, sampler in RUN_CELLS}


def samples_done(run, weights, sampler):
    return f"{P.run_dir(run)}/samples/{weights}/{sampler}/done.json"


def eval_json(run, weights, sampler):
    return str(P.eval_file(run, weights, sampler))
