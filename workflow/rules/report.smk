# Tables (paper Table 1/2 shape, paper numbers beside ours; MD/CSV/TeX) and plots. Runs locally.
# `snakemake --report report.html` after a run collects Table 1, every evaluation and the plots with captions.
TABLES = f"{RESULTS}/tables/{P.profile}"
PLOTS = f"{RESULTS}/plots/{P.profile}"


rule report:
    input:
        [eval_json(r, w, s) for r, w, s in P.evaluation_cells()],
    output:
        f"{TABLES}/table1.md",
        # output[1]: table1.rst shows this file under its caption
        report(f"{TABLES}/table1.csv", caption="../report/table1.rst", category="Tables", labels={"table": "Table 1"}),
        report(f"{TABLES}/results.csv", caption="../report/results.rst", category="Tables",
               labels={"table": "every evaluation"}),
        f"{TABLES}/complete.json",
        report(directory(PLOTS), patterns=["{name}.png"], caption="../report/plots.rst", category="Plots",
               subcategory=lambda w: "Sample sheets" if w.name.startswith("samples_") else "Figures",  # apart
               labels={"figure": "{name}"}),
    params:
        reads=stage_reads(P, "report"),
    log:
        f"{RESULTS}/logs/report-{P.profile}.log",
    conda:
        "../envs/alphaflow.yaml"
    shell:
        stage_shell(stage_cmd("report"), threads=False)
