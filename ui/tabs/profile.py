"""The Profile tab: the company profile that fills ``{{Slot}}`` placeholders in replies."""

from __future__ import annotations

from typing import Any

import gradio as gr

from csra.client import ApiError
from ui.common import QUIET, api_errors, client, on

PROFILE_FIELDS = ("company_name", "website_url", "support_phone", "support_email", "support_hours")


def slots_text(slots: dict[str, str]) -> str:
    return "\n".join(f"{k} = {v}" for k, v in slots.items())


def parse_slots(text: str) -> dict[str, str]:
    """``Slot name = value`` lines as a dict; a malformed line is a ``gr.Error`` naming it."""
    slots = {}
    for n, line in enumerate((text or "").splitlines(), start=1):
        if not line.strip():
            continue
        if "=" not in line:
            raise gr.Error(f"Custom slots, line {n}: write 'Slot name = value'.")
        k, v = line.split("=", 1)
        if not k.strip():
            raise gr.Error(f"Custom slots, line {n}: the slot name is empty.")
        slots[k.strip()] = v.strip()
    return slots


def _fields(p: dict[str, Any]) -> tuple[Any, ...]:
    return (*(p.get(f, "") for f in PROFILE_FIELDS), slots_text(p.get("custom_slots") or {}))


def load_profile() -> tuple[Any, ...]:
    try:
        return _fields(client().profile())
    except ApiError:
        return (gr.skip(),) * (len(PROFILE_FIELDS) + 1)


@api_errors
def save_profile(company: str, website: str, phone: str, email: str, hours: str, slots: str) -> tuple[Any, ...]:
    body: dict[str, Any] = {
        k: (v or "").strip()
        for k, v in zip(PROFILE_FIELDS, (company, website, phone, email, hours), strict=True)
    }
    body["custom_slots"] = parse_slots(slots)
    p = client().save_profile(body)
    gr.Info("Profile saved: new replies fill {{Slot}} placeholders with it.")
    return _fields(p)


def build(demo: gr.Blocks) -> gr.Tab:
    """The tab inside the current ``gr.Blocks``, with its events."""
    with gr.Tab("Profile", id="profile") as tab:
        gr.Markdown("The company profile fills `{{Company Name}}`-style placeholders in replies shown here.")
        with gr.Row():
            company = gr.Textbox(label="Company name", elem_id="profile-company")
            web = gr.Textbox(label="Website URL")
        with gr.Row():
            phone = gr.Textbox(label="Support phone")
            email = gr.Textbox(label="Support email")
            hours = gr.Textbox(label="Support hours")
        slots = gr.Textbox(
            elem_id="profile-slots",
            label="Custom slots",
            lines=5,
            placeholder="Order Number = see your confirmation email\nRefund Policy URL = …",
            info="one per line: Slot name = value",
        )
        save = gr.Button("Save profile", variant="primary", elem_id="profile-save")

    fields = [company, web, phone, email, hours, slots]
    demo.load(load_profile, None, fields, **QUIET)
    save.click(save_profile, fields, fields, **on(slots))
    return tab
