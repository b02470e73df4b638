"""Stages, the `Reducer` base class, budgets and `Plan` (composition and parsing of plan strings)."""

from __future__ import annotations

import ast
import dataclasses
import enum
import math
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import torch

from .errors import BudgetError, PlanError, UnsupportedModelError
from .params import check_fields, clip, short
from .tokens import VisualTokens


class Stage(enum.IntEnum):
    """Where in the model a reducer acts, in data-flow order."""

    FRAMES = 0  # sampled frames and the query, before encoding
    ENCODER = 1  # inside the vision encoder
    VISUAL = 2  # projected visual tokens, just before the LLM
    PREFILL = 3  # inside the LLM during prefill
    DECODE = 4  # the KV cache after prefill

    def __str__(self) -> str:
        return self.name.lower()


class Services(Protocol):
    """What the pipeline offers reducers for one call (see `Context`); implemented by `tokenreduce.pipeline`."""

    def ask(self, inputs: dict[str, Any]) -> Any: ...

    def generate(self, prompt: str, max_new_tokens: int) -> str: ...

    def frame_inputs(self, pixels: torch.Tensor, prompts: list[str]) -> dict[str, Any]: ...

    def chat(self, text: str, media: str | None) -> str: ...


@dataclass
class Context:
    """What a reducer may read besides the tokens, for one sample of one model call (filled by the pipeline).

    Reducers get facts and services here, never the model or its adapter: a reducer must not know which
    model family it runs on.

    Attributes:
        sample: index of the sample in the batch.
        batch_size: number of samples in the call.
        query_ids: (T,) long, the caller's non-visual token ids of this sample (the prompt text).
        pixels: (n_items, ...) the sample's vision-tower inputs (its images, crops or frames), as the model's
            processor normalised them; (n_items, 3, S, S) for the LLaVA families.
        text: the prompt's text without the visual placeholders (when the handle has a tokenizer).
        tokenizer: the handle's tokenizer (`attach(..., tokenizer=...)`), or None.
        raw_grids: (n_items, h, w, D) the sample's projected features before the model pools them (LLaVA-
            OneVision video: the 27x27 grid that becomes 14x14), for reducers that resize from the finer
            grid; None when the model does not pool (the tokens already are the projected grid) or pools
            before projecting (LLaVA-NeXT-Video). Set just before the VISUAL stage.
        times: seconds of named sub-steps a reducer wants reported (e.g. "score:quota").

    Services (they raise `UnsupportedModelError` when the pipeline or the adapter cannot offer them):
        `ask(**inputs)`: the model's output for `inputs`, unreduced (the plan stays out of it).
        `generate(prompt, max_new_tokens)`: the unreduced model's greedy text answer to a text-only prompt.
        `frame_inputs(pixels, prompt)`: model inputs asking `prompt` about each single frame/image of
            `pixels` (items of `self.pixels`), in the model's own chat format.
        `chat(text, media=None)`: `text` as one user turn of the model's chat template, with one image or
            video placeholder first when `media` is "image" or "video", ending where the answer starts.
    """

    sample: int = 0
    batch_size: int = 1
    query_ids: torch.Tensor | None = None
    pixels: torch.Tensor | None = None
    text: str | None = None
    tokenizer: Any = None
    raw_grids: torch.Tensor | None = None
    times: dict[str, float] = field(default_factory=dict)
    services: Services | None = field(default=None, repr=False)

    def _svc(self, what: str) -> Services:
        if self.services is None:
            raise UnsupportedModelError(f"{what} needs a model: this Context was not made by an attached plan")
        return self.services

    def ask(self, **inputs: Any) -> Any:
        """The unreduced model's output (logits, ...) for the model inputs `inputs`."""
        return self._svc("ask()").ask(inputs)

    def generate(self, prompt: str, max_new_tokens: int = 64) -> str:
        """The unreduced model's greedy answer (new text only) to the text-only `prompt` (a full chat turn)."""
        return self._svc("generate()").generate(prompt, max_new_tokens)

    def frame_inputs(self, pixels: torch.Tensor, prompt: str | list[str]) -> dict[str, Any]:
        """Inputs asking `prompt` (one, or one per frame) about each single frame of `pixels` (n, ...)."""
        prompts = [prompt] * pixels.shape[0] if isinstance(prompt, str) else list(prompt)
        return self._svc("frame_inputs()").frame_inputs(pixels, prompts)

    def chat(self, text: str, media: str | None = None) -> str:
        """`text` as a user turn of the model's chat template (optionally after one image/video placeholder)."""
        return self._svc("chat()").chat(text, media)


