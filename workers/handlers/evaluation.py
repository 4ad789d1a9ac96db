"""Evaluation jobs: batched generation on a held-out split, metrics, stored predictions, report.

Each model's predictions and metrics are committed as soon as that model is done, so a model
that fails (or a cancel) never loses the results already computed for the others. Within a
model, finished batches are checkpointed to a file, so a retried job resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import os
import statistics
import time
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import Any

from sqlalchemy import delete, insert, select

from csra.jobctx import JobCancelled, JobContext, JobError
from csra.settings import get_settings
from csra.specs import RETRIEVAL, EvaluateSpec, Grounding, loop_guard, recorded_grounding
from db.models import Evaluation, EvaluationExample, Job, JobEvent, Model
from db.session import session_scope
from ml.importing.columns import UNKNOWN as UNKNOWN_INTENT
from ml.memory.grounding import Steering, steering
from ml.sampling import composition, stratified_sample
from models_store.registry import ensure_baseline_registered, find_model_row
from workers.handlers.generation import load_profile
from workers.handlers.memory import ensure_embedder
from workers.handlers.training import background_yielder, load_split
from workers.neighbours import Neighbours, neighbours_for
from workers.presence import publish_invariance

logger = logging.getLogger(__name__)


def sample_makeup(examples: list[dict[str, Any]], split_rows: list[dict[str, Any]]) -> dict[str, Any]:
    """What was evaluated: examples and intents covered, against the whole split, per intent."""
    per_intent = composition(examples)
    return {"examples": len(examples), "split_rows": len(split_rows), "intents": len(per_intent),
            "split_intents": len(composition(split_rows)), "per_intent": per_intent}


def _evaluation_for(job_id: int, spec: EvaluateSpec, sample: dict[str, Any]) -> int:
    """The evaluation row of this job (reused by a retried job)."""
    with session_scope() as s:
        ev = s.scalar(select(Evaluation).where(Evaluation.job_id == job_id))
        if ev is None:
            job = s.get(Job, job_id)
            ev = Evaluation(job_id=job_id, dataset_id=spec.dataset_id, split=spec.split,
                            owner=job.owner if job is not None else None,
                            params=spec.model_dump(mode="json"), metrics={}, sample=sample, status="running")
            s.add(ev)
            s.flush()
        return ev.id


def _resolve(ref: str) -> dict[str, Any]:
    if ref == get_settings().baseline_name:
        return ensure_baseline_registered()
    row = find_model_row(ref)
    if row is None:
        raise JobError(f"model {ref!r} does not exist (GET /models lists the models)")
    return row


class _Checkpoint:
    """A model's finished predictions, appended batch by batch to a JSON-lines file.

    A retried job (worker killed, Redis restart) reads it back and generates only the examples
    that are missing, so a long evaluation does not start the model over. Lines name their
    example ids; a file written for other examples is ignored. Removed once the model is stored.
    """

    def __init__(self, path: Path, example_ids: list[Any]) -> None:
        self.path, self.example_ids = path, example_ids
        self.results: dict[int, Any] = {}
        self.wall = 0.0
        self._read()

    def _read(self) -> None:
        from ml.inference.types import GenerationResult

        if not self.path.is_file():
            return
        position = {eid: i for i, eid in enumerate(self.example_ids)}
        try:
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    batch = json.loads(line)
                except json.JSONDecodeError:
                    break  # a line torn by the crash: its batch is generated again
                results = {}
                for item in batch["results"]:
                    i = position.get(item.pop("example_id"))
                    if i is None:
                        raise ValueError("it was written for other examples")
                    results[i] = GenerationResult(**item)
                self.results.update(results)
                self.wall += float(batch["wall"])
        except (ValueError, KeyError, TypeError) as exc:
            logger.warning("ignoring evaluation checkpoint %s: %s", self.path, exc)
            self.results, self.wall = {}, 0.0
            self.path.unlink(missing_ok=True)

    def append(self, indices: list[int], results: list[Any], wall: float) -> None:
        items = [{"example_id": self.example_ids[i], **dataclasses.asdict(r)} for i, r in zip(indices, results,
                                                                                              strict=True)]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps({"wall": wall, "results": items}) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.wall += wall
        for i, r in zip(indices, results, strict=True):
            self.results[i] = r


def checkpoint_path(eval_id: int, model_name: str) -> Path:
    return get_settings().data_dir / "evaluations" / str(eval_id) / f"predictions-{model_name}.partial.jsonl"


def _predict(row: dict[str, Any], examples: list[dict[str, Any]], spec: EvaluateSpec, ctx: JobContext,
             done_before: int, total: int, checkpoint: Path | None = None, neighbours: Neighbours | None = None,
             ) -> tuple[list[str], list[Any], float, dict[str, Any]]:
    """Every example's prediction; with ``checkpoint``, resumes from and appends to that file. A model
    trained grounded is shown each example's nearest training answers, as in chat.

    Returns (prompts, results in example order, generation wall time in seconds, the model's
    batch-invariance self-check on this worker).
    """
    from ml.inference.batches import generate_many
    from ml.inference.selfcheck import prepare_model
    from ml.inference.types import GenerationRequest
    from models_store.loading import load_model_and_tokenizer

    saved = _Checkpoint(checkpoint, [e["id"] for e in examples]) if checkpoint is not None else None
    loaded = load_model_and_tokenizer(Path(row["path"]))
    try:
        invariance = prepare_model(loaded, spec.batch_size)
        publish_invariance(row["name"], invariance)
        if not invariance["batch_invariant"]:
            ctx.event("log", f"{row['name']}: batch invariance is OFF on this worker ({invariance['detail']}); "
                             "batched greedy replies may differ from one-at-a-time ones")
        prompts, steers = _prompts(loaded.tokenizer, row, examples, neighbours, spec)
        todo = [i for i in range(len(examples)) if saved is None or i not in saved.results]
        requests = [GenerationRequest(prompt=prompts[i], **dataclasses.asdict(steers[i]),
                                      temperature=spec.temperature, seed=spec.seed, num_beams=spec.num_beams)
                    for i in todo]
        already = len(examples) - len(todo)
        if already:
            ctx.event("log", f"{row['name']}: {already} predictions kept from an interrupted run")

        def on_batch(done: int, n: int) -> None:
            ctx.progress((done_before + already + done) / total,
                         f"{row['name']}: generated {already + done}/{len(examples)}")

        t0 = time.perf_counter()
        last = [t0]

        def on_results(indices: list[int], results: list[Any]) -> None:
            now = time.perf_counter()
            if saved is not None:
                saved.append([todo[i] for i in indices], results, now - last[0])
            last[0] = now

        yield_cpu = background_yielder(ctx)

        def each_step() -> None:
            ctx.check_cancelled()
            if yield_cpu is not None:
                yield_cpu()  # chats on this machine first

        new = generate_many(loaded, requests, batch_size=spec.batch_size, on_batch_done=on_batch,
                            check_cancelled=each_step, on_results=on_results)
        wall = time.perf_counter() - t0
        if saved is None:
            return prompts, new, wall, invariance
        return prompts, [saved.results[i] for i in range(len(examples))], saved.wall, invariance
    finally:
        del loaded
        gc.collect()


def _predict_llamacpp(row: dict[str, Any], examples: list[dict[str, Any]], spec: EvaluateSpec, ctx: JobContext,
                      done_before: int, total: int, neighbours: Neighbours | None,
                      ) -> tuple[list[str], list[Any], float, dict[str, Any] | None]:
    """Every example's prediction through llama.cpp from the model's GGUF export (``spec.backend``): the same
    prompts as torch, ``batch_size`` sequences decoding together. Not resumable (no checkpoint)."""
    from ml.inference.llamacpp import LlamaCppEngine, LlamaCppLoadError, ReplyDecoder
    from ml.inference.tokens import encode_prompt_with
    from ml.inference.types import GenerationRequest
    from models_store.loading import load_tokenizer
    from models_store.naming import preferred_gguf
    from models_store.registry import fetch_exports

    quant = spec.backend.partition(":")[2]
    fetch_exports(row["name"], row.get("content_hash"), Path(row["path"]))  # published from another host
    gguf = preferred_gguf(Path(row["path"]), [quant])
    if gguf is None:
        raise JobError(f"model {row['name']!r} has no GGUF export at {quant}: POST /models/{row['name']}/export "
                       f'{{"quantization": "{quant}"}} makes one')
    tokenizer, arch = load_tokenizer(row["path"])
    decoder = ReplyDecoder.from_tokenizer(tokenizer, arch)
    prompts, steers = _prompts(tokenizer, row, examples, neighbours, spec)
    requests = [GenerationRequest(prompt=p, **dataclasses.asdict(steer), temperature=spec.temperature,
                                  seed=spec.seed, num_beams=spec.num_beams)
                for p, steer in zip(prompts, steers, strict=True)]
    t0 = time.perf_counter()
    with LlamaCppEngine(max_batch_size=spec.batch_size) as engine:
        try:
            engine.load(gguf)
        except LlamaCppLoadError as e:
            raise JobError(f"llama.cpp could not load {gguf.name} ({e}); re-export the model") from None
        futures = [engine.submit(gguf, encode_prompt_with(tokenizer, arch, r.prompt), r, decoder) for r in requests]
        results = []
        for i, future in enumerate(futures):
            while True:
                try:
                    results.append(future.result(timeout=1.0))
                    break
                except FutureTimeout:
                    ctx.check_cancelled()
            if (i + 1) % 16 == 0 or i + 1 == len(futures):
                ctx.progress((done_before + i + 1) / total, f"{row['name']}: generated {i + 1}/{len(examples)} "
                                                            f"({spec.backend})")
    return prompts, results, time.perf_counter() - t0, None


def _prompts(tokenizer: Any, row: dict[str, Any], examples: list[dict[str, Any]], neighbours: Neighbours | None,
             spec: EvaluateSpec) -> tuple[list[str], list[Steering]]:
    """Each example's prompt and how decoding holds its reply to the exemplars (a grounded model's length
    floor and copy bias)."""
    from ml.prompting import example_prompt, truncate_tokens

    grounding = _grounding(row, spec)
    if grounding is None:
        return ([example_prompt(tokenizer, e["instruction"], e["input"]) for e in examples],
                [steering(tokenizer, None, [], spec.max_new_tokens, spec.no_repeat_ngram_size)] * len(examples))
    if neighbours is None:
        raise JobError(f"{row['name']} was trained grounded, but the answer memory of this dataset could not be "
                       "prepared (see the job log)")
    prompts, steers = [], []
    for i, e in enumerate(examples):
        exemplars = neighbours.exemplars(i, grounding)
        prompts.append(example_prompt(tokenizer, e["instruction"], e["input"],
                                      [truncate_tokens(tokenizer, x, grounding.max_exemplar_tokens)
                                       for x in exemplars], grounding.template))
        steers.append(steering(tokenizer, grounding, exemplars, spec.max_new_tokens, spec.no_repeat_ngram_size,
                               neighbours.nearest_similarity(i)))
    return prompts, steers


def _grounding(row: dict[str, Any], spec: EvaluateSpec) -> Grounding | None:
    """How the model is grounded in this evaluation: as trained, with the evaluation's overrides."""
    return recorded_grounding(row.get("grounding"), length_floor=spec.length_floor, copy_bias=spec.copy_bias,
                              copy_exemplars=spec.copy_exemplars,
                              consensus_pool=spec.consensus_pool, no_repeat_ngram_size=spec.no_repeat_ngram_size)


