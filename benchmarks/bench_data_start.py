"""Start-up cost of the GAD dataset: serial (the pre-cache path) vs parallel tokenization vs the cache.

A synthetic LMSYS-like set is written (``--rows``, default 200,000; JSONL or Parquet): prompts are a
string or a chat (a system message, a few turns) and teacher responses are long, their word counts
drawn from log-normal distributions clipped to the GAD lengths. Words come from a Zipf-like
vocabulary, with punctuation, digits and non-ASCII letters mixed in. The tokenizer is a byte-level
BPE (the kind Qwen2.5 uses) trained here on a sample of that text, with a ChatML template, so the
per-row cost (template rendering plus BPE) has the shape of the real one; no download is needed.

Four ways to build the same dataset from the same file, each timed once in a fresh process:

* **serial**: the pre-cache code path (``SerialDataset`` below): one row at a time,
  ``apply_chat_template`` and ``encode`` per row, lists of lists;
* **batched**: ``GADDataset`` with one process and no cache: one fast-tokenizer call per chunk of rows
  (the Rust tokenizer may use its own threads);
* **parallel**: ``GADDataset`` with ``--workers`` processes and nothing in the cache (the first start;
  it writes the cache);
* **cached**: the next start (a resume or a requeue): the file is hashed and the token arrays are read
  from the cache (checksums verified).

The results must be equal row for row (checked here on every row: ids and skip counts).

    python benchmarks/bench_data_start.py [--rows 200000] [--format jsonl|parquet] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
MODES = ("serial", "batched", "parallel", "cached")
CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


# ---------------------------------------------------------------------------------- synthetic data
def make_rows(rows: int, seed: int = 0):
    """Yields GAD rows (content, teacher_response) with LMSYS-like shapes."""
    import numpy as np

    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyzéüß"))
    vocab = ["".join(rng.choice(letters, size=int(k))) for k in rng.integers(2, 9, size=20_000)]
    vocab = np.array(vocab + [",", ".", "?", "(", ")", "42", "3.14", "2025", "ça", "naïve", "数据", "模型"])
    cdf = np.cumsum(1.0 / np.arange(1, len(vocab) + 1) ** 1.1)
    cdf /= cdf[-1]

    def words(count: int) -> str:
        return " ".join(vocab[np.searchsorted(cdf, rng.random(count))].tolist())

    p_len = np.clip(rng.lognormal(np.log(30), 1.0, size=rows), 2, 1200).astype(int)
    r_len = np.clip(rng.lognormal(np.log(150), 0.6, size=rows), 5, 1000).astype(int)
    for i in range(rows):
        if i % 3 == 0:  # a chat: system + earlier turn + question
            content = [{"role": "system", "content": "You are a helpful assistant."},
                       {"role": "user", "content": words(8)}, {"role": "assistant", "content": words(12)},
                       {"role": "user", "content": words(int(p_len[i]))}]
        else:
            content = words(int(p_len[i]))
        yield {"content": content, "teacher_response": words(int(r_len[i]))}


def write_rows(path: str, rows: int) -> None:
    if path.endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        # one Parquet column must have one type: chats are stored as JSON-free message lists, strings
        # as a one-message chat (the template renders both the same way)
        batch = []
        writer = None
        for row in make_rows(rows):
            c = row["content"]
            batch.append({"content": c if isinstance(c, list) else [{"role": "user", "content": c}],
                          "teacher_response": row["teacher_response"]})
            if len(batch) == 10_000:
                table = pa.Table.from_pylist(batch)
                writer = writer or pq.ParquetWriter(path, table.schema)
                writer.write_table(table)
                batch = []
        if batch:
            table = pa.Table.from_pylist(batch)
            writer = writer or pq.ParquetWriter(path, table.schema)
            writer.write_table(table)
        writer.close()
        return
    with open(path, "w", encoding="utf-8") as f:
        for row in make_rows(rows):
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def make_tokenizer(out_dir: str, sample_rows: int = 2000, vocab_size: int = 16_000) -> str:
    """A byte-level BPE tokenizer trained on a sample of the synthetic text, ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    texts = (r["teacher_response"] for r in make_rows(sample_rows, seed=1))
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    hf.chat_template = CHATML
    hf.save_pretrained(out_dir)
    return out_dir


