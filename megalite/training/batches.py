"""From the config to batches on the device: vocabulary, datasets, samplers, loaders."""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset

from megalite import timers
from megalite.errors import MegaliteError
from megalite.parallel import state


class MockGPTDataset(Dataset):
    """Random tokens, for benchmarks and smoke tests (--mock-data): sample i depends only on
    (seed, i), so every layout sees the same data."""

    def __init__(self, vocab_size, seq_length, num_samples, seed):
        self.vocab_size, self.seq_length = vocab_size, seq_length
        self.num_samples, self.seed = num_samples, seed

    def __len__(self):
        return self.num_samples

    def __getitem__(self, i):
        rng = np.random.default_rng((self.seed, int(i)))
        return rng.integers(0, self.vocab_size, self.seq_length + 1, dtype=np.int64)


def collate(samples):
    """Pretraining samples ([seq + 1] token arrays) or packed SFT samples (dicts of [seq]
    arrays: tokens, labels, loss_mask, position_ids, segment_ids) into a micro-batch."""
    if isinstance(samples[0], dict):
        from megalite.data.sft import collate_samples

        return collate_samples(samples)
    s = torch.from_numpy(np.stack(samples).astype(np.int64))  # [b, seq+1]
    return {"tokens": s[:, :-1].contiguous(), "labels": s[:, 1:].contiguous()}


def global_batch(data, cfg) -> Iterator:
    """This DP rank's micro-batches of one global batch, read now, each given the
    `loss_weight` that makes the loss the mean over the global batch's target tokens
    (`pipeline.micro_batch_loss`): DP x M / (loss-mask ones over every micro-batch of every
    DP rank). The count is one all-reduce over DP, on the device (no host read)."""
    st, m = state.get(), cfg.num_microbatches
    with timers.timed("data"):
        batches = [next(data) for _ in range(m)]
        targets = torch.stack([b["loss_mask"].sum() for b in batches]).sum()
        if st.dp > 1:
            dist.all_reduce(targets, group=st.dp_group)
    weight = (st.dp * m) / targets.clamp(min=1.0)  # no target at all: a zero loss
    return iter([dict(b, loss_weight=weight) for b in batches])


def vocab_size(cfg) -> int:
    """The real vocabulary size: the tokenizer's (checked against --vocab-size), or
    --vocab-size alone (mock data, pre-tokenized shards)."""
    if cfg.data.tokenizer_model:
        from megalite.data import build_tokenizer

        tok = build_tokenizer(cfg.data.tokenizer_type, cfg.data.tokenizer_model)
        if cfg.model.vocab_size and cfg.model.vocab_size != tok.vocab_size:
            raise MegaliteError(
                f"--vocab-size {cfg.model.vocab_size} differs from the tokenizer's "
                f"{tok.vocab_size} ({cfg.data.tokenizer_model}); drop --vocab-size"
            )
        return tok.vocab_size
    if cfg.model.vocab_size:
        return cfg.model.vocab_size
    raise MegaliteError(
        "the vocabulary size is unknown: pass --tokenizer-model (the one the "
        "data was preprocessed with) or --vocab-size"
    )


def num_samples_needed(cfg):
    t = cfg.training
    gbs = t.global_batch_size
    evals = t.train_iters // t.eval_interval + 1
    return (t.train_iters * gbs, evals * t.eval_iters * gbs, t.eval_iters * gbs)


def build_datasets(cfg, vocab_size):
    """(train, valid, test) datasets; valid/test may be None."""
    d, m = cfg.data, cfg.model
    if not d.data_path and not d.mock_data:
        raise MegaliteError(
            "no training data: pass --data-path PREFIX (shards written by "
            "tools/preprocess.py) or --mock-data"
        )
    n = num_samples_needed(cfg)
    if d.mock_data:
        return tuple(
            MockGPTDataset(vocab_size, m.seq_length, k, cfg.training.seed + i)
            for i, k in enumerate(n)
        )
    if d.sft:  # packed conversations with their loss masks (megalite/data/sft.py)
        from megalite.data.sft import build_sft_datasets

        return build_sft_datasets(
            d.data_path, d.split, m.seq_length, n, cfg.training.seed, d.data_cache_path
        )
    from megalite.data import build_train_valid_test_datasets

    return build_train_valid_test_datasets(
        d.data_path,
        d.split,
        m.seq_length,
        n,
        cfg.training.seed,
        d.data_cache_path,
        blend_temperature=d.data_blend_temperature,
        blend_by_tokens=d.data_blend_by_tokens,
    )


def describe_data(dataset):
    """The log line of a blend's effective proportions, or None (one dataset, mock data)."""
    describe = getattr(dataset, "describe", None)
    return describe() if callable(describe) else None


def batch_iterator(dataset, micro_batch_size, consumed_samples, num_workers, vocab_size, device):
    """Endless iterator of this data-parallel rank's micro-batches, starting after
    `consumed_samples` global samples, checking token ids against the vocabulary."""
    from megalite.data import PretrainingSampler

    st = state.get()
    sampler = PretrainingSampler(
        len(dataset), consumed_samples, micro_batch_size, st.dp_rank, st.dp
    )
    # A private generator: creating a loader iterator draws a seed from it, and drawing from
    # the global one would shift every later dropout mask (and break exact resume).
    loader = DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate,
        pin_memory=device.type == "cuda",
        generator=torch.Generator(),
    )
    for batch in loader:
        top = int(batch["tokens"].max().item()) if batch["tokens"].numel() else 0
        top = max(top, int(batch["labels"][:, -1].max().item()) if batch["labels"].numel() else 0)
        if top >= vocab_size:
            raise MegaliteError(
                f"the data holds token id {top} but the vocabulary has {vocab_size} ids: the "
                f"shards were made with another tokenizer; pass the --tokenizer-model they "
                f"were preprocessed with (or re-run tools/preprocess.py)"
            )
        yield {k: v.to(device, non_blocking=True) for k, v in batch.items()}
