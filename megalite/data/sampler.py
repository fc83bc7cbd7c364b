"""The data-parallel batch sampler; its position is one number, consumed_samples.

The global sample order is 0, 1, 2, ... (GPTDataset/BlendedDataset already shuffle). A global
micro-batch is micro_batch_size * data_parallel_size consecutive samples; DP rank r takes its
r-th slice of micro_batch_size. Hence from consumed_samples alone a restarted run yields
exactly what the uninterrupted run would have, and the union over DP ranks of step k's
micro-batches is the same global slice for every DP size.

Use as `DataLoader(dataset, batch_sampler=PretrainingSampler(...))`.
"""

from megalite.errors import MegaliteError


class PretrainingSampler:
    def __init__(
        self,
        total_samples,
        consumed_samples,
        micro_batch_size,
        data_parallel_rank,
        data_parallel_size,
        drop_last=True,
    ):
        self.total_samples = int(total_samples)
        self.consumed_samples = int(consumed_samples)
        self.micro_batch_size = int(micro_batch_size)
        self.data_parallel_rank = int(data_parallel_rank)
        self.data_parallel_size = int(data_parallel_size)
        self.drop_last = drop_last
        if self.total_samples < 1:
            raise MegaliteError(f"the dataset has no samples (total_samples={total_samples})")
        if self.micro_batch_size < 1 or self.data_parallel_size < 1:
            raise MegaliteError(
                f"micro_batch_size ({micro_batch_size}) and data_parallel_size "
                f"({data_parallel_size}) must be positive"
            )
        if not 0 <= self.data_parallel_rank < self.data_parallel_size:
            raise MegaliteError(
                f"data_parallel_rank {data_parallel_rank} outside [0, {data_parallel_size})"
            )
        if not 0 <= self.consumed_samples <= self.total_samples:
            raise MegaliteError(
                f"consumed_samples {consumed_samples} is beyond the dataset's {total_samples} "
                "samples; "
                f"the checkpoint belongs to a longer run: build the dataset with more samples"
            )
        self.global_batch = self.micro_batch_size * self.data_parallel_size

    def __len__(self):
        remaining = self.total_samples - self.consumed_samples
        if self.drop_last:
            return remaining // self.global_batch
        return -(-remaining // self.global_batch)

    def __iter__(self):
        mbs, rank = self.micro_batch_size, self.data_parallel_rank
        start = self.consumed_samples
        full_end = start + (self.total_samples - start) // self.global_batch * self.global_batch
        for base in range(start, full_end, self.global_batch):
            lo = base + rank * mbs
            yield list(range(lo, lo + mbs))
        if not self.drop_last and full_end < self.total_samples:
            # The last, short global batch is shared out evenly; a rank may get an empty list.
            tail = list(range(full_end, self.total_samples))
            per_rank = -(-len(tail) // self.data_parallel_size)
            yield tail[rank * per_rank : (rank + 1) * per_rank]
