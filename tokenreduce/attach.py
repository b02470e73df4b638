"""`attach` / `apply`: put a plan on a stock model, take it off again, and keep the report."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

from .errors import PlanError
from .pipeline import Options, Pipeline
from .plan import Plan
from .registry import adapter_for
from .report import Report


def _as_plan(plan: Plan | str | list) -> Plan:
    if plan is None:
        raise PlanError("plan is None: pass a plan string such as 'aim-merge(keep=0.25)', a tr.Plan, or 'none' "
                        "for the empty plan")
    if isinstance(plan, str):
        return Plan.parse(plan)
    if isinstance(plan, Plan):
        return plan
    try:
        return Plan(list(plan))
    except TypeError:
        raise PlanError(f"a plan must be a plan string, a tr.Plan or a list of reducers, got {type(plan).__name__}") \
            from None


class Handle:
    """A plan attached to one model. All state lives here (and in its pipeline): nothing is patched globally.

    Attributes:
        model: the model.
        plan: the attached plan.
        adapter: the model family's adapter (a stateless description of the model).
        report: the calls made while attached (`report.last`, or attribute access for the latest).
        keep_positions: whether the tokens that enter the LLM keep the position ids they had in the full
            prompt (see `attach`).
        tokenizer: the tokenizer reducers may use (QuoTA's scorer).
    """

    def __init__(self, model: nn.Module, plan: Plan | str, sync_timing: bool = False, tokenizer=None,
                 keep_positions: bool | None = None, history: int | None = 100, keep_features: bool | int = 8):
        plan = _as_plan(plan)
        if history is not None and (isinstance(history, bool) or not isinstance(history, int) or history < 1):
            raise PlanError(f"history must be a positive number of calls or None (keep all), got {history!r}")
        if keep_features is not True and (isinstance(keep_features, bool) or not isinstance(keep_features, int)
                                          or keep_features < 0):
            raise PlanError(f"keep_features must be True (all) or a number of calls >= 0, got {keep_features!r}")
        self.model = model
        self.plan = plan
        self.sync_timing = sync_timing
        self.tokenizer = tokenizer
        self.keep_positions = plan.keep_positions if keep_positions is None else bool(keep_positions)
        self.adapter = adapter_for(model)(model)
        self.adapter.check(plan)
        self.report = Report(plan=str(plan), history=history, keep_features=keep_features)
        self.attached = False
        self._pipeline = Pipeline(model, self.adapter, plan, self.report,
                                  Options(sync_timing=sync_timing, tokenizer=tokenizer,
                                          keep_positions=self.keep_positions))
        self._pipeline.install()
        self.attached = True

    def visual_tokens(self, **inputs) -> list[int]:
        """Visual tokens per sample of the model inputs `inputs`, as budgets count them (the tokens a `keep=`
        fraction applies to: grid tokens that enter the LLM, no newline or CLS extras); runs no model."""
        return self._pipeline.visual_tokens(inputs)

    def detach(self) -> None:
        """Remove every hook and patch; the model is again exactly the model it was."""
        if self.attached:
            self._pipeline.remove()
            self.attached = False

    def __enter__(self) -> Handle:
        return self

    def __exit__(self, *exc) -> None:
        self.detach()


def attach(model: nn.Module, plan: Plan | str, sync_timing: bool = False, tokenizer=None,
           keep_positions: bool | None = None, history: int | None = 100, keep_features: bool | int = 8) -> Handle:
    """Attach `plan` to `model` until `handle.detach()`; see `apply` for the with-block form.

    By default the shorter sequence that VISUAL reducers leave gets consecutive position ids, as the papers'
    code does. `keep_positions=True` (or a plan string ending in " @positions") gives every token that enters
    the LLM the position id it had in the full prompt instead (a merged token: the slot it sits in), and
    decoding continues after the full prompt's length, so rotary position still tells the model where a kept
    token was. Models with their own position scheme (Qwen2-VL's 3-D M-RoPE) always keep the stock positions
    of the kept tokens. In-LLM pruning keeps positions either way. With a manual decode loop over `forward`,
    pass the next `position_ids` yourself (the report's `positions` has the caller's slot of every LLM position).

    `history`: how many calls `handle.report` keeps (None: all); only the latest `keep_features` calls keep their
    final token features (True: every call), so a long-lived handle's memory stays bounded. A model carries one
    plan at a time; `copy.deepcopy` of an attached model gives a copy without the plan.
    """
    return Handle(model, plan, sync_timing=sync_timing, tokenizer=tokenizer, keep_positions=keep_positions,
                  history=history, keep_features=keep_features)


@contextlib.contextmanager
def apply(model: nn.Module, plan: Plan | str, sync_timing: bool = False, tokenizer=None,
          keep_positions: bool | None = None, history: int | None = 100, keep_features: bool | int = 8
          ) -> Iterator[Handle]:
    """Reduce `model` with `plan` inside the block; everything is restored on exit, also on error.

    `sync_timing=True` synchronises CUDA around timed stages (accurate times, slower). `tokenizer` lets
    reducers that read the prompt's text or ask the model (QuoTA's frame scorer) use it. `keep_positions`,
    `history`, `keep_features`: see `attach`.
    """
    handle = attach(model, plan, sync_timing=sync_timing, tokenizer=tokenizer, keep_positions=keep_positions,
                    history=history, keep_features=keep_features)
    try:
        yield handle
    finally:
        handle.detach()
