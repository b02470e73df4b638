"""Evaluation protocols of MLVU and Video-MME: prompts, answer extraction and scoring, named and versioned.

A **protocol** is what a published number depends on besides the model: the prompt around the question, the
generation length and the rule that turns a completion into an answer letter. Each one here reproduces one
reference implementation *including its quirks* (ported from reading the reference code, written anew):

=================  ======================================================================================
name               reference
=================  ======================================================================================
``videomme``       lmms-eval 0.7.3 Video-MME task (``videomme/utils.py``): its prompt with the default
                   post-prompt, and the shared ranked extractor ``extract_mcq_answer`` over A-D.
``videomme-legacy`` lmms-eval <= 0.7.1 (before PR #1274, commit 9ca4445): strip answer prefixes, "" for more
                   than 10 words without A-D, else the first A-D anywhere. Its prefix list misses two commas,
                   so Python glues "The best option is" + "The correct option is" and "Best answer:" + "Best
                   option:" into two strings that never occur: "Best option: (A)" extracts the B of "Best",
                   "Answer: B" the A of "Answer". Kept as it was, because published numbers used it.
``mlvu``           MLVU's official multiple-choice protocol (JUNJIE99/MLVU ``choice_bench.py`` @fd060c1): its
                   system prompt, "Question:/Options:/(A) ..." block, "Only give the best option." and the
                   assistant turn pre-filled with "Best Option: ("; ``check_ans``: the character before the
                   first ")" if there is one, else the whole completion unchanged (so a bare "A" counts, " A"
                   does not), compared with the ground-truth letter.
``mlvu-lmms``      lmms-eval 0.7.3 MLVU task: the record's question + "\\nOnly give the best option.\\nBest
                   option: (" and the ranked extractor over A-D (also on MLVU-Test's six options: E and F
                   can never be extracted, as in lmms-eval).
``mlvu-lmms-legacy`` lmms-eval <= 0.7.1 MLVU: strip; the character before the first ")" if any, else the whole
                   stripped completion.
``mlvu-test``      MLVU-Test's official inference script (``evaluation_test/test_bench.py``): MLVU's prompt
                   with up to six options; the submitted option is the stripped completion cut before its
                   first ")" and stripped again.
=================  ======================================================================================

One entry point: `extract(protocol, completion)` gives the answer letter or "" and `score(protocol, completion,
answer)` whether the reference counts it correct (exactly: e.g. MLVU's ``check_ans`` compares whatever it
extracted, not only letters). `build_prompt` gives the full model prompt. The prompt *forms* (`PROMPT_FORMS`:
``mlvu``, ``mlvu-lmms``, ``videomme``) are what the default models are trained on; every protocol uses one.

The chat turn is the LLaVA-1.5 one: ``USER: <image>\\n{text} ASSISTANT:``. For still images the word "video" of
the MLVU system prompt reads "image".
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

LETTERS = "ABCDEF"
#: the prompt forms (one per benchmark family); the default models are trained on them
PROMPT_FORMS: tuple[str, ...] = ("mlvu", "mlvu-lmms", "videomme")
#: kept for training code: the prompt forms each kind of model is trained on
PROTOCOLS: tuple[str, ...] = PROMPT_FORMS
IMAGE_PROTOCOLS: tuple[str, ...] = ("mlvu", "mlvu-lmms")
VIDEO_PROTOCOLS: tuple[str, ...] = PROMPT_FORMS

MLVU_SYSTEM = ("Carefully watch this video and pay attention to every detail. Based on your observations, select "
               "the best option that accurately addresses the question.")
VIDEOMME_OPTION_PROMPT = ("Select the best answer to the following multiple-choice question based on the video and "
                          "the subtitles. Respond with only the letter (A, B, C, or D) of the correct option.")
VIDEOMME_POST_PROMPT = "\nAnswer with the option's letter from the given choices directly."
VIDEOMME_SUBTITLE_INTRO = "This video's subtitles are listed below: \n"
VIDEOMME_SUBTITLE_POST = "The best answer is:"
MLVU_LMMS_POST_PROMPT = "\nOnly give the best option.\nBest option: ("

CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }} "
    "{% elif m['role'] == 'user' %}USER: "
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>\n{% elif c['type'] == 'video' %}<video>\n"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %} {% else %}ASSISTANT: "
    "{% for c in m['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}</s>"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


# --- answer extraction: the references' rules ------------------------------------------------------------------

#: lmms-eval's ``extract_mcq_answer``: phrases after which the first choice letter counts, in its order
RANKED_PHRASES = (
    "the answer is", "answer is", "the correct answer is", "correct answer is", "the best answer is",
    "best answer is", "the correct option is", "correct option is", "the best option is", "best option is",
    "the choice is", "choice is", "the correct choice is", "correct choice is", "i choose", "i select", "i pick",
    "my answer is", "my choice is", "옵션", "정답은", "답은", "답:", "答案是", "答案为", "选", "答えは",
)
#: how much each kind of match is trusted (higher wins; then the later position wins)
RANKED_PRIORITY = {"start": 10, "end": 9, "phrase": 7, "parentheses": 6, "period": 5, "colon": 4,
                   "right_paren": 3, "space": 2, "fallback": 0}
_RANKED_TRIM = ",.!?;:'\""


def ranked_letter(response: str, choices: Sequence[str] = "ABCDEFGH") -> str:
    """lmms-eval 0.7.3's ``extract_mcq_answer(response, choices)``: every place a choice letter appears in a
    recognised form is a candidate ranked by `RANKED_PRIORITY`; the best form wins, and within it the last
    position. Ties keep the first candidate found. "" if no letter appears at all.

    The quirks are the reference's: the response is stripped of whitespace and then of each of ``,.!?;:'"`` in
    turn (one ``str.strip`` per character); "X " and "X." match inside words ("THE B" -> B); after a phrase the
    first occurrence of each letter anywhere later counts (capitals of words included); the phrase is found in
    the lower-cased text and its index used on the original; an uppercase letter anywhere is the fallback.
    """
    if not response or not response.strip():
        return ""
    text = response.strip()
    for ch in _RANKED_TRIM:
        text = text.strip(ch)
    text = f" {text} "
    found: list[tuple[int, int, str]] = []  # (priority, position, letter), in the reference's order
    for form, pattern in (("parentheses", "({})"), ("period", "{}."), ("colon", "{}:"), ("right_paren", "{})"),
                          ("space", "{} ")):
        for ch in choices:
            needle = pattern.format(ch)
            if needle in text:
                found.append((RANKED_PRIORITY[form], text.rfind(needle), ch))
    lower = text.lower()
    for phrase in RANKED_PHRASES:
        at = lower.find(phrase)
        if at < 0:
            continue
        for ch in choices:
            pos = text.find(ch, at + len(phrase))
            if pos >= 0:
                found.append((RANKED_PRIORITY["phrase"], pos, ch))
    core = text.strip()
    for ch in choices:
        if core.startswith(ch) and (len(core) == 1 or not core[1].isalpha()):
            found.append((RANKED_PRIORITY["start"], 0, ch))
    for ch in choices:
        if core.endswith(ch) and (len(core) == 1 or not core[-2].isalpha()):
            found.append((RANKED_PRIORITY["end"], len(text) - 1, ch))
    if not found:
        found = [(RANKED_PRIORITY["fallback"], text.rfind(ch), ch) for ch in choices if ch in text]
    if not found:
        return ""
    best = max(range(len(found)), key=lambda i: (found[i][0], found[i][1], -i))
    return found[best][2]


#: lmms-eval <= 0.7.1's Video-MME prefixes, as Python reads that list: two missing commas glue four of them
VIDEOMME_LEGACY_PREFIXES = (
    "The best answer is", "The correct answer is", "The answer is", "The answer",
    "The best option is" + "The correct option is",
    "Best answer:" + "Best option:",
)


def videomme_legacy_letter(s: str) -> str:
    """lmms-eval <= 0.7.1's Video-MME rule: strip, delete the (glued) prefixes, then the first of A-D anywhere
    (capitals inside words included), or "". (Its "more than 10 words and no A-D gives ''" branch returns what
    the no-match branch returns anyway.)"""
    s = s.strip()
    for prefix in VIDEOMME_LEGACY_PREFIXES:
        s = s.replace(prefix, "")
    m = re.search("[ABCD]", s)
    return m.group(0) if m else ""


def before_first_paren(s: str) -> str:
    """The one character before the first ")" (a ")" at the very start gives ""), or `s` unchanged without one:
    the rule of MLVU's ``check_ans`` (applied to the raw completion) and, after stripping, of lmms-eval <= 0.7.1's
    MLVU task."""
    i = s.find(")")
    if i < 0:
        return s
    return s[i - 1:i] if i > 0 else ""


def mlvu_lmms_legacy_answer(s: str) -> str:
    """lmms-eval <= 0.7.1's MLVU rule: strip, then `before_first_paren` (the whole stripped text without ")")."""
    return before_first_paren(s.strip())


