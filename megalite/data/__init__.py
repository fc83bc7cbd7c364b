"""Data pipeline: Megatron-compatible token shards, GPT samples, blending, sampler, tokenizers.

    tools/preprocess.py   raw text -> {prefix}_{key}_document.bin/.idx (IndexedDatasetWriter)
                          --sft: chat rows -> tokens + a uint8 loss-mask shard (chat.py)
    IndexedDataset        memory-mapped reader of one shard
    GPTDataset            seq_len+1-token samples over the shuffled document stream (cached indices)
    BlendedDataset        several datasets mixed by weight
    PretrainingSampler    DP-aware batch sampler resumable from consumed_samples

Nothing here imports torch; torch.distributed is used only when a process group is up.
"""

from megalite.data.blended import BlendedDataset
from megalite.data.builder import build_train_valid_test_datasets
from megalite.data.gpt_dataset import GPTDataset, parse_data_path, parse_split
from megalite.data.indexed import IndexedDataset, IndexedDatasetWriter, best_dtype
from megalite.data.sampler import PretrainingSampler
from megalite.data.tokenizers import build_tokenizer

__all__ = [
    "BlendedDataset",
    "GPTDataset",
    "IndexedDataset",
    "IndexedDatasetWriter",
    "PretrainingSampler",
    "best_dtype",
    "build_tokenizer",
    "build_train_valid_test_datasets",
    "parse_data_path",
    "parse_split",
]
