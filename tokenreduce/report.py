"""The report of an attached plan: what each stage kept, real sequence lengths, time per stage."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from .tokens import VisualTokens


@dataclass
class CallReport:
    """One `forward` or `generate` call.

    Attributes:
        kind: "forward" or "generate".
        batch_size: samples in the call.
        stages: (stage label, visual tokens per sample) in order; the first entry is "input".
        seq_in: per sample, the caller's sequence length without padding.
        seq_llm: per sample, the sequence length that entered the LLM (without padding).
        llm_shape: (batch, length) of the padded sequence that entered the LLM.
        times: seconds per stage ("vision", "reduce:<name>", "prefill"); only stages that ran.
        positions: (batch, length) long, the caller's sequence position of every LLM position (-1: padding).
        visual: the final `VisualTokens` of every sample (what survived, with origins).
        flops: estimated FLOPs: "llm_prefill" / "llm_prefill_full" (same prompts, nothing reduced),
            and "vision" when the adapter knows the vision tower's widths.
        extra_tokens: per sample, non-grid visual tokens that entered the LLM (LLaVA-NeXT's row newlines
            of rows that kept a token, Video-LLaVA's frame CLS tokens, LLaVA-OneVision's video newline);
            not counted in `stages`.
        vision_layers: vision-tower layers that ran (the tower stops after the last layer anybody needs).
        llm_visual: [layer][sample] visual tokens entering each decoder layer (in-LLM reduction only).
        llm_tokens: [layer][sample] tokens entering each decoder layer (in-LLM reduction only).
        kv_tokens: [layer][sample] entries of each layer's KV cache after prefill (in-LLM reduction only).
    """

    kind: str
    batch_size: int
    stages: list[tuple[str, list[int]]] = field(default_factory=list)
    seq_in: list[int] = field(default_factory=list)
    seq_llm: list[int] = field(default_factory=list)
    llm_shape: tuple[int, int] = (0, 0)
    times: dict[str, float] = field(default_factory=dict)
    positions: Tensor | None = None
    visual: list[VisualTokens] = field(default_factory=list)
    flops: dict[str, float] = field(default_factory=dict)
    extra_tokens: list[int] = field(default_factory=list)
    vision_layers: int = 0
    llm_visual: list[list[int]] = field(default_factory=list)
    llm_tokens: list[list[int]] = field(default_factory=list)
    kv_tokens: list[list[int]] = field(default_factory=list)

    @property
    def visual_layer_average(self) -> list[float]:
        """Per sample, visual tokens averaged over decoder layers, the way AIM and MustDrop count them."""
        if not self.llm_visual:
            return [float(c) for c in self.tokens()]
        return [sum(col) / len(self.llm_visual) for col in zip(*self.llm_visual)]

    def tokens(self, stage: str = "final") -> list[int]:
        """Visual tokens per sample after `stage` ("input", a reducer label, or "final")."""
        if not self.stages:
            return []
        if stage == "final":
            return self.stages[-1][1]
        for label, counts in self.stages:
            if label == stage:
                return counts
        raise KeyError(f"no stage {stage!r} in this report; stages: {[s for s, _ in self.stages]}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "batch_size": self.batch_size,
            "stages": [{"stage": s, "tokens": c} for s, c in self.stages],
            "seq_in": self.seq_in,
            "seq_llm": self.seq_llm,
            "llm_shape": list(self.llm_shape),
            "times_s": self.times,
            "flops": self.flops,
            "extra_tokens": self.extra_tokens,
            "vision_layers": self.vision_layers,
            "llm_visual_per_layer": self.llm_visual,
            "kv_tokens": self.kv_tokens,
            "visual_layer_average": self.visual_layer_average,
        }

    def __str__(self) -> str:
        lines = [f"{self.kind}: batch {self.batch_size}, LLM input {self.llm_shape[0]}x{self.llm_shape[1]}"]
        width = max([len(s) for s, _ in self.stages] + [10])
        lines.append(f"  {'stage':<{width}}  visual tokens per sample")
        for label, counts in self.stages:
            lines.append(f"  {label:<{width}}  {', '.join(str(c) for c in counts)}")
        if any(self.extra_tokens):
            extra = ", ".join(str(c) for c in self.extra_tokens)
            lines.append(f"  {'+ extra':<{width}}  {extra}  (newline/CLS tokens)")
        if self.llm_visual:
            per_layer = " ".join("/".join(str(c) for c in layer) for layer in self.llm_visual)
            lines.append(f"  {'LLM layers':<{width}}  {per_layer}  (visual tokens entering each layer)")
            avg = ", ".join(f"{a:.1f}" for a in self.visual_layer_average)
            lines.append(f"  {'layer avg':<{width}}  {avg}")
        lines.append(f"  {'sequence':<{width}}  {', '.join(f'{a} -> {b}' for a, b in zip(self.seq_in, self.seq_llm))}")
        if "llm_prefill" in self.flops and self.flops.get("llm_prefill_full"):
            ratio = self.flops["llm_prefill_full"] / self.flops["llm_prefill"]
            lines.append(
                f"  {'LLM FLOPs':<{width}}  {self.flops['llm_prefill'] / 1e9:.2f} G "
                f"(unreduced {self.flops['llm_prefill_full'] / 1e9:.2f} G, {ratio:.2f}x less)"
            )
        if self.times:
            t = ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in self.times.items())
            lines.append(f"  {'time':<{width}}  {t}")
        return "\n".join(lines)


@dataclass
class Report:
    """The calls made while the plan was attached; attribute access reads the latest call.

    Memory stays bounded on a long-lived handle: only the latest `history` calls are kept (`dropped` counts
    the older ones), and only the latest `keep_features` calls keep their final token features
    (`visual[i].features`, the large part); older calls keep every other field (counts, origins, positions,
    times) and features of shape (N, 0). `attach(..., history=None)` keeps every call, and
    `keep_features=True` every kept call's features.
    """

    plan: str
    calls: list[CallReport] = field(default_factory=list)
    history: int | None = 100
    keep_features: bool | int = 8
    dropped: int = 0

    def add(self, call: CallReport) -> None:
        """Append a call; release the features of calls beyond `keep_features` and the calls beyond `history`."""
        self.calls.append(call)
        if self.history is not None and len(self.calls) > self.history:
            extra = len(self.calls) - self.history
            del self.calls[:extra]
            self.dropped += extra
        if self.keep_features is not True and len(self.calls) > int(self.keep_features):
            old = self.calls[-int(self.keep_features) - 1]
            if any(v.features.shape[-1] for v in old.visual):
                old.visual = [v.with_features(v.features.new_zeros(len(v), 0)) for v in old.visual]

    @property
    def last(self) -> CallReport:
        if not self.calls:
            raise RuntimeError("the report is empty: no model call with visual inputs ran while attached")
        return self.calls[-1]

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_") or name in ("plan", "calls", "history", "keep_features", "dropped"):
            raise AttributeError(name)
        return getattr(self.last, name)

    def to_dict(self) -> dict[str, Any]:
        return {"plan": self.plan, "dropped": self.dropped, "calls": [c.to_dict() for c in self.calls]}

    def __str__(self) -> str:
        if not self.calls:
            return f"plan {self.plan}: no calls yet"
        return f"plan {self.plan}\n{self.last}"
