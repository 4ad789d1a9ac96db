"""Answer-memory search speed at 100,000 answers: the embedding of a query, the index search, both.

    python bench/memory.py [--entries 100000] [--queries 200] [--k 5]

The vectors are real: every customer message of the full Bitext instructions file (26,872) embedded
with the memory's own embedder (MiniLM through ONNX Runtime), then repeated with a little noise up
to ``--entries`` (near-duplicates, as a real team's memory has). Queries are other real messages.
Goal (issue "Grounded replies"): search p50 under 20 ms at 100,000 answers on this machine.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from ml.memory.embedder import Embedder  # noqa: E402
from ml.memory.export import export_embedder  # noqa: E402
from ml.memory.memory import AnswerMemory, Entry  # noqa: E402
from ml.metrics import embedding_model_dir  # noqa: E402

FULL = REPO.parent / "shared/data/bitext/bitext_instructions_intents_full.csv"


def ms(values: list[float]) -> str:
    q = statistics.quantiles(values, n=100)
    return f"p50 {statistics.median(values):7.2f} ms   p99 {q[98]:7.2f} ms"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--entries", type=int, default=100_000)
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--data", type=Path, default=FULL)
    p.add_argument("--real", type=int, default=5000, help="real messages embedded (the rest: noisy repeats)")
    args = p.parse_args()
    folder = export_embedder(embedding_model_dir(), Path(tempfile.mkdtemp()) / "embedder")
    embedder = Embedder(folder)
    messages = pd.read_csv(args.data)["instruction"].astype(str).tolist()
    rng = np.random.default_rng(0)
    order = rng.permutation(len(messages))
    queries = [messages[i] for i in order[: args.queries]]
    base_texts = [messages[i] for i in order[args.queries: args.queries + args.real]]
    t0 = time.perf_counter()
    base = embedder.embed(base_texts)
    embed_all = time.perf_counter() - t0
    reps = -(-args.entries // len(base))
    vectors = np.concatenate([base + rng.normal(0, 0.02, base.shape).astype(np.float32) * (r > 0)
                              for r in range(reps)])[: args.entries]
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    memory = AnswerMemory()  # what the API and the workers search (entries + message index)
    t0 = time.perf_counter()
    memory.add([Entry(i, "", "", group=str(i)) for i in range(len(vectors))], vectors, None)
    build = time.perf_counter() - t0
    index = memory.messages
    embed_ms, search_ms, exact_ms, both_ms, recall, memory_ms = [], [], [], [], [], []
    for q in queries:
        t0 = time.perf_counter()
        vec = embedder.embed([q])[0]
        t1 = time.perf_counter()
        found = index.search(vec, args.k)
        t2 = time.perf_counter()
        truth = index.search(vec, args.k, exact=True)
        t3 = time.perf_counter()
        embed_ms.append((t1 - t0) * 1000)
        search_ms.append((t2 - t1) * 1000)
        both_ms.append((t2 - t0) * 1000)
        exact_ms.append((t3 - t2) * 1000)
        memory.similar(vec, args.k)
        memory_ms.append((time.perf_counter() - t3) * 1000)
        recall.append(len({k for k, _ in found} & {k for k, _ in truth}) / args.k)
    print(f"\nanswer memory: {len(index):,} entries ({len(base):,} real Bitext messages embedded in {embed_all:.0f} s, "
          f"repeated with noise); index built in {build:.1f} s; {args.queries} real queries, k={args.k}")
    print(f"  embed the query (MiniLM, ONNX Runtime)  {ms(embed_ms)}")
    print(f"  search the index (usearch HNSW)         {ms(search_ms)}   recall@{args.k} vs exact "
          f"{statistics.fmean(recall):.3f}")
    print(f"  exact search (brute force, evaluation)  {ms(exact_ms)}")
    print(f"  AnswerMemory.similar (index + entries)  {ms(memory_ms)}")
    print(f"  embed + search                          {ms(both_ms)}   goal: search p50 < 20 ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
