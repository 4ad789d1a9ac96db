"""Typed, validated job parameters. Stored on the job row as JSON (``Job.params``).

The API validates requests against these models (a bad value is a 422 naming the field);
workers re-parse ``job.params`` with the same model.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

MODEL_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")

Tone = Literal["neutral", "friendly", "strict_professional"]
# The bounds of each generation setting, defined once: settings, per-message overrides and the
# OpenAI-compatible request all use these.
Temperature = Annotated[float, Field(ge=0, le=2, description="0 = greedy")]
TopP = Annotated[float, Field(gt=0, le=1)]
# A reply the copy bias holds to an approved answer may run this many tokens past that answer's own length,
# above the caller's max_new_tokens if need be (the model's tokens of a copy can differ a little from the
# answer's own): an approved answer is suggested whole, never cut one token short (ml.memory.grounding.steering).
ANSWER_ROOM = 8
MaxNewTokens = Annotated[int, Field(ge=1, le=2048, description="the most tokens a reply may have; a grounded reply "
                                    "held to approved answers longer than that may run to the longest of them "
                                    f"plus {ANSWER_ROOM} tokens, so an approved answer is never cut")]
CopyBias = Annotated[float, Field(ge=0, le=20, description="added to the logits of the tokens that continue the "
                                  "reply along the whole exemplars (the first copy_exemplars of them; 0: off; "
                                  "ml.inference.copying)")]
CopyExemplars = Annotated[int, Field(ge=0, le=8, description="the copy bias follows the first n of the prompt's "
                                     "exemplars (0: all of them)")]
ConsensusPool = Annotated[int, Field(ge=0, le=8, description="0: a grounded prompt carries the k nearest approved "
                                     "answers; n: of the n nearest, those of the nearest one's intent that agree "
                                     "most with the others, first (ml.memory.grounding.grounding_exemplars)")]


def _not_one(n: int) -> int:
    if n == 1:
        raise ValueError("no_repeat_ngram_size 1 would ban every token the reply already used: 0 (off) or 2-64")
    return n


NoRepeatNgram = Annotated[int, Field(ge=0, le=64, description="the loop guard: a reply may not repeat a run of this "
                                     "many tokens it already wrote (0: off; ml.inference.loops)"),
                          AfterValidator(_not_one)]
LengthFloor = Annotated[float, Field(ge=0, le=1.5, description="the reply may not end before this share of the "
                                     "first exemplar's length in tokens (0: no floor)")]
MinSimilarity = Annotated[float, Field(ge=0, le=1, description="the copy bias and the length floor hold a reply to "
                                       "its exemplars only when the nearest approved answer's message is at least "
                                       "this similar (MiniLM cosine); below, the message is unlike any approved one "
                                       "and the model writes on its own (0: always)")]
# The default reply length (chat, /v1, evaluation) and training's reply cut: 384 tokens hold 99.6% of
# Bitext's replies (256 cut 6.8% of them, 192 cut 18%: check_refund_policy's replies average 334).
REPLY_TOKENS = 384
# the error patterns an evaluation flags per example (ml.metrics.score_examples), whose examples can be listed
ERROR_PATTERNS = ("too_verbose", "asks_needless_details", "repetitive", "off_tone", "unfinished",
                  "placeholders_invented", "placeholders_broken")

DEFAULT_INSTRUCTION = (
    "You are a customer support agent. Reply to the customer's message helpfully, politely "
    "and concisely."
)


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ImportSpec(_Spec):
    """How to turn a raw file into a cleaned, split dataset."""

    column_mapping: dict[str, str] = Field(
        default_factory=dict,
        description="csra column -> source column, e.g. {'input': 'question', 'output': 'answer'}",
    )
    train_fraction: float = Field(0.9, gt=0, lt=1)
    validation_fraction: float = Field(0.05, ge=0, lt=1)
    test_fraction: float = Field(0.05, ge=0, lt=1)
    seed: int = 42
    min_message_chars: int | None = Field(None, ge=0, description="default: CSRA_MIN_MESSAGE_CHARS")
    min_reply_chars: int | None = Field(None, ge=0, description="default: CSRA_MIN_REPLY_CHARS")
    default_instruction: str = Field(DEFAULT_INSTRUCTION, min_length=1)
    format: Literal["csv", "jsonl", "parquet"] | None = Field(
        None, description="file format; default: from the file name"
    )

    @model_validator(mode="after")
    def _fractions(self) -> ImportSpec:
        total = self.train_fraction + self.validation_fraction + self.test_fraction
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"train/validation/test fractions must add up to 1, not {total:g}")
        return self


RETRIEVAL = "retrieval"  # the responder that answers with the nearest approved answer (no model)
GROUNDING_TEMPLATE = (
    "Approved answers to similar customer messages follow. Answer like them, with their steps, adapted to "
    "this customer; use only placeholders that they use.\n{exemplars}"
)


class Grounding(_Spec):
    """A grounded model is shown the approved answers to the ``k`` most similar customer messages."""

    k: int = Field(3, ge=1, le=8, description="exemplars per prompt")
    # 48: three exemplars then cost about 1.6x an ungrounded example's tokens (bench/train.py --grounded)
    max_exemplar_tokens: int = Field(48, ge=16, le=512, description="each exemplar is cut to this many tokens")
    template: str = Field(GROUNDING_TEMPLATE, min_length=1, description="'{exemplars}' marks where they go")
    # A grounded model's replies are shorter than the references (0.885 of their length on Bitext's
    # validation split), and the nearest approved answer's length predicts the reference's (r = 0.81).
    # Alone, floors of 0.6-1.0 cost ROUGE-L and added repetitive replies (the model wrote filler past
    # its own ending); with consensus exemplars, the copy bias and the loop guard, 0.8 lifts BLEU and
    # chrF at the same ROUGE-L on the validation split (README, "Consensus exemplars and a loop guard").
    length_floor: LengthFloor = 0.8
    # 10 along the first (consensus) exemplar, with the loop guard at 4: on Bitext's validation split the
    # setting above retrieval on all four metrics with the fewest repetitive and unfinished replies (README,
    # "Following it harder"; 2.5 along every exemplar before 2026-12-05, 6 earlier that day). A
    # reply then departs from the approved answer only where the model is sure: 286 of 300 did not.
    copy_bias: CopyBias = 10.0
    copy_exemplars: CopyExemplars = 1
    # 8: the best pool measured on Bitext's validation split (README, "Consensus exemplars and a loop guard");
    # chat and evaluation choose exemplars alike, training takes the k nearest (grounding.training_grounding).
    consensus_pool: ConsensusPool = 8
    no_repeat_ngram_size: NoRepeatNgram = 4
    # 0.5: on Bitext every test and validation message has an approved answer at cosine 0.59 or more (p1
    # 0.69-0.71), while off-topic messages (the weather, a recipe, a crashing app) find nothing above 0.42
    # (README, "Only for a message like an approved one"). Below it, copying the nearest answer would answer
    # another question, so the model writes on its own.
    min_similarity: MinSimilarity = 0.5

    @field_validator("template")
    @classmethod
    def _marked(cls, v: str) -> str:
        if "{exemplars}" not in v:
            raise ValueError("the grounding template needs '{exemplars}' where the approved answers go")
        return v

    def prompt_budget(self) -> int:
        """Prompt tokens a grounded example needs at least: the exemplars plus the usual prompt."""
        return self.k * (self.max_exemplar_tokens + 4) + 160


def loop_guard(grounding: Grounding | None, override: int | None) -> int:
    """The loop guard a reply decodes with: the request's or evaluation's, else a grounded model's own, else off."""
    if override is not None:
        return override
    return grounding.no_repeat_ngram_size if grounding is not None else 0


