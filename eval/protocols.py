"""Prompt protocols of MLVU and Video-MME (and an MLVU-like one for still images), and answer extraction.

Every protocol turns (question, options) into the full model prompt (chat turn included, the assistant turn
pre-filled where the protocol does so) and gives the target completion for a correct answer. The shipped
models are trained on these exact strings and evaluated on them (shared/specs/field.md section 6):

- `mlvu`: the official MLVU multiple-choice protocol (``choice_bench.py``): its system prompt, "Question: ...",
  "Options:" with "(A) ..." lines, "Only give the best option."; the assistant turn is pre-filled with
  "Best Option: (" and the score is the character before the first ")".
- `mlvu-lmms`: lmms-eval's MLVU task: the record's question (candidates appended as "(A) ..." lines) +
  "\\nOnly give the best option.\\nBest option: (".
- `videomme`: lmms-eval's Video-MME task with its default post-prompt ("Answer with the option's letter from the
  given choices directly.").

The chat turn is the LLaVA-1.5 one: ``USER: <image>\\n{text} ASSISTANT:``. For still images the word "video" of
the MLVU system prompt reads "image".

Extraction: `extract_paren` (MLVU's official rule; lmms-eval's before PR #1274), `extract_videomme` (lmms-eval's
legacy Video-MME rule) and `extract_ranked` (lmms-eval's current ``extract_mcq_answer`` ranking).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

LETTERS = "ABCDEF"
PROTOCOLS: tuple[str, ...] = ("mlvu", "mlvu-lmms", "videomme")
#: protocols each kind of model is trained on
IMAGE_PROTOCOLS: tuple[str, ...] = ("mlvu", "mlvu-lmms")
VIDEO_PROTOCOLS: tuple[str, ...] = PROTOCOLS

MLVU_SYSTEM = ("Carefully watch this video and pay attention to every detail. Based on your observations, select "
               "the best option that accurately addresses the question.")
VIDEOMME_OPTION_PROMPT = ("Select the best answer to the following multiple-choice question based on the video and "
                          "the subtitles. Respond with only the letter (A, B, C, or D) of the correct option.")
VIDEOMME_POST_PROMPT = "\nAnswer with the option's letter from the given choices directly."

CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }} "
    "{% elif m['role'] == 'user' %}USER: "
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>\n{% elif c['type'] == 'video' %}<video>\n"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %} {% else %}ASSISTANT: "
    "{% for c in m['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}</s>"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def chat(text: str, visual: str, system: str | None = None, prefill: str = "") -> str:
    """The LLaVA-1.5 turn: "[system ]USER: <visual>\\n{text} ASSISTANT:[ prefill]"."""
    head = f"{system} " if system else ""
    tail = f" {prefill}" if prefill else ""
    return f"{head}USER: {visual}\n{text} ASSISTANT:{tail}"


def mlvu_question_block(question: str, options: Sequence[str]) -> str:
    """MLVU's ``qa_template``: "Question: q\\nOptions:\\n(A) o1\\n(B) o2..." (no trailing newline)."""
    lines = [f"Question: {question}", "Options:"] + [f"({LETTERS[i]}) {o}" for i, o in enumerate(options)]
    return "\n".join(lines)


def build_prompt(protocol: str, question: str, options: Sequence[str], kind: str = "video") -> str:
    """The full prompt (one `<image>` or `<video>` placeholder) for a question with option texts (no letters).

    Args:
        protocol: one of `PROTOCOLS`.
        question: the question text.
        options: the option texts in letter order.
        kind: "image" or "video" (the placeholder and the word in MLVU's system prompt).
    """
    visual = "<image>" if kind == "image" else "<video>"
    if protocol == "mlvu":
        system = MLVU_SYSTEM if kind == "video" else MLVU_SYSTEM.replace("video", "image")
        text = mlvu_question_block(question, options) + "\nOnly give the best option."
        return chat(text, visual, system=system, prefill="Best Option: (")
    if protocol == "mlvu-lmms":
        lines = [question] + [f"({LETTERS[i]}) {o}" for i, o in enumerate(options)]
        return chat("\n".join(lines) + "\nOnly give the best option.\nBest option: (", visual)
    if protocol == "videomme":
        lettered = "\n".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(options))
        return chat(f"{VIDEOMME_OPTION_PROMPT}\n{question}\n{lettered}\n{VIDEOMME_POST_PROMPT}", visual)
    raise ValueError(f"unknown protocol {protocol!r}; choose from {PROTOCOLS}")


def open_prompt(question: str, kind: str = "video") -> str:
    """A training-only auxiliary form: the question without options, answered in words (" red circle")."""
    return chat(f"Question: {question}\nAnswer in a few words.", "<image>" if kind == "image" else "<video>")


def target(protocol: str, letter: str) -> str:
    """What a correct model generates after the prompt (before the end-of-sequence token)."""
    if protocol == "mlvu":
        return f"{letter})"
    if protocol == "mlvu-lmms":
        return f" {letter})"
    if protocol == "videomme":
        return f" {letter}"
    raise ValueError(f"unknown protocol {protocol!r}; choose from {PROTOCOLS}")


def extract_paren(pred: str) -> str:
    """MLVU's official ``check_ans`` rule: the character immediately before the first ")" ("" if none)."""
    i = pred.find(")")
    return pred[i - 1].strip() if i > 0 else ""


_VIDEOMME_PREFIXES = ("The best answer is", "The correct answer is", "The answer is", "The answer",
                      "The best option is", "The correct option is", "Best answer:", "Best option:")


def extract_videomme(pred: str, letters: str = "ABCD") -> str:
    """lmms-eval's legacy Video-MME rule: strip answer prefixes; "" for more than 10 words without a letter;
    otherwise the first option letter."""
    s = pred.strip()
    for p in _VIDEOMME_PREFIXES:
        s = s.replace(p, "")
    if len(s.split()) > 10 and not re.search(f"[{letters}]", s):
        return ""
    m = re.search(f"[{letters}]", s)
    return m.group(0) if m else ""


def extract_ranked(pred: str, letters: str = "ABCD") -> str:
    """lmms-eval's current ``extract_mcq_answer`` ranking: a letter at the start > at the end > after "answer is"
    > "(X)" > "X." > "X:" > "X)" > "X "; within a format the last occurrence wins. "" if none."""
    s = pred.strip()
    L = f"[{letters}]"
    m = re.match(rf"\(?({L})(?=[\s.:)]|$)", s)
    if m:
        return m.group(1)
    m = re.search(rf"(?:^|[\s(])({L})\)?\.?$", s)
    if m:
        return m.group(1)
    for pattern in (rf"(?i:answer is):?\s*\(?({L})\b", rf"\(({L})\)", rf"\b({L})\.", rf"\b({L}):",
                    rf"\b({L})\)", rf"\b({L})\s"):
        found = re.findall(pattern, s)
        if found:
            return found[-1]
    return ""


def extract(protocol: str, completion: str) -> str:
    """The protocol's own rule: MLVU -> `extract_paren`, Video-MME -> `extract_videomme`."""
    return extract_videomme(completion) if protocol == "videomme" else extract_paren(completion)
