"""`attach` / `apply`: put a plan on a stock model, take it off again, and keep the report."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import torch
from torch import nn

from .plan import Context, Plan, Stage
from .registry import adapter_for
from .report import CallReport, Report
from .tokens import VisualTokens


class Handle:
    """A plan attached to one model. All state lives here: nothing is patched globally.

    Attributes:
        model: the model.
        plan: the attached plan.
        adapter: the model family's adapter instance.
        report: every call made while attached (`report.last`, or attribute access for the latest).
        keep_positions: whether the tokens that enter the LLM keep the position ids they had in the full
            prompt (see `attach`).
    """

    def __init__(self, model: nn.Module, plan: Plan | str, sync_timing: bool = False, tokenizer=None,
                 keep_positions: bool = False):
        if isinstance(plan, str):
            plan = Plan.parse(plan)
        elif not isinstance(plan, Plan):
            plan = Plan(list(plan))
        self.model = model
        self.plan = plan
        self.sync_timing = sync_timing
        self.tokenizer = tokenizer
        self.keep_positions = bool(keep_positions)
        self.adapter = adapter_for(model)(model)
        self.adapter.check(plan)
        self.report = Report(plan=str(plan))
        self.attached = False
        self.adapter.install(self)
        self.attached = True

    def detach(self) -> None:
        """Remove every hook and patch; the model is again exactly the model it was."""
        if self.attached:
            self.adapter.remove()
            self.attached = False

    def __enter__(self) -> Handle:
        return self

    def __exit__(self, *exc) -> None:
        self.detach()

    def _sync(self) -> None:
        if self.sync_timing and torch.cuda.is_available():
            torch.cuda.synchronize()

    def _run_stage(
        self, stage: Stage, batch: list[VisualTokens], contexts: list[Context], call: CallReport
    ) -> list[VisualTokens]:
        """Run the plan's reducers of `stage` in order, recording counts and times."""
        for r in self.plan.at(stage):
            self._sync()
            t0 = time.perf_counter()
            out = r.reduce(batch, contexts)
            self._sync()
            for c in contexts:  # named sub-steps (e.g. scoring), reported on their own
                for k, v in c.times.items():
                    call.times[k] = call.times.get(k, 0.0) + v
                c.times.clear()
            label = r.name
            n = sum(1 for s, _ in call.stages if s == label or s.startswith(label + "#"))
            if n:
                label = f"{label}#{n + 1}"
            call.times[f"reduce:{label}"] = time.perf_counter() - t0
            if len(out) != len(batch):
                raise RuntimeError(f"{r.name} returned {len(out)} samples for a batch of {len(batch)}")
            batch = out
            call.stages.append((label, [len(v) for v in batch]))
        return batch


def attach(model: nn.Module, plan: Plan | str, sync_timing: bool = False, tokenizer=None,
           keep_positions: bool = False) -> Handle:
    """Attach `plan` to `model` until `handle.detach()`; see `apply` for the with-block form.

    By default the shorter sequence that VISUAL reducers leave gets consecutive position ids, as the papers'
    code does. `keep_positions=True` gives every token that enters the LLM the position id it had in the full
    prompt instead (a merged token: the slot it sits in), and decoding continues after the full prompt's
    length, so rotary position still tells the model where a kept token was. In-LLM pruning keeps positions
    either way. With a manual decode loop over `forward`, pass the next `position_ids` yourself (the report's
    `positions` has the caller's slot of every LLM position).
    """
    return Handle(model, plan, sync_timing=sync_timing, tokenizer=tokenizer, keep_positions=keep_positions)


@contextlib.contextmanager
def apply(model: nn.Module, plan: Plan | str, sync_timing: bool = False, tokenizer=None,
          keep_positions: bool = False) -> Iterator[Handle]:
    """Reduce `model` with `plan` inside the block; everything is restored on exit, also on error.

    `sync_timing=True` synchronises CUDA around timed stages (accurate times, slower). `tokenizer` lets
    reducers that read the prompt's text (QuoTA's frame scorer) see it. `keep_positions`: see `attach`.
    """
    handle = attach(model, plan, sync_timing=sync_timing, tokenizer=tokenizer, keep_positions=keep_positions)
    try:
        yield handle
    finally:
        handle.detach()
