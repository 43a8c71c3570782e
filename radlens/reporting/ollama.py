"""The narrative from a local LLM through Ollama (the ``ollama`` client), grounded, bounded in time,
and replaced by the template whenever it is off, slow, wrong or absent.

The model answers in the JSON schema of ``LlmNarrative`` (``format``), at temperature 0 with a
fixed seed. Every answer is checked by ``grounding.check``; one retry lists the violations; then
the template text goes out and the SR says why. Nothing waits longer than ``llm.timeout_s``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx
import ollama
from pydantic import BaseModel, Field, ValidationError

from radlens.config import LlmSettings
from radlens.findings import StudyFindings
from radlens.logs import kv
from radlens.reporting import grounding
from radlens.reporting.narrative import Narrative
from radlens.reporting.prompt import StudyFacts, chat_messages
from radlens.reporting.template import template_narrative

log = logging.getLogger(__name__)


Answer = TypeVar("Answer", bound=BaseModel)


class LlmNarrative(BaseModel):
    """What the model must answer: the report's sections."""

    impression: str = Field(description="a short clinical summary of the study")
    lesions: list[str] = Field(description="one description per finding (lesion) the "
                               "findings list, in order")
    comparison: str = Field(description="how those findings compare")
    recommendation: str = Field(description="the category of each, as an AI suggestion")
    limitations: str = Field(description="what this automated analysis cannot tell")

    def text(self) -> str:
        parts = [f"Impression: {self.impression.strip()}"]
        parts += [description.strip() for description in self.lesions]
        parts += [f"Comparison: {self.comparison.strip()}",
                  f"Recommendation: {self.recommendation.strip()}",
                  f"Limitations: {self.limitations.strip()}"]
        return "\n".join(part for part in parts if part)


@dataclass(frozen=True)
class ModelStatus:
    """What the agent found at start-up, for the log and ``radlens status``."""

    provider: str
    host: str
    model: str
    reachable: bool
    pulled: bool
    vision: bool
    message: str

    @property
    def ready(self) -> bool:
        return self.reachable and self.pulled


class LlmUnavailable(Exception):
    """The LLM could not answer: server down, model missing, timeout, server error."""


def _same_model(a: str, b: str) -> bool:
    normalise = lambda name: name if ":" in name else f"{name}:latest"  # noqa: E731
    return normalise(a) == normalise(b)


class OllamaNarrator:
    def __init__(self, settings: LlmSettings) -> None:
        self.settings = settings

    def _client(self, timeout_s: float) -> ollama.Client:
        return ollama.Client(host=self.settings.host, timeout=max(timeout_s, 0.1))

    def status(self) -> ModelStatus:
        s = self.settings
        try:
            client = self._client(min(s.timeout_s, 10.0))
            names = [m.model or "" for m in client.list().models]
        except (httpx.HTTPError, ollama.ResponseError, ConnectionError) as exc:
            return ModelStatus("ollama", s.host, s.model, False, False, False,
                               f"Ollama at {s.host} is not reachable ({_reason(exc)}): the "
                               "template narrative is used")
        if not any(_same_model(name, s.model) for name in names):
            return ModelStatus("ollama", s.host, s.model, True, False, False,
                               f"model {s.model} is not pulled into Ollama at {s.host} (run: "
                               f"ollama pull {s.model}): the template narrative is used")
        try:
            capabilities = client.show(s.model).capabilities or []
        except (httpx.HTTPError, ollama.ResponseError, ConnectionError):
            capabilities = []
        return ModelStatus("ollama", s.host, s.model, True, True, "vision" in capabilities,
                           f"model {s.model} ready at {s.host}")

    def ask(self, messages: list[dict[str, Any]], schema: type[Answer], *, timeout_s: float,
            images: list[bytes] | None = None) -> Answer:
        """One chat request answered in ``schema``; raises LlmUnavailable, or ValueError for an
        answer that is not that JSON."""
        messages = [dict(m) for m in messages]
        if images:
            messages[1]["images"] = images
        try:
            response = self._client(timeout_s).chat(
                model=self.settings.model, messages=messages, stream=False,
                format=schema.model_json_schema(),
                options={"temperature": 0, "seed": self.settings.seed},
                keep_alive=self.settings.keep_alive)
        except (httpx.HTTPError, ollama.ResponseError, ConnectionError) as exc:
            raise LlmUnavailable(_reason(exc)) from exc
        content = response.message.content or ""
        try:
            return schema.model_validate(json.loads(content))
        except (json.JSONDecodeError, ValidationError) as exc:
            raise ValueError(f"the answer is not the requested JSON ({exc.__class__.__name__})"
                             ) from exc


