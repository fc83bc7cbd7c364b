"""megalite: Megatron-style 3D-parallel GPT pretraining on torch.distributed."""

__version__ = "0.1.0"


def __getattr__(name):
    # Lazy: `import megalite` stays light (no torch, no model code) until this is used.
    if name == "load_pretrained":
        from megalite.convert.pretrained import load_pretrained

        return load_pretrained
    raise AttributeError(f"module 'megalite' has no attribute {name!r}")
