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

    python tools/bench/preprocess.py --near-dedup [--docs 20000] [--scale 10] [--json out.json]

--near-dedup measures `--dedup near` against `--dedup exact` instead, with --workers processes,
on generated corpora (tools/bench/corpus.py: Shakespeare lines, 10% planted copies with 5% of
their words changed) of --docs and --scale x --docs documents:

  docs/s       input documents / wall seconds of `tools/preprocess.py` (launch to exit), the
               sentencepiece tokenizer above, runs of the two modes alternating; cpu ratio:
               the same in documents per CPU-second of the process tree (far less sensitive
               to load from other processes)
  recall       planted copies removed / planted copies, precision: planted copies removed /
               all documents removed (from a byte-tokenizer run whose shards decode exactly)
  memory       peak RSS (ru_maxrss) of the main process, which holds the index, and of the
               largest worker, from --report; and the index's own bytes per kept document
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
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

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


def _train_tokenizer(tmp):
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
    return model + ".model"


def _dedup_run(corpus, out, workers, mode, tokenizer):
    """One preprocess run -> (wall seconds, its --report)."""
    tok = ["--tokenizer-type", "byte"] if tokenizer is None else ["--tokenizer-model", tokenizer]
    dedup = ["--dedup", mode] if mode else []
    cmd = [
        sys.executable,
        os.path.join(ROOT, "tools", "preprocess.py"),
        "--input",
        corpus,
        *tok,
        "--append-eod",
        "--workers",
        str(workers),
        *dedup,
        "--report",
        out + ".json",
        "--output-prefix",
        out,
    ]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)  # the run's whole process tree
    if proc.returncode != 0:
        raise SystemExit(f"preprocess failed:\n{proc.stderr}")
    with open(out + ".json") as f:
        rep = json.load(f)
    rep["cpu_seconds"] = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return seconds, rep


