"""eval.protocol (the official α-Flow sampling protocol), ADM .npz batches and `alphaflow generate`."""

import io
import shutil

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from alphaflow import evaluate as E
from alphaflow import samples as S
from alphaflow.config import ParamsError, load_params
from alphaflow.data.encoders import IdentityEncoder, to_uint8
from alphaflow.errors import InvalidInputError, MissingInputError
from alphaflow.sampling import SeededNoise, protocol_noise, sample
from helpers import ROOT, randomized

SHAPE = (4, 8, 8)


@pytest.fixture(scope="module")
def net4():
    from alphaflow.models import build_model

    net = build_model("T/2", num_classes=5, input_size=8, in_channels=4, depth=1, hidden_size=32, num_heads=2)
    return randomized(net).eval()


# ----------------------------------------------------------------------------
# The official noise streams, restated.


def official_consistency(net, seed, label, t_steps, shape=SHAPE):
    """The official code, one seed: torch.Generator(seed mod 2**32), first draw float32 [1,C,H,W] = z_1, each
    consistency step's ε′ the next float64 [1,C,H,W] draw of the same generator; float64 updates."""
    g = torch.Generator("cpu").manual_seed(seed % 2**32)
    z = torch.randn([1, *shape], generator=g).to(torch.float64)
    y = torch.tensor([label])
    for t_n, t_m in zip(t_steps[:-1], t_steps[1:]):
        ones = torch.ones(1)
        u = net(z.float(), ones * 0.0, ones * t_n, y).to(torch.float64)
        x0 = z - t_n * u
        z = x0 if t_m == 0 else (1 - t_m) * x0 + t_m * torch.randn([1, *shape], generator=g, dtype=torch.float64)
    return z


@pytest.mark.parametrize("seed", [0, 7, 2**32 + 7, 123456789])
def test_alphaflow_streams_equal_the_official_code_for_a_2_step_consistency_sampler(net4, seed):
    t_steps = [1.0, 0.5, 0.0]
    noise, fresh = protocol_noise([seed], SHAPE, protocol="alphaflow")
    g = torch.Generator("cpu").manual_seed(seed % 2**32)
    assert noise.dtype == torch.float32 and torch.equal(noise, torch.randn([1, *SHAPE], generator=g))
    got = sample(net4, noise, torch.tensor([3]), t_steps, mode="consistency", generator=fresh)
    assert torch.equal(got, official_consistency(net4, seed, 3, t_steps))


def test_alphaflow_streams_are_per_seed_whatever_the_batch(net4):
    seeds, labels, t_steps = [4, 0, 2**32 + 1], torch.tensor([1, 2, 3]), [1.0, 0.5, 0.0]
    noise, fresh = protocol_noise(seeds, SHAPE, protocol="alphaflow")
    batch = sample(net4, noise, labels, t_steps, mode="consistency", generator=fresh)
    for i, seed in enumerate(seeds):
        torch.testing.assert_close(
            batch[i : i + 1], official_consistency(net4, seed, int(labels[i]), t_steps), rtol=1e-5, atol=1e-5
        )  # batched kernels: float32 rounding only
    # seed 2**32 + 1 is seed 1 of the official code (seed mod 2**32), not of the default stream
    assert torch.equal(
        protocol_noise([2**32 + 1], SHAPE, protocol="alphaflow")[0], protocol_noise([1], SHAPE, protocol="alphaflow")[0]
    )


def test_ode_sampling_draws_no_more_noise(net4):
    noise, fresh = protocol_noise([5], SHAPE, protocol="alphaflow")
    before = fresh.generators[0].get_state()
    sample(net4, noise, torch.tensor([0]), [1.0, 0.5, 0.0], mode="ode", generator=fresh)
    assert torch.equal(fresh.generators[0].get_state(), before)


