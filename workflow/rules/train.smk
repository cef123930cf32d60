# One training job per run of the profile. A run with init_from (XL-2-plus) waits for its source.
# The rule re-runs when the run's settings change (params fingerprint) or its step count grows;
# an interrupted run resumes from its latest checkpoint.


def train_inputs(w):
    inputs = [LATENTS]
    if P.run(w.run).eval_every:  # in-training FD_clf needs the classifier and its reference statistics
        inputs += [CLASSIFIER, REFERENCE]
    source = P.run(w.run).init_from
    if source:
        inputs.append(final_state(source))
    return inputs


rule train:
    input:
        train_inputs,
    output:
        final_state("{run}"),
    wildcard_constraints:
        run="|".join(map(re.escape, RUNS)),
    params:
        cmd=lambda w: stage_cmd("train", f"--run {w.run}", run=w.run),
        fingerprint=lambda w: P.run(w.run).fingerprint(),
        steps=lambda w: P.run(w.run).steps,
    threads: 1   # tiny CPU runs: two 1-thread trainings beat one 2-thread run; GPU jobs ignore this
    priority: train_priority
    log:
        f"{RESULTS}/logs/train-{{run}}.log",
    shell:
        "OMP_NUM_THREADS={threads} {params.cmd} > {log} 2>&1"
