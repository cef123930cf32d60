"""Images/s of evaluation: DiT sampling at 1 and 2 NFE, SD-VAE decoding and the metric networks.

    python benchmarks/eval_throughput.py --device cpu --threads 1 --resolution 28 --n-features 32   # the CPU demo
    python benchmarks/eval_throughput.py --device cuda --bf16 --model XL/2 --input-size 32 --channels 4 \\
        --num-classes 1000 --nfe 1 2 --sections sample vae inception dinov2 clip classifier --n 2048   # one GPU

Sections (`--sections`):
- sample: alphaflow.sampling.sample(net, noise, y, t_steps) of a DiT `--model` at each `--nfe` (1: [1, 0];
  2: [1, 0.5, 0]), random weights (the cost does not depend on them), bf16 autocast with `--bf16`;
- vae: SD-VAE decoding of `--resolution` px images, alphaflow.data.encoders.VAEEncoder.decode (bf16 autocast on
  CUDA, as the sample stage decodes) of a random-init diffusers AutoencoderKL built from the packaged
  sd-vae-ft-ema config;
- inception, dinov2, clip, classifier: alphaflow.metrics.extract_features of each metric network on uint8
  `--resolution` px images. The networks' weights come from their usual files (README "Data and weights"); where
  a file is absent, a random-init network of the same architecture stands in (saved to a temporary file and
  loaded by the same extractor; the FID Inception falls back to torchvision's Inception-v3), and the row says so.
  `--tiny` swaps in small architectures (the CPU smoke test of benchmarks/gpu_suite.sh), and the rows say that.

Prints one line per row and writes the table as JSON (read by `alphaflow plan`) and Markdown to `--out`
(default benchmarks/results/), `eval-<device>.{json,md}`. A section that fails prints one line and the others go
on; the exit status is 1 if any failed.
"""

import argparse
import contextlib
import datetime
import json
import os
import re
import tempfile
import time
from pathlib import Path

import torch

