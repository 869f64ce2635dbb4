"""LLM-judge semantic reward (PathReasoner's R_semantic): a judge model grades the `<answer>` text
against the ground truth with a rubric and replies "Score: x", x in [0, 1].

Two backends, one rubric and one parser:
- `judge_http`: any OpenAI-compatible server (`POST {url}/chat/completions`), per sample, async (the
  calls of a task run concurrently); the API key, if any, is read from the environment variable
  named by `api_key_env`, never from config.
- `judge_vllm`: a `JudgeActor` (a Ray actor holding a text-only, in-process `vllm.LLM`) started once
  with `start_judge_actor` and found by name; one batched generation per call. The reply is
  constrained by a regex to "Score: <number in [0,1]>" (vLLM structured outputs), so even a weak
  judge returns a parseable score.
A reply without a parseable score is an error for that sample (never a silent 0). A response
without an `<answer>` span scores 0.0 (metric `no_answer` = 1): nothing to judge is the model's
failure, not the judge's.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import urllib.request
from typing import Any

from rewards.api import RewardInput
from rewards.pathology import LETTERS, answer_span

SYSTEM_PROMPT = ("You are an expert pathologist grading answers to pathology questions. Judge meaning, "
                 "not wording: synonyms and equivalent diagnoses are correct.")
RUBRIC = """Question:
{question}

Reference answer:
{reference}

Candidate answer:
{candidate}