def _reason(exc: BaseException) -> str:
    if isinstance(exc, httpx.TimeoutException):
        return "timed out"
    if isinstance(exc, ollama.ResponseError):
        return f"HTTP {exc.status_code}: {str(exc.error)[:200]}"
    if isinstance(exc, ConnectionError | httpx.ConnectError):
        return "connection refused"
    return f"{type(exc).__name__}: {str(exc)[:200]}"


def grounded_text(settings: LlmSettings, schema: type[Answer],
                  messages: Callable[[list[str] | None], list[dict[str, Any]]],
                  check: Callable[[str], list[str]], *, subject: str,
                  images: list[bytes] | None = None) -> tuple[str | None, str | None, bool | None]:
    """Ask, check, retry once with the violations. Returns (text, why not, grounded): the
    text when a grounded answer came within ``settings.timeout_s``, else the reason."""
    started = time.monotonic()
    remaining = lambda: settings.timeout_s - (time.monotonic() - started)  # noqa: E731
    narrator = OllamaNarrator(settings)
    violations: list[str] | None = None
    for attempt in (1, 2):
        if remaining() <= 0:
            return None, f"the LLM did not answer within {settings.timeout_s:g} s", None
        try:
            answer = narrator.ask(messages(violations), schema, timeout_s=remaining(),
                                  images=images)
        except LlmUnavailable as exc:
            return None, f"the LLM was unavailable ({exc})", None
        except ValueError as exc:
            violations = [str(exc)]
            log.warning("LLM answer unusable", extra=kv(subject=subject, attempt=attempt,
                                                        reason=str(exc)))
            continue
        text = answer.text()  # type: ignore[attr-defined]
        violations = check(text)
        if not violations:
            log.info("LLM narrative grounded", extra=kv(subject=subject, model=settings.model,
                                                        attempt=attempt))
            return text, None, True
        log.warning("LLM narrative not grounded", extra=kv(
            subject=subject, attempt=attempt, violations="; ".join(violations)[:500]))
    return None, ("the LLM's text failed grounding twice ("
                  + "; ".join(violations or [])[:300] + ")"), False


def narrate(findings: StudyFindings, settings: LlmSettings, *,
            images: Callable[[], list[bytes]] | None = None,
            vision_capable: bool = False) -> Narrative:
    """The study's narrative: the LLM's when it answers, grounded, within ``timeout_s``;
    otherwise the template, saying why."""
    template = template_narrative(findings)
    if settings.provider == "template" or not findings.tasks_run:
        return template  # nothing analysed: there is nothing for an LLM to put into words
    facts = StudyFacts.from_findings(findings)
    attachments = images() if (images and settings.vision and vision_capable) else None
    text, reason, grounded = grounded_text(
        settings, LlmNarrative, lambda violations: chat_messages(facts, violations=violations),
        lambda answer: grounding.check(answer, facts), subject=findings.study_instance_uid,
        images=attachments)
    if text is not None:
        return Narrative(text=text, author=settings.model, grounded=True)
    assert reason is not None
    return _fallback(template, findings.study_instance_uid, reason, grounded=grounded)


def _fallback(template: Narrative, subject: str, reason: str, *,
              grounded: bool | None = None) -> Narrative:
    log.warning("template narrative used instead of the LLM",
                extra=kv(subject=subject, reason=reason))
    return Narrative(text=template.text, author=template.author, grounded=grounded,
                     note=f"template used because {reason}")