def old_generate(net, encoder, seeds, labels, sampler):
    """samples.generate as it was before eval.protocol (the default protocol must stay bit-identical)."""
    shape = (net.in_channels, net.latent_mean.shape[-2], net.latent_mean.shape[-1])
    noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s % (1 << 63))) for s in seeds])
    fresh = SeededNoise([s + (1 << 40) for s in seeds])
    x = sample(net, noise, torch.as_tensor(labels), sampler["t_steps"], mode=sampler["mode"], generator=fresh)
    return ((net.denormalize(x.float()) + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)


@pytest.mark.parametrize("mode", ["ode", "consistency"])
def test_the_default_protocol_is_the_old_code_bit_for_bit(net4, mode):
    import contextlib

    seeds, labels = [0, 3, 2**40, 2**33 + 2], [0, 1, 2, 4]
    sampler = {"t_steps": [1.0, 0.4, 0.0], "mode": mode}
    new = S.generate(net4, IdentityEncoder(), seeds, labels, sampler, torch.device("cpu"), contextlib.nullcontext)
    assert torch.equal(new, old_generate(net4, IdentityEncoder(), seeds, labels, sampler))
    official = S.generate(
        net4, IdentityEncoder(), seeds, labels, sampler, torch.device("cpu"), contextlib.nullcontext, "alphaflow"
    )
    assert not torch.equal(official, new)


def test_uint8_truncation_vs_rounding_on_edge_values():
    y = torch.tensor([0.999, 1.6, 127.7, 254.6, 254.999, -3.0, 300.0], dtype=torch.float64)
    x = y / 127.5 - 1
    assert to_uint8(x, "truncate").tolist() == [0, 1, 127, 254, 254, 0, 255]
    assert to_uint8(x, "round").tolist() == [1, 2, 128, 255, 255, 0, 255]
    assert torch.equal(to_uint8(x), to_uint8(x, "round"))
    official = ((x.float() + 1) * 127.5).clamp(0, 255).to(torch.uint8)
    assert torch.equal(to_uint8(x, "truncate"), official)
    assert torch.equal(IdentityEncoder().decode(x.view(1, 1, 1, -1), rounding="truncate").flatten(), official)
    with pytest.raises(ValueError, match="rounding"):
        to_uint8(x, "floor")


# ----------------------------------------------------------------------------
# Params and fingerprints


def test_paper_profile_uses_the_alphaflow_protocol_and_the_demo_keeps_default():
    from alphaflow.provenance import stage_reads

    paper, demo = load_params(ROOT / "params/paper.yaml"), load_params(ROOT / "params/default.yaml")
    assert paper.raw["eval"]["protocol"] == "alphaflow"
    assert "protocol" not in demo.raw["eval"]
    sampler = next(iter(demo.samplers))
    reads = stage_reads(demo, "sample", weights="ema", sampler=sampler)
    assert "protocol" not in reads  # the default protocol's fingerprints are what they were
    explicit = load_params(ROOT / "params/default.yaml", ["eval.protocol=default"])
    assert stage_reads(explicit, "sample", weights="ema", sampler=sampler) == reads
    official = load_params(ROOT / "params/default.yaml", ["eval.protocol=alphaflow"])
    assert stage_reads(official, "sample", weights="ema", sampler=sampler)["protocol"] == "alphaflow"
    assert stage_reads(official, "evaluate", weights="ema") == stage_reads(demo, "evaluate", weights="ema")
    assert "protocol" not in stage_reads(demo, "reference")  # real images untouched: fingerprint as before
    assert stage_reads(official, "reference")["protocol"] == "alphaflow"  # round-tripped real images


# ----------------------------------------------------------------------------
# The real images' float32 round trip of the official evaluation, restated.


def official_rearrange(videos_uint8, resize):
    """The official detectors' real-image path for one frame per video ([b, 1, c, h, w] uint8): flatten, then
    maybe_rescale_uint8_to_fp32, area resize, maybe_rescale_fp32_to_uint8, each as the official code writes it."""
    x = videos_uint8.flatten(0, 1)
    x = x.float().mul_(2 / 255).sub_(1)
    x = torch.nn.functional.interpolate(x, size=resize, mode="area")
    return x.add_(1).mul_(255 / 2).clamp_(0, 255).byte()


@pytest.mark.parametrize("hw", [(16, 16), (28, 28), (3, 5)])
def test_real_round_trip_equals_the_official_real_image_path(hw):
    from alphaflow.data.encoders import official_real_round_trip

    g = torch.Generator().manual_seed(hw[0])
    images = torch.randint(0, 256, (6, 3, *hw), generator=g, dtype=torch.uint8)
    images[0].view(-1)[:256] = torch.arange(256, dtype=torch.uint8)[: images[0].numel()]  # every value once
    assert torch.equal(official_real_round_trip(images), official_rearrange(images.unsqueeze(1), hw))


def test_real_round_trip_maps_1_to_47_one_down_and_keeps_the_rest():
    from alphaflow.data.encoders import official_real_round_trip

    values = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16)
    out = official_real_round_trip(values).flatten().long()
    moved = [v for v in range(256) if out[v] != v]
    assert moved == list(range(1, 48))
    assert all(out[v] == v - 1 for v in moved)
    with pytest.raises(ValueError, match="uint8"):
        official_real_round_trip(values.float())


