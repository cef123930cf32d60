# alphaflow DAG: prepare → encode → train(run) → sample(run, weights, sampler) → evaluate → report.
#
#   snakemake --cores 2 all                     embedded demo (params/default.yaml, stages in-process)
#   snakemake --profile slurm all               paper reproduction on SLURM (see slurm/config.yaml)
#   snakemake --config params=params/x.yaml executor=local all
#
# Every rule calls the `alphaflow` CLI; GPU stages go through `alphaflow launch` (submitit) when an
# executor is set. Params are validated (alphaflow/schemas/params.schema.yaml) before anything runs.
from alphaflow.config import load_params

PARAMS_FILE = config.get("params", "params/default.yaml")
OVERRIDES = list(config.get("set", []))
P = load_params(PARAMS_FILE, OVERRIDES)           # raises ParamsError naming key, value, allowed
EXECUTOR = config.get("executor") or P.raw.get("executor", "none")
RESULTS = str(P.results)

report: "workflow/report/workflow.rst"

include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/report.smk"


rule all:
    input:
        rules.report.output,