@dataclass(frozen=True)
class Probe:
    """A signal from inside the vision tower that a reducer needs, stored in `VisualTokens.scores[name]`.

    kind "cls": the CLS query's attention probabilities over the patch tokens at `layer`, summed over
    heads (softmax over all keys, CLS included, as in HiRED and MustDrop). `layer` indexes the tower's
    layers (negative counts from the end); None means the layer that produces the visual features.
    kind "keys": the (N, H * d) keys that `layer` computes for the patch tokens (its k_proj output, heads
    concatenated); None means the keys of the visual features, computed by the layer after the feature
    layer (AIM's LLaVA-1.5 merge metric: CLIP's layer-23 keys).
    """

    name: str
    layer: int | None
    kind: str = "cls"


def param(default: Any = dataclasses.MISSING, doc: str = "", *, factory: Any = None, shown: str | None = None) -> Any:
    """A reducer hyperparameter: a dataclass field that carries its one-line description.

        keep: float | None = param(0.2, "fraction of the sample's visual tokens to keep")
        layers: list[int] | None = param(None, "decoder layers after which it drops", shown="2/6/10/14 of 32")

    `factory` makes a mutable default (as `field(default_factory=...)`), `shown` replaces the default's repr where
    the value alone says little (None meaning "scaled to the model"). `tokenreduce list`, `list --json` and the
    README's reducer table are built from these (`parameters`); a test fails for a registered reducer whose
    fields have no description.
    """
    metadata = {"doc": doc, "shown": shown}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class Parameter:
    """One documented hyperparameter of a reducer class (see `param`)."""

    name: str
    type: str
    default: Any
    shown: str
    doc: str

    def to_dict(self) -> dict[str, Any]:
        import json

        try:
            json.dumps(self.default)
            default = self.default
        except TypeError:
            default = repr(self.default)
        return {"name": self.name, "type": self.type, "default": default, "default_shown": self.shown,
                "description": self.doc}


def parameters(cls: type) -> list[Parameter]:
    """The documented hyperparameters of a reducer class, in field order (inherited budget fields first)."""
    out = []
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:
            default = dataclasses.MISSING
        shown = f.metadata.get("shown") or ("(required)" if default is dataclasses.MISSING else repr(default))
        kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        out.append(Parameter(f.name, kind, None if default is dataclasses.MISSING else default, shown,
                             f.metadata.get("doc", "")))
    return out


@dataclass
class Reducer:
    """Base class of every reducer. Subclasses are dataclasses whose fields are their hyperparameters.

    Class attributes to set: `name` (registry name used in plan strings), `stage`, `summary` (one line).
    Declare each hyperparameter with `param(default, "one-line description")`.
    """

    name: ClassVar[str] = ""
    stage: ClassVar[Stage] = Stage.VISUAL
    summary: ClassVar[str] = ""
    #: True for reducers that need the question to reduce the visual tokens (QuoTA), which a stream cannot serve
    query_aware: ClassVar[bool] = False

    def __post_init__(self) -> None:
        check_fields(self)
        self.validate()

    def validate(self) -> None:
        """Raise `PlanError`/`BudgetError` naming the bad hyperparameter. Called on construction, after every
        field was checked against its type annotation (`tokenreduce.params.check_fields`)."""

    def reduce(self, batch: list[VisualTokens], contexts: list[Context]) -> list[VisualTokens]:
        """Reduce every sample of a batch. The default calls `reduce_sample` once per sample."""
        return [self.reduce_sample(t, c) for t, c in zip(batch, contexts)]

    def reduce_sample(self, tokens: VisualTokens, ctx: Context) -> VisualTokens:
        raise NotImplementedError(f"{type(self).__name__} must implement reduce() or reduce_sample()")

    def probes(self) -> list[Probe]:
        """Signals this reducer reads from inside the vision tower (recorded before it runs)."""
        return []

    def spec(self) -> str:
        """The plan-string form of this reducer, e.g. ``aim-merge(keep=0.25)``."""
        args = []
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            default = f.default if f.default is not dataclasses.MISSING else None
            if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
                default = f.default_factory()  # type: ignore[misc]
            if v != default:
                args.append(f"{f.name}={v!r}")
        return f"{self.name}({', '.join(args)})" if args else self.name


