"""The declarative promise, stage by stage: a changed input never yields a stale result.

Each test changes what a stage reads on a finished output and checks that the re-run equals a from-scratch
run with the new params (bit-equal on CPU), and that a re-run with unchanged params reuses the output.
The whole-DAG versions (Snakemake, DVC, kill -9 of the DAG) are in tests/test_declarative.py.
"""

import json
import shutil

import pytest
import torch

from alphaflow import checkpoint as ckpt
from alphaflow import samples as S
from alphaflow.config import ParamsError, load_params
from alphaflow.ema import ema_beta
from alphaflow.train import train
from helpers import tiny_params_dict
from helpers import assert_bit_identical, final_tensors

RUN = "alphaflow-tiny"


def final_weights(results, run=RUN):
    return final_tensors(results, run)


@pytest.fixture
def scratch(tiny_latents, tmp_path):
    """`fresh(**defaults)` trains RUN from scratch in its own results folder and returns its weights."""
    count = [0]

    def fresh(runs=None, run=RUN, **defaults):
        count[0] += 1
        results = tmp_path / f"scratch{count[0]}"
        shutil.copytree(tiny_latents / "results", results)
        d = tiny_params_dict(results, tiny_latents / "images", **defaults)
        if runs is not None:
            d["runs"] = runs
        path = tmp_path / f"scratch{count[0]}.yaml"
        path.write_text(json.dumps(d))
        params = load_params(path)
        for name in params.run_names:
            train(params, name, tracking=False, quiet=True)
        return final_weights(results, run)

    return fresh


