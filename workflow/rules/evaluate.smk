# Every run × {ema, raw} × sampler: generate eval.num_samples images (array job over eval.parts),
# then metrics with bootstrap intervals, logged onto the run's MLflow run.
SAMPLE_PARTS = P.raw["eval"].get("parts", 1)


def samples_done(run, weights, sampler):
    return f"{P.run_dir(run)}/samples/{weights}/{sampler}/done.json"


def eval_json(run, weights, sampler):
    return f"{P.run_dir(run)}/eval/{weights}/{sampler}.json"


EVAL_WILDCARDS = dict(
    run="|".join(map(re.escape, RUNS)),
    weights="|".join(WEIGHTS),
    sampler="|".join(map(re.escape, SAMPLERS)),
)


rule sample:
    input:
        lambda w: final_state(w.run),
    output:
        samples_done("{run}", "{weights}", "{sampler}"),
    wildcard_constraints:
        **EVAL_WILDCARDS,
    params:
        cmd=lambda w: stage_cmd("sample", f"--run {w.run} --weights {w.weights} --sampler {w.sampler}",
                                parts=SAMPLE_PARTS),
        sampler=lambda w: P.samplers[w.sampler],
        num_samples=P.raw["eval"]["num_samples"],
        labels=P.raw["eval"].get("labels", "random"),
    threads: 1
    log:
        f"{RESULTS}/logs/sample-{{run}}-{{weights}}-{{sampler}}.log",
    shell:
        "OMP_NUM_THREADS={threads} {params.cmd} > {log} 2>&1"


rule evaluate:
    input:
        samples=samples_done("{run}", "{weights}", "{sampler}"),
        reference=REFERENCE,
    output:
        eval_json("{run}", "{weights}", "{sampler}"),
    wildcard_constraints:
        **EVAL_WILDCARDS,
    params:
        cmd=lambda w: stage_cmd("evaluate", f"--run {w.run} --weights {w.weights} --sampler {w.sampler}"),
        metrics=P.raw["eval"]["metrics"],
    threads: 1
    log:
        f"{RESULTS}/logs/evaluate-{{run}}-{{weights}}-{{sampler}}.log",
    shell:
        "OMP_NUM_THREADS={threads} {params.cmd} > {log} 2>&1"