def mlvu_test_answer(s: str) -> str:
    """MLVU-Test's official script: strip; if there is a ")", the text before it, stripped."""
    s = s.strip()
    i = s.find(")")
    return s[:i].strip() if i >= 0 else s


# --- protocols ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Protocol:
    """One named evaluation protocol.

    Attributes:
        name: registry name.
        reference: the implementation it reproduces, with its version.
        prompt: the prompt form (`PROMPT_FORMS`).
        rule: completion -> the string the reference compares with the ground-truth letter.
        extractor: short name of `rule`, recorded in result files.
        letters: the letters the rule can return (others extract as "").
        ignore_case: the reference compares case-insensitively (Video-MME's per-sample score).
        max_new_tokens: the reference's generation length (greedy decoding).
        aggregate: "videomme" (micro average with breakdowns) or "mlvu" (mean over task types).
    """

    name: str
    reference: str
    prompt: str
    rule: Callable[[str], str]
    extractor: str
    letters: str = "ABCD"
    ignore_case: bool = False
    max_new_tokens: int = 16
    aggregate: str = "mlvu"

    def raw(self, completion: str) -> str:
        """What the reference compares with the ground truth (any string: MLVU compares whatever it cut)."""
        return self.rule(completion)

    def extract(self, completion: str) -> str:
        """The answer letter the reference reads from `completion`, or "" if what it reads is not a letter."""
        got = self.rule(completion)
        got = got.upper() if self.ignore_case else got
        return got if len(got) == 1 and got in self.letters else ""

    def score(self, completion: str, answer: str) -> bool:
        """Whether the reference counts `completion` correct for the ground-truth `answer` letter."""
        got = self.rule(completion)
        if self.ignore_case:
            return got.lower() == answer.lower()
        return got == answer

    def to_dict(self) -> dict[str, object]:
        return {"name": self.name, "reference": self.reference, "prompt": self.prompt, "extractor": self.extractor,
                "letters": self.letters, "max_new_tokens": self.max_new_tokens, "aggregate": self.aggregate}


