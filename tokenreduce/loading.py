"""One model loader for the command line and for Python: shipped models, presets, checkpoints, the HF cache.

    from tokenreduce.loading import load_model
    m = load_model("default", kind="video")                         # the shipped trained video model
    m = load_model("/models/llava-1.5-7b-hf", dtype="bf16", device="cuda", attn="sdpa")
    m = load_model("llava-hf/llava-1.5-7b-hf")                      # from the local Hugging Face cache only
    m.model, m.processor, m.tokenizer, m.source

A model spec is one of:

- ``default``: the model this package ships and trained (`tokenreduce/assets/models/<kind>/`);
- a built-in random-weight preset (``tiny``, ``llava-1.5-7b-shape``, ``tiny-onevision``, ...), built from config;
- a local checkpoint folder (anything `save_pretrained` wrote: config.json, weights, tokenizer, processor);
- a hub id (``org/name``, optionally ``org/name@revision``) already in the local Hugging Face cache, resolved
  offline from the cache layout ``models--org--name/snapshots/<commit>/`` (``refs/<revision>`` names the
  commit; ``main`` by default). Nothing is ever downloaded: a hub id that is not in the cache is refused with
  a hint to pass the folder.

`dtype` is ``fp32``, ``bf16`` or ``fp16`` (``float32``/``bfloat16``/``float16`` are accepted too), `attn` the
attention implementation (``sdpa``, ``eager``, or ``flash_attention_2`` where the flash-attn package and a CUDA
device are present), `device` ``cpu``, ``cuda``, ``cuda:N``, ``mps`` or ``auto`` (CUDA when available). Every
bad value raises `InputError` with one line naming it.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import InputError

KINDS = ("image", "video")
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_ALIASES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
ATTENTION = ("sdpa", "eager", "flash_attention_2")
#: model types whose images are prepared without transformers' processor (it needs torchvision):
#: `tokenreduce.adapters.qwen2vl.zoo.qwen_inputs` does its work from the tokenizer
QWEN_TYPES = ("qwen2_vl", "qwen2_5_vl")
#: a hub id: org/name with the characters the hub allows, optionally @revision
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")


@dataclass
class LoadedModel:
    """What `load_model` returns.

    Attributes:
        model: the transformers model, in eval mode, on `device` in `dtype`.
        processor: the processor for images (LLaVA, LLaVA-NeXT, OneVision checkpoints with one); None for the
            video path, which builds inputs from the tokenizer (`tokenreduce.adapters.videollm.video_inputs`),
            and for Qwen2-VL / Qwen2.5-VL (`QWEN_TYPES`: `tokenreduce.adapters.qwen2vl.zoo.qwen_inputs`).
        tokenizer: the tokenizer, padding on the left (for batched generation).
        kind: "image" or "video", what the model was loaded for.
        source: one line saying what was loaded ("shipped image model", "preset tiny (random weights)", ...).
        path: the checkpoint folder, None for presets.
        card: the shipped model's `training.json` (or a checkpoint's, when it has one), else {}.
    """

    model: Any
    processor: Any
    tokenizer: Any
    kind: str
    source: str
    path: Path | None = None
    card: dict | None = None


def resolve_dtype(name: str | torch.dtype) -> torch.dtype:
    """``fp32``/``bf16``/``fp16`` (or their torch names, or a torch dtype) -> the torch dtype."""
    if isinstance(name, torch.dtype):
        if name not in DTYPES.values():
            raise InputError(f"dtype {name}: choose from {', '.join(DTYPES)}")
        return name
    key = DTYPE_ALIASES.get(str(name), str(name))
    if key not in DTYPES:
        raise InputError(f"dtype {name!r}: choose from {', '.join(DTYPES)}")
    return DTYPES[key]


def resolve_device(name: str | torch.device) -> torch.device:
    """``cpu``, ``cuda``, ``cuda:N``, ``mps`` or ``auto`` -> a device that exists here."""
    if str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise InputError(f"device {name!r}: not a device name (cpu, cuda, cuda:N, mps, auto)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"device {name!r}: no CUDA device is available here (torch {torch.__version__})")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise InputError(f"device {name!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif device.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise InputError(f"device {name!r}: MPS is not available here")
    elif device.type != "cpu":
        raise InputError(f"device {name!r}: choose cpu, cuda, cuda:N, mps or auto")
    return device


def check_attention(attn: str, device: torch.device | None = None) -> str:
    """`attn` if it can run here, else `InputError` saying what it needs."""
    if attn not in ATTENTION:
        raise InputError(f"attention {attn!r}: choose from {', '.join(ATTENTION)}")
    if attn == "flash_attention_2":
        from transformers.utils import is_flash_attn_2_available

        if not is_flash_attn_2_available():
            raise InputError("attention 'flash_attention_2' needs the flash-attn package and a CUDA GPU, which are "
                             "not installed here (pip install flash-attn); use sdpa, which is as fast on most GPUs")
        if device is not None and device.type != "cuda":
            raise InputError(f"attention 'flash_attention_2' runs on CUDA only, not on {device}; use sdpa")
    return attn


def hub_cache() -> Path:
    """The local Hugging Face hub cache: $HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def resolve_hub_id(spec: str, cache: Path | None = None) -> Path:
    """The snapshot folder of hub id ``org/name[@revision]`` in the local cache (never a download).

    The revision (default ``main``) is a ref under ``refs/`` or a commit hash (a prefix of at least 7
    characters); without refs, a cache holding exactly one snapshot uses it.
    """
    cache = hub_cache() if cache is None else cache
    repo, _, revision = spec.partition("@")
    folder = cache / f"models--{repo.replace('/', '--')}"
    snapshots = folder / "snapshots"
    hint = (f"nothing is downloaded; fetch it where there is a network (`hf download {repo}`) and pass "
            "its folder, or point HF_HUB_CACHE at the cache that holds it")
    if not snapshots.is_dir():
        raise InputError(f"model {spec!r}: not a local folder, and not in the Hugging Face cache at {cache}; {hint}")
    found = sorted(p.name for p in snapshots.iterdir() if p.is_dir())
    ref = folder / "refs" / (revision or "main")
    commit = ref.read_text().strip() if ref.is_file() else None
    if commit is None and revision:
        matches = [c for c in found if len(revision) >= 7 and c.startswith(revision)]
        commit = matches[0] if len(matches) == 1 else None
    if commit is None and not revision and len(found) == 1:
        commit = found[0]
    if commit is None or commit not in found:
        what = f"revision {revision!r}" if revision else "no refs/main and not exactly one snapshot"
        raise InputError(f"model {spec!r}: in the cache at {folder}, but {what} (snapshots: "
                         f"{', '.join(found) or 'none'}); pass the snapshot folder itself")
    return snapshots / commit


