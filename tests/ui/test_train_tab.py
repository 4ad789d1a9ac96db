"""The Train tab's handlers without a browser: the list of every training job (labels, order, the
auto-follow, a selection a refresh never undoes), the estimate as the form changes and the
confirmation a long run needs. HTTP is stubbed with an ``httpx.MockTransport`` that plays the API
(``GET /jobs``, ``POST /jobs/train`` with and without ``dry_run``); the tab's own code runs unchanged.
"""

from __future__ import annotations

import json
import warnings
from typing import Any

import gradio as gr
import httpx
import pytest

from csra.client import Client
from ui import common
from ui.tabs import train


def job(job_id: int, status: str, progress: float = 0.0, **extra: Any) -> dict[str, Any]:
    params = {"base_model": "baseline", "method": "full", **extra.pop("params", {})}
    return {"id": job_id, "kind": "train", "status": status, "progress": progress, "stage": "", "params": params,
            "eta_seconds": None, "result": None, "error": None, "attempts": 1, "cancel_requested": False,
            "parent_id": None, "finished": status in ("succeeded", "failed", "cancelled"), **extra}


LONG = {"dry_run": True, "kind": "train", "summary": "9,458 rows, 2,366 steps: about 9 h 2 min on cpu",
        "estimated_seconds": 32_520.0, "confirm": True, "note": None, "steps": 2366, "throughput": None}
SHORT = {**LONG, "summary": "48 rows, 6 steps: about 12 s on cpu", "estimated_seconds": 12.0, "confirm": False}


