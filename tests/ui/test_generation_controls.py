"""The generation fields the Chat and Compare tabs send are the API's own: validated by the real specs."""

from __future__ import annotations

import gradio as gr
import pytest

from csra.specs import GenerationOverrides, GenerationSettings
from ui.common import (
    BACKENDS,
    COPY_BIASES,
    GENERATION_KEYS,
    MODEL_SETTING,
    copy_bias_choice,
    copy_bias_value,
    gen_settings,
    generation_controls,
)


def test_every_backend_and_an_empty_copy_bias_are_valid_settings() -> None:
    for backend in BACKENDS:
        body = gen_settings("baseline", "friendly", 0.7, 0.9, 64, False, backend, None)
        settings = GenerationSettings.model_validate({k: v for k, v in body.items() if k != "model_id"})
        assert settings.backend == backend and settings.copy_bias is None  # empty: the model's own
        GenerationOverrides.model_validate({k: v for k, v in body.items() if k != "model_id"})


def test_a_copy_bias_is_sent_as_a_number_and_a_bad_one_is_named() -> None:
    assert gen_settings("m", "neutral", 0, 1, 64, True, "torch", "12.5")["copy_bias"] == 12.5  # typed
    assert gen_settings("m", "neutral", 0, 1, 64, True, "torch", "0")["copy_bias"] == 0  # "its own words"
    for empty in (MODEL_SETTING, "", None):
        assert gen_settings("m", "neutral", 0, 1, 64, True, "torch", empty)["copy_bias"] is None
    for _, choice in COPY_BIASES:
        GenerationOverrides.model_validate({"copy_bias": copy_bias_value(choice)})
        assert copy_bias_choice(copy_bias_value(choice)) == choice  # a reopened chat shows what was sent
    with pytest.raises(gr.Error, match="'a lot' is not a number"):
        gen_settings("m", "neutral", 0, 1, 64, True, "torch", "a lot")
    with pytest.raises(ValueError, match="copy_bias"):  # out of range: the API's 422 names the field
        GenerationOverrides.model_validate({"copy_bias": 25})


def test_the_controls_come_in_the_order_of_the_keys() -> None:
    with gr.Blocks():
        controls = generation_controls("t", render=False)
    assert len(controls) == len(GENERATION_KEYS)
    assert [c.elem_id for c in controls] == ["t-tone", "t-temperature", "t-top-p", "t-max-tokens", "t-ask-details",
                                             "t-backend", "t-copy-bias"]


def test_no_model_is_a_clear_error() -> None:
    with pytest.raises(gr.Error, match="Pick a model"):
        gen_settings(None, "neutral", 0, 1, 64, True)


def test_the_whole_ui_builds_with_them() -> None:
    from ui.app import build

    with build() as demo:  # every tab and its events; no API is called while building
        ids = {getattr(b, "elem_id", None) for b in demo.blocks.values()}
    assert {"chat-backend", "chat-copy-bias", "cmp-backend", "cmp-copy-bias"} <= ids
