"""How far a lookup alone goes: the nearest approved answer against the consensus one, no model at all.

Each test message is answered from the dataset's train split (never from its own leakage group) by
(a) the nearest training message's reply, the `retrieval` responder, and (b) the reply that the
answers of the 8 nearest messages agree on most (minimum-Bayes-risk selection within the nearest
answer's intent: `ml.memory.grounding.grounding_exemplars`, the first exemplar a grounded prompt
carries). Scored with csra's own metrics on the evaluation's stratified draw (seed 42), so the rows
compare with `bench/grounded.py`'s. In-process, against the data directory of a stack that has
imported the dataset (`CSRA_DATA_DIR`); no worker or model is needed.

    CSRA_DATA_DIR=/srv/csra python bench/consensus_lookup.py --dataset 1 --split test --samples 300 --samples all
"""

from __future__ import annotations

import argparse
from collections import Counter

import numpy as np

from csra.memory import embedder
from csra.specs import Grounding
from ml import metrics
from ml.memory.grounding import grounding_exemplars
from ml.sampling import stratified_sample
from workers.handlers.training import load_split
from workers.neighbours import nearest, split_memory


def scores(predictions: list[str], references: list[str]) -> str:
    rouge = float(np.mean([metrics.rouge_l(p, r) for p, r in zip(predictions, references, strict=True)]))
    semantic = float(np.mean(metrics.semantic_similarities(predictions, references)))
    return (f"ROUGE-L {rouge:.4f}  BLEU {metrics.corpus_bleu(predictions, references):.2f}  "
            f"chrF {metrics.corpus_chrf(predictions, references):.2f}  semantic {semantic:.4f}")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--dataset", type=int, default=1)
    p.add_argument("--split", default="test", choices=("test", "validation"))
    p.add_argument("--samples", action="append", default=None, help="rows per run ('all': every one)")
    p.add_argument("--pool", type=int, default=8, help="the consensus among this many nearest answers")
    p.add_argument("--seed", type=int, default=42)
    args = p.parse_args()
    train = load_split(args.dataset, "train")
    memory, _ = split_memory(args.dataset, train)
    rows = load_split(args.dataset, args.split)
    consensus = Grounding(k=1, consensus_pool=args.pool)
    for n in args.samples or ["300"]:
        examples = stratified_sample(rows, None if n == "all" else int(n), args.seed)
        messages = [e["input"] for e in examples]
        hits = nearest(memory, embedder().embed(messages), messages, k=args.pool)
        references = [e["output"] for e in examples]
        intents = Counter(e.get("intent") for e in examples)
        print(f"\n{args.split}, {len(examples)} rows, {len(intents)} intents "
              f"({', '.join(f'{k} {v}' for k, v in intents.most_common(3))}, ...), seed {args.seed}")
        print(f"{'nearest answer (retrieval)':34s}", scores([h[0].entry.reply for h in hits], references))
        chosen = [grounding_exemplars(consensus, h)[0].entry.reply for h in hits]
        print(f"{f'consensus of the {args.pool} nearest':34s}", scores(chosen, references))


if __name__ == "__main__":
    main()
