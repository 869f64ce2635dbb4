"""How soon training prompts flow, and in how much memory, as a dataset grows: 1,000,000 rows
against 10,000, in each input kind the engine reads lazily.

    .venv/bin/python launch/bench_data.py [--rows 1000000] [--small 10000] [--json out.json]

Datasets are generated in a temporary folder, every row naming one of a few demo images
(artifacts/demo-data) by absolute path: jsonl in our schema, parquet in verl's (1000-row groups)
and a Hugging Face `save_to_disk` folder (Arrow IPC stream, 1000-row batches) in EasyR1's. Each
measurement runs in a fresh process that loads the demo's processor and does the same read of a
100-row dataset of the same kind first (imports, allocator pools and the processor's first call are
then not counted), then opens data.train as a run does (engine/preflight.py's `open_train`: up to
data.check_rows rows are checked whole first, more are read lazily) and serves the first 16 prompts
of a shuffled stream (images decoded and processed). Reported: seconds to open, seconds until the
16th prompt (opening included), the peak resident memory above the memory before opening (VmHWM,
reset by /proc/self/clear_refs), and the anonymous and file-backed (memory-mapped, reclaimable)
growth while the rows are still held. `whole` rows load the small dataset into memory with
`load_rows` (how validation sets are read, and how training sets were read before): the size of
materialised rows.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Iterator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
DEMO = os.path.join(ROOT, "artifacts", "demo-data")
MODEL = os.path.join(ROOT, "artifacts", "tiny-qwen2.5-vl")
CHUNK = 100_000


def _demo_rows() -> list[dict]:
    with open(os.path.join(DEMO, "train.jsonl")) as f:
        rows = [json.loads(line) for line in f][:4]
    for row in rows:
        row["images"] = [os.path.join(DEMO, p) for p in row["images"]]
    return rows


def _question(row: dict) -> str:
    from rewards import format_prompt

    return format_prompt(row["question"], row["options"])


def write_jsonl(path: str, n: int) -> None:
    demo = _demo_rows()
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({**demo[i % len(demo)], "id": f"r{i}"}) + "\n")


def _chunks(n: int, make: Callable[[int, dict], dict]) -> Iterator[Any]:
    """Tables of CHUNK generated rows (the rows of 1M dicts at once would take gigabytes)."""
    import pyarrow as pa

    demo = _demo_rows()
    for start in range(0, n, CHUNK):
        yield pa.Table.from_pylist([make(i, demo[i % len(demo)]) for i in range(start, min(n, start + CHUNK))])


def write_parquet(path: str, n: int) -> None:
    import pyarrow.parquet as pq

    def verl(i: int, row: dict) -> dict:
        return {"data_source": row["data_source"], "prompt": [{"role": "user", "content": "<image>" + _question(row)}],
                "images": [{"bytes": None, "path": row["images"][0]}],
                "reward_model": {"ground_truth": row["answer"], "style": "rule"}, "extra_info": {"index": i}}

    writer = None
    for table in _chunks(n, verl):
        writer = writer or pq.ParquetWriter(path, table.schema)
        writer.write_table(table, row_group_size=1000)
    writer.close()


def write_save_to_disk(folder: str, n: int) -> None:
    import pyarrow as pa

    def easyr1(i: int, row: dict) -> dict:
        return {"problem": "<image>" + _question(row), "answer": row["answer"], "images": row["images"]}

    os.makedirs(folder)
    name = "data-00000-of-00001.arrow"
    writer = None
    with pa.OSFile(os.path.join(folder, name), "wb") as sink:
        for table in _chunks(n, easyr1):
            writer = writer or pa.ipc.new_stream(sink, table.schema)
            for batch in table.to_batches(max_chunksize=1000):
                writer.write_batch(batch)
        writer.close()
    with open(os.path.join(folder, "state.json"), "w") as f:
        json.dump({"_data_files": [{"filename": name}], "_format_type": None, "_split": "train"}, f)
    with open(os.path.join(folder, "dataset_info.json"), "w") as f:
        json.dump({"features": {}}, f)


def _rss_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field)) / 1024


def _read(path: str, mode: str, processor: Any, before: dict[str, float]) -> dict:
    """Opens `path` (and serves 16 prompts) or loads it whole; memory growth since `before` is taken
    while the rows are still held."""
    from engine.config import DataConfig
    from engine.data import PromptBuilder, PromptStream, load_rows
    from engine.preflight import open_train

    t0 = time.perf_counter()
    if mode == "whole":
        held: Any = load_rows(path)[0]
        out = {"rows": len(held), "open_s": time.perf_counter() - t0}
    else:
        data = DataConfig(train=path, val=None)
        held, _, _ = open_train(data)
        out = {"rows": len(held), "open_s": time.perf_counter() - t0, "checked": len(held) <= data.check_rows}
        assert len(PromptStream(held, PromptBuilder.from_config(processor, data), seed=0).take(16)) == 16
        out["first_16_s"] = time.perf_counter() - t0
    out["peak_rss_growth_mb"] = _rss_mb("VmHWM") - before.get("VmRSS", 0.0)
    # file-backed pages are memory-mapped data (Arrow files) that the kernel can drop again
    out["anon_growth_mb"], out["file_growth_mb"] = (_rss_mb(k) - before.get(k, 0.0) for k in ("RssAnon", "RssFile"))
    return out


def child(path: str, mode: str, warmup: str) -> dict:
    """One measurement, in a fresh process, after the same read of a tiny dataset of the same kind
    (so that first-use costs — imports, allocator pools, the processor's first call — are not counted)."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(MODEL)
    _read(warmup, mode, processor, {})
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS: the peak below is this measurement's
    return _read(path, mode, processor, {key: _rss_mb(key) for key in ("VmRSS", "RssAnon", "RssFile")})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--small", type=int, default=10_000)
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--child", nargs=3, metavar=("PATH", "MODE", "WARMUP"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        return
    writers = {"jsonl (ours)": (write_jsonl, "rows.jsonl"), "parquet (verl)": (write_parquet, "rows.parquet"),
               "save_to_disk (EasyR1)": (write_save_to_disk, "rows_hf")}
    results = []
    with tempfile.TemporaryDirectory(prefix="bench_data-") as tmp:
        for kind, (write, name) in writers.items():
            warmup = os.path.join(tmp, f"warmup_{name}")
            write(warmup, 100)
            for n in (args.small, args.rows):
                path = os.path.join(tmp, f"{n}_{name}")
                t0 = time.perf_counter()
                write(path, n)
                written = time.perf_counter() - t0
                for mode in ["lazy", "whole"] if n == args.small else ["lazy"]:
                    proc = subprocess.run([sys.executable, __file__, "--child", path, mode, warmup],
                                          capture_output=True, text=True, cwd=ROOT)
                    if proc.returncode != 0:
                        sys.exit(f"{kind}, {n} rows, {mode}: failed\n{proc.stderr[-3000:]}")
                    measured = json.loads(proc.stdout.splitlines()[-1])
                    result = {"kind": kind, "mode": mode, "write_s": written, **measured}
                    results.append(result)
                    print(json.dumps(result), file=sys.stderr)
    print("| input | rows | read | open s | first 16 prompts s | peak RSS growth MB | held: anon / file-backed MB |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        first = f"{r['first_16_s']:.2f}" if "first_16_s" in r else "-"
        read = ("whole (`load_rows`)" if r["mode"] == "whole" else
                "checked whole, then served" if r["checked"] else "served lazily")
        print(f"| {r['kind']} | {r['rows']:,} | {read} | {r['open_s']:.2f} | {first} | "
              f"{r['peak_rss_growth_mb']:.0f} | {r['anon_growth_mb']:.0f} / {r['file_growth_mb']:.0f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