@dataclass
class BudgetedReducer(Reducer):
    """A reducer with a budget: visual tokens per sample that leave it.

    Give exactly one of `tokens` (absolute, per sample) or `keep` (fraction of the sample's tokens).
    Several images or frames in one sample share the budget in proportion to their token counts.
    """

    #: True when the reducer cuts every image/frame to exactly its share from `item_budgets`, so another
    #: reducer can drive it with per-item budgets (QuoTA's `resize=`); False for reducers with their own split
    item_budgeted: ClassVar[bool] = False

    tokens: int | None = param(None, "visual tokens to keep per sample (give tokens= or keep=)")
    keep: float | None = param(None, "fraction in (0, 1] of the sample's visual tokens to keep (or tokens=)")

    def validate(self) -> None:
        if self.tokens is not None and self.keep is not None:
            raise BudgetError(f"{self.name}: give either tokens= or keep=, not both")
        if self.tokens is None and self.keep is None:
            raise BudgetError(f"{self.name}: a budget is required: tokens=<int> or keep=<fraction in (0, 1]>")
        if self.tokens is not None:
            if isinstance(self.tokens, bool) or not isinstance(self.tokens, int):
                raise BudgetError(f"{self.name}: tokens= must be an integer, got {self.tokens!r}")
            if self.tokens <= 0:
                raise BudgetError(f"{self.name}: tokens= must be positive, got {self.tokens}")
        if self.keep is not None:
            if isinstance(self.keep, bool) or not isinstance(self.keep, (int, float)):
                raise BudgetError(f"{self.name}: keep= must be a number, got {self.keep!r}")
            if not 0.0 < float(self.keep) <= 1.0:
                raise BudgetError(f"{self.name}: keep= must be in (0, 1], got {self.keep}")

    def budget(self, n: int) -> int:
        """Tokens to keep out of `n` for one sample."""
        if self.tokens is not None:
            if self.tokens > n:
                raise BudgetError(
                    f"{self.name}: tokens={self.tokens} is larger than the {n} visual tokens of the sample"
                )
            return self.tokens
        return max(1, min(n, math.floor(float(self.keep) * n + 0.5)))  # type: ignore[arg-type]

    def item_budgets(self, tokens: VisualTokens) -> list[int]:
        """The sample's budget split over its items in proportion to their token counts (sums exactly).

        A reducer driven by another one (QuoTA reducing each frame with `pool`) gets its per-item budgets
        set in `fixed_item_budgets` instead.
        """
        fixed = getattr(self, "fixed_item_budgets", None)
        if fixed is not None:
            return list(fixed)
        counts = tokens.item_counts().tolist()
        return split_budget(self.budget(len(tokens)), counts)


def split_budget(total: int, counts: list[int], floor: int = 1) -> list[int]:
    """Split `total` over parts with `counts` tokens in proportion to the counts (largest remainder).

    Every non-empty part then gets at least `floor` tokens when the total allows it (taken from the
    largest shares) and never more than its count; the result sums exactly to `total`. Ties go to the
    earlier part, so the split is deterministic.
    """
    n = sum(counts)
    if total > n:
        raise BudgetError(f"budget {total} is larger than the {n} tokens available")
    if total < 0:
        raise BudgetError(f"budget must be non-negative, got {total}")
    if n == 0:
        return [0] * len(counts)
    exact = [total * c / n for c in counts]
    share = [math.floor(e) for e in exact]
    for i in sorted(range(len(counts)), key=lambda i: (share[i] - exact[i], i))[: total - sum(share)]:
        share[i] += 1
    need = [i for i, c in enumerate(counts) if c > 0 and share[i] < floor]
    if total >= floor * sum(c > 0 for c in counts):
        for i in need:
            while share[i] < min(floor, counts[i]):
                donor = max(range(len(counts)), key=lambda j: (share[j] - floor, -j))
                share[donor] -= 1
                share[i] += 1
    return share


def allocate(total: int, weights: list[float], caps: list[int]) -> list[int]:
    """Split `total` over parts in proportion to `weights`, never giving a part more than its cap.

    Largest-remainder rounding, so the parts sum exactly to `total`; what a capped part cannot take goes
    to the others in proportion to their weights (or their spare room when all their weights are 0).
    Ties go to the earlier part.
    """
    if total > sum(caps):
        raise BudgetError(f"budget {total} is larger than the {sum(caps)} tokens available")
    if total < 0:
        raise BudgetError(f"budget must be non-negative, got {total}")
    if any(w < 0 or not math.isfinite(w) for w in weights):
        raise BudgetError(f"allocation weights must be finite and >= 0, got {weights}")
    share = [0] * len(caps)
    left = total
    while left > 0:
        open_parts = [i for i in range(len(caps)) if share[i] < caps[i]]
        w = [weights[i] for i in open_parts]
        if sum(w) <= 0:
            w = [float(caps[i] - share[i]) for i in open_parts]
        tot = sum(w)
        exact = [left * x / tot for x in w]
        add = [math.floor(e) for e in exact]
        for j in sorted(range(len(open_parts)), key=lambda j: (add[j] - exact[j], j))[: left - sum(add)]:
            add[j] += 1
        for j, i in enumerate(open_parts):
            give = min(add[j], caps[i] - share[i])
            share[i] += give
            left -= give
    return share