def _score(examples: list[dict[str, Any]], results: list[Any], wall: float, neighbours: Neighbours | None,
           grounding: Grounding | None, consensus_pool: int = 0) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    from ml.metrics import ExampleInput, aggregate, score_examples

    inputs = [ExampleInput(prediction=r.text, reference=e["output"], intent=e.get("intent") or "",
                           category=e.get("category") or "", hit_token_limit=r.finish_reason == "length")
              for e, r in zip(examples, results, strict=True)]
    scores = score_examples(inputs)
    if neighbours is not None:  # judged against the dataset's approved answers: intent and placeholders
        judged_all = neighbours.judge([r.text for r in results], grounding, consensus_pool)
        for s, e, judged in zip(scores, examples, judged_all, strict=True):
            reply_intent, intent = judged.pop("reply_intent"), e.get("intent") or ""
            # unknown intents (a dataset without them) are not judged
            s["intent_match"] = (reply_intent == intent) if intent and intent != UNKNOWN_INTENT else None
            s.update(judged)
    agg = aggregate(scores, inputs)
    latencies = [r.latency_ms for r in results]
    tokens = sum(r.completion_tokens for r in results)
    agg["overall"]["latency_ms_mean"] = statistics.fmean(latencies)
    agg["overall"]["tokens_per_second"] = tokens / max(wall, 1e-9)  # batched: wall time, not summed latency
    agg["overall"]["examples_per_second"] = len(results) / max(wall, 1e-9)
    agg["overall"]["completion_tokens_mean"] = tokens / len(results)
    return scores, agg


