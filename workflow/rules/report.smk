# Tables (paper Table 1/2 shape, paper numbers beside ours; MD/CSV/TeX) and plots. Runs locally.
REPORT = [f"{RESULTS}/tables/{P.profile}/{name}" for name in ("table1.md", "results.csv", "complete.json")]


rule report:
    input:
        [eval_json(r, w, s) for r, w, s in P.evaluation_cells()],
    output:
        REPORT,
    params:
        reads=stage_reads(P, "report"),
    log:
        f"{RESULTS}/logs/report-{P.profile}.log",
    shell:
        stage_shell(stage_cmd("report"), threads=False)
