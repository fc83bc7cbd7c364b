"""Generated corpora with planted near-duplicates, for tests/test_data_near_dedup.py and the
near-dedup benchmark (tools/bench/preprocess.py --near-dedup).

A distinct document is 10-39 lines drawn at random from tinyshakespeare (so documents share
words, speaker names and the odd line, as real text does, but not long passages); a planted
near-duplicate is a copy of an earlier distinct document with `change` of its words replaced
by random words of the corpus, placed at a random position after its original.
"""

import os

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHAKESPEARE = os.path.join(os.path.dirname(ROOT), "shared", "data", "tinyshakespeare.txt")


def near_duplicate_corpus(n_docs, dup_fraction=0.10, change=0.05, seed=0, lines=(10, 40)):
    """-> (texts, source): source[i] is the index in `texts` of the document text i is a near
    copy of, or -1 for a distinct document. About dup_fraction of the n_docs are copies."""
    rng = np.random.default_rng(seed)
    pool = [x for x in open(SHAKESPEARE, encoding="utf-8").read().split("\n") if x.strip()]
    vocab = sorted({w for x in pool for w in x.split()})
    n_dup = int(round(n_docs * dup_fraction))
    n_distinct = n_docs - n_dup
    distinct = []
    for k in rng.integers(lines[0], lines[1], n_distinct):
        distinct.append("\n".join(pool[i] for i in rng.integers(0, len(pool), k)))
    sources = rng.integers(0, n_distinct, n_dup)
    copies = []
    for s in sources:
        rows = [line.split(" ") for line in distinct[s].split("\n")]
        where = [(r, c) for r, row in enumerate(rows) for c in range(len(row))]
        for q in rng.choice(len(where), max(1, int(round(change * len(where)))), replace=False):
            r, c = where[q]
            rows[r][c] = vocab[rng.integers(len(vocab))]
        copies.append("\n".join(" ".join(row) for row in rows))
    # order: the distinct documents in order, each copy somewhere after its original
    keys = np.concatenate([np.arange(n_distinct), rng.uniform(sources + 0.5, n_distinct)])
    order = np.argsort(keys, kind="stable")
    texts = distinct + copies
    position = np.empty(n_docs, dtype=np.int64)
    position[order] = np.arange(n_docs)
    source = np.full(n_docs, -1, dtype=np.int64)
    source[position[n_distinct:]] = position[sources]
    return [texts[i] for i in order], source
