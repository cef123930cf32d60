# Tables (paper Table 1/2 shape, paper numbers beside ours; MD/CSV/TeX) and plots. Runs locally.
# `snakemake --report report.html` after a run collects Table 1, every evaluation and the plots with captions.
TABLES = f"{RESULTS}/tables/{P.profile}"
PLOTS = f"{RESULTS}/plots/{P.profile}"


rule report:
    input:
        [eval_json(r, w, s) for r, w, s in P.evaluation_cells()],
    output:
        f"{TABLES}/table1.md",
        report(f"{TABLES}/table1.csv", caption="../report/table1.rst", category="Tables"),
        report(f"{TABLES}/results.csv", caption="../report/results.rst", category="Tables"),
        f"{TABLES}/complete.json",
        report(directory(PLOTS), patterns=["{name}.png"], caption="../report/plots.rst", category="Plots"),
    params:
        reads=stage_reads(P, "report"),
    log:
        f"{RESULTS}/logs/report-{P.profile}.log",
    conda:
        "../envs/alphaflow.yaml"
    shell:
        stage_shell(stage_cmd("report"), threads=False)