def presets(kind: str) -> list[str]:
    """Names of the built-in random-weight presets of `kind`."""
    if kind == "image":
        from .adapters.llava.zoo import NEXT_PRESETS, PRESETS
        from .adapters.qwen2vl.zoo import PRESETS as QWEN_PRESETS

        return [*PRESETS, *NEXT_PRESETS, *QWEN_PRESETS]
    from .adapters.videollm.zoo import PRESETS as VIDEO_PRESETS

    return list(VIDEO_PRESETS)


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise InputError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")


def locate(spec: str, kind: str = "image") -> tuple[str, Path | None]:
    """What `spec` names without loading it: ("default" | "preset" | "folder" | "hub", folder or None).

    Raises `InputError` for a spec that is none of them, so callers can check it before slow work."""
    _check_kind(kind)
    if not isinstance(spec, str) or not spec.strip():
        raise InputError(f"model {spec!r}: give default, a preset name, a checkpoint folder or a cached hub id")
    if spec == "default":
        from .eval.models import model_dir

        path = model_dir(kind)
        if not (path / "config.json").is_file():
            raise InputError(f"model 'default': the shipped {kind} model is missing from {path} (reinstall)")
        return "default", path
    if spec in presets(kind):
        return "preset", None
    if os.path.isdir(spec):
        if not os.path.isfile(os.path.join(spec, "config.json")):
            raise InputError(f"model {spec!r}: the folder has no config.json, so it is not a checkpoint "
                             "(save_pretrained writes one)")
        return "folder", Path(spec)
    if os.path.exists(spec):
        raise InputError(f"model {spec!r}: a file, not a checkpoint folder")
    other = [p for p in presets("video" if kind == "image" else "image") if p == spec]
    if other:
        want = "a video" if kind == "image" else "an image"
        raise InputError(f"model {spec!r} is {want} preset; {kind} inputs need default, a checkpoint or a {kind} "
                         f"preset ({', '.join(presets(kind))})")
    if HUB_ID.match(spec):
        return "hub", resolve_hub_id(spec)
    raise InputError(f"model {spec!r}: not a local checkpoint folder, a cached hub id (org/name) nor a built-in "
                     f"{kind} model (default, {', '.join(presets(kind))}); nothing is downloaded")


def _read_card(path: Path | None) -> dict:
    import json

    if path is None or not (path / "training.json").is_file():
        return {}
    try:
        return json.loads((path / "training.json").read_text())
    except ValueError:
        return {}