def _ranked_abcd(s: str) -> str:
    return ranked_letter(s, "ABCD")


REGISTRY: dict[str, Protocol] = {p.name: p for p in (
    Protocol("videomme", "lmms-eval 0.7.3 tasks/videomme (extract_mcq_answer, choices A-D)", "videomme",
             _ranked_abcd, "lmms-eval extract_mcq_answer A-D", ignore_case=True, aggregate="videomme"),
    Protocol("videomme-legacy", "lmms-eval <= 0.7.1 tasks/videomme (before PR #1274), glued prefix list",
             "videomme", videomme_legacy_letter, "lmms-eval legacy prefix strip + first [ABCD]", ignore_case=True,
             aggregate="videomme"),
    Protocol("mlvu", "MLVU official choice_bench.py check_ans (JUNJIE99/MLVU @fd060c1)", "mlvu", before_first_paren,
             "MLVU check_ans: char before first ')', else the completion", letters="ABCDEF"),
    Protocol("mlvu-lmms", "lmms-eval 0.7.3 tasks/mlvu (extract_mcq_answer, choices A-D)", "mlvu-lmms", _ranked_abcd,
             "lmms-eval extract_mcq_answer A-D"),
    Protocol("mlvu-lmms-legacy", "lmms-eval <= 0.7.1 tasks/mlvu (before PR #1274)", "mlvu-lmms",
             mlvu_lmms_legacy_answer, "lmms-eval legacy: strip, char before first ')', else all"),
    Protocol("mlvu-test", "MLVU-Test official test_bench.py (JUNJIE99/MLVU @fd060c1)", "mlvu", mlvu_test_answer,
             "MLVU-Test: strip, text before first ')'", letters="ABCDEF"),
)}
#: the default protocol of each benchmark
BENCH_PROTOCOL = {"videomme": "videomme", "mlvu": "mlvu", "mlvu-test": "mlvu-test", "images": "mlvu"}


def get(protocol: str | Protocol) -> Protocol:
    """The `Protocol` named `protocol` (a `Protocol` passes through); ValueError naming the choices."""
    if isinstance(protocol, Protocol):
        return protocol
    try:
        return REGISTRY[protocol]
    except (KeyError, TypeError):
        raise ValueError(f"unknown protocol {protocol!r}; choose from {', '.join(REGISTRY)}") from None


def extract(protocol: str | Protocol, completion: str) -> str:
    """The answer letter `protocol`'s reference reads from `completion`, or ""."""
    return get(protocol).extract(completion)