class FakeApi:
    """The endpoints the tab calls, with the requests it got."""

    def __init__(self, jobs: list[dict[str, Any]], estimate: dict[str, Any] | None = None) -> None:
        self.jobs = {j["id"]: j for j in jobs}
        self.estimate = estimate or SHORT
        self.requests: list[tuple[str, str]] = []
        self.started: list[dict[str, Any]] = []
        self.metrics = [{"data": {"step": 1, "loss": 2.5}}, {"data": {"step": 2, "loss": 2.1, "eval_loss": 2.3}}]

    def __call__(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        self.requests.append((request.method, path))
        if request.method == "POST" and path == "/jobs/train":
            body = json.loads(request.content)
            if body.pop("dry_run", False):
                if body["epochs"] > 100:
                    return httpx.Response(422, json={"detail": [{"loc": ["body", "epochs"], "msg": "too many"}]})
                return httpx.Response(200, json=self.estimate)
            self.started.append(body)
            new = job(max(self.jobs, default=0) + 1, "queued", params=body)
            self.jobs[new["id"]] = new
            return httpx.Response(202, json=new)
        if path == "/jobs":
            assert request.url.params["kind"] == "train"
            return httpx.Response(200, json={"data": sorted(self.jobs.values(), key=lambda j: -j["id"]), "count": 0})
        if request.method == "POST" and path.endswith("/cancel"):  # asked: the worker stops it later
            self.jobs[int(path.split("/")[2])]["cancel_requested"] = True
            return httpx.Response(202, json=self.jobs[int(path.split("/")[2])])
        if path.endswith("/events"):
            return httpx.Response(200, json={"data": self.metrics, "count": len(self.metrics)})
        return httpx.Response(200, json=self.jobs[int(path.rsplit("/", 1)[1])])

    def count(self, suffix: str) -> int:
        return sum(p.endswith(suffix) for _, p in self.requests)


@pytest.fixture()
def api(monkeypatch: pytest.MonkeyPatch) -> FakeApi:
    fake = FakeApi([
        job(3, "succeeded", 1.0, result={"model_name": "ft-3"}),
        job(4, "running", 0.45, params={"output_name": "mine"}),
        job(5, "queued", parent_id=2, params={"method": "lora"}),
        job(6, "cancelled", 0.2),
    ])
    c = Client(base_url="http://api.test", api_key="", transport=httpx.MockTransport(fake))
    monkeypatch.setattr(train, "client", lambda: c)
    monkeypatch.setattr(common, "client", lambda: c)  # cancel_job, shared by the tabs
    return fake


def form(**changes: Any) -> list[Any]:
    """The form's values in train_body's order."""
    values = {"dataset_id": 1, "base_model": "baseline", "method": "full", "epochs": 2, "lr": 5e-5,
              "batch_size": 8, "max_train": 0, "output_name": "", "lora_r": 8, "lora_alpha": 16, "max_input": 192,
              "max_target": 192, "warmup": 0.0, "seed": 42, "keep_best": False, "log_every": 10, "grounded": False,
              "k": 3, "exemplar_tokens": 48, **changes}
    return list(values.values())


SKIP = gr.skip()


# ---------------------------------------------------------------------------- the list
def test_every_training_job_is_listed_newest_first_with_running_ones_marked(api: FakeApi) -> None:
    choices = train.train_job_choices(list(api.jobs.values()))
    assert choices == [
        ("#6 (baseline, full) · cancelled", 6),
        ("#5 (baseline, lora) · sweep #2 · ○ queued", 5),
        ("#4 mine (baseline, full) · ● running 45%", 4),
        ("#3 ft-3 (baseline, full) · succeeded", 3),
    ]
    cancelling = job(7, "running", 0.5, cancel_requested=True)
    assert train.job_label(cancelling).endswith("● running 50% · cancelling")
    # a followed job past the listing stays in the list
    assert [v for _, v in train.train_job_choices([api.jobs[6]], api.jobs[3])] == [6, 3]


def test_the_newest_running_job_is_preferred_then_the_newest_waiting_one() -> None:
    assert train.newest_active([job(1, "running"), job(2, "running"), job(3, "queued")]) == 2
    assert train.newest_active([job(1, "queued"), job(2, "waiting"), job(3, "failed")]) == 2
    assert train.newest_active([job(1, "succeeded")]) is None


def test_with_nothing_selected_a_refresh_follows_the_newest_running_job(api: FakeApi) -> None:
    job_id, follow, status, plot, result, shown, listed = train.train_refresh(None, None, None)
    assert job_id == 4 and follow.constructor_args["value"] == 4
    assert [v for _, v in follow.constructor_args["choices"]] == [6, 5, 4, 3] == [v for _, v in listed]
    assert "train job #4" in status and "running" in status and "45%" in status
    assert plot.to_dict("records") == [
        {"step": 1, "loss": 2.5, "series": "train loss"}, {"step": 2, "loss": 2.1, "series": "train loss"},
        {"step": 2, "loss": 2.3, "series": "validation loss"},
    ]
    assert result is None and shown["id"] == 4 and shown["points"] == 3


def test_a_refresh_never_undoes_the_selection_and_lists_a_job_started_elsewhere(api: FakeApi) -> None:
    _, _, *_, shown, listed = train.show_job(3)  # the person picked a finished job
    api.jobs[9] = job(9, "running", 0.1, params={"output_name": "from-cli"})  # e.g. `csra train`
    job_id, follow, status, plot, result, shown2, listed2 = train.train_refresh(3, shown, listed)
    assert job_id == SKIP and "value" not in follow.constructor_args  # the selection stays as it is
    assert listed2[0] == ("#9 from-cli (baseline, full) · ● running 10%", 9)
    # the finished job shown already: nothing is sent again, and its events are not fetched again
    assert (status, plot, result) == (SKIP, SKIP, SKIP) and shown2 == shown
    events = api.count("/events")
    assert train.train_refresh(3, shown2, listed2)[1] == SKIP  # an unchanged list is not sent either
    assert api.count("/events") == events


def test_a_running_job_s_progress_and_new_loss_points_come_in(api: FakeApi) -> None:
    *_, shown, listed = train.show_job(4)
    api.jobs[4]["progress"] = 0.5
    api.metrics.append({"data": {"step": 3, "loss": 1.9}})
    _, follow, status, plot, _, shown, _ = train.train_refresh(4, shown, listed)
    assert "50%" in status and len(plot) == 4 and shown["points"] == 4
    assert follow.constructor_args["choices"][2] == ("#4 mine (baseline, full) · ● running 50%", 4)


def test_only_training_jobs_open_in_the_train_tab(api: FakeApi) -> None:
    api.jobs[8] = {**job(8, "succeeded"), "kind": "evaluate"}
    with pytest.raises(gr.Error, match="evaluate job"):
        train.show_job(8)


# ---------------------------------------------------------------------------- estimate and confirmation
def test_the_estimate_follows_the_form_and_its_errors_stay_inline(api: FakeApi) -> None:
    est, line, pending, button = train.train_estimate(*form())
    assert est["estimate"] == {"summary": SHORT["summary"], "confirm": False, "estimated_seconds": 12.0,
                               "note": None}
    assert "48 rows, 6 steps" in line and pending is None and button.constructor_args["visible"] is False
    assert api.started == []  # a dry run starts nothing
    est, line, *_ = train.train_estimate(*form(epochs=500))  # the API's 422: inline, no exception
    assert est is None and "No estimate: epochs: too many" in line and "csra-err" in line
    est, line, *_ = train.train_estimate(*form(epochs=None))
    assert est is None and "Epochs: enter a number" in line
    assert train.train_estimate(*form(dataset_id=None))[:2] == (None, "")  # nothing picked yet: no estimate


def test_a_short_run_starts_at_the_first_click(api: FakeApi) -> None:
    est = train.train_estimate(*form())[0]
    out = train.train_start(est, *form())
    assert len(api.started) == 1 and out[0] == 7 and out[1].constructor_args["value"] == 7
    assert out[7] is None and out[8].constructor_args["visible"] is False
    assert api.count("/jobs/train") == 2  # the estimate made for this very form is not asked again


def test_a_long_run_starts_only_once_confirmed_and_a_change_takes_the_confirmation_back(api: FakeApi) -> None:
    api.estimate = LONG
    est, line, *_ = train.train_estimate(*form())
    assert "about 9 h 2 min" in line and "Start will ask for a confirmation" in line

    out = train.train_start(est, *form())  # first click: the estimate and the question, nothing started
    assert api.started == [] and out[:7] == (SKIP,) * 7
    pending, button, line = out[7:]
    assert button.constructor_args == {"value": "Start anyway (about 9h 02m)", "visible": True}
    assert "needs a confirmation" in line and pending["body"]["epochs"] == 2

    with warnings.catch_warnings(record=True) as seen:  # the form changed after the question
        warnings.simplefilter("always")
        out = train.train_confirm(pending, *form(epochs=3))
        assert train.train_confirm(None, *form())[7] is None  # nothing was asked
    assert api.started == [] and out[7] is None and out[8].constructor_args["visible"] is False
    assert "form changed" in str(seen[0].message)
    # a form change hides the question too (and an edited name, without a new estimate)
    assert train.train_estimate(*form(epochs=3))[2:3] == (None,)
    assert train.reset_confirmation()[0] is None

    pending = train.train_start(est, *form())[7]  # asked again, then confirmed: started, once
    out = train.train_confirm(pending, *form())
    assert len(api.started) == 1 and api.started[0]["epochs"] == 2 and out[0] == 7
    assert out[7] is None and out[8].constructor_args["visible"] is False
    assert "about 9 h 2 min" in out[9] and "needs a confirmation" not in out[9]


def test_an_estimate_without_a_time_asks_too() -> None:
    unknown = {"summary": "no throughput measured yet", "confirm": True, "estimated_seconds": None, "note": "x"}
    assert train.needs_confirmation(unknown) and train.confirm_label(unknown) == "Start anyway (time unknown)"
    assert not train.needs_confirmation(None) and not train.needs_confirmation({"confirm": False})
    assert "<i>x</i>" in train.estimate_html(unknown)


def test_a_grounded_run_asks_for_its_exemplars_and_the_api_makes_room_for_them() -> None:
    from csra.specs import TrainSpec

    default_input = TrainSpec.model_fields["max_input_length"].default
    assert "grounding" not in train.train_body(*form(max_input=default_input))
    body = train.train_body(*form(grounded=True, k=2, exemplar_tokens=64, max_input=default_input))
    assert body["grounding"] == {"k": 2, "max_exemplar_tokens": 64}
    assert "max_input_length" not in body  # left at its default: the API makes room for the exemplars
    spec = TrainSpec.model_validate(body)
    assert spec.grounding is not None and spec.max_input_length == spec.grounding.prompt_budget() > default_input
    chosen = train.train_body(*form(grounded=True, max_input=1024))  # a length of the person's own is sent
    assert TrainSpec.model_validate(chosen).max_input_length == 1024
    with pytest.raises(gr.Error, match="Exemplars per prompt"):
        train.train_body(*form(grounded=True, k=None))


def test_a_grounded_run_sends_its_reply_settings_as_the_spec_types_them() -> None:
    from csra.specs import ReplySettings, TrainSpec

    fields = [field for field, _, _ in train.REPLY_SETTINGS]
    assert set(fields) == set(ReplySettings.model_fields)  # every one
    chosen = {"copy_bias": 2.5, "copy_exemplars": 0.0, "length_floor": 0.6, "consensus_pool": 4.0,
              "no_repeat_ngram_size": 6.0, "min_similarity": 0.4}  # gr.Number gives floats
    body = train.train_body(*form(grounded=True), *chosen.values())
    grounding = TrainSpec.model_validate(body).grounding
    assert grounding is not None and grounding.model_dump(include=set(fields)) == chosen
    assert isinstance(body["grounding"]["consensus_pool"], int) and isinstance(body["grounding"]["copy_bias"], float)
    assert "copy_bias" not in train.train_body(*form(grounded=True))["grounding"]  # none given: the spec's defaults
    assert "grounding" not in train.train_body(*form(), *chosen.values())  # not grounded: nothing of it is sent
    cleared = list(chosen.values())
    cleared[4] = None
    with pytest.raises(gr.Error, match="Loop guard"):
        train.train_body(*form(grounded=True), *cleared)


def test_a_cancel_answered_after_a_tick_saw_the_job_end_is_repainted_by_the_next_tick(api: FakeApi) -> None:
    """The cancel's answer (the job before the worker stopped it) can reach the page after a tick that
    already showed the job cancelled; the next tick must send the status again, not skip it as shown."""
    *_, shown, _ = train.train_refresh(4, None, None)  # job 4 running, shown
    answer, forgotten = train.train_cancel(4)
    assert "running" in answer and forgotten is None
    api.jobs[4] = job(4, "cancelled", 0.45)
    _, _, status, *_, seen_done, _ = train.train_refresh(4, shown, None)  # this tick lands first
    assert "cancelled" in status
    assert train.train_refresh(4, seen_done, None)[2] == SKIP  # as that tick left things: nothing to resend
    # then the answer lands: "running" on screen, shown forgotten; the next tick repaints
    assert "cancelled" in train.train_refresh(4, forgotten, None)[2]