def test_changed_params_on_a_finished_run_retrain_it(tiny_project, scratch, capsys):
    write, results = tiny_project
    train(load_params(write(steps=4)), RUN, tracking=False, quiet=True)
    old = final_weights(results)
    train(load_params(write(steps=4, lr=5e-4, fm_ratio=0.25)), RUN, tracking=False)
    assert "changed keys: ['fm_ratio', 'lr']" in capsys.readouterr().out
    new = final_weights(results)
    assert not torch.equal(old["model"]["final_layer.linear.weight"], new["model"]["final_layer.linear.weight"])
    assert_bit_identical(new, scratch(steps=4, lr=5e-4, fm_ratio=0.25))
    # The old weights are kept aside, never mixed in; metrics.jsonl holds only the new run's records.
    superseded = list((results / "runs" / RUN / "superseded").iterdir())
    assert len(superseded) == 1 and (superseded[0] / "ema.safetensors").exists()
    steps = [json.loads(line)["step"] for line in (results / "runs" / RUN / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4]


def test_unchanged_params_reuse_the_finished_run(tiny_project):
    write, results = tiny_project
    params = load_params(write(steps=4, log_every=1, resources={"gpus_per_node": 8}))
    train(params, RUN, tracking=False, quiet=True)
    state = results / "runs" / RUN / "checkpoints" / "final" / "state.json"
    mtime = state.stat().st_mtime_ns
    # Cadence, resources and how du/dt is computed do not change the weights: nothing is retrained.
    train(load_params(write(steps=4, log_every=2, jvp_mode="split", compile=True)), RUN, tracking=False, quiet=True)
    assert state.stat().st_mtime_ns == mtime


def test_upstream_latents_change_retrains(tiny_project, capsys):
    write, results = tiny_project
    params = load_params(write(steps=2))
    train(params, RUN, tracking=False, quiet=True)
    # New data (fewer images per class) → new latents: the run's weights depend on them.
    from alphaflow.stages import encode, prepare

    params.raw["data"]["limit_per_class"] = 20
    prepare(params, "train")
    encode(params)
    train(params, RUN, tracking=False)
    assert "upstream data or code" in capsys.readouterr().out


@pytest.mark.parametrize("delete_marker", [False, True])
def test_more_steps_extend_a_finished_run_exactly(tiny_project, scratch, delete_marker):
    """A larger `steps` continues from the finished run as if launched with it; Snakemake deletes
    final/state.json before it re-runs the job, which must not strand the resume."""
    write, results = tiny_project
    train(load_params(write(steps=6, checkpoint_every=4)), RUN, tracking=False, quiet=True)
    if delete_marker:
        (results / "runs" / RUN / "checkpoints" / "final" / "state.json").unlink()
    train(load_params(write(steps=10, checkpoint_every=4)), RUN, tracking=False, quiet=True)
    assert_bit_identical(final_weights(results), scratch(steps=10, checkpoint_every=4))
    steps = [json.loads(line)["step"] for line in (results / "runs" / RUN / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4, 6, 8, 10]


def test_fewer_steps_equal_a_shorter_run(tiny_project, scratch):
    write, results = tiny_project
    # fmt: off
    train(load_params(write(steps=10)), RUN, tracking=False, quiet=True)  # keeps step-8 and step-10
    train(load_params(write(steps=8)), RUN, tracking=False, quiet=True)   # from step-8
    # fmt: on
    assert_bit_identical(final_weights(results), scratch(steps=8))
    train(load_params(write(steps=5)), RUN, tracking=False, quiet=True)  # no checkpoint ≤ 5: starts over
    assert_bit_identical(final_weights(results), scratch(steps=5))


def test_stop_after_writes_a_checkpoint_at_that_step(tiny_project, scratch):
    write, results = tiny_project
    params = load_params(write(steps=8, checkpoint_every=1000))
    train(params, RUN, tracking=False, quiet=True, stop_after=3)
    latest = json.loads((results / "runs" / RUN / "checkpoints" / "latest.json").read_text())
    assert latest["step"] == 3
    assert not (results / "runs" / RUN / "checkpoints" / "final").exists()
    train(params, RUN, tracking=False, quiet=True)
    assert_bit_identical(final_weights(results), scratch(steps=8, checkpoint_every=1000))


def test_finetune_continues_the_source_ema_with_its_half_life(tiny_project):
    """XL/2+ semantics: the fine-tune's first EMA update uses the source's step count for the ramp-up,
    so the loaded EMA is averaged with β = ema_beta(source steps), not replaced (β = 0 at step 0)."""
    write, results = tiny_project
    runs = {
        "base": {"method": "alphaflow"},
        "plus": {"method": "meanflow", "init_from": "base", "steps": 1, "lr": 0.0, "warmup_steps": 0},
    }
    params = load_params(write(runs=runs, steps=12, ema_halflife=4, ema_rampup=0.5))
    train(params, "base", tracking=False, quiet=True)
    train(params, "plus", tracking=False, quiet=True)
    base, plus = final_weights(results, "base"), final_weights(results, "plus")
    beta = ema_beta(12, 4, 0.5)
    assert 0.8 < beta < 0.9
    for k in ("final_layer.linear.weight", "x_embedder.proj.weight"):
        expected = base["ema"][k].double() * beta + base["model"][k].double() * (1 - beta)
        torch.testing.assert_close(plus["ema"][k].double(), expected, rtol=1e-6, atol=1e-7)
    state = ckpt.read_state(results / "runs" / "plus" / "checkpoints" / "final")
    assert state["ema_step_offset"] == 12
    # A retrained source invalidates the fine-tune (its fingerprint names the source's).
    from alphaflow.run_folder import train_fingerprint

    fp = train_fingerprint(params, params.run("plus"))
    train(
        load_params(
            write(runs={**runs, "base": {"method": "alphaflow", "lr": 5e-4}}, steps=12, ema_halflife=4, ema_rampup=0.5)
        ),
        "base",
        tracking=False,
        quiet=True,
    )
    assert train_fingerprint(params, params.run("plus")) != fp


def test_weights_tampered_after_training_are_refused(tiny_project):
    write, results = tiny_project
    train(load_params(write(steps=2)), RUN, tracking=False, quiet=True)
    final = results / "runs" / RUN / "checkpoints" / "final"
    ckpt.load_weights(final, "ema")
    data = bytearray((final / "ema.safetensors").read_bytes())
    data[-1] ^= 1
    (final / "ema.safetensors").unlink()  # a hard link: replace, do not write through to step-*
    (final / "ema.safetensors").write_bytes(bytes(data))
    with pytest.raises(ckpt.CheckpointError, match="does not match the sha256"):
        ckpt.load_weights(final, "ema")


def test_a_torn_latest_pointer_falls_back_to_the_newest_complete_checkpoint(tiny_project):
    write, results = tiny_project
    params = load_params(write(steps=6))
    train(params, RUN, tracking=False, quiet=True, stop_after=4)
    ckpt_dir = results / "runs" / RUN / "checkpoints"
    (ckpt_dir / "latest.json").write_text('{"dir": "step-00')
    assert ckpt.latest_checkpoint(ckpt_dir).name == "step-0000004"
    (ckpt_dir / "latest.json").write_text('{"dir": "step-0000009", "step": 9}')  # pruned/never written
    assert ckpt.latest_checkpoint(ckpt_dir).name == "step-0000004"


def test_run_names_cannot_leave_the_runs_folder(tmp_path):
    d = tiny_params_dict(tmp_path / "results", tmp_path)
    for bad in ("..", "../x", "a..b", ".hidden", "a/b"):
        d["runs"] = {bad: {"method": "fm"}}
        (tmp_path / "p.yaml").write_text(json.dumps(d))
        with pytest.raises(ParamsError, match="runs"):
            load_params(tmp_path / "p.yaml")
    d["runs"] = {"alphaflow-XL-2.5": {"method": "fm"}}
    (tmp_path / "p.yaml").write_text(json.dumps(d))
    load_params(tmp_path / "p.yaml")


# ----------------------------------------------------------------------------
# Sampling


@pytest.fixture
def sampled(tiny_project):
    write, results = tiny_project
    params = load_params(write(steps=2))
    train(params, RUN, tracking=False, quiet=True)
    return write, results


def sample_images(params, weights="ema", sampler="1nfe"):
    S.sample_run(params, RUN, weights, sampler, device="cpu", quiet=True)
    out = params.samples_dir(RUN, weights, sampler)
    return S.load_samples(out, fingerprint=S.sample_fingerprint(params, RUN, weights, sampler))[0]


def with_sampler(write, t_steps, mode="ode", **defaults):
    params = load_params(write(steps=2, **defaults))
    params.raw["eval"]["samplers"][0].update(t_steps=t_steps, mode=mode)
    return params


def test_a_changed_sampler_resamples(sampled, tmp_path):
    write, results = sampled
    one = sample_images(with_sampler(write, [1.0, 0.0]))
    two = sample_images(with_sampler(write, [1.0, 0.3, 0.0]))  # same name "1nfe", other steps
    assert not torch.equal(one, two)
    out = load_params(write(steps=2)).samples_dir(RUN, "ema", "1nfe")
    assert len(list(out.glob("chunks-*"))) == 1  # the old set is gone once the new one is done
    # From scratch (no earlier samples) the new sampler gives the same images.
    shutil.rmtree(out)
    assert torch.equal(sample_images(with_sampler(write, [1.0, 0.3, 0.0])), two)


@pytest.mark.parametrize("change", [{"labels": "random"}, {"num_samples": 36}, {"batch_size": 8}])
def test_changed_eval_settings_resample(sampled, change):
    write, results = sampled
    params = load_params(write(steps=2))
    sample_images(params)  # the set of the old settings, on disk
    params.raw["eval"].update(change)
    after = sample_images(params)
    out = params.samples_dir(RUN, "ema", "1nfe")
    shutil.rmtree(out)
    assert torch.equal(sample_images(params), after)  # equals a from-scratch sample set
    labels = S.load_samples(out)[1]
    if "labels" in change:  # the stale set had the balanced labels
        assert not torch.equal(labels, torch.arange(len(labels)) % 3)


def test_retrained_weights_resample_and_stale_samples_are_refused(sampled, tmp_path):
    write, results = sampled
    params = load_params(write(steps=2))
    sample_images(params)
    out = params.samples_dir(RUN, "ema", "1nfe")
    shutil.copytree(out, tmp_path / "old-samples")
    old_fp = S.sample_fingerprint(params, RUN, "ema", "1nfe")
    retrained = load_params(write(steps=2, lr=5e-4))
    train(retrained, RUN, tracking=False, quiet=True)
    assert not (results / "runs" / RUN / "samples" / "ema").exists()  # the retrain cleared the run's samples
    assert S.sample_fingerprint(retrained, RUN, "ema", "1nfe") != old_fp
    # Old samples put back (a restored cache, a copied folder) are refused for the new weights.
    shutil.copytree(tmp_path / "old-samples", out)
    with pytest.raises(S.ShardError, match="other weights or settings"):
        S.load_samples(out, fingerprint=S.sample_fingerprint(retrained, RUN, "ema", "1nfe"))
    sample_images(retrained)  # … and replaced by a new set
    assert [p.name for p in out.glob("chunks-*")] == [f"chunks-{S.sample_fingerprint(retrained, RUN, 'ema', '1nfe')}"]


@pytest.mark.slow
def test_compiled_training_matches_eager(scratch):
    """`compile: true` (torch.compile of the gradient forward with its tangent pass and of the teachers)
    trains the weights eager training does, up to float rounding, through FM, α-Flow and MeanFlow steps."""
    eager = scratch(steps=10)
    compiled = scratch(steps=10, compile=True)
    assert eager.keys() == compiled.keys()
    for name in eager:
        torch.testing.assert_close(compiled[name], eager[name], rtol=1e-4, atol=1e-5, msg=name)
