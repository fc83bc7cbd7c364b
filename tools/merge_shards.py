#!/usr/bin/env python
"""Merge several .bin/.idx shards into one, documents in the order given.

Example (the outputs of four preprocess runs into one shard):
  python tools/merge_shards.py --input 'data/part*_text_document' \
      --output-prefix data/all_text_document

Inputs are shard prefixes (a trailing .bin/.idx is ignored), globs over prefixes or .idx files,
or directories (every shard inside, sorted by name). Tokens are copied as raw bytes when the
dtypes agree; mixing uint16 and int32 shards writes int32. Memory stays flat; the output appears
under its final name only once complete.
"""

import argparse
import glob
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from megalite.data.indexed import IndexedDataset, IndexedDatasetWriter, strip_suffix  # noqa: E402
from megalite.errors import MegaliteError, run_main  # noqa: E402


def get_parser():
    p = argparse.ArgumentParser(
        prog="tools/merge_shards.py",
        description=__doc__.split("\n\n")[0],
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--input",
        nargs="+",
        required=True,
        metavar="PREFIX",
        help="shard prefixes, globs (quote them) or directories, merged in the order given",
    )
    p.add_argument("--output-prefix", required=True, help="writes PREFIX.bin and PREFIX.idx")
    p.add_argument(
        "--debug", action="store_true", help="show tracebacks instead of one-line errors"
    )
    return p


def expand(patterns):
    prefixes = []
    for pat in patterns:
        if os.path.isdir(pat):
            found = sorted(glob.glob(os.path.join(pat, "*.idx")))
        elif any(c in pat for c in "*?["):
            found = sorted(glob.glob(pat if pat.endswith((".idx", ".bin")) else pat + ".idx"))
        else:
            found = [pat]
        found = [strip_suffix(f) for f in found]
        if not found:
            raise MegaliteError(f"--input {pat!r} matches no shard (.idx); check the path")
        prefixes += found
    return list(dict.fromkeys(prefixes))


def main(argv):
    args = get_parser().parse_args(argv)
    out = strip_suffix(args.output_prefix)
    prefixes = expand(args.input)
    if out in prefixes:
        raise MegaliteError(f"--output-prefix {out} is also an input; write the merge elsewhere")
    shards = [IndexedDataset(p) for p in prefixes]  # checks every input before writing anything
    dtype = np.result_type(*[s.dtype for s in shards])
    if dtype not in (np.uint16, np.int32):
        dtype = np.dtype(np.int32) if np.can_cast(dtype, np.int32) else np.dtype(np.int64)
    t0 = time.perf_counter()
    with IndexedDatasetWriter(out, dtype) as writer:
        for shard in shards:
            writer.add_index(shard)
    print(
        f"done: {len(shards)} shards, {writer.num_documents:,} documents, {writer.num_sequences:,} "
        f"sequences, {writer.num_tokens:,} {np.dtype(dtype).name} tokens, "
        f"{time.perf_counter() - t0:.2f} s -> {out}.bin/.idx",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