def test_the_alphaflow_protocol_scores_against_round_tripped_real_images(tmp_path, tiny_latents):
    """Reference statistics under eval.protocol alphaflow are those of the round-tripped images, cached apart;
    the default protocol keeps the untouched images and their cache key."""
    from helpers import tiny_params_dict

    from alphaflow.data.encoders import official_real_round_trip
    from alphaflow.reference import content_hash, reference, reference_images, reference_stats_for

    shutil.copytree(tiny_latents / "results", tmp_path / "results")
    d = tiny_params_dict(tmp_path / "results", tiny_latents / "images")
    d["eval"]["metrics"] = ["fid"]
    (tmp_path / "default.yaml").write_text(yaml.safe_dump(d))
    d["eval"]["protocol"] = "alphaflow"
    (tmp_path / "official.yaml").write_text(yaml.safe_dump(d))
    default, official = load_params(tmp_path / "default.yaml"), load_params(tmp_path / "official.yaml")

    plain, labels, manifest = reference_images(default)
    tripped, labels2, manifest2 = reference_images(official)
    assert torch.equal(tripped, official_real_round_trip(plain)) and not torch.equal(tripped, plain)
    assert torch.equal(labels, labels2)
    assert content_hash(manifest, len(plain)) != content_hash(manifest2, len(tripped))

    cache = tmp_path / "results" / "reference"
    summary_default = reference(default, device="cpu")
    files_default = {f.name for f in cache.glob("inception-fid-ts-*.safetensors")}
    mu_d, _ = reference_stats_for(default, "inception-fid-ts", plain, manifest)
    summary_official = reference(official, device="cpu")
    files_official = {f.name for f in cache.glob("inception-fid-ts-*.safetensors")}
    mu_o, _ = reference_stats_for(official, "inception-fid-ts", tripped, manifest2)
    assert summary_default["fingerprint"] != summary_official["fingerprint"]
    assert len(files_official) == 1 and files_official.isdisjoint(files_default)  # a cache key of its own
    assert not np.array_equal(mu_d, mu_o)


def test_adm_protocol_needs_its_reference_and_fid(tmp_path):
    demo = ROOT / "params/default.yaml"
    with pytest.raises(ParamsError, match="eval.adm_reference"):
        load_params(demo, ["eval.protocol=adm"])
    with pytest.raises(ParamsError, match="eval.protocol"):
        load_params(demo, ["eval.protocol=official"])
    with pytest.raises(ParamsError, match="eval.adm_reference"):
        load_params(demo, ["eval.adm_reference=ref.npz"])
    with pytest.raises(ParamsError, match="eval.metrics"):
        load_params(demo, ["eval.protocol=adm", "eval.adm_reference=ref.npz", "eval.metrics=[fd_classifier]"])
    p = load_params(demo, ["eval.protocol=adm", "eval.adm_reference=ref.npz", "eval.metrics=[fid]"])
    from alphaflow.provenance import stage_reads

    assert stage_reads(p, "sample", weights="ema", sampler=next(iter(p.samplers)))["protocol"] == "alphaflow"
    assert stage_reads(p, "evaluate", weights="ema")["adm_reference"] == "ref.npz"


# ----------------------------------------------------------------------------
# ADM .npz batches


def test_adm_reference_round_trip_and_object_arrays_refused(tmp_path):
    from alphaflow.adm import load_adm_reference

    rng = np.random.default_rng(0)
    mu, a = rng.normal(size=6), rng.normal(size=(6, 6))
    np.savez(tmp_path / "ref.npz", mu=mu.astype(np.float32), sigma=(a @ a.T), arr_0=np.zeros((2, 4, 4, 3), np.uint8))
    got_mu, got_sigma = load_adm_reference(tmp_path / "ref.npz")
    assert got_mu.dtype == np.float64 and np.array_equal(got_mu, mu.astype(np.float32))
    assert np.array_equal(got_sigma, a @ a.T)
    np.savez(tmp_path / "obj.npz", mu=mu, sigma=np.array([{"x": 1}], dtype=object))
    with pytest.raises(InvalidInputError, match="object arrays"):
        load_adm_reference(tmp_path / "obj.npz")
    np.savez(tmp_path / "samples.npz", arr_0=np.zeros((2, 4, 4, 3), np.uint8))
    with pytest.raises(InvalidInputError, match="mu"):
        load_adm_reference(tmp_path / "samples.npz")
    with pytest.raises(MissingInputError):
        load_adm_reference(tmp_path / "absent.npz")