SECTIONS = ("sample", "vae", "inception", "dinov2", "clip", "classifier")
TINY_DINOV2 = "vit_small_patch14_dinov2.lvd142m"  # --tiny: ViT-S/14 instead of ViT-L/14
TINY_CLIP = dict(embed_dim=64, depth=2, num_heads=2, num_classes=32)  # --tiny: a 2-block CLIP-shaped ViT


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, n, device, repeats=1):
    """Images/s of fn() (which processes n images): one warm-up call, then the best of `repeats`."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return n / best


def device_label(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


# ----------------------------------------------------------------------------
# Sections: each returns a list of rows {name, images_per_s, ...}.


def sample_rows(args, device):
    from alphaflow.models import build_model
    from alphaflow.sampling import sample

    net = (
        build_model(args.model, num_classes=args.num_classes, input_size=args.input_size, in_channels=args.channels)
        .to(device)
        .eval()
    )
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(args.n, args.channels, args.input_size, args.input_size, generator=g).to(device)
    y = torch.randint(0, args.num_classes, (args.n,), generator=g).to(device)
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if args.bf16 else contextlib.nullcontext
    rows = []
    for nfe in args.nfe:
        t_steps = [1.0 - i / nfe for i in range(nfe)] + [0.0]

        @torch.no_grad()
        def run(t_steps=t_steps):
            with autocast():
                for i in range(0, args.n, args.sample_batch):
                    sample(net, noise[i : i + args.sample_batch], y[i : i + args.sample_batch], t_steps)

        rows.append(
            {
                "name": f"sample-{args.model}-{nfe}nfe",
                "model": args.model,
                "nfe": nfe,
                "input": [args.channels, args.input_size, args.input_size],
                "batch": args.sample_batch,
                "dtype": "bf16" if args.bf16 else "fp32",
                "images_per_s": timed(run, args.n, device, args.repeats),
            }
        )
    return rows


def vae_rows(args, device):
    from diffusers import AutoencoderKL

    from alphaflow.data.encoders import VAEEncoder
    from alphaflow.official import sd_vae_config

    torch.manual_seed(0)
    encoder = VAEEncoder(AutoencoderKL(**sd_vae_config()), device)
    n = args.n_vae or args.n
    latents = torch.randn(n, encoder.channels, args.resolution // encoder.factor, args.resolution // encoder.factor)
    batch = args.batch

    def run():
        for i in range(0, n, batch):
            encoder.decode(latents[i : i + batch])

    return [
        {
            "name": "sd-vae-decode",
            "resolution": args.resolution,
            "batch": batch,
            "dtype": "bf16" if device.type == "cuda" else "fp32",
            "weights": "random init (the sd-vae-ft-ema architecture)",
            "images_per_s": timed(run, n, device, args.repeats),
        }
    ]


def random_state_file(model, folder, name):
    """A random-init network's state dict saved where the extractor loads its weights from."""
    from safetensors.torch import save_file

    path = Path(folder) / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def feature_weights(network, args, folder):
    """(extractor name, weights path or None = its usual file, what the row says about the weights)."""
    import timm

    from alphaflow.features import resolve_weights, vit
    from alphaflow.classifier import SmallCNN, save_classifier
    from alphaflow.errors import MissingInputError

    def usual(extractor):
        try:
            return resolve_weights(extractor)
        except MissingInputError:
            return None

    if network == "classifier":
        path = Path(folder) / "smallcnn.safetensors"
        save_classifier(SmallCNN().eval(), path)
        return "classifier-local", path, "random init (the cost does not depend on the weights)"
    if network == "inception":
        for extractor in ("inception-nvidia-ts", "inception-fid-ts"):
            if not args.tiny and usual(extractor):
                return extractor, None, ""
        return None, None, "random init (torchvision inception_v3: no FID Inception file)"
    if network == "dinov2":
        model_name = TINY_DINOV2 if args.tiny else vit.DINOV2_DEFAULT_MODEL
        os.environ[vit.ENV_DINOV2_MODEL] = model_name
        if not args.tiny and usual("dinov2-timm-local"):
            return "dinov2-timm-local", None, ""
        net = timm.create_model(model_name, pretrained=False, img_size=224, num_classes=0)
        what = f"random init ({model_name}{', --tiny' if args.tiny else ''})"
        return "dinov2-timm-local", random_state_file(net, folder, "dinov2"), what
    if network == "clip":
        vit.CLIP_MODEL_KWARGS = TINY_CLIP if args.tiny else {}
        if not args.tiny and usual("clip-vit-b32-local"):
            return "clip-vit-b32-local", None, ""
        net = timm.create_model(
            vit.CLIP_MODEL, pretrained=False, **{"num_classes": 512, "act_layer": "quick_gelu", **vit.CLIP_MODEL_KWARGS}
        )
        what = f"random init ({vit.CLIP_MODEL}{', a 2-block ViT, --tiny' if args.tiny else ''})"
        return "clip-vit-b32-local", random_state_file(net, folder, "clip"), what
    raise ValueError(network)


def torchvision_inception(device):
    """Random-init Inception-v3 of torchvision on 299 px inputs: the FID Inception's architecture, when its
    TorchScript file is absent."""
    import torchvision

    net = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=False).to(device).eval()

    @torch.no_grad()
    def features(images):
        x = images.to(device, torch.float32).expand(-1, 3, -1, -1) / 127.5 - 1
        return net(torch.nn.functional.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False))

    return features


def feature_rows(network, args, device):
    from alphaflow import metrics as M

    size = 28 if network == "classifier" else args.resolution
    channels = 1 if network == "classifier" else 3
    n = args.n if network == "classifier" else (args.n_features or args.n)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, channels, size, size), dtype=torch.uint8, generator=g)
    with tempfile.TemporaryDirectory() as tmp:
        extractor, path, weights = feature_weights(network, args, tmp)
        if extractor is None:
            features = torchvision_inception(device)
            run = lambda: [features(images[i : i + args.batch]) for i in range(0, n, args.batch)]
        else:
            run = lambda: M.extract_features(
                extractor, images, weights_path=path, device=device, batch_size=args.batch, progress=False
            )
        ips = timed(run, n, device, args.repeats)
    row = {
        "name": network,
        "extractor": extractor or "torchvision inception_v3",
        "resolution": size,
        "batch": args.batch,
        "dtype": "fp32",
        "images_per_s": ips,
    }
    return [{**row, "weights": weights} if weights else row]