def _store(eval_id: int, row: dict[str, Any], examples: list[dict[str, Any]], prompts: list[str],
           results: list[Any], scores: list[dict[str, Any]], agg: dict[str, Any]) -> None:
    with session_scope() as s:
        s.execute(delete(EvaluationExample).where(EvaluationExample.evaluation_id == eval_id,
                                                  EvaluationExample.model_name == row["name"]))
        s.execute(insert(EvaluationExample), [
            {"evaluation_id": eval_id, "model_id": row["id"], "model_name": row["name"], "example_id": e["id"],
             "intent": e.get("intent") or "", "category": e.get("category") or "", "prompt": e["input"],
             "reference": e["output"], "prediction": r.text, "scores": sc, "latency_ms": r.latency_ms}
            for e, p, r, sc in zip(examples, prompts, results, scores, strict=True)
        ])
        ev = s.get(Evaluation, eval_id)
        assert ev is not None
        ev.metrics = {**(ev.metrics or {}), row["name"]: agg}


def _loss_curves(names: list[str]) -> dict[str, list[dict[str, Any]]]:
    curves: dict[str, list[dict[str, Any]]] = {}
    with session_scope() as s:
        for m in s.scalars(select(Model).where(Model.name.in_(names), Model.train_job_id.is_not(None))):
            points = s.scalars(select(JobEvent.data).where(JobEvent.job_id == m.train_job_id,
                                                           JobEvent.kind == "metric")).all()
            curves[m.name] = [p for p in points if p and ("loss" in p or "eval_loss" in p)]
    return curves