def test_adm_sample_batch_round_trip(tmp_path):
    from alphaflow.adm import write_adm_npz

    images = torch.randint(0, 256, (5, 1, 6, 7), dtype=torch.uint8)
    write_adm_npz(tmp_path / "s.npz", images, torch.tensor([0, 1, 2, 3, 4]))
    with np.load(tmp_path / "s.npz", allow_pickle=False) as npz:
        assert npz["arr_0"].dtype == np.uint8 and npz["arr_0"].shape == (5, 6, 7, 3)
        assert np.array_equal(npz["arr_0"], images.expand(-1, 3, -1, -1).permute(0, 2, 3, 1).numpy())
        assert npz["arr_1"].dtype == np.int64 and npz["arr_1"].tolist() == [0, 1, 2, 3, 4]
    rgb = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    write_adm_npz(tmp_path / "rgb.npz", rgb)
    with np.load(tmp_path / "rgb.npz", allow_pickle=False) as npz:
        assert npz.files == ["arr_0"] and np.array_equal(npz["arr_0"], rgb.permute(0, 2, 3, 1).numpy())


# ----------------------------------------------------------------------------
# A tiny trained run: the sample stage under the protocol, export-npz, `alphaflow generate`.


@pytest.fixture(scope="module")
def official_run(tmp_path_factory, tiny_latents):
    """A tiny project (eval.protocol alphaflow) with one finished run and its 2-NFE consistency samples."""
    from helpers import trained_tiny_project

    params = trained_tiny_project(tmp_path_factory.mktemp("protocol"), tiny_latents, protocol="alphaflow")
    S.sample_run(params, "alphaflow-tiny", "ema", "2nfe-cons-0.5", device="cpu", quiet=True)
    return params


def read_png(path):
    return torch.from_numpy(np.array(Image.open(io.BytesIO(path.read_bytes())).convert("RGB"))).permute(2, 0, 1)


def test_export_npz_of_a_sample_set(official_run, tmp_path):
    from alphaflow.cli import main

    params = official_run
    out = tmp_path / "batch.npz"
    assert (
        main(
            [
                "export-npz",
                "--params",
                params.path,
                "--run",
                "alphaflow-tiny",
                "--weights",
                "ema",
                "--sampler",
                "2nfe-cons-0.5",
                "--out",
                str(out),
                "--quiet",
            ]
        )
        == 0
    )
    images, labels = S.load_samples(params.samples_dir("alphaflow-tiny", "ema", "2nfe-cons-0.5"))
    with np.load(out, allow_pickle=False) as npz:
        assert np.array_equal(npz["arr_0"], images.permute(0, 2, 3, 1).numpy())
        assert np.array_equal(npz["arr_1"], labels.numpy())
    # No finished sample set: one clear line, exit 2.
    assert (
        main(
            [
                "export-npz",
                "--params",
                params.path,
                "--run",
                "alphaflow-tiny",
                "--weights",
                "raw",
                "--sampler",
                "1nfe",
                "--out",
                str(tmp_path / "x.npz"),
            ]
        )
        == 2
    )


def test_generate_equals_the_sample_stage_and_is_deterministic(official_run, tmp_path):
    from alphaflow.cli import main

    params = official_run
    images, labels = S.load_samples(params.samples_dir("alphaflow-tiny", "ema", "2nfe-cons-0.5"))
    n = len(images)
    # balanced labels: seed i → i mod 3, i.e. --classes 0,1,2 taken cyclically
    assert labels.tolist() == [i % 3 for i in range(n)]
    common = [
        "generate",
        "--params",
        params.path,
        "--run",
        "alphaflow-tiny",
        "--weights",
        "ema",
        "--classes",
        "0,1,2",
        "--seeds",
        f"0-{n - 1}",
        "--nfe",
        "2",
        "--mode",
        "consistency",
        "--quiet",
    ]
    assert main(common + ["--out", str(tmp_path / "pngs") + "/"]) == 0
    files = sorted((tmp_path / "pngs").glob("sample_*.png"))
    assert [f.name for f in files] == [f"sample_{s:06d}.png" for s in range(n)]
    assert torch.equal(torch.stack([read_png(f) for f in files]), images)
    for out in ("a.png", "b.png"):
        assert main(common + ["--out", str(tmp_path / out)]) == 0
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    # the final weights file itself, with its preset given
    weights = params.run_dir("alphaflow-tiny") / "checkpoints" / "final" / "ema.safetensors"
    assert (
        main(
            [
                "generate",
                "--checkpoint",
                str(weights),
                "--model",
                "T/2",
                "--model-overrides",
                '{"depth": 1, "hidden_size": 32, "num_heads": 2}',
                "--classes",
                "0,1,2",
                "--seeds",
                "0-4,7",
                "--nfe",
                "2",
                "--mode",
                "consistency",
                "--out",
                str(tmp_path / "ck") + "/",
                "--quiet",
            ]
        )
        == 0
    )
    for s in (0, 1, 2, 3, 4):
        assert torch.equal(read_png(tmp_path / "ck" / f"sample_{s:06d}.png"), images[s])
    # seed 7 is the 6th seed given: it takes classes[5 % 3] = 2, not 7 mod 3 = 1
    assert (tmp_path / "ck" / "sample_000007.png").exists()
    # shapes that match no preset: --model is needed, said in one line
    assert main(["generate", "--checkpoint", str(weights), "--seeds", "0", "--out", str(tmp_path / "z.png")]) == 2


