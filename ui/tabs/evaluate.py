"""The Evaluate tab: run an evaluation on a dataset's test (or validation) split, follow it, show the
leaderboard, the plots and the HTML report. Progress is polled with a ``gr.Timer``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, get_args

import gradio as gr
import pandas as pd

from csra.client import ApiError
from csra.specs import ERROR_PATTERNS, EvaluateSpec, ReplySettings
from ui.common import (
    QUIET,
    api_errors,
    cancel_job,
    client,
    copy_bias_dropdown,
    copy_bias_value,
    job_html,
    keep,
    num,
    on,
    save_download,
)

EVAL_PLOTS = ("metrics.png", "per_intent.png", "lengths.png", "loss_curves.png")
LEADERBOARD_METRICS = {  # overall metric -> column title
    "rouge_l": "ROUGE-L",
    "bleu": "BLEU",
    "chrf": "chrF",
    "semantic_similarity": "semantic sim.",
    "heuristic_quality": "quality",
    "too_verbose": "too verbose",
    "asks_needless_details": "needless asks",
    "repetitive": "repetitive",
    "off_tone": "off tone",
    "unfinished": "unfinished",
    "intent_match": "intent match",
    "slots_outside_contract": "foreign slots",
}
CONFIG_KEYS = ("method", "epochs", "learning_rate", "batch_size", "max_train_samples", "grounding")
SPLITS = [("test (to report)", "test"), ("validation (to choose settings)", "validation")]
PATTERN_CHOICES = [("any", "")] + [(p.replace("_", " "), p) for p in ERROR_PATTERNS]
EXAMPLE_SORTS = [("worst first (ROUGE-L)", "worst"), ("best first", "best"), ("in order", "id")]
EXAMPLE_COLUMNS = ["intent", "customer message", "reference", "prediction", "ROUGE-L", "flags"]
EXAMPLE_WIDTHS: list[str | int] = ["10%", "18%", "30%", "30%", "6%", "6%"]
EXAMPLES_SHOWN = 50
EVAL_BACKENDS = list(get_args(EvaluateSpec.model_fields["backend"].annotation))


def leaderboard_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    out = []
    for i, r in enumerate(rows, start=1):
        m = r.get("metrics") or {}
        tc = r.get("training_config") or {}
        row = {"rank": i, "model": r["model"], "kind": r.get("kind") or ""}
        for k, title in LEADERBOARD_METRICS.items():
            v = m.get(k)
            row[title] = round(float(v), 4) if isinstance(v, (int, float)) else None
        row["evaluation"] = r.get("evaluation_id")
        row["training config"] = ", ".join(f"{k}={tc[k]}" for k in CONFIG_KEYS if tc.get(k) is not None)
        out.append(row)
    cols = ["rank", "model", "kind", *LEADERBOARD_METRICS.values(), "evaluation", "training config"]
    return pd.DataFrame(out, columns=cols)


def _evaluation_choices(dataset_id: int | None) -> list[tuple[str, int]]:
    evs = client().evaluations(dataset_id=dataset_id)
    return [(f"#{e['id']} {', '.join(e['params'].get('model_ids', []))} ({e['status']})", e["id"]) for e in evs]


@api_errors
def eval_start(
    models: list[str] | None,
    dataset_id: int | None,
    max_samples: float | None,
    max_new_tokens: float,
    num_beams: float,
    seed: float,
    split: str = "test",
    backend: str = "torch",
    copy_bias: str | None = None,
) -> tuple[Any, ...]:
    if not models:
        raise gr.Error("Pick at least one model to evaluate.")
    if dataset_id is None:
        raise gr.Error("Pick a dataset (its test or validation split is used).")
    body: dict[str, Any] = {
        "model_ids": list(models),
        "dataset_id": int(dataset_id),
        "split": split or "test",
        "max_new_tokens": int(num(max_new_tokens, "Max new tokens")),
        "num_beams": int(num_beams or 1),
        "seed": int(seed or 0),
        "max_samples": int(max_samples) if max_samples else None,
        "backend": backend or "torch",
    }
    bias = copy_bias_value(copy_bias)
    if bias is not None:  # unset: each grounded model's own
        body["copy_bias"] = bias
    job = client().evaluate(body)
    gr.Info(f"Evaluation job #{job['id']} queued.")
    return job["id"], job_html(job), gr.Timer(active=True)


def _file_or_none(evaluation_id: int, name: str, saved_as: str) -> str | None:
    try:
        return save_download(saved_as, client().evaluation_file(evaluation_id, name))
    except ApiError:
        return None  # not every evaluation has every plot (loss curves need fine-tuned models)


def _evaluation_view(evaluation_id: int) -> tuple[Any, ...]:
    """The dataset's leaderboard, this evaluation's plots and report, the evaluation list."""
    ev = client().evaluation(evaluation_id)
    dataset_id = ev.get("dataset_id")
    board = leaderboard_frame(client().leaderboard(dataset_id)) if dataset_id is not None else gr.skip()
    plots = [_file_or_none(evaluation_id, name, f"eval{evaluation_id}-{name}") for name in EVAL_PLOTS]
    report = _file_or_none(evaluation_id, "report.html", f"evaluation-{evaluation_id}-report.html")
    choices = _evaluation_choices(dataset_id)
    return board, *plots, report, gr.Dropdown(choices=choices, value=keep(evaluation_id, choices))


EVAL_VIEW_SKIP = (gr.skip(),) * (len(EVAL_PLOTS) + 3)


def eval_poll(job_id: int | None) -> tuple[Any, ...]:
    """job line, the evaluation view (once it has succeeded), timer."""
    if job_id is None:
        return gr.skip(), *EVAL_VIEW_SKIP, gr.Timer(active=False)
    try:
        job = client().job(int(job_id))
        if not job["finished"]:
            return job_html(job), *EVAL_VIEW_SKIP, gr.skip()
        ev_id = (job.get("result") or {}).get("evaluation_id")
        if job["status"] != "succeeded" or ev_id is None:
            return job_html(job), *EVAL_VIEW_SKIP, gr.Timer(active=False)
        return job_html(job), *_evaluation_view(int(ev_id)), gr.Timer(active=False)
    except ApiError as e:
        gr.Warning(f"Stopped following the evaluation: {e.detail}")
        return job_html(None, f"⚠️ {e.detail}"), *EVAL_VIEW_SKIP, gr.Timer(active=False)


@api_errors
def eval_show(dataset_id: int | None, evaluation_id: int | None) -> tuple[Any, ...]:
    """Leaderboard of the dataset; plots and report of the chosen (or latest) evaluation."""
    if dataset_id is None:
        raise gr.Error("Pick a dataset to see its leaderboard.")
    choices = _evaluation_choices(int(dataset_id))
    evaluation_id = keep(evaluation_id, choices)  # else the latest, or None
    if evaluation_id is None:
        board = leaderboard_frame(client().leaderboard(int(dataset_id)))
        return board, *([None] * len(EVAL_PLOTS)), None, gr.Dropdown(choices=choices, value=None)
    return _evaluation_view(int(evaluation_id))


def examples_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    out = []
    for r in rows:
        scores = r.get("scores") or {}
        flags = [p.replace("_", " ") for p in ERROR_PATTERNS if scores.get(p)]
        rouge = scores.get("rouge_l")
        out.append({"intent": r.get("intent") or "", "customer message": r["prompt"], "reference": r["reference"],
                    "prediction": r["prediction"], "ROUGE-L": round(float(rouge), 3) if rouge is not None else None,
                    "flags": ", ".join(flags)})
    return pd.DataFrame(out, columns=EXAMPLE_COLUMNS)


@api_errors
def example_filters(evaluation_id: int | None) -> tuple[Any, Any]:
    """The picked evaluation's models and intents, for the examples' filters."""
    if evaluation_id is None:
        return gr.Dropdown(choices=[], value=None), gr.Dropdown(choices=[("any", "")], value="")
    ev = client().evaluation(int(evaluation_id))
    per_model = {k: v for k, v in (ev.get("metrics") or {}).items() if isinstance(v, dict)}
    models = list(per_model)
    intents = sorted({i for v in per_model.values() for i in (v.get("per_intent") or {})})
    return (gr.Dropdown(choices=models, value=models[0] if models else None),
            gr.Dropdown(choices=[("any", ""), *((i, i) for i in intents)], value=""))


@api_errors
def show_examples(evaluation_id: int | None, model: str | None, pattern: str, intent: str, sort: str,
                  page: float | None = 1) -> tuple[pd.DataFrame, str]:
    """A page of one model's stored predictions, filtered by error pattern and intent, worst first by default."""
    if evaluation_id is None or not model:
        raise gr.Error("Pick an evaluation and one of its models first.")
    start = (max(1, int(page or 1)) - 1) * EXAMPLES_SHOWN
    found = client().evaluation_examples(int(evaluation_id), model=model, pattern=pattern or None,
                                         intent=intent or None, sort=sort or "worst", limit=EXAMPLES_SHOWN,
                                         offset=start)
    what = " · ".join(x for x in (pattern.replace("_", " ") if pattern else "", intent) if x) or "all"
    line = f"{model}: {found['count']:,} example(s) ({what})"
    if found["count"] > EXAMPLES_SHOWN:
        pages = -(-found["count"] // EXAMPLES_SHOWN)
        line += (f"; {start + 1}-{start + len(found['data'])} shown, page {start // EXAMPLES_SHOWN + 1} of {pages}"
                 if found["data"] else f"; page {start // EXAMPLES_SHOWN + 1} is past the last ({pages})")
    return examples_frame(found["data"]), line


def measured_reply_settings(measured: dict[str, Any] | None, trained: dict[str, Any] | None) -> dict[str, Any]:
    """The reply settings an evaluation measured a grounded model with that differ from what it was trained
    with: the ``PUT /models/{ref}/reply-settings`` body that serves them (``{}``: the trained ones)."""
    measured, trained = measured or {}, trained or {}
    return {k: measured[k] for k in ReplySettings.model_fields if k in measured and measured[k] != trained.get(k)}


@api_errors
def serve_measured(evaluation_id: int | None, model: str | None) -> str:
    """Serve the reply settings the picked evaluation measured ``model`` with; the line saying what it serves."""
    if evaluation_id is None or not model:
        raise gr.Error("Pick an evaluation and one of its models first.")
    measured = ((client().evaluation(int(evaluation_id)).get("metrics") or {}).get(model) or {}).get("grounding")
    if not measured:
        raise gr.Error(f"{model} was not evaluated grounded: it has no reply settings to serve.")
    trained = (client().model(model).get("training_config") or {}).get("grounding")
    body = measured_reply_settings(measured, trained)
    served = client().set_reply_settings(model, body)["grounding"] or {}
    what = ", ".join(f"{k.replace('_', ' ')} {served.get(k)}" for k in ReplySettings.model_fields)
    gr.Info(f"{model} now replies with the settings of evaluation #{evaluation_id}.")
    return (f"**{model}** replies with {what}"
            + (f" (set after training: {', '.join(body)})." if body else " (as trained)."))


def _examples(pick: gr.Dropdown) -> tuple[list[Any], gr.Button, gr.Markdown, gr.Dataframe]:
    """The examples' filters (in show_examples' order, after the evaluation), show, the line and the table;
    and the button that serves what the picked evaluation measured a model with."""
    with gr.Accordion("Examples: what each model answered, by error pattern and intent", open=False):
        with gr.Row():
            model = gr.Dropdown([], value=None, label="Model", elem_id="ex-model")
            pattern = gr.Dropdown(PATTERN_CHOICES, value="", label="Error pattern", elem_id="ex-pattern")
            intent = gr.Dropdown([("any", "")], value="", label="Intent", elem_id="ex-intent")
            sort = gr.Dropdown(EXAMPLE_SORTS, value="worst", label="Order", elem_id="ex-sort")
            page = gr.Number(1, label=f"Page ({EXAMPLES_SHOWN} a page)", precision=0, minimum=1, elem_id="ex-page")
            go = gr.Button("Show examples", elem_id="ex-show")
        line = gr.Markdown("", elem_id="ex-line")
        table = gr.Dataframe(pd.DataFrame(columns=EXAMPLE_COLUMNS), interactive=False, wrap=True,
                             column_widths=EXAMPLE_WIDTHS, elem_id="ex-table")
        with gr.Row():
            serve = gr.Button("Serve the reply settings this evaluation measured for this model", size="sm",
                              elem_id="ex-serve", scale=0, min_width=360)
            served = gr.Markdown("", elem_id="ex-served")
        serve.click(serve_measured, [pick, model], served, **on(served))
    return [model, pattern, intent, sort, page], go, line, table


@dataclass
class EvaluateTab:
    tab: gr.Tab
    models: gr.Dropdown
    dataset: gr.Dropdown


def _form() -> tuple[list[Any], gr.Button, gr.Button, gr.Dropdown, gr.Button]:
    """The job's parameters (in eval_start's order), run, cancel, evaluation pick and show."""
    with gr.Row():
        models = gr.Dropdown([], value=[], multiselect=True, label="Models", scale=3, elem_id="eval-models")
        dataset = gr.Dropdown([], value=None, label="Dataset", scale=2, elem_id="eval-dataset")
    with gr.Row():
        max_samples = gr.Number(
            300, label="Max samples (0: the whole split)", precision=0, minimum=0, elem_id="eval-max"
        )
        tokens = gr.Number(256, label="Max new tokens", precision=0, minimum=1, elem_id="eval-tokens")
        beams = gr.Number(1, label="Beams", precision=0, minimum=1, maximum=8)
        seed = gr.Number(42, label="Seed", precision=0)
    with gr.Row():
        split = gr.Dropdown(SPLITS, value="test", label="Split", elem_id="eval-split")
        backend = gr.Dropdown(EVAL_BACKENDS, value="torch", label="Backend", elem_id="eval-backend",
                              info="torch: exact; llamacpp:<format>: what serving each model's GGUF export costs")
        copy_bias = copy_bias_dropdown("eval-copy-bias")
    with gr.Row():
        run = gr.Button("Run evaluation", variant="primary", elem_id="eval-run")
        cancel = gr.Button("Cancel", variant="stop")
        pick = gr.Dropdown([], value=None, label="Evaluation", scale=2, elem_id="eval-pick")
        show = gr.Button("Show leaderboard", elem_id="eval-show")
    return [models, dataset, max_samples, tokens, beams, seed, split, backend, copy_bias], run, cancel, pick, show


def _results() -> list[Any]:
    """Leaderboard, plots and report (the evaluation view's outputs, without the evaluation pick)."""
    board = gr.Dataframe(
        leaderboard_frame([]), label="Leaderboard", interactive=False, wrap=False, elem_id="leaderboard"
    )
    plots = []
    for row in (EVAL_PLOTS[:2], EVAL_PLOTS[2:]):
        with gr.Row():
            for name in row:
                plots.append(gr.Image(
                    None, label=name, type="filepath", interactive=False, elem_id=f"plot-{name.split('.')[0]}"
                ))
    report = gr.File(None, label="Report (HTML)", interactive=False, height=90)
    return [board, *plots, report]


def build(demo: gr.Blocks) -> EvaluateTab:
    """The tab inside the current ``gr.Blocks``, with its events."""
    with gr.Tab("Evaluate", id="evaluate") as tab:
        job = gr.State(None)
        timer = gr.Timer(1.0, active=False)
        params, run, cancel, pick, show = _form()
        status = gr.HTML(job_html(None), elem_id="eval-status")
        results = _results()
        filters, ex_go, ex_line, ex_table = _examples(pick)

    view = [*results, pick]
    run.click(eval_start, params, [job, status, timer], **on(status))
    timer.tick(eval_poll, job, [status, *view, timer], **QUIET)
    cancel.click(cancel_job, job, status, **on(status))
    dataset = params[1]
    show.click(eval_show, [dataset, pick], view, **on(results[0]))
    pick.input(eval_show, [dataset, pick], view, **on(results[0]))
    model, _, intent, _, _ = filters
    pick.change(example_filters, pick, [model, intent], **QUIET)  # its models and intents
    ex_go.click(show_examples, [pick, *filters], [ex_table, ex_line], **on(ex_table))
    return EvaluateTab(tab, models=params[0], dataset=dataset)
