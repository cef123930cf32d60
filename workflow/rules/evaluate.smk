# Every run × {ema, raw} × sampler: generate eval.num_samples images (array job over eval.parts),
# then metrics with bootstrap intervals, logged onto the run's MLflow run.
SAMPLE_PARTS = P.raw["eval"].get("parts", 1)
CELL_ARGS = "--run {wildcards.run} --weights {wildcards.weights} --sampler {wildcards.sampler}"


EVAL_WILDCARDS = dict(
    run="|".join(map(re.escape, RUNS)),
    weights="|".join(map(re.escape, WEIGHTS)),
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
        reads=lambda w: stage_reads(P, "sample", weights=w.weights, sampler=w.sampler),
    threads: 1
    log:
        f"{RESULTS}/logs/sample-{{run}}-{{weights}}-{{sampler}}.log",
    conda:
        "../envs/alphaflow.yaml"
    shell:
        stage_shell(stage_cmd("sample", CELL_ARGS, parts=SAMPLE_PARTS))


rule evaluate:
    input:
        samples=samples_done("{run}", "{weights}", "{sampler}"),
        reference=REFERENCE,
    output:
        eval_json("{run}", "{weights}", "{sampler}"),
    wildcard_constraints:
        **EVAL_WILDCARDS,
    params:
        reads=lambda w: stage_reads(P, "evaluate", weights=w.weights),
    threads: 1
    log:
        f"{RESULTS}/logs/evaluate-{{run}}-{{weights}}-{{sampler}}.log",
    conda:
        "../envs/alphaflow.yaml"
    shell:
        stage_shell(stage_cmd("evaluate", CELL_ARGS))