def test_generate_argument_errors(official_run, tmp_path):
    from alphaflow.cli import main
    from alphaflow.generate import parse_int_list

    assert parse_int_list("0-3,7,9-10", "--seeds") == [0, 1, 2, 3, 7, 9, 10]
    with pytest.raises(ParamsError):
        parse_int_list("3-1", "--seeds")
    with pytest.raises(ParamsError):
        parse_int_list("a", "--seeds")
    base = ["generate", "--params", official_run.path, "--run", "alphaflow-tiny", "--quiet"]
    assert main(base + ["--classes", "9", "--out", str(tmp_path / "g.png")]) == 2  # 3 classes only
    assert main(base + ["--out", str(tmp_path / "g.jpg")]) == 2  # not .png nor a folder
    assert main(["generate", "--seeds", "0", "--out", str(tmp_path / "g.png")]) == 2  # no --run / --checkpoint


def test_generate_from_an_official_snapshot(tmp_path):
    """`--checkpoint X.pt`: an official α-Flow snapshot (here pixel-space shapes, 3 channels: no VAE needed)."""
    import contextlib

    from alphaflow.cli import main
    from alphaflow.data import IdentityEncoder
    from alphaflow.official import build_official_model
    from helpers import write_snapshot

    path = tmp_path / "alphaflow-T-2.pt"
    write_snapshot(path, depth=4, hidden=128, rows=1000, channels=3, size=8)
    assert (
        main(
            [
                "generate",
                "--checkpoint",
                str(path),
                "--weights",
                "raw",
                "--classes",
                "207,360",
                "--seeds",
                "0-3",
                "--nfe",
                "2",
                "--out",
                str(tmp_path / "out") + "/",
                "--quiet",
            ]
        )
        == 0
    )
    net, preset = build_official_model(path, "raw")
    assert preset == "T/2"
    expected = S.generate(
        net,
        IdentityEncoder(),
        [0, 1, 2, 3],
        [207, 360, 207, 360],
        {"t_steps": [1.0, 0.5, 0.0], "mode": "ode"},
        torch.device("cpu"),
        contextlib.nullcontext,
        "alphaflow",
    )
    for s in range(4):
        assert torch.equal(read_png(tmp_path / "out" / f"sample_{s:06d}.png"), expected[s])


def test_adm_protocol_takes_fid_against_the_adm_reference(official_run, tmp_path, monkeypatch):
    from alphaflow import metrics as M

    rng = np.random.default_rng(1)
    a = rng.normal(size=(6, 6))
    mu, sigma = rng.normal(size=6), a @ a.T + np.eye(6)
    np.savez(tmp_path / "VIRTUAL_tiny.npz", mu=mu, sigma=sigma, arr_0=np.zeros((1, 8, 8, 3), np.uint8))
    params = load_params(
        official_run.path,
        ["eval.protocol=adm", f"eval.adm_reference={tmp_path / 'VIRTUAL_tiny.npz'}", "eval.metrics=[fid]"],
    )
    features = lambda name, images, **kw: {"features": images.float().flatten(1)[:, :6]}
    monkeypatch.setattr(M, "extract_features", features)  # no Inception weights here: any 6-d features
    monkeypatch.setattr(E, "metric_plan", lambda p: [("fid", "inception-fid-ts", None)])
    images, _ = S.load_samples(official_run.samples_dir("alphaflow-tiny", "ema", "2nfe-cons-0.5"))
    got = E.evaluate_images(params, images, "cpu")["fid"]
    ev = params.raw["eval"]
    expected = M.bootstrap_fd(features("", images)["features"], mu, sigma, n_boot=ev["n_boot"], seed=params.raw["seed"])
    assert got["value"] == pytest.approx(expected["value"]) and got["low"] == pytest.approx(expected["low"])
