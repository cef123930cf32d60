# Images → checksummed shards (train + held-out split) → latents; the demo metric's classifier;
# reference feature statistics of held-out real images.


rule prepare:
    output:
        data_manifest("{split}"),
    wildcard_constraints:
        split="train|test",
    params:
        reads=lambda w: stage_reads(P, "prepare", split=w.split),
    log:
        f"{RESULTS}/logs/prepare-{{split}}.log",
    conda:
        "../envs/alphaflow.yaml"
    shell:
        stage_shell(stage_cmd("prepare", "--split {wildcards.split}"))


ENCODE_PARTS = P.raw["encoder"].get("parts", 1)


rule encode:
    input:
        data_manifest("train"),
    output:
        LATENTS,
    params:
        reads=stage_reads(P, "encode"),
    threads: 2
    priority: PRIORITY["encode"]
    log:
        f"{RESULTS}/logs/encode.log",
    conda:
        "../envs/alphaflow.yaml"
    shell:
        stage_shell(stage_cmd("encode", "", parts=ENCODE_PARTS)
                    + (f" && {stage_cmd('encode', f'--finalize --num-parts {ENCODE_PARTS}')}" if ENCODE_PARTS > 1 else ""))


rule classifier:
    input:
        data_manifest("train"),
        data_manifest("test"),
    output:
        CLASSIFIER,
    params:
        reads=stage_reads(P, "classifier"),
    threads: 2
    priority: PRIORITY["classifier"]
    log:
        f"{RESULTS}/logs/classifier.log",
    conda:
        "../envs/alphaflow.yaml"
    shell:
        stage_shell(stage_cmd("classifier"))


rule reference:
    input:
        data_manifest(P.reference_split()),
        CLASSIFIER if NEEDS_CLASSIFIER else [],
    output:
        REFERENCE,
    params:
        reads=stage_reads(P, "reference"),
    threads: 2
    priority: PRIORITY["reference"]
    log:
        f"{RESULTS}/logs/reference.log",
    conda:
        "../envs/alphaflow.yaml"
    shell:
        stage_shell(stage_cmd("reference"))
