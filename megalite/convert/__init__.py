"""Whole models out of checkpoints: `load_pretrained` (any layout, one process), the Hugging
Face export/import (`hf.py`) and the LoRA merge and peft export (`lora.py`), used by
tools/convert.py."""

from megalite.convert.pretrained import PretrainedGPT, load_pretrained

__all__ = ["PretrainedGPT", "load_pretrained"]