def score(protocol: str | Protocol, completion: str, answer: str) -> bool:
    """Whether `protocol`'s reference counts `completion` correct for the ground-truth letter `answer`."""
    return get(protocol).score(completion, answer)


# --- prompts -----------------------------------------------------------------------------------------------


def chat(text: str, visual: str, system: str | None = None, prefill: str = "") -> str:
    """The LLaVA-1.5 turn: "[system ]USER: <visual>\\n{text} ASSISTANT:[ prefill]"."""
    head = f"{system} " if system else ""
    tail = f" {prefill}" if prefill else ""
    return f"{head}USER: {visual}\n{text} ASSISTANT:{tail}"


def mlvu_question_block(question: str, options: Sequence[str]) -> str:
    """MLVU's ``qa_template``: "Question: q\\nOptions:\\n(A) o1\\n(B) o2..." (no trailing newline)."""
    lines = [f"Question: {question}", "Options:"] + [f"({LETTERS[i]}) {o}" for i, o in enumerate(options)]
    return "\n".join(lines)


def mlvu_lmms_question(question: str, options: Sequence[str]) -> str:
    """The ``question`` field of lmms-eval's MLVU records as the generated benchmark writes it: the question and
    one "(A) option" line per candidate."""
    return "\n".join([question] + [f"({LETTERS[i]}) {o}" for i, o in enumerate(options)])


def prompt_parts(protocol: str | Protocol, question: str, options: Sequence[str], kind: str = "video", *,
                 raw_question: str | None = None, subtitles: str | None = None) -> tuple[str | None, str, str]:
    """(system, user text, assistant prefill) of `protocol`'s prompt, without the chat wrapping.

    Args:
        protocol: a protocol or prompt-form name.
        question: the question text; options: the option texts in letter order (no letters).
        kind: "image" or "video" (the word in MLVU's system prompt).
        raw_question: lmms-eval's MLVU prompt uses the record's ``question`` field as it is (the candidates are
            already in it); when None it is made with `mlvu_lmms_question`.
        subtitles: Video-MME's subtitle variant (``videomme_w_subtitle``): the subtitle text ("No subtitles
            available" when a video has none); None for the plain prompt.
    """
    form = protocol if protocol in PROMPT_FORMS else get(protocol).prompt
    if len(options) > len(LETTERS):
        raise ValueError(f"at most {len(LETTERS)} options, got {len(options)}")
    if form == "mlvu":
        system = MLVU_SYSTEM if kind == "video" else MLVU_SYSTEM.replace("video", "image")
        return system, mlvu_question_block(question, options) + "\nOnly give the best option.", "Best Option: ("
    if form == "mlvu-lmms":
        body = raw_question if raw_question is not None else mlvu_lmms_question(question, options)
        return None, body + MLVU_LMMS_POST_PROMPT, ""
    lettered = "\n".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(options))
    if subtitles is not None:
        return None, (f"{VIDEOMME_SUBTITLE_INTRO}{subtitles}\n{VIDEOMME_OPTION_PROMPT}\n{question}\n{lettered}\n"
                      f"{VIDEOMME_SUBTITLE_POST}"), ""
    return None, f"{VIDEOMME_OPTION_PROMPT}\n{question}\n{lettered}\n{VIDEOMME_POST_PROMPT}", ""


def build_prompt(protocol: str | Protocol, question: str, options: Sequence[str], kind: str = "video", *,
                 raw_question: str | None = None, subtitles: str | None = None) -> str:
    """The full prompt (one `<image>` or `<video>` placeholder) for a question with option texts (no letters),
    in the LLaVA-1.5 chat turn the default models use. See `prompt_parts` for the arguments."""
    system, text, prefill = prompt_parts(protocol, question, options, kind, raw_question=raw_question,
                                         subtitles=subtitles)
    return chat(text, "<image>" if kind == "image" else "<video>", system=system, prefill=prefill)


def open_prompt(question: str, kind: str = "video") -> str:
    """A training-only auxiliary form: the question without options, answered in words (" red circle")."""
    return chat(f"Question: {question}\nAnswer in a few words.", "<image>" if kind == "image" else "<video>")


def target(protocol: str, letter: str) -> str:
    """What a correct model generates after the prompt (before the end-of-sequence token)."""
    form = protocol if protocol in PROMPT_FORMS else get(protocol).prompt
    if form == "mlvu":
        return f"{letter})"
    if form == "mlvu-lmms":
        return f" {letter})"
    return f" {letter}"