# ---------------------------------------------------------------------------------- one timed start
class SerialDataset:
    """The pre-cache ``GADDataset`` construction, kept here as the baseline: one row at a time,
    ``encode_prompt`` / ``encode_teacher_response`` per row, lists of lists."""

    def __init__(self, path: str, tok, max_prompt: int, max_response: int):
        from collections import Counter

        from megatron_gad.data import BadRow, check_row, encode_prompt, encode_teacher_response, iter_file

        self.prompt_ids, self.teacher_response_ids, skipped = [], [], Counter()
        for _, row in iter_file(path, ("content", "teacher_response")):
            try:
                prompt, response = check_row(row, "content", "teacher_response")
                p = encode_prompt(tok, prompt)
                if len(p) > max_prompt:
                    raise BadRow("prompt_too_long", "")
                r = encode_teacher_response(tok, response)
                if len(r) > max_response:
                    raise BadRow("response_too_long", "")
            except BadRow as e:
                skipped[e.reason] += 1
                continue
            self.prompt_ids.append(p)
            self.teacher_response_ids.append(r)
        self.skipped = dict(sorted(skipped.items()))


def _child(args) -> None:
    """One start in this (fresh) process: build the dataset, print its timing and a digest of its ids."""
    import hashlib
    import logging

    from transformers import AutoTokenizer

    from megatron_gad.data import GADDataset

    logging.basicConfig(level=logging.INFO, format="    %(message)s", stream=sys.stderr)
    tok = AutoTokenizer.from_pretrained(args.tok)
    t0 = time.perf_counter()
    if args.mode == "serial":
        ds = SerialDataset(args.data, tok, args.max_prompt, args.max_response)
    else:
        ds = GADDataset(args.data, tok, max_prompt_length=args.max_prompt, max_response_length=args.max_response,
                        on_bad_row="skip", cache_dir=None if args.mode == "batched" else args.cache,
                        num_workers=1 if args.mode == "batched" else args.workers)
    seconds = time.perf_counter() - t0
    h = hashlib.sha256()
    tokens = 0
    for p, r in zip(ds.prompt_ids, ds.teacher_response_ids):
        h.update(json.dumps([p, r]).encode())
        tokens += len(p) + len(r)
    print(json.dumps({"seconds": seconds, "rows": len(ds.prompt_ids), "tokens": tokens, "skipped": ds.skipped,
                      "digest": h.hexdigest()}))