#: plan options written after the reducers, e.g. "pool(tokens=16) @positions" -> Plan.<field> = True
PLAN_OPTIONS = {"positions": "keep_positions"}


@dataclass
class Plan:
    """An ordered list of reducers, applied stage by stage, and the plan's options.

    Options (written after the reducers in a plan string, each as " @name"):
        keep_positions ("@positions"): the tokens that enter the LLM keep the 1-D position ids they had in
            the full prompt instead of consecutive ones (see `tr.attach`); `attach(..., keep_positions=...)`
            overrides it.
    """

    reducers: list[Reducer] = field(default_factory=list)
    keep_positions: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.keep_positions, bool):
            raise PlanError(f"keep_positions must be True or False, got {self.keep_positions!r}")
        self.reducers = list(self.reducers)
        for i, r in enumerate(self.reducers):
            if not isinstance(r, Reducer):
                raise PlanError(f"plan entry {i} is {type(r).__name__}, not a Reducer")
        # a reducer that spans several stages (mustdrop) stands for its parts, one per stage
        self.reducers = [p for r in self.reducers for p in (r.parts() if hasattr(r, "parts") else [r])]
        for a, b in zip(self.reducers, self.reducers[1:]):
            if b.stage < a.stage:
                raise PlanError(
                    f"stage order: {b.name} ({b.stage}) cannot come after {a.name} ({a.stage}); "
                    f"stages run in the order {', '.join(str(s) for s in Stage)}"
                )

    def at(self, stage: Stage) -> list[Reducer]:
        return [r for r in self.reducers if r.stage == stage]

    def __str__(self) -> str:
        text = "+".join(r.spec() for r in self.reducers) or "none"
        return text + "".join(f" @{o}" for o, f in PLAN_OPTIONS.items() if getattr(self, f))

    def __len__(self) -> int:
        return len(self.reducers)

    @classmethod
    def parse(cls, text: str) -> Plan:
        """Parse ``"name(arg=value, ...)+name+..."``; ``""`` or ``"none"`` is the empty plan.

        Values are Python literals (numbers, strings, lists, True/False/None) or bare words: ``true``,
        ``false`` and ``none`` in any case, ``inf`` (also ``-inf``), anything else is a string
        (``pool(mode=avg)``). Nothing is ever evaluated. Every problem raises `PlanError` (or its subclass
        `BudgetError`) naming the entry and the parameter; what parses prints back (``str(plan)``) to a
        string that parses to the same plan.
        """
        from .registry import get_reducer

        if not isinstance(text, str):
            raise PlanError(f"a plan string is required, got {type(text).__name__}")
        text, options = _plan_options(text)
        text = text.strip()
        if text in ("", "none"):
            return cls([], **options)
        reducers = []
        for k, part in enumerate(_split_top(text)):
            part = part.strip()
            m = _ENTRY.fullmatch(part)
            if m is None:
                raise PlanError(
                    f"cannot parse plan entry {k + 1} {short(part)} in {short(text)}: "
                    "expected name or name(key=value, ...)"
                )
            name, args = m.group(1), m.group(2)
            reducer_cls = get_reducer(name)
            kwargs = _parse_kwargs(args or "", name)
            names = {f.name for f in dataclasses.fields(reducer_cls)}
            unknown = sorted(set(kwargs) - names)
            if unknown:
                raise PlanError(
                    f"{name}: unknown parameter(s) {clip(', '.join(unknown))}; "
                    f"known: {', '.join(sorted(names)) or '(none)'}"
                )
            try:
                reducers.append(reducer_cls(**kwargs))
            except PlanError:
                raise
            except (TypeError, ValueError, OverflowError) as e:  # a value the reducer's own checks did not foresee
                raise PlanError(f"{name}: {clip(str(e), 200)}") from None
        return cls(reducers, **options)


