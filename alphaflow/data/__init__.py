"""Data: prepared image shards, embedded datasets, encoders, latent shards, training loader.

prepare_folder / prepare_embedded -> load_prepared        (images + labels)
build_encoder -> encode_dataset (per part) -> finalize_latents -> LatentLoader

Names are re-exported lazily (PEP 562) so that the spawned image-decoding workers of
prepare_folder import only prepare.py's numpy/PIL dependencies, not torch (~2 s and ~300 MB
per worker).
"""

import importlib

_EXPORTS = {
    "embedded": ["EMBEDDED", "FASHION_CLASSES", "load_embedded"],
    "encoders": ["ENCODERS", "IdentityEncoder", "VAEEncoder", "build_encoder"],
    "encode": ["encode_dataset", "finalize_latents"],
    "latents": ["LatentLoader", "load_latent_stats", "read_latent_manifest"],
    "prepare": ["center_crop_resize", "iter_prepared_shards", "load_prepared", "prepare_embedded", "prepare_folder"],
    "shards": ["ShardError"],
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