# ----------------------------------------------------------------------------


def weights_of(row):
    """What a row without a `weights` note ran: sampling a random-weight DiT, or an extractor's own weights."""
    return f"{row['extractor']}'s weights file" if "extractor" in row else "random weights (cost only)"


def markdown(record):
    lines = [
        f"Evaluation throughput, {record['device']}, torch {record['torch']}, {record['date']}",
        "",
        "| what | images/s | input | batch | dtype | weights |",
        "|---|---|---|---|---|---|",
    ]
    for row in record["rows"]:
        size = row.get("input") or f"{row.get('resolution')} px"
        lines.append(
            f"| {row['name']} | {row['images_per_s']:,.1f} | {size} | {row.get('batch', '')} | "
            f"{row.get('dtype', '')} | {row.get('weights') or weights_of(row)} |"
        )
    lines += [f"| {name} | failed: {err} | | | | |" for name, err in record["failed"].items()]
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--sections", nargs="*", default=["sample", "classifier", "inception"], choices=SECTIONS)
    ap.add_argument("--n", type=int, default=None, help="images per measurement (default 512 cpu, 4096 cuda)")
    ap.add_argument(
        "--n-features", type=int, default=None, help="images for the ImageNet networks (default 16 cpu, = n cuda)"
    )
    ap.add_argument("--n-vae", type=int, default=None, help="images for SD-VAE decoding (default = n-features)")
    ap.add_argument("--batch", type=int, default=64, help="feature-extraction and decoding batch size")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--model", default="T/4", help="DiT preset for the sample section")
    ap.add_argument("--input-size", type=int, default=28)
    ap.add_argument("--channels", type=int, default=1)
    ap.add_argument("--num-classes", type=int, default=10)
    ap.add_argument("--nfe", type=int, nargs="*", default=[1], help="sampling steps to time (1: [1, 0], 2: ...)")
    ap.add_argument("--sample-batch", type=int, default=1024)
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast for sampling")
    ap.add_argument("--resolution", type=int, default=256, help="image size of decoding and the ImageNet networks")
    ap.add_argument("--tiny", action="store_true", help="small DINOv2/CLIP architectures (the smoke test)")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    ap.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).resolve().parent / "results",
        help="folder for the .json/.md tables ('' = do not write)",
    )
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    args.n = args.n or (4096 if device.type == "cuda" else 512)
    args.n_features = args.n_features or (args.n if device.type == "cuda" else 16)
    args.n_vae = args.n_vae or args.n_features

    record = {
        "kind": "eval-throughput",
        "device": device_label(device),
        "device_type": device.type,
        "threads": torch.get_num_threads() if device.type == "cpu" else None,
        "torch": torch.__version__,
        "date": datetime.date.today().isoformat(),
        "rows": [],
        "failed": {},
    }
    print(f"device: {record['device']}", flush=True)
    for section in args.sections:
        try:
            rows = (
                sample_rows(args, device)
                if section == "sample"
                else vae_rows(args, device)
                if section == "vae"
                else feature_rows(section, args, device)
            )
        except Exception as err:  # one line per failed section, the others go on
            record["failed"][section] = f"{type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}"
            print(f"  {section:24s} FAILED {record['failed'][section]}", flush=True)
            continue
        for row in rows:
            row = {**row, "tiny": True} if args.tiny and section in ("dinov2", "clip") else row
            record["rows"].append(row)
            print(f"  {row['name']:24s} {row['images_per_s']:12.1f} images/s  {row.get('weights', '')}", flush=True)
    if str(args.out):
        args.out.mkdir(parents=True, exist_ok=True)
        from alphaflow.io import atomic_write_text

        slug = re.sub(r"[^a-z0-9]+", "-", record["device"].lower()).strip("-")
        stem = f"eval-{device.type}-{slug}" if device.type == "cuda" else f"eval-cpu-t{record['threads']}"
        atomic_write_text(args.out / f"{stem}.json", json.dumps(record, indent=1) + "\n")
        atomic_write_text(args.out / f"{stem}.md", markdown(record))
        print(f"wrote {args.out / stem}.json and .md")
    print(json.dumps({r["name"]: r["images_per_s"] for r in record["rows"]}))
    return 1 if record["failed"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
