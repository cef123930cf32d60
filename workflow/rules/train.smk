# One training job per run of the profile. A run with init_from (XL-2-plus) waits for its source.
# The rule re-runs when the run's weight-changing settings or its step count change (`reads`), or its
# inputs do; `alphaflow train` then retrains (other settings or data), extends (more steps) or resumes.
# A run with `checkpoint:` (a released file) is imported instead: its inputs are the file and the data's
# manifest (for the label count), and `alphaflow train` re-imports only when the file's sha256 changed.


rule train:
    input:
        train_inputs,
    output:
        final_state("{run}"),
    wildcard_constraints:
        run="|".join(map(re.escape, RUNS)),
    params:
        reads=lambda w: stage_reads(P, "train", run=w.run),
        steps=lambda w: P.run(w.run).steps,
    threads: 1   # tiny CPU runs: two 1-thread trainings beat one 2-thread run; GPU jobs ignore this
    priority: train_priority
    log:
        f"{RESULTS}/logs/train-{{run}}.log",
    benchmark:  # wall time and memory of the job (s, max_rss, …): `make demo` prints one beside its own
        f"{RESULTS}/benchmarks/train-{{run}}.tsv"
    conda:
        "../envs/alphaflow.yaml"
    shell:
        stage_shell(stage_cmd("train", "--run {wildcards.run}", run="{wildcards.run}"))