def _plan_options(text: str) -> tuple[str, dict[str, bool]]:
    """Split trailing "@option" words (outside parentheses and quotes) off a plan string."""
    options: dict[str, bool] = {}
    rest = text.rstrip()
    while (at := _last_outside_arguments(rest, "@")) >= 0:
        name = rest[at + 1:].strip()
        if not re.fullmatch(r"[A-Za-z_][\w-]*", name):
            raise PlanError(f"plan options (@...) go at the end of the plan, after every reducer: {short(text)}")
        if name not in PLAN_OPTIONS:
            raise PlanError(f"unknown plan option @{clip(name)}; known: {', '.join('@' + o for o in PLAN_OPTIONS)}")
        if PLAN_OPTIONS[name] in options:
            raise PlanError(f"plan option @{name} is given twice in {short(text)}")
        options[PLAN_OPTIONS[name]] = True
        rest = rest[:at].rstrip()
    return rest, options


def _outside_quotes(text: str) -> tuple[list[tuple[int, str, int]], int, bool]:
    """Scan a plan string: (index, char, bracket depth after it) of every character outside quotes, the depth at
    the end, and whether a quote is left open. A backslash escapes the next character inside quotes."""
    chars, depth, quote, escaped = [], 0, None, False
    for i, ch in enumerate(text):
        if quote:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == quote:
                quote = None
            continue
        if ch in "'\"":
            quote = ch
            continue
        depth += (ch in "([{") - (ch in ")]}")
        chars.append((i, ch, depth))
    return chars, depth, quote is not None


def _last_outside_arguments(text: str, char: str) -> int:
    """Index of the last `char` in `text` outside parentheses and quotes, or -1."""
    return max((i for i, ch, depth in _outside_quotes(text)[0] if ch == char and depth == 0), default=-1)


#: one plan entry, already stripped: a reducer name and optionally its arguments in parentheses. No two
#: adjacent unbounded whitespace runs, so a long run of spaces cannot make the match quadratic.
_ENTRY = re.compile(r"([A-Za-z_][\w\-.]*)(?:\s*\((.*)\))?", flags=re.S)

#: bare words with a meaning of their own (any case); every other bare word is a string
_WORDS: dict[str, Any] = {"true": True, "false": False, "none": None, "inf": math.inf}


def _split_top(text: str) -> list[str]:
    """Split on '+' outside brackets and quotes (a backslash escapes the next character inside quotes)."""
    chars, depth, open_quote = _outside_quotes(text)
    cuts = []
    for i, ch, d in chars:
        if d < 0:
            raise PlanError(f"unbalanced {ch!r} in plan {short(text)}")
        if ch == "+" and d == 0:
            cuts.append(i)
    if depth != 0 or open_quote:
        raise PlanError(f"unbalanced parentheses or quotes in plan {short(text)}")
    parts = [text[a + 1:b] for a, b in zip([-1, *cuts], [*cuts, len(text)])]
    for p in parts:
        if not p.strip():
            raise PlanError(f"empty entry in plan {short(text)} (a stray '+'?)")
    return parts


def _parse_kwargs(args: str, name: str) -> dict[str, Any]:
    """``key=value, ...`` -> dict, values as `Plan.parse` describes; `PlanError` for anything else."""
    if not args.strip():
        return {}
    try:
        call = ast.parse(f"f({args})", mode="eval").body
    except (SyntaxError, ValueError, RecursionError, MemoryError, OverflowError):
        # ValueError: null bytes, integers past the digit limit; RecursionError: thousands of nested operators
        raise PlanError(f"{name}: cannot parse arguments ({short(args)})") from None
    if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == "f"):
        raise PlanError(f"{name}: cannot parse arguments ({short(args)}): unbalanced parentheses?")
    if call.args:
        raise PlanError(f"{name}: arguments must be named, e.g. {name}(keep=0.5); got ({short(args)})")
    out: dict[str, Any] = {}
    for kw in call.keywords:
        if kw.arg is None:
            raise PlanError(f"{name}: **kwargs are not allowed in a plan string")
        if kw.arg in out:
            raise PlanError(f"{name}: {kw.arg}= is given twice")
        out[kw.arg] = _literal(kw.value, name, kw.arg)
    return out


def _literal(node: ast.expr, name: str, key: str) -> Any:
    """The value of one argument: a Python literal, a bare word, or +/- a bare number word (``-inf``)."""
    if isinstance(node, ast.Name):
        return _WORDS.get(node.id.lower(), node.id)
    signed = isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd))
    if signed and isinstance(node.operand, ast.Name):
        word = _WORDS.get(node.operand.id.lower())
        if isinstance(word, float):
            return -word if isinstance(node.op, ast.USub) else word
    try:
        return ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, RecursionError, MemoryError, OverflowError):
        # TypeError: an unhashable dict key or set member ({[1]: 2})
        try:
            shown = short(ast.unparse(node))
        except RecursionError:
            shown = "(too deeply nested)"
        raise PlanError(f"{name}: value of {key}= is not a literal: {shown}") from None