def recorded_grounding(recorded: dict[str, Any] | None, **overrides: float | int | None) -> Grounding | None:
    """A model's grounding as its registry row records it (None: not trained grounded), with each override
    that is set (a request's or an evaluation's ``copy_bias``, ``copy_exemplars``, ``length_floor``,
    ``consensus_pool``, ``no_repeat_ngram_size``) in place of its own."""
    if not recorded:
        return None
    grounding = Grounding.model_validate(recorded)
    return grounding.model_copy(update={k: v for k, v in overrides.items() if v is not None})


class ReplySettings(_Spec):
    """How a grounded model's replies follow their approved answers, set after training
    (``PUT /models/{ref}/reply-settings``), typically to serve a setting an evaluation measured. Each one
    set replaces the value the model was trained with; one left out keeps it. What the model learned
    from (``k``, ``max_exemplar_tokens``, ``template``) stays as trained."""

    copy_bias: CopyBias | None = None
    copy_exemplars: CopyExemplars | None = None
    length_floor: LengthFloor | None = None
    consensus_pool: ConsensusPool | None = None
    no_repeat_ngram_size: NoRepeatNgram | None = None
    min_similarity: MinSimilarity | None = None

    @model_validator(mode="before")
    @classmethod
    def _not_what_it_learned(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        learned = sorted(set(data) & (set(Grounding.model_fields) - set(cls.model_fields)))
        if learned:
            raise ValueError(f"{', '.join(learned)}: what the model was trained with, not a reply setting; "
                             "train it again to change that")
        return data


def served_grounding(trained: dict[str, Any] | None, reply_settings: dict[str, Any] | None) -> dict[str, Any] | None:
    """The grounding a model serves with: the one it was trained with (``training_config.grounding``;
    None: not grounded) with its reply settings in place of the trained values."""
    if not trained:
        return None
    return {**trained, **(reply_settings or {})}


class TrainSpec(_Spec):
    """A fine-tuning run. Defaults are the original design's best config (2 epochs, lr 5e-5, batch 8)."""

    dataset_id: int = Field(..., description="a dataset whose import succeeded")
    base_model: str = Field("baseline", description="model-store name or id, HF id, or local folder")
    method: Literal["full", "lora"] = "full"
    lora_r: int = Field(8, ge=1, le=256)
    lora_alpha: int = Field(16, ge=1)
    lora_dropout: float = Field(0.05, ge=0, lt=1)
    lora_target_modules: list[str] | None = Field(
        None, description="module names to adapt; default: the attention projections"
    )
    epochs: float = Field(2, ge=1, description="passes over the training split")
    learning_rate: float = Field(5e-5, gt=0, le=1)
    batch_size: int = Field(8, ge=1, le=512)
    gradient_accumulation: int = Field(1, ge=1, le=256)
    max_input_length: int = Field(192, ge=8, description="prompt tokens kept (system+instruction+message)")
    max_target_length: int = Field(REPLY_TOKENS, ge=8,
                                   description="reply tokens kept; a longer reply is cut, without its end token")
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    seed: int = 42
    max_train_samples: int | None = Field(None, ge=1)
    max_eval_samples: int | None = Field(200, ge=1, description="validation rows used for val loss")
    eval_every: int | Literal["epoch"] = Field(
        "epoch", description="evaluate (and checkpoint) every N optimizer steps, or each epoch"
    )
    logging_steps: int = Field(10, ge=1)
    early_stopping_patience: int | None = Field(None, ge=1)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 autocast where the hardware supports it"
    )
    output_name: str | None = Field(None, description="model-store name; default: ft-<job id>")
    keep_best_on_cancel: bool = Field(False, description="on cancel, register the best checkpoint so far")
    grounding: Grounding | None = Field(
        None, description="train on grounded prompts: each example shown the approved answers to its nearest "
        "training messages (never its own); the model then gets them in chat and evaluation too"
    )

    @field_validator("output_name")
    @classmethod
    def _name(cls, v: str | None) -> str | None:
        if v is not None and not MODEL_NAME_RE.match(v):
            raise ValueError(
                "output_name must be 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
            )
        return v

    @field_validator("eval_every")
    @classmethod
    def _eval_every(cls, v: int | str) -> int | str:
        if isinstance(v, int) and v < 1:
            raise ValueError("eval_every must be a positive number of steps or 'epoch'")
        return v

    @model_validator(mode="after")
    def _room_for_exemplars(self) -> TrainSpec:
        if self.grounding is None or self.max_input_length >= self.grounding.prompt_budget():
            return self
        if "max_input_length" not in self.model_fields_set:  # the default is for ungrounded prompts: make room
            self.max_input_length = self.grounding.prompt_budget()
        else:
            raise ValueError(f"a grounded prompt needs max_input_length >= {self.grounding.prompt_budget()} "
                             f"(k={self.grounding.k} exemplars of {self.grounding.max_exemplar_tokens} tokens)")
        return self