def _start(mode: str, args, data: str, tok: str, cache: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", mode, "--data", data, "--tok", tok,
           "--cache", cache, "--workers", str(args.workers), "--max-prompt", str(args.max_prompt),
           "--max-response", str(args.max_response)]
    env = {**os.environ, "PYTHONPATH": os.path.dirname(HERE) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
    sys.stderr.write(out.stderr)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    from megatron_gad.tokenized import CHUNK_ROWS

    global CHUNK
    CHUNK = CHUNK_ROWS

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=200_000)
    p.add_argument("--format", choices=["jsonl", "parquet"], default="jsonl")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--max-prompt", type=int, default=2048)
    p.add_argument("--max-response", type=int, default=1536)
    p.add_argument("--workdir", default=None, help="keep the data, tokenizer and cache here (default: a temp dir)")
    p.add_argument("--out", default=os.path.join(HERE, "results", "data_start"))
    p.add_argument("--modes", default=",".join(MODES),
                   help=f"starts to time, in this order (default all: {','.join(MODES)}); cached needs parallel")
    p.add_argument("--child", choices=MODES, default=None, help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--tok", help=argparse.SUPPRESS)
    p.add_argument("--cache", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        args.mode = args.child
        _child(args)
        return

    work = args.workdir or tempfile.mkdtemp(prefix="bench_data_start_")
    os.makedirs(work, exist_ok=True)
    data = os.path.join(work, f"train_{args.rows}.{args.format}")
    tok = os.path.join(work, "tokenizer")
    cache = os.path.join(work, "cache")
    t0 = time.perf_counter()
    if not os.path.exists(data):
        write_rows(data, args.rows)
    if not os.path.exists(os.path.join(tok, "tokenizer.json")):
        make_tokenizer(tok)
    print(f"data {data} ({os.path.getsize(data) / 2**20:.0f} MiB) and tokenizer ready in "
          f"{time.perf_counter() - t0:.0f} s", flush=True)
    if os.path.isdir(cache):
        import shutil

        shutil.rmtree(cache)
    modes = [m for m in MODES if m in args.modes.split(",")]
    if "cached" in modes and "parallel" not in modes:
        p.error("--modes: cached reads the cache the parallel start writes; add parallel")
    runs = {}
    for mode in modes:
        runs[mode] = _start(mode, args, data, tok, cache)
        print(f"{mode:9s} {runs[mode]['seconds']:8.2f} s  ({runs[mode]['rows']} rows)", flush=True)
    digests = {r["digest"] for r in runs.values()}
    skipped = {json.dumps(r["skipped"], sort_keys=True) for r in runs.values()}
    assert len(digests) == 1 and len(skipped) == 1, f"the starts disagree: {runs}"
    cache_bytes = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(cache) for f in fs)
    first = runs[modes[0]]
    base = runs.get("serial")
    result = {
        "rows_in_file": args.rows, "rows_kept": first["rows"], "skipped": first["skipped"],
        "tokens": first["tokens"], "format": args.format, "modes": modes,
        "file_mib": round(os.path.getsize(data) / 2**20, 1), "cache_mib": round(cache_bytes / 2**20, 1),
        "workers": args.workers, "cpu_count": os.cpu_count(), "machine": platform.processor() or platform.machine(),
        "seconds": {m: round(r["seconds"], 2) for m, r in runs.items()},
        "speedup_vs_serial": {m: round(base["seconds"] / r["seconds"], 1) for m, r in runs.items()} if base else None,
        "equal_results": True,
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(result, f, indent=2)
    s = result["seconds"]

    def row(mode: str, what: str, fmt: str = ".1f") -> str:
        if mode not in s:
            return f"| {mode} | {what} | not run | - |"
        vs = f"{result['speedup_vs_serial'][mode]}x" if base else "-"
        return f"| {mode} | {what} | {s[mode]:{fmt}} | {vs} |"

    md = [
        "# Dataset start-up: serial vs parallel tokenization vs cache",
        "",
        f"{args.rows:,} synthetic LMSYS-like rows ({args.format}, {result['file_mib']} MiB, "
        f"{result['tokens']:,} tokens kept; byte-level BPE, ChatML template), max lengths "
        f"{args.max_prompt}/{args.max_response}, {os.cpu_count()} CPU cores. Each start runs in a fresh "
        "process; their results are equal row for row.",
        "",
        "| start | what it does | seconds | vs serial |",
        "|---|---|---:|---:|",
        row("serial", "one row at a time (the pre-cache path)"),
        row("batched", f"one tokenizer call per {CHUNK} rows, this process only, no cache"),
        row("parallel", f"batched fast tokenizer, {args.workers} processes; writes the cache"),
        row("cached", "hash the file, read the cached arrays, verify checksums (a resume or requeue)", ".2f"),
        "",
        f"Cache size: {result['cache_mib']} MiB. Reproduce: `python benchmarks/bench_data_start.py --rows {args.rows} "
        f"--format {args.format} --workers {args.workers} --modes {','.join(modes)}`.",
    ]
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
