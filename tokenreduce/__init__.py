"""tokenreduce: remove the visual tokens a vision-language model does not need.

    import tokenreduce as tr
    with tr.apply(model, "aim-merge(keep=0.25)") as run:
        out = model.generate(**inputs, max_new_tokens=32)
    print(run.report)

    model, processor = tr.load_default("video")   # the shipped default video (or "image") model
    m = tr.load_model("path/to/checkpoint", dtype="bf16", device="cuda")   # any LLaVA-family checkpoint
"""

from .attach import Handle, apply, attach
from .defaults import load_default
from .errors import BudgetError, InputError, PlanError, TokenReduceError, UnsupportedModelError
from .loading import LoadedModel, load_model
from .plan import BudgetedReducer, Context, Plan, Probe, Reducer, Stage, allocate, param, split_budget
from .registry import get_reducer, reducers, register_adapter, register_reducer
from .tokens import ItemInfo, VisualTokens

__version__ = "0.1.0"

__all__ = [
    "BudgetError",
    "BudgetedReducer",
    "Context",
    "Handle",
    "InputError",
    "ItemInfo",
    "LoadedModel",
    "Plan",
    "PlanError",
    "Probe",
    "Reducer",
    "Stage",
    "TokenReduceError",
    "UnsupportedModelError",
    "VisualTokens",
    "allocate",
    "apply",
    "attach",
    "get_reducer",
    "load_default",
    "load_model",
    "param",
    "reducers",
    "register_adapter",
    "register_reducer",
    "split_budget",
]
