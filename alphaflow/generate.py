"""`alphaflow generate`: images from a trained run or a weights file, like DiT's sample.py.

    alphaflow generate --params P --run R [--weights ema|raw] --classes 207,360,387,974 --seeds 0-15 --nfe 1 \
        --out grid.png
    alphaflow generate --checkpoint ema.safetensors [--model B/2] [--vae DIR] --seeds 0-7 --nfe 2 --out samples/
    alphaflow generate --checkpoint alphaflow-B-2.pt [--weights ema|raw] [--vae DIR] ...    (official α-Flow snapshot)

Seed i takes the class classes[i mod len(classes)]; `--nfe 1` samples along t_steps [1, 0], `--nfe 2` along
[1, 0.5, 0] (`--mode ode|consistency`). The noise is the official α-Flow protocol's by default (`--protocol
alphaflow`: per-seed generator seeded with seed mod 2**32, consistency ε′ from the same generator, truncated
uint8); `--protocol default` gives this project's default streams, i.e. the sample stage's images of a profile
whose eval.protocol is default. `--out X.png` writes one grid, `--out DIR/` one sample_{seed:06d}.png per seed.
"""

import contextlib
import io
import json
from pathlib import Path

import torch
from PIL import Image

from alphaflow.config import ParamsError
from alphaflow.io import atomic_write_bytes
from alphaflow.errors import InvalidInputError

NFE_T_STEPS = {1: [1.0, 0.0], 2: [1.0, 0.5, 0.0]}


def parse_int_list(text, what):
    """ "0-15" / "3,5,9-11" → [0, …]; ranges inclusive."""
    out = []
    try:
        for part in str(text).split(","):
            part = part.strip()
            if not part:
                continue
            lo, sep, hi = part.partition("-")
            if sep and lo:
                lo, hi = int(lo), int(hi)
                if hi < lo:
                    raise ValueError(part)
                out += list(range(lo, hi + 1))
            else:
                out.append(int(part))
    except ValueError:
        raise ParamsError(f"{what} {text!r}: expected integers and inclusive ranges, e.g. 0-15 or 1,4,7-9") from None
    if not out or any(v < 0 for v in out):
        raise ParamsError(f"{what} {text!r}: expected non-negative integers, e.g. 0-15 or 1,4,7-9")
    return out


def labels_cyclic(seeds, classes):
    """seed index i → classes[i mod len(classes)]."""
    return [classes[i % len(classes)] for i in range(len(seeds))]


def net_from_state(state, model=None, model_overrides=None, device="cpu"):
    """A DiT from this project's state dict (latent_mean/latent_std included): the preset `model`, else the
    preset whose shapes the state dict has."""
    from alphaflow.models import build_model
    from alphaflow.presets import preset_of, state_shapes

    if "latent_mean" not in state or "y_embedder.table.weight" not in state:
        raise InvalidInputError("not this project's DiT weights (no latent_mean / y_embedder.table.weight)")
    c, h, _ = state["latent_mean"].shape[1:]
    num_classes = state["y_embedder.table.weight"].shape[0] - 1
    if model is None:
        model = preset_of(state)
        if model is None:
            hidden, depth, patch = state_shapes(state)
            raise InvalidInputError(
                f"weights of a DiT with hidden size {hidden}, {depth} blocks, patch {patch}: no "
                "preset has these shapes; give --model (and --model-overrides)"
            )
    net = build_model(model, num_classes=num_classes, input_size=h, in_channels=c, **(model_overrides or {}))
    try:
        net.load_state_dict(state)
    except RuntimeError as e:
        raise InvalidInputError(
            f"the weights do not fit model {model} {model_overrides or ''}: {str(e)[:400]}"
        ) from None
    return net.to(device).eval()


