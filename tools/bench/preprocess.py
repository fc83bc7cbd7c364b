#!/usr/bin/env python
"""Benchmark tools/preprocess.py against the tokenizer's own batch-encode speed (the ceiling).

    python tools/bench/preprocess.py [--workers 2] [--repeats 3] [--json out.json]

Corpus: tinyshakespeare repeated (10x and 100x by default), as JSONL documents of ~10
paragraphs (~1.5 KB).
Tokenizer: a sentencepiece BPE (vocab 4000) trained on tinyshakespeare by tools/train_tokenizer.py.

  ceiling      the same documents, already in memory, batch-encoded by --workers processes
               (tokenize_batch on ~1 MB batches, as the preprocess workers call it): text
               tokens / wall seconds of the encoding alone
  end-to-end   `tools/preprocess.py --workers N --append-eod` as a subprocess: text tokens (EODs
               not counted) / wall seconds from launch to exit, start-up, reading, JSON parsing,
               writing and renaming included
  cpu ratio    the same two, in tokens per CPU-second (all processes, start-up included): what
               the wall ratio tends to on an idle machine, and far less sensitive to other load
  memory       peak (and median) over a run of the summed PSS (shared pages counted once) of the
               preprocess process and its workers, sampled every 20 ms with psutil in separate,
               untimed runs (sampling costs CPU the timed runs must not lose)
  index        GPTDataset index build for 10^9 tokens (500k documents, seq 2048; sparse .bin)

Runs alternate ceiling and end-to-end, so load from other processes hits both alike; medians
of --repeats runs are reported. Goal: ratio >= 0.8 and flat memory from 10x to 100x.
"""

import argparse
import json
import multiprocessing as mp
import os
import resource
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import psutil  # noqa: E402

from megalite.data import GPTDataset, IndexedDataset, build_tokenizer  # noqa: E402

SHAKESPEARE = os.path.join(os.path.dirname(ROOT), "shared", "data", "tinyshakespeare.txt")
_DOCS = []  # the ceiling's documents, inherited by the forked encoders


def make_corpus(path, copies):
    paras = [p for p in open(SHAKESPEARE, encoding="utf-8").read().split("\n\n") if p.strip()]
    docs = ["\n\n".join(paras[i : i + 10]) for i in range(0, len(paras), 10)]
    with open(path, "w") as f:
        for _ in range(copies):
            for d in docs:
                f.write(json.dumps({"text": d}) + "\n")
    return docs * copies


def _init_encoder(model):
    global _TOK
    _TOK = build_tokenizer(None, model)
    _TOK.tokenize_batch(["warm up"])


def _encode_share(bounds):
    lo, hi = bounds
    cpu0 = time.process_time()
    n, i = 0, lo
    while i < hi:  # ~1 MB batches, like preprocess's chunks
        j, size = i, 0
        while j < hi and size < 1 << 20:
            size += len(_DOCS[j])
            j += 1
        n += sum(len(x) for x in _TOK.tokenize_batch(_DOCS[i:j]))
        i = j
    return n, time.process_time() - cpu0


def ceiling(pool, workers):
    step = -(-len(_DOCS) // workers)
    shares = [(k * step, min(len(_DOCS), (k + 1) * step)) for k in range(workers)]
    t0 = time.perf_counter()
    parts = pool.map(_encode_share, shares, chunksize=1)
    return sum(p[0] for p in parts), time.perf_counter() - t0, sum(p[1] for p in parts)


def tree_pss(proc):
    total = 0
    for p in [proc] + proc.children(recursive=True):
        try:
            mi = p.memory_full_info()
            total += getattr(mi, "pss", mi.rss)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total


def end_to_end(corpus, model, out, workers, sample_memory=False):
    """One preprocess run -> (text tokens, wall s, CPU s of the process tree, PSS samples).

    Memory is sampled only in runs that are not timed: reading /proc/*/smaps_rollup 50 times a
    second costs CPU that the 2-core machine would take from the run being timed."""
    cmd = [
        sys.executable,
        os.path.join(ROOT, "tools", "preprocess.py"),
        "--input",
        corpus,
        "--tokenizer-model",
        model,
        "--append-eod",
        "--workers",
        str(workers),
        "--output-prefix",
        out,
    ]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ps, samples, stop = psutil.Process(proc.pid), [], threading.Event()

    def sample():
        while not stop.is_set():
            try:
                samples.append(tree_pss(ps))
            except psutil.NoSuchProcess:
                return
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    if sample_memory:
        sampler.start()
    stdout, stderr = proc.communicate()
    seconds = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)  # the run's whole process tree, reaped
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    stop.set()
    if sample_memory:
        sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"preprocess failed:\n{stderr}")
    ds = IndexedDataset(out + "_text_document")
    return ds.num_tokens - ds.num_documents, seconds, cpu, samples, stdout.strip()