def write_report(eval_id: int) -> dict[str, str]:
    from ml.report import build_report

    with session_scope() as s:
        ev = s.get(Evaluation, eval_id)
        assert ev is not None
        per_model = {k: v for k, v in (ev.metrics or {}).items() if "overall" in v}
        evaluation = {"id": ev.id, "dataset_id": ev.dataset_id, "split": ev.split, "sample": ev.sample,
                      "created_at": ev.created_at.isoformat(), "per_model": per_model}
        models = [{"name": m.name, "kind": m.kind, "base_model": m.base_model}
                  for m in s.scalars(select(Model).where(Model.name.in_(list(per_model))))]
        examples = [{"model": x.model_name, "intent": x.intent, "category": x.category, "prompt": x.prompt,
                     "reference": x.reference, "prediction": x.prediction, **(x.scores or {})}
                    for x in s.scalars(select(EvaluationExample).where(EvaluationExample.evaluation_id == eval_id))]
    out = get_settings().data_dir / "evaluations" / str(eval_id)
    paths = build_report(out, evaluation, models, examples, _loss_curves(list(per_model)))
    return {name: str(p) for name, p in paths.items()}


def _finish(eval_id: int, status: str) -> None:
    with session_scope() as s:
        ev = s.get(Evaluation, eval_id)
        if ev is not None:
            ev.status = status


def handle_evaluate(job_id: int, params: dict[str, Any], ctx: JobContext) -> dict[str, Any]:
    spec = EvaluateSpec.model_validate(params)
    rows = load_split(spec.dataset_id, spec.split)
    if not rows:
        raise JobError(f"the {spec.split} split of dataset {spec.dataset_id} is empty: nothing to evaluate")
    examples = stratified_sample(rows, spec.max_samples, spec.seed)
    sample = sample_makeup(examples, rows)
    eval_id = _evaluation_for(job_id, spec, sample)
    ctx.event("log", f"evaluation {eval_id}: {len(examples)} examples ({sample['intents']} of "
                     f"{sample['split_intents']} intents of the {spec.split} split) x {len(spec.model_ids)} models",
              sample=sample)
    errors: dict[str, str] = {}
    total = len(examples) * len(spec.model_ids)
    neighbours = _neighbours(spec.dataset_id, examples, ctx)
    for i, ref in enumerate(spec.model_ids):
        try:
            _evaluate_one(eval_id, ref, examples, spec, ctx, (i * len(examples), total), neighbours)
        except JobCancelled:
            _finish(eval_id, "cancelled")
            raise
        except Exception as e:  # one model failing must not lose the others' results
            logger.warning("evaluation %s: model %s failed", eval_id, ref, exc_info=True)
            errors[ref] = str(e) if isinstance(e, JobError) else f"{type(e).__name__}: {e}"
            ctx.event("log", f"model {ref} failed: {errors[ref]}")
    if len(errors) == len(spec.model_ids):
        _finish(eval_id, "failed")
        raise JobError("every model failed: " + "; ".join(f"{k}: {v}" for k, v in errors.items()))
    ctx.progress(0.99, "writing the report")
    files = write_report(eval_id)
    _finish(eval_id, "partial" if errors else "succeeded")
    return {"evaluation_id": eval_id, "examples": len(examples), "intents": sample["intents"],
            "split_intents": sample["split_intents"], "errors": errors, "report_files": sorted(files)}