# llamacpp serves the first export in CSRA_GEN_GGUF_PREFERENCE; llamacpp:<quantization> that export
Backend = Literal["auto", "torch", "llamacpp", "llamacpp:f16", "llamacpp:bf16", "llamacpp:q8_0", "llamacpp:q4_k_m",
                  "llamacpp:q4_0"]


class GenerationSettings(_Spec):
    """Decoding and prompt settings of a reply (chat defaults, per-message overrides)."""

    tone: Tone = "neutral"
    temperature: Temperature = 0.0
    top_p: TopP = 1.0
    max_new_tokens: MaxNewTokens = REPLY_TOKENS
    ask_details_only_if_relevant: bool = Field(
        True, description="on: ask for order/account/email only when the request needs it; off: never"
    )
    seed: int | None = None
    backend: Backend = Field("auto", description="auto: the deployment's CSRA_GEN_BACKEND; torch: csra's engine "
                             "(exact, batch-invariant); llamacpp[:quantization]: the model's GGUF export through "
                             "llama.cpp")
    copy_bias: CopyBias | None = Field(None, description="grounded models only: instead of the model's own "
                                       "(Grounding.copy_bias)")
    no_repeat_ngram_size: NoRepeatNgram | None = Field(None, description="any model: instead of its own (a grounded "
                                                       "model's Grounding.no_repeat_ngram_size, else 0: off)")