def load_checkpoint_net(path, *, weights="ema", model=None, model_overrides=None, device="cpu"):
    """A DiT from a .safetensors of this project's weights or an official α-Flow .pt snapshot."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        from alphaflow.errors import MissingInputError

        raise MissingInputError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        state = load_file(str(path), device="cpu")
    else:
        from alphaflow.official import load_official_snapshot  # lazily: only for official snapshots

        state = load_official_snapshot(str(path), weights=weights)
    return net_from_state(state, model, model_overrides, device)


def checkpoint_decoder(net, vae=None, device="cpu"):
    """The decoder for a checkpoint: the SD-VAE at `vae` (a diffusers directory, or an official .pt file), or pixel
    space when the latent has 1 or 3 channels."""
    from alphaflow.data import build_encoder

    if vae is not None:
        if Path(vae).is_file():  # a released .pt (sd_vae_ft_ema.pt or a snapshot holding the VAE)
            return build_encoder("sd-vae-official", path=str(Path(vae).resolve()), device=device)
        return build_encoder("sd-vae-ft-ema", path=vae, device=device)
    if net.in_channels in (1, 3):
        return build_encoder("identity", device=device)
    raise ParamsError(
        f"the latents have {net.in_channels} channels: give the SD-VAE with --vae DIR "
        "(pixel space only for 1 or 3 channels)"
    )


def generate_images(
    net, decoder, seeds, labels, *, nfe=1, mode="ode", protocol="alphaflow", device="cpu", batch_size=64
):
    """uint8 [N,C,H,W] for seeds/labels, batch by batch (a sample depends on its seed only)."""
    from alphaflow.samples import generate

    device = torch.device(device)
    sampler = {"t_steps": NFE_T_STEPS[nfe], "mode": mode}
    autocast = (
        (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else contextlib.nullcontext
    )
    out = []
    for i in range(0, len(seeds), batch_size):
        out.append(
            generate(
                net, decoder, seeds[i : i + batch_size], labels[i : i + batch_size], sampler, device, autocast, protocol
            ).cpu()
        )
    return torch.cat(out)


def png_bytes(image):
    """uint8 [C,H,W] → PNG bytes (grey for one channel)."""
    array = image.permute(1, 2, 0).numpy()
    buf = io.BytesIO()
    Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).save(buf, format="PNG")
    return buf.getvalue()


def write_images(images, seeds, out, nrow=None):
    """`out` ending in / (or an existing folder): one sample_{seed:06d}.png per seed; else a PNG grid."""
    from alphaflow.images import save_grid

    out_s = str(out)
    out = Path(out)
    if out_s.endswith(("/", "\\")) or out.is_dir():
        for seed, image in zip(seeds, images):
            atomic_write_bytes(out / f"sample_{seed:06d}.png", png_bytes(image))
        return [out / f"sample_{s:06d}.png" for s in seeds]
    if out.suffix.lower() != ".png":
        raise ParamsError(f"--out {out_s!r}: a .png file (a grid) or a folder ending in / (one PNG per seed)")
    nrow = nrow or min(len(images), 8)
    save_grid(images, out, nrow=nrow, scale=2 if images.shape[-1] < 64 else 1)
    return [out]


def run_generate(args, params, device=None):
    """The `alphaflow generate` command (argparse namespace from alphaflow.cli)."""
    from alphaflow.data import build_encoder
    from alphaflow.distributed import resolve_device

    device = torch.device(resolve_device(device))
    seeds = parse_int_list(args.seeds, "--seeds")
    classes = parse_int_list(args.classes, "--classes")
    overrides = json.loads(args.model_overrides) if args.model_overrides else None
    if args.checkpoint:
        if args.run:
            raise ParamsError("give either --run or --checkpoint, not both")
        net = load_checkpoint_net(
            args.checkpoint, weights=args.weights, model=args.model, model_overrides=overrides, device=device
        )
        decoder = checkpoint_decoder(net, args.vae, device)
    elif args.run:
        from alphaflow.samples import load_run_net

        if params is None:
            raise ParamsError("--run needs --params P (the profile the run belongs to)")

        net = load_run_net(params, args.run, args.weights, device)
        decoder = build_encoder(**params.encoder_args(), device=device)
    else:
        raise ParamsError("give --run R (with --params P) or --checkpoint FILE")
    bad = [c for c in classes if c >= net.num_classes]
    if bad:
        raise ParamsError(f"--classes {bad}: the model has {net.num_classes} classes (0 … {net.num_classes - 1})")
    labels = labels_cyclic(seeds, classes)
    images = generate_images(
        net,
        decoder,
        seeds,
        labels,
        nfe=args.nfe,
        mode=args.mode,
        protocol=args.protocol,
        device=device,
        batch_size=args.batch_size,
    )
    written = write_images(images, seeds, args.out, args.nrow)
    if not args.quiet:
        where = written[0] if len(written) == 1 else f"{Path(args.out)}/ ({len(written)} PNGs)"
        print(
            f"[alphaflow] generate: {len(seeds)} images ({args.nfe}-NFE {args.mode}, {args.protocol} protocol) "
            f"→ {where}"
        )
    return images