def index_build(tmp):
    prefix = os.path.join(tmp, "big")
    lengths = np.random.default_rng(0).integers(1, 4000, 500_000).astype(np.int64)
    n = len(lengths)
    with open(prefix + ".idx", "wb") as f:
        f.write(b"MMIDIDX\x00\x00" + struct.pack("<QBQQ", 1, 8, n, n + 1))
        f.write(lengths.astype("<i4").tobytes())
        f.write((np.concatenate([[0], np.cumsum(lengths)[:-1]]) * 2).astype("<i8").tobytes())
        f.write(np.arange(n + 1, dtype="<i8").tobytes())
    with open(prefix + ".bin", "wb") as f:
        f.truncate(int(lengths.sum()) * 2)
    t0 = time.perf_counter()
    GPTDataset(
        prefix, "train", None, 2048, int(lengths.sum()) // 2048 - 1, 0, os.path.join(tmp, "cache")
    )
    return int(lengths.sum()), time.perf_counter() - t0


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument(
        "--repeats", type=int, default=3, help="timed runs of each kind (median reported)"
    )
    p.add_argument(
        "--memory-runs", type=int, default=1, help="extra, untimed runs that sample memory"
    )
    p.add_argument(
        "--scales",
        type=int,
        nargs=2,
        default=[10, 100],
        metavar=("SMALL", "LARGE"),
        help="copies of tinyshakespeare in the small and the large input",
    )
    p.add_argument("--json", help="write the results here")
    a = p.parse_args()
    res = {"workers": a.workers, "repeats": a.repeats, "cpus": os.cpu_count(), "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        model = os.path.join(tmp, "tok")
        subprocess.run(
            [
                sys.executable,
                os.path.join(ROOT, "tools", "train_tokenizer.py"),
                "--input",
                SHAKESPEARE,
                "--vocab-size",
                "4000",
                "--output-prefix",
                model,
            ],
            check=True,
            capture_output=True,
        )
        model += ".model"
        for copies in a.scales:
            corpus = os.path.join(tmp, f"corpus{copies}.jsonl")
            _DOCS[:] = make_corpus(corpus, copies)
            mb = os.path.getsize(corpus) / 2**20
            pool = mp.get_context("fork").Pool(
                a.workers, initializer=_init_encoder, initargs=(model,)
            )
            ceil, e2e, ceil_cpu, e2e_cpu = [], [], [], []
            for _ in range(a.repeats):
                tokens, sec, cpu = ceiling(pool, a.workers)
                ceil.append(tokens / sec)
                ceil_cpu.append(tokens / cpu)
                t2, sec2, cpu2, _, summary = end_to_end(
                    corpus, model, os.path.join(tmp, "out"), a.workers
                )
                assert t2 == tokens, (t2, tokens)  # both count the same text tokens
                e2e.append(t2 / sec2)
                e2e_cpu.append(t2 / cpu2)
            pool.close()
            pool.join()
            mem, mem_median = [], []
            for _ in range(a.memory_runs):
                *_, samples, _ = end_to_end(
                    corpus, model, os.path.join(tmp, "out"), a.workers, sample_memory=True
                )
                mem.append(max(samples) / 2**20)
                mem_median.append(statistics.median(samples) / 2**20)
            run = {
                "input_mb": round(mb, 1),
                "documents": len(_DOCS),
                "tokens": tokens,
                "ceiling_tokens_per_s": statistics.median(ceil),
                "e2e_tokens_per_s": statistics.median(e2e),
                "ratio": statistics.median(e2e) / statistics.median(ceil),
                "ceiling_tokens_per_cpu_s": statistics.median(ceil_cpu),
                "e2e_tokens_per_cpu_s": statistics.median(e2e_cpu),
                "cpu_ratio": statistics.median(e2e_cpu) / statistics.median(ceil_cpu),
                "peak_pss_mb": statistics.median(mem),
                "median_pss_mb": statistics.median(mem_median),
                "all_ceiling": ceil,
                "all_e2e": e2e,
                "all_pss_mb": mem,
                "all_ceiling_per_cpu_s": ceil_cpu,
                "all_e2e_per_cpu_s": e2e_cpu,
                "last_summary": summary,
            }
            res["runs"][f"{copies}x"] = run
            _DOCS.clear()
        tokens, seconds = index_build(tmp)
        res["index_build"] = {"tokens": tokens, "seconds": seconds}
    small, large = (res["runs"][f"{c}x"] for c in a.scales)
    res["memory_growth"] = large["peak_pss_mb"] / small["peak_pss_mb"]

    print(
        f"preprocess vs raw batch encode, {a.workers} processes, median of {a.repeats} timed runs, "
        f"memory from {a.memory_runs} more ({os.cpu_count()} CPUs)"
    )
    print(
        f"{'input':>6} {'MB':>6} {'tokens':>11} {'ceiling tok/s':>14} {'e2e tok/s':>11} "
        f"{'ratio':>6} "
        f"{'cpu ratio':>9} {'peak PSS MB':>12} {'median PSS MB':>14}"
    )
    for name, r in res["runs"].items():
        print(
            f"{name:>6} {r['input_mb']:>6.1f} {r['tokens']:>11,} "
            f"{r['ceiling_tokens_per_s']:>14,.0f} "
            f"{r['e2e_tokens_per_s']:>11,.0f} {r['ratio']:>6.2f} {r['cpu_ratio']:>9.2f} "
            f"{r['peak_pss_mb']:>12.1f} {r['median_pss_mb']:>14.1f}"
        )
    print(
        f"load average during the run: {os.getloadavg()[0]:.1f} (above {os.cpu_count()}: wall "
        "ratios are noisy; "
        f"'cpu ratio' compares tokens per CPU-second, main process and start-up included)"
    )
    print(f"peak memory {a.scales[1]}x / {a.scales[0]}x input: {res['memory_growth']:.2f}")
    print(
        f"index build: {res['index_build']['tokens']:,} tokens in "
        f"{res['index_build']['seconds']:.2f} s"
    )
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
