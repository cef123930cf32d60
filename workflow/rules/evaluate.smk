# Every run × {ema, raw} × sampler: generate eval.num_samples images (array job over eval.parts),
# then metrics with bootstrap intervals, logged onto the run's MLflow run. eval.jobs cell: a sample and an
# evaluate job per cell; eval.jobs run: one sample_evaluate job per run writes the same files.
SAMPLE_PARTS = P.raw["eval"].get("parts", 1)
CELL_ARGS = "--run {wildcards.run} --weights {wildcards.weights} --sampler {wildcards.sampler}"


EVAL_WILDCARDS = dict(
    run="|".join(map(re.escape, RUNS)),
    weights="|".join(map(re.escape, WEIGHTS)),
    sampler="|".join(map(re.escape, SAMPLERS)),
)


if EVAL_JOBS == "cell":

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

else:  # eval.jobs run: one job samples and evaluates all of a run's cells (the same outputs, one process)

    rule sample_evaluate:
        input:
            lambda w: final_state(w.run),
            reference=REFERENCE,
        output:  # update(): Snakemake keeps them while the job runs, so the job keeps the cells that are current
            samples=[update(samples_done("{run}", w, s)) for w, s in RUN_CELLS],
            evals=[update(eval_json("{run}", w, s)) for w, s in RUN_CELLS],
        wildcard_constraints:
            run=EVAL_WILDCARDS["run"],
        params:
            reads=run_cells_reads,
        threads: 1
        log:
            f"{RESULTS}/logs/sample_evaluate-{{run}}.log",
        conda:
            "../envs/alphaflow.yaml"
        shell:
            stage_shell(stage_cmd("sample-evaluate", "--run {wildcards.run}"))