def _neighbours(dataset_id: int, examples: list[dict[str, Any]], ctx: JobContext) -> Neighbours | None:
    """The examples' nearest answers in the dataset's train split (None, logged, if it cannot be made)."""
    try:
        ctx.progress(0.0, "preparing the answer memory of the train split")
        ensure_embedder()
        return neighbours_for(dataset_id, load_split(dataset_id, "train"), examples, load_profile(), ctx)
    except (JobCancelled, JobError):
        raise
    except Exception as e:  # the models are still evaluated, without intent and contract checks
        logger.warning("evaluation without the answer memory", exc_info=True)
        ctx.event("log", f"the answer memory could not be prepared ({type(e).__name__}: {e}): retrieval and "
                         "grounded models fail; intent_match and slots_outside_contract are not measured")
        return None


def _retrieval(row: dict[str, Any], examples: list[dict[str, Any]], neighbours: Neighbours | None
               ) -> tuple[list[str], list[Any], float, dict[str, Any] | None]:
    if neighbours is None:
        raise JobError("the retrieval responder needs the answer memory of the train split (see the job log)")
    return [e["input"] for e in examples], neighbours.retrieved(row.get("consensus_pool") or 0), 0.0, None


def _evaluate_one(eval_id: int, ref: str, examples: list[dict[str, Any]], spec: EvaluateSpec,
                  ctx: JobContext, progress: tuple[int, int], neighbours: Neighbours | None) -> None:
    done_before, total = progress
    row = _resolve(ref)
    with session_scope() as s:
        ev = s.get(Evaluation, eval_id)
        if ev is not None and "overall" in (ev.metrics or {}).get(row["name"], {}):
            return  # a retried job: this model is already done
    ctx.progress(done_before / total, f"{row['name']}: loading")
    checkpoint = checkpoint_path(eval_id, row["name"])
    if row.get("kind") == RETRIEVAL:
        prompts, results, wall, invariance = _retrieval(row, examples, neighbours)
    elif spec.backend != "torch":
        prompts, results, wall, invariance = _predict_llamacpp(row, examples, spec, ctx, done_before, total,
                                                               neighbours)
    else:
        prompts, results, wall, invariance = _predict(row, examples, spec, ctx, done_before, total, checkpoint,
                                                      neighbours)
    ctx.progress((done_before + len(examples)) / total, f"{row['name']}: scoring")
    grounding = None if row.get("kind") == RETRIEVAL else _grounding(row, spec)
    scores, agg = _score(examples, results, wall, neighbours, grounding, row.get("consensus_pool") or 0)
    agg["batch_invariance"] = invariance
    agg["backend"] = "retrieval" if row.get("kind") == RETRIEVAL else spec.backend
    # a grounded model saw each example's nearest training answers
    agg["grounding"] = grounding.model_dump() if grounding is not None else row.get("grounding")
    agg["no_repeat_ngram_size"] = None if row.get("kind") == RETRIEVAL else loop_guard(grounding,
                                                                                       spec.no_repeat_ngram_size)
    _store(eval_id, row, examples, prompts, results, scores, agg)
    checkpoint.unlink(missing_ok=True)
    ctx.event("metric", f"{row['name']}: rouge_l {agg['overall'].get('rouge_l', 0):.3f}",
              model=row["name"], **{k: v for k, v in agg["overall"].items() if isinstance(v, (int, float))})