class GenerationOverrides(_Spec):
    """Per-message changes to a chat's settings: any subset of ``GenerationSettings``, same bounds."""

    tone: Tone | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    max_new_tokens: MaxNewTokens | None = None
    ask_details_only_if_relevant: bool | None = None
    seed: int | None = None
    backend: Backend | None = None
    copy_bias: CopyBias | None = None
    no_repeat_ngram_size: NoRepeatNgram | None = None


class ReplyTo(_Spec):
    """The chat turn a generation answers: the job's outcome is written into this assistant message."""

    chat_id: int
    message_id: int


class GenerateRequest(GenerationSettings):
    """What a client asks for (``POST /jobs/generate``): ``message`` (one customer message) or
    ``messages`` (a conversation)."""

    model_id: str = Field("baseline", description="model name or id")
    message: str | None = Field(None, description="the customer's message")
    messages: list[dict[str, str]] | None = Field(
        None, description="multi-turn: [{'role': 'user'|'assistant', 'content': ...}], last one from the user"
    )

    @model_validator(mode="after")
    def _one_message(self) -> GenerateRequest:
        if (self.message is None) == (self.messages is None):
            raise ValueError("give exactly one of 'message' or 'messages'")
        if self.message is not None and not self.message.strip():
            raise ValueError("message is empty")
        if self.messages is not None:
            if not self.messages or self.messages[-1].get("role") != "user":
                raise ValueError("messages must end with a user message")
            for m in self.messages:
                if m.get("role") not in ("user", "assistant", "system") or not str(m.get("content", "")).strip():
                    raise ValueError("each message needs a role (user/assistant/system) and non-empty content")
        return self

    def conversation(self) -> list[dict[str, str]]:
        """The turns as messages (a single ``message`` is a one-turn conversation)."""
        if self.messages is not None:
            return [{"role": m["role"], "content": m["content"]} for m in self.messages]
        return [{"role": "user", "content": self.message or ""}]


class GenerateSpec(GenerateRequest):
    """One generation job, as stored for the worker (a ``POST /jobs/generate``, a chat reply or a
    ``/v1/chat/completions`` call): ``messages`` and the model's resolved name, and for a chat
    reply the assistant turn it fills in."""

    reply_to: ReplyTo | None = Field(None, description="the chat's assistant turn this job answers")


GgufQuantization = Literal["f16", "bf16", "q8_0", "q4_k_m", "q4_0"]
# the Hugging Face architectures ml.export converts to GGUF (checked against it by its tests)
GGUF_ARCHITECTURES = ("LlamaForCausalLM",)
EXPORTS_DIR = "exports"  # the folder inside a model's store folder that holds its exported files


class ExportSpec(_Spec):
    """An export job (``POST /models/{ref}/export``): one model of the store as one GGUF file."""

    model_id: str = Field(..., description="the model's stored name")
    format: Literal["gguf"] = "gguf"
    quantization: GgufQuantization = "f16"

    @property
    def file_name(self) -> str:
        return f"{self.model_id}-{self.quantization}.gguf"


class EvaluateSpec(_Spec):
    """An evaluation job (``POST /jobs/evaluate``)."""

    model_ids: list[str] = Field(..., min_length=1, description="model names or ids; 'baseline' allowed")
    dataset_id: int
    split: Literal["train", "validation", "test"] = "test"
    max_samples: int | None = Field(300, ge=1, description="stratified by intent when sampling")
    max_new_tokens: MaxNewTokens = REPLY_TOKENS  # below the references' lengths, cut replies would be scored
    num_beams: int = Field(1, ge=1, le=8, description="the original design used 4 (slower)")
    temperature: float = Field(0.0, ge=0, le=2)
    batch_size: int = Field(16, ge=1, le=128)
    seed: int = 42
    length_floor: LengthFloor | None = Field(None, description="grounded models only: the share of the "
                                       "first exemplar's length a reply must reach, instead of the model's "
                                       "own (to measure a setting before serving it)")
    copy_bias: CopyBias | None = Field(None, description="grounded models only: instead of the model's own")
    copy_exemplars: CopyExemplars | None = Field(None, description="grounded models only: instead of the model's own")
    consensus_pool: ConsensusPool | None = Field(None, description="grounded models only: instead of the model's own")
    no_repeat_ngram_size: NoRepeatNgram | None = Field(None, description="any model: instead of its own (a grounded "
                                                       "model's Grounding.no_repeat_ngram_size, else 0: off)")
    backend: Literal["torch", "llamacpp:f16", "llamacpp:bf16", "llamacpp:q8_0", "llamacpp:q4_k_m",
                     "llamacpp:q4_0"] = Field(
        "torch", description="torch: csra's engine (exact: greedy text the same alone or batched); llamacpp:<q>: "
        "each model's GGUF export at that quantization, to measure what serving it through llama.cpp costs")
