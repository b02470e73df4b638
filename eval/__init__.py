"""Evaluation and benchmarks (installed as `tokenreduce.eval`)."""


def default_model(kind: str = "image"):
    """The shipped default model ("image": LLaVA, "video": LLaVA-OneVision) and its tokenizer, loaded with stock
    `from_pretrained` from `tokenreduce/assets/models/<kind>/`: (model, tokenizer). See `tokenreduce.eval.models`."""
    from .models import default_model as _default_model

    return _default_model(kind)
