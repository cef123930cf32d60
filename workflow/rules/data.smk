# Images → checksummed shards (train + held-out split) → latents; the demo metric's classifier;
# reference feature statistics of held-out real images.
from alphaflow.stages import reference_split


rule prepare:
    output:
        data_manifest("{split}"),
    wildcard_constraints:
        split="train|test",
    params:
        cmd=lambda w: stage_cmd("prepare", f"--split {w.split}"),
        data=P.raw["data"],
    log:
        f"{RESULTS}/logs/prepare-{{split}}.log",
    shell:
        "OMP_NUM_THREADS={threads} {params.cmd} > {log} 2>&1"


ENCODE_PARTS = P.raw["encoder"].get("parts", 1)


rule encode:
    input:
        data_manifest("train"),
    output:
        LATENTS,
    params:
        cmd=(stage_cmd("encode", "", parts=ENCODE_PARTS)
             + (f" && {stage_cmd('encode', f'--finalize --num-parts {ENCODE_PARTS}')}" if ENCODE_PARTS > 1 else "")),
        encoder=P.raw["encoder"],
    threads: 2
    priority: PRIORITY["encode"]
    log:
        f"{RESULTS}/logs/encode.log",
    shell:
        "OMP_NUM_THREADS={threads} {params.cmd} > {log} 2>&1"


rule classifier:
    input:
        data_manifest("train"),
        data_manifest("test"),
    output:
        CLASSIFIER,
    params:
        cmd=stage_cmd("classifier"),
        epochs=P.raw["eval"].get("classifier_epochs", 2),
    threads: 2
    priority: PRIORITY["classifier"]
    log:
        f"{RESULTS}/logs/classifier.log",
    shell:
        "OMP_NUM_THREADS={threads} {params.cmd} > {log} 2>&1"


rule reference:
    input:
        data_manifest(reference_split(P)),
        CLASSIFIER if NEEDS_CLASSIFIER else [],
    output:
        REFERENCE,
    params:
        cmd=stage_cmd("reference"),
        metrics=P.raw["eval"]["metrics"],
        ref_samples=P.raw["eval"].get("ref_samples"),
    threads: 2
    priority: PRIORITY["reference"]
    log:
        f"{RESULTS}/logs/reference.log",
    shell:
        "OMP_NUM_THREADS={threads} {params.cmd} > {log} 2>&1"