def load_model(spec: str = "default", kind: str = "image", *, device: str | torch.device = "cpu",
               dtype: str | torch.dtype = "fp32", attn: str = "sdpa", llm_layers: int | None = None,
               vision_layers: int | None = None) -> LoadedModel:
    """Load the model `spec` names (see the module docstring) for `kind` inputs.

    Args:
        spec: "default", a preset name, a checkpoint folder, or a hub id in the local cache.
        kind: "image" (the model and its processor) or "video" (the model and its tokenizer).
        device, dtype, attn: where, in what precision and with which attention implementation.
        llm_layers, vision_layers: keep only the first n decoder / vision layers (for benchmarks of big
            models on small machines: the other layers' weights are not loaded); None keeps them all.

    Returns:
        a `LoadedModel`.
    """
    what, path = locate(spec, kind)
    torch_dtype = resolve_dtype(dtype)
    dev = resolve_device(device)
    check_attention(attn, dev)
    for name, n in (("llm_layers", llm_layers), ("vision_layers", vision_layers)):
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise InputError(f"{name} must be a positive integer, got {n!r}")
    if what == "preset":
        model, companion = _build_preset(spec, kind, attn, torch_dtype, llm_layers, vision_layers)
        has_processor = hasattr(companion, "tokenizer")  # a processor; Qwen presets come with a tokenizer only
        processor, tokenizer = (companion, companion.tokenizer) if has_processor else (None, companion)
        return LoadedModel(model.to(dev), processor, tokenizer, kind, f"preset {spec} (random weights)")
    assert path is not None
    model, processor, tokenizer = _from_folder(spec, path, kind, attn, torch_dtype, llm_layers, vision_layers)
    source = {"default": f"shipped {kind} model", "folder": f"checkpoint {path}",
              "hub": f"{spec} from the Hugging Face cache ({path})"}[what]
    return LoadedModel(model.to(dev), processor, tokenizer, kind, source, path, _read_card(path))


def _build_preset(spec: str, kind: str, attn: str, dtype: torch.dtype, llm_layers, vision_layers):
    kw = dict(attn=attn, dtype=dtype, llm_layers=llm_layers, vision_layers=vision_layers)
    from .adapters.qwen2vl.zoo import PRESETS as QWEN_PRESETS
    from .adapters.qwen2vl.zoo import build_qwen

    if spec in QWEN_PRESETS:  # (model, tokenizer): no processor (transformers' needs torchvision)
        return build_qwen(spec, **kw)
    if kind == "image":
        from .adapters.llava.zoo import build_llava_with_processor

        return build_llava_with_processor(spec, **kw)
    from .adapters.videollm.zoo import build_video_llm

    return build_video_llm(spec, **kw)


def _truncate(config, llm_layers: int | None, vision_layers: int | None) -> None:
    """Shorten a composite config's decoder / vision tower in place (only ever shorter)."""
    for sub, n, name in ((config.text_config, llm_layers, "llm_layers"),
                         (config.vision_config, vision_layers, "vision_layers")):
        if n is None:
            continue
        depth = "depth" if hasattr(sub, "depth") else "num_hidden_layers"  # Qwen2-VL's vision tower: depth
        if n > getattr(sub, depth):
            raise InputError(f"{name}={n}, but the checkpoint has {getattr(sub, depth)}")
        setattr(sub, depth, n)
        for key in ("layer_types", "mlp_only_layers"):
            if isinstance(getattr(sub, key, None), list):
                setattr(sub, key, getattr(sub, key)[:n])
        if isinstance(getattr(sub, "fullatt_block_indexes", None), list):  # Qwen2.5-VL: keep those that remain
            sub.fullatt_block_indexes = [i for i in sub.fullatt_block_indexes if i < n]


def _from_folder(spec: str, path: Path, kind: str, attn: str, dtype: torch.dtype, llm_layers, vision_layers):
    import transformers
    from transformers.utils import logging as hf_logging

    try:
        config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise InputError(f"model {spec!r}: cannot read its config.json ({_short(e)})") from None
    if not hasattr(config, "text_config") or not hasattr(config, "vision_config"):
        raise InputError(f"model {spec!r}: a {config.model_type!r} checkpoint, not a vision-language model "
                         "(LLaVA, LLaVA-NeXT, Video-LLaVA, LLaVA-OneVision, LLaVA-NeXT-Video, Qwen2-VL)")
    _truncate(config, llm_layers, vision_layers)
    arch = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    cls = cls or transformers.AutoModelForImageTextToText
    verbosity, bar = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    if llm_layers is not None or vision_layers is not None:
        hf_logging.set_verbosity_error()  # the dropped layers' weights are "unused" on purpose
    hf_logging.disable_progress_bar()  # a bar per load is noise on the command line
    try:
        model = cls.from_pretrained(path, config=config, local_files_only=True, dtype=dtype,
                                    attn_implementation=attn).eval()
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise InputError(f"model {spec!r}: cannot load the model from {path} ({_short(e)})") from None
    finally:
        hf_logging.set_verbosity(verbosity)
        if bar:
            hf_logging.enable_progress_bar()
    processor = None
    try:
        if kind == "image" and config.model_type not in QWEN_TYPES:
            processor = transformers.AutoProcessor.from_pretrained(path, local_files_only=True)
            tokenizer = processor.tokenizer
        else:
            tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError, ImportError) as e:
        need = "processor" if kind == "image" else "tokenizer"
        raise InputError(f"model {spec!r}: cannot load its {need} from {path} ({_short(e)})") from None
    tokenizer.padding_side = "left"
    if model.generation_config.pad_token_id is None and tokenizer.pad_token_id is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, processor, tokenizer


def _short(e: BaseException) -> str:
    """The first line of an exception's message (transformers' are often paragraphs)."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200]}" if text else type(e).__name__
