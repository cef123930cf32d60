"""The demo classifier (alphaflow.classifier) and its metric (classifier-local) on real Fashion-MNIST.

One SmallCNN is trained for one epoch over 20k training images (~5 s on 2 CPU cores) and shared by
the module's tests; it reaches ~85 % held-out accuracy.
"""

import json

import pytest
import torch
import torch_fidelity
import torchvision.transforms.functional as TF

from alphaflow import classifier as C
from alphaflow import metrics as M


def fashion(split, n, offset=0):
    from alphaflow.data.embedded import load_embedded

    d = load_embedded("fashion-mnist", split)
    images = torch.from_numpy(d["images"][offset : offset + n].copy()).unsqueeze(1)  # (n, 1, 28, 28)
    return images, torch.from_numpy(d["labels"][offset : offset + n])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    x, y = fashion("train", 20000)
    xv, yv = fashion("test", 2000)
    path = tmp_path_factory.mktemp("classifier") / "fashion-mnist.safetensors"
    info = C.train_classifier(x, y, out_path=path, epochs=1, val_images=xv, val_labels=yv)
    return path, info


# ----------------------------------------------------------------------------
# Training, saving, loading


def test_train_save_load(trained):
    path, info = trained
    assert info["accuracy"] > 0.75, info
    meta = C.read_classifier_meta(path)
    assert meta["architecture"] == C.ARCHITECTURE and meta["accuracy_split"] == "val"
    assert meta["image_size"] == [28, 28] and meta["num_classes"] == 10 and meta["feature_dim"] == 128
    net = C.load_classifier(path)
    xv, yv = fashion("test", 2000)
    assert C.classifier_accuracy(net, xv, yv) == pytest.approx(info["accuracy"])
    assert not any(p.requires_grad for p in net.parameters()) and not net.training


def test_load_errors(trained, tmp_path):
    path, _ = trained
    with pytest.raises(FileNotFoundError, match="train_classifier"):
        C.load_classifier(tmp_path / "missing.safetensors")
    copy = tmp_path / "c.safetensors"
    copy.write_bytes(path.read_bytes())
    with pytest.raises(FileNotFoundError, match="metadata"):
        C.load_classifier(copy)
    meta = json.loads(C._meta_path(path).read_text())
    C._meta_path(copy).write_text(json.dumps(dict(meta, architecture="something-else")))
    with pytest.raises(ValueError, match="unknown architecture"):
        C.load_classifier(copy)


def test_train_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="uint8"):
        C.train_classifier(torch.zeros(4, 1, 8, 8), torch.zeros(4), out_path=tmp_path / "c.safetensors")
    with pytest.raises(ValueError, match="labels"):
        C.train_classifier(
            torch.zeros(4, 1, 8, 8, dtype=torch.uint8), torch.zeros(3), out_path=tmp_path / "c.safetensors"
        )


# ----------------------------------------------------------------------------
# classifier-local features


def test_classifier_features_shapes_channels_sizes(trained):
    path, _ = trained
    x, _ = fashion("test", 5)
    f = M.extract_features("classifier-local", x, weights_path=path, progress=False, batch_size=2)
    assert f["features"].shape == (5, 128) and f["logits"].shape == (5, 10) and f["features"].dtype == torch.float64
    rgb = M.extract_features("classifier-local", x.repeat(1, 3, 1, 1), weights_path=path, progress=False)
    torch.testing.assert_close(rgb["features"], f["features"], rtol=1e-4, atol=1e-4)  # RGB mean → grey
    big = M.extract_features(
        "classifier-local", TF.resize(x, [56, 56], antialias=True), weights_path=path, progress=False
    )
    assert big["features"].shape == (5, 128)


def test_classifier_metric_ranks_real_blur_noise(trained):
    """FD against 5k training images: held-out real < degraded real < pure noise; IS real > IS noise."""
    path, _ = trained
    ref = M.stats(
        M.extract_features(
            "classifier-local", fashion("train", 5000, offset=20000)[0], weights_path=path, progress=False
        )["features"]
    )
    test, _ = fashion("test", 1000, offset=2000)
    g = torch.Generator().manual_seed(0)
    noisy = (test.float() + 60 * torch.randn(test.shape, generator=g)).clamp(0, 255).to(torch.uint8)
    noise = torch.randint(0, 256, test.shape, dtype=torch.uint8, generator=g)
    sets = {"real": test, "blur": TF.gaussian_blur(test, 7, 2.0), "noisy": noisy, "noise": noise}
    fd, isc = {}, {}
    for name, x in sets.items():
        f = M.extract_features("classifier-local", x, weights_path=path, progress=False)
        fd[name] = M.fd_from_stats(*M.stats(f["features"]), *ref)
        isc[name] = M.inception_score(f["logits"])
    print(
        "classifier-local FD vs train:",
        {k: round(v, 2) for k, v in fd.items()},
        "IS:",
        {k: round(v, 2) for k, v in isc.items()},
    )
    assert fd["real"] < fd["blur"] < fd["noise"]
    assert fd["real"] < fd["noisy"] < fd["noise"]
    assert isc["real"] > 5 > isc["noise"]


def test_classifier_through_torch_fidelity_calculate_metrics(trained):
    """torch-fidelity's own pipeline with our registered extractor gives our FD."""
    path, _ = trained
    a, b = fashion("test", 200)[0], fashion("train", 200)[0]

    class Images(torch.utils.data.Dataset):
        def __init__(self, x):
            self.x = x

        def __len__(self):
            return len(self.x)

        def __getitem__(self, i):
            return self.x[i]

    out = torch_fidelity.calculate_metrics(
        input1=Images(a),
        input2=Images(b),
        fid=True,
        isc=True,
        cuda=False,
        feature_extractor="classifier-local",
        feature_extractor_weights_path=str(path),
        save_cpu_ram=True,
        verbose=False,
    )
    fa = M.extract_features("classifier-local", a, weights_path=path, progress=False)
    fb = M.extract_features("classifier-local", b, weights_path=path, progress=False)
    assert out["frechet_inception_distance"] == pytest.approx(
        M.fd_from_stats(*M.stats(fa["features"]), *M.stats(fb["features"])), rel=1e-4
    )
    assert out["inception_score_mean"] > 1