def near_dedup_bench(a):
    from corpus import near_duplicate_corpus

    res = {"workers": a.workers, "repeats": a.repeats, "cpus": os.cpu_count(), "scales": {}}
    with tempfile.TemporaryDirectory() as tmp:
        model = _train_tokenizer(tmp)
        for scale in (1, a.scale):
            n = a.docs * scale
            texts, source = near_duplicate_corpus(n, seed=scale)
            corpus = os.path.join(tmp, f"corpus{scale}.jsonl")
            with open(corpus, "w") as f:
                for t in texts:
                    f.write(json.dumps({"text": t}) + "\n")
            out = os.path.join(tmp, "out")
            # quality: byte tokens decode to the exact texts that were kept
            _, rep = _dedup_run(corpus, out, a.workers, "near", None)
            kept = {
                bytes(x[:-1].astype(np.uint8)).decode()
                for x in IndexedDataset(out + "_text_document")
            }
            removed = np.array([t not in kept for t in texts])
            planted = source >= 0
            run = {
                "documents": n,
                "input_mb": round(os.path.getsize(corpus) / 2**20, 1),
                "planted": int(planted.sum()),
                "recall": float(removed[planted].mean()),
                "precision": float(planted[removed].mean()) if removed.any() else 1.0,
                "distinct_removed": float(removed[~planted].mean()),
                "index_bytes": rep["dedup"]["index_bytes"],
                "index_bytes_per_kept_document": rep["dedup"]["index_bytes"]
                / max(rep["dedup"]["signatures"], 1),
            }
            del texts, source, kept, removed
            times = {"exact": [], "near": []}
            cpu = {"exact": [], "near": []}
            rss = {"exact": [], "near": []}
            for _ in range(a.repeats):
                for mode in ("exact", "near"):
                    sec, rep = _dedup_run(corpus, out, a.workers, mode, model)
                    times[mode].append(rep["documents_in"] / sec)
                    cpu[mode].append(rep["documents_in"] / rep["cpu_seconds"])
                    rss[mode].append(rep["peak_rss_mb"])
            for mode in ("exact", "near"):
                run[f"{mode}_docs_per_s"] = statistics.median(times[mode])
                run[f"{mode}_all_docs_per_s"] = times[mode]
                run[f"{mode}_docs_per_cpu_s"] = statistics.median(cpu[mode])
                run[f"{mode}_peak_rss_main_mb"] = max(r["main"] for r in rss[mode])
                run[f"{mode}_peak_rss_worker_mb"] = max(r["workers"] for r in rss[mode])
            run["near_over_exact"] = run["near_docs_per_s"] / run["exact_docs_per_s"]
            run["near_over_exact_cpu"] = run["near_docs_per_cpu_s"] / run["exact_docs_per_cpu_s"]
            try:  # the same documents as Parquet (row groups of 5000), no deduplication
                import pyarrow as pa
                import pyarrow.parquet as pq

                texts = [json.loads(line)["text"] for line in open(corpus)]
                pq.write_table(pa.table({"text": texts}), corpus + ".parquet", row_group_size=5000)
                del texts
                for fmt, path in (("jsonl", corpus), ("parquet", corpus + ".parquet")):
                    sec, rep = _dedup_run(path, out, a.workers, None, model)
                    run[f"{fmt}_plain_docs_per_s"] = rep["documents_in"] / sec
                    run[f"{fmt}_plain_peak_rss_main_mb"] = rep["peak_rss_mb"]["main"]
                os.remove(corpus + ".parquet")
            except ImportError:
                pass
            res["scales"][f"{scale}x"] = run
            os.remove(corpus)
    one, big = res["scales"]["1x"], res["scales"][f"{a.scale}x"]
    print(
        f"--dedup near vs exact, {a.workers} workers, median of {a.repeats} ({os.cpu_count()} "
        f"CPUs, load {os.getloadavg()[0]:.1f})"
    )
    print(
        f"{'input':>6} {'docs':>8} {'MB':>6} {'exact docs/s':>12} {'near docs/s':>11} "
        f"{'ratio':>5} {'cpu ratio':>9} {'recall':>7} {'precision':>9} {'RSS exact':>9} "
        f"{'RSS near':>8} {'index B/doc':>11}"
    )
    for name, r in res["scales"].items():
        cols = [
            f"{name:>6}",
            f"{r['documents']:>8,}",
            f"{r['input_mb']:>6.1f}",
            f"{r['exact_docs_per_s']:>12,.0f}",
            f"{r['near_docs_per_s']:>11,.0f}",
            f"{r['near_over_exact']:>5.2f}",
            f"{r['near_over_exact_cpu']:>9.2f}",
            f"{r['recall']:>7.4f}",
            f"{r['precision']:>9.4f}",
            f"{r['exact_peak_rss_main_mb']:>9.1f}",
            f"{r['near_peak_rss_main_mb']:>8.1f}",
            f"{r['index_bytes_per_kept_document']:>11.0f}",
        ]
        print(" ".join(cols))
    res["near_memory_growth"] = big["near_peak_rss_main_mb"] / one["near_peak_rss_main_mb"]
    res["exact_memory_growth"] = big["exact_peak_rss_main_mb"] / one["exact_peak_rss_main_mb"]
    if "parquet_plain_peak_rss_main_mb" in one:
        for name, r in res["scales"].items():
            print(
                f"{name:>6} no dedup: JSONL {r['jsonl_plain_docs_per_s']:,.0f} docs/s, "
                f"{r['jsonl_plain_peak_rss_main_mb']:.1f} MB; Parquet "
                f"{r['parquet_plain_docs_per_s']:,.0f} docs/s, "
                f"{r['parquet_plain_peak_rss_main_mb']:.1f} MB (main process peak RSS)"
            )
    print(
        f"peak RSS of the main process {a.scale}x / 1x: near {res['near_memory_growth']:.2f}, "
        f"exact {res['exact_memory_growth']:.2f}"
    )
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)


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
    p.add_argument(
        "--near-dedup", action="store_true", help="measure --dedup near against --dedup exact"
    )
    p.add_argument("--docs", type=int, default=20000, help="--near-dedup: the small corpus")
    p.add_argument("--scale", type=int, default=10, help="--near-dedup: the large one, x docs")
    a = p.parse_args()
    if a.near_dedup:
        return near_dedup_bench(a)
    res = {"workers": a.workers, "repeats": a.repeats, "cpus": os.cpu_count(), "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        model = _train_tokenizer(tmp)
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