Grade the candidate answer against the reference answer:
1.0 = same diagnosis or meaning; 0.5 = partly correct (right category, wrong subtype, or correct but
incomplete); 0.0 = wrong, contradictory, or unrelated. Intermediate values are allowed.
Reply with exactly one line: Score: <number between 0 and 1>"""
SCORE_REGEX = r"Score: (0(\.[0-9]{1,2})?|1(\.0{1,2})?)"

# Not the head of a decimal comma ("0,8") or of an exponent ("1e-1"): those are refused, not misread.
_NUMBER = r"(\d+(?:\.\d+)?|\.\d+)(?![,.]\d|[eE][-+]?\d)"
_KEYED = re.compile(rf"(?i)\bscore\b\s*(?:is|of|=|:)?\s*\**\s*{_NUMBER}\s*(?:(/|out of)\s*{_NUMBER}|(%))?")
_FRACTION = re.compile(rf"{_NUMBER}\s*(?:/|out of)\s*{_NUMBER}")
_THINK = re.compile(r"<think>.*?</think>", flags=re.DOTALL)


def parse_judge_score(text: str) -> float | None:
    """The score in a judge's reply, in [0, 1], or None when there is none.

    Reasoning in `<think>...</think>` is ignored. The last "score" keyword wins ("Score: 0.8",
    "score = 4/5", "Score: 80%", "**Score**: 1"); without one, a last fraction ("4 out of 5"), or a reply
    that is a bare number. Fractions and percentages are divided out; values outside [0, 1] (a bare
    "7" without a scale) are rejected rather than clipped.
    """
    text = _THINK.sub(" ", text).replace("**", "")
    value = None
    keyed = list(_KEYED.finditer(text))
    if keyed:
        m = keyed[-1]
        value = float(m.group(1))
        if m.group(3):
            value = value / float(m.group(3)) if float(m.group(3)) > 0 else None
        elif m.group(4):
            value /= 100.0
    elif fractions := list(_FRACTION.finditer(text)):
        num, den = float(fractions[-1].group(1)), float(fractions[-1].group(2))
        value = num / den if den > 0 else None
    elif re.fullmatch(_NUMBER, text.strip().rstrip(".")):
        value = float(text.strip().rstrip("."))
    return value if value is not None and 0.0 <= value <= 1.0 else None


def reference_answer(sample: RewardInput) -> str:
    """The ground truth as the judge should read it: "B. <option text>" for an option letter."""
    options = sample.extra.get("options") or []
    truth = sample.ground_truth.strip()
    if len(truth) == 1 and truth.upper() in LETTERS[:len(options)]:
        return f"{truth.upper()}. {options[LETTERS.index(truth.upper())]}"
    return truth


def judge_messages(sample: RewardInput, candidate: str, rubric: str = RUBRIC) -> list[dict[str, str]]:
    """The chat messages sent to the judge for one sample."""
    user = rubric.format(question=sample.prompt, reference=reference_answer(sample), candidate=candidate)
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


def _score_reply(reply: str) -> dict[str, float]:
    score = parse_judge_score(reply)
    if score is None:
        raise ValueError(f"judge reply has no score in [0, 1]: {reply[:200]!r}")
    return {"score": score, "no_answer": 0.0}


def _post_json(url: str, body: dict, headers: dict[str, str], timeout_s: float) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json", **headers})
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        return json.loads(response.read())


async def judge_http(sample: RewardInput, url: str, model: str, api_key_env: str | None = None,
                     max_tokens: int = 256, temperature: float = 0.0, request_timeout_s: float = 30.0,
                     rubric: str = RUBRIC) -> dict[str, float]:
    """Semantic score from an OpenAI-compatible chat endpoint; `url` is its base ("http://host:8000/v1")."""
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"judge_http: url must start with http:// or https://, got {url!r}")
    candidate = answer_span(sample.response)
    if candidate is None:
        return {"score": 0.0, "no_answer": 1.0}
    headers = {}
    if api_key_env:
        if api_key_env not in os.environ:
            raise KeyError(f"judge_http: environment variable {api_key_env!r} (the API key) is not set")
        headers["Authorization"] = f"Bearer {os.environ[api_key_env]}"
    body = {"model": model, "messages": judge_messages(sample, candidate, rubric), "max_tokens": max_tokens,
            "temperature": temperature}
    reply = await asyncio.to_thread(_post_json, url.rstrip("/") + "/chat/completions", body, headers,
                                    request_timeout_s)
    try:
        text = reply["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise ValueError(f"judge_http: not a chat-completions reply: {json.dumps(reply)[:200]}") from None
    return _score_reply(text or "")


class JudgeActor:
    """A text-only vLLM engine in the actor's own process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`,
    `distributed_executor_backend="uni"`: starts in seconds, no extra processes)."""

    def __init__(self, model: str, **llm_kwargs: Any):
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        from vllm import LLM

        options = {"max_model_len": 4096, "limit_mm_per_prompt": {"image": 0, "video": 0}, **llm_kwargs}
        self.llm = LLM(model=model, distributed_executor_backend="uni", **options)

    def ready(self) -> bool:
        return True

    def generate(self, conversations: list[list[dict[str, str]]], max_tokens: int, temperature: float,
                 regex: str | None) -> list[str]:
        """One reply per conversation (chat template applied), constrained to `regex` when given."""
        from vllm import SamplingParams
        from vllm.sampling_params import StructuredOutputsParams

        params = SamplingParams(max_tokens=max_tokens, temperature=temperature,
                                structured_outputs=StructuredOutputsParams(regex=regex) if regex else None)
        outputs = self.llm.chat(conversations, params, use_tqdm=False)
        return [out.outputs[0].text for out in outputs]


def start_judge_actor(model: str, name: str = "pathorl-judge", namespace: str = "pathorl", num_cpus: float = 1,
                      num_gpus: float = 0, env_vars: dict[str, str] | None = None, **llm_kwargs: Any):
    """Starts a named `JudgeActor` in the current Ray cluster (ray.init() first) and waits until its
    engine is loaded. `judge_vllm` finds it by `name` and `namespace`. Returns the actor handle;
    `ray.kill(handle)` stops it."""
    import ray

    env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", **(env_vars or {})}
    actor = ray.remote(JudgeActor).options(name=name, namespace=namespace, num_cpus=num_cpus, num_gpus=num_gpus,
                                           runtime_env={"env_vars": env}).remote(model, **llm_kwargs)
    ray.get(actor.ready.remote())
    return actor


def judge_vllm(samples: list[RewardInput], actor_name: str = "pathorl-judge", namespace: str = "pathorl",
               ray_address: str = "auto", max_tokens: int = 16, temperature: float = 0.0, constrain: bool = True,
               rubric: str = RUBRIC) -> list[dict[str, float] | Exception]:
    """Semantic scores from the named `JudgeActor`, one batched generation for all samples. The
    worker process joins the Ray cluster at `ray_address` on first use."""
    import ray

    if not ray.is_initialized():
        ray.init(address=ray_address, namespace=namespace, log_to_driver=False, logging_level="ERROR")
    actor = ray.get_actor(actor_name, namespace=namespace)
    candidates = [answer_span(s.response) for s in samples]
    asked = [k for k, c in enumerate(candidates) if c is not None]
    conversations = [judge_messages(samples[k], candidates[k], rubric) for k in asked]
    replies = ray.get(actor.generate.remote(conversations, max_tokens, temperature,
                                            SCORE_REGEX if constrain else None)) if asked else []
    results: list[dict[str, float] | Exception] = [{"score": 0.0, "no_answer": 1.0}] * len(samples)
    for k, reply in zip(asked, replies):
        try:
            results[k] = _score_reply(reply)
        except ValueError as exc:
            results[k] = exc
    return results
