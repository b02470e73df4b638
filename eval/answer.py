"""Asking a model one benchmark question under a plan, and measuring what it cost.

`Answerer` wraps a loaded VLM (image or video; the shipped default models or any local checkpoint with an
adapter) with how its inputs are built: video models through their adapter's `video_spec` and
`tokenreduce.adapters.videollm.video_inputs` (transformers' video processors need torchvision), image models
through their processor. Prompts come from the protocol (`protocols.prompt_parts`) put into the model's own chat
template, with the protocol's assistant prefill appended ("Best Option: (" for MLVU).

`Answerer.ask` runs greedy decoding (``num_beams=1``, the protocol's ``max_new_tokens``: 16, as lmms-eval) with
the plan attached and returns the completion, the protocol's extraction and score, and the efficiency of the
call: visual tokens entering the LLM and their per-layer average, analytic prefill FLOPs (LLM and vision tower),
measured vision time, LLM prefill time, time to first token, decode tokens/s and peak memory.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import protocols as P
from .datasets import Item, videomme_subtitles
from .errors import EvalError

POSITIONS = "@positions"  # plan suffix: kept visual tokens keep their full-prompt position ids


def split_positions(plan: str) -> tuple[str, bool]:
    """"pool(tokens=16) @positions" -> ("pool(tokens=16)", True): the suffix runs a plan with the kept tokens at
    their full-prompt position ids (`tr.attach(..., keep_positions=True)`); its rows are their own series."""
    plan = plan.strip()
    if plan.endswith(POSITIONS):
        return plan[: -len(POSITIONS)].strip(), True
    return plan, False


def canonical_plan(plan: str) -> str:
    """`plan` checked by parsing it, then written one way: no spaces around ``= + ( ) [ ]``, ", " between
    arguments, "none" for the empty plan, the ``@positions`` suffix kept. So "pool(tokens = 16)" and
    "pool(tokens=16)" are one series, while the label stays what the user wrote (`Plan`'s own printing spells
    out every default). Raises `tokenreduce.PlanError` for a plan that does not parse."""
    import re

    from tokenreduce.plan import Plan

    body, keep = split_positions(plan)
    Plan.parse(body)
    text = re.sub(r"\s+", " ", body).strip()
    text = re.sub(r"\s*([=+()\[\]])\s*", r"\1", text)
    text = re.sub(r"\s*,\s*", ", ", text) or "none"
    return f"{text} {POSITIONS}" if keep else text


# --- loading ----------------------------------------------------------------------------------------------------


def model_fingerprint(path: str | os.PathLike) -> str:
    """A cheap identity of a checkpoint folder: sha256 over config.json, the tokenizer files, and each weight
    file's name, size, first and last MiB (hashing every byte of a 7B checkpoint would take minutes)."""
    root = Path(path)
    h = hashlib.sha256()
    for p in sorted(root.iterdir()):
        if not p.is_file():
            continue
        if p.suffix in (".safetensors", ".bin", ".pt", ".gguf"):
            size = p.stat().st_size
            h.update(f"{p.name}:{size}".encode())
            with p.open("rb") as f:
                h.update(f.read(2**20))
                f.seek(max(0, size - 2**20))
                h.update(f.read(2**20))
        elif p.suffix in (".json", ".jinja", ".model", ".txt") and p.name != "training.json":
            h.update(p.name.encode())
            h.update(p.read_bytes())
    return h.hexdigest()[:16]


def weights_fingerprint(model) -> str:
    """Identity of an in-memory model: its class, config and a sample of every parameter."""
    h = hashlib.sha256(type(model).__name__.encode())
    h.update(json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode())
    for name, p in sorted(model.state_dict().items()):
        flat = p.detach().reshape(-1)
        h.update(name.encode())
        h.update(flat[:: max(1, flat.numel() // 64)].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def resolve_model(spec: str, kind: str) -> Path:
    """The checkpoint folder of `spec`: "default" is the shipped `kind` model, else a local folder."""
    if spec == "default":
        from .models import model_dir

        path = model_dir(kind)
        if not (path / "config.json").exists():
            raise EvalError(f"no shipped {kind} model at {path}")
        return path
    path = Path(spec).expanduser()
    if not (path / "config.json").is_file():
        raise EvalError(f"--model {spec!r}: not a checkpoint folder (no config.json); no download is attempted")
    return path


def checkpoint_info(path: str | os.PathLike, dtype: str = "float32") -> dict[str, Any]:
    """The identity of a checkpoint as `Answerer.describe` gives it once loaded (fingerprint, class, dtype), read
    without loading the weights, so a results folder of another model is refused before any loading."""
    import transformers

    try:
        cfg = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
        cls = transformers.AutoModelForImageTextToText._model_mapping[type(cfg)]
    except (OSError, ValueError, KeyError) as e:
        raise EvalError(f"--model {str(path)!r}: not a vision-language checkpoint transformers knows ({e})") from None
    return {"fingerprint": model_fingerprint(path), "class": cls.__name__,
            "dtype": str(DTYPES[dtype]).replace("torch.", "")}


def add_runtime_arguments(p: argparse.ArgumentParser, device_help: str) -> None:
    """The options `evaluate`, `eval` and `sweep` share: the timing pass, where and how the model runs, and how
    the table shows."""
    p.add_argument("--timing-items", default="8", help="questions (per data set) the TTFT speedup is measured on "
                   "after the answers, every plan interleaved with the unreduced model (default 8; 0: no timing pass)")
    p.add_argument("--timing-repeats", default="3", help="measured rounds of the timing pass (default 3, after one "
                   "warm-up round)")
    p.add_argument("--device", default="cpu", help=device_help)
    p.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16 (or fp32, bf16, fp16)")
    p.add_argument("--attn", default="sdpa", choices=["sdpa", "eager", "flash_attention_2"])
    p.add_argument("--threads", default=None, help="torch.set_num_threads")
    p.add_argument("--wide", action="store_true", help="every column (the table is otherwise at most 120 wide)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def load_checkpoint(path: str | os.PathLike, device: str = "cpu", dtype: str = "float32", attn: str = "sdpa"):
    """(model, tokenizer, processor or None) from a local checkpoint folder with stock transformers classes."""
    import transformers

    path = Path(path)
    transformers.utils.logging.disable_progress_bar()  # the weight-loading bar; ours are the run's
    try:
        cfg = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
        cls = transformers.AutoModelForImageTextToText._model_mapping[type(cfg)]
        model = cls.from_pretrained(path, local_files_only=True, dtype=DTYPES[dtype], attn_implementation=attn)
        tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise EvalError(f"--model {str(path)!r}: cannot load a vision-language model and tokenizer ({e})") from None
    processor = None
    if (path / "processor_config.json").exists() or (path / "preprocessor_config.json").exists():
        try:
            processor = transformers.AutoProcessor.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError, KeyError, ImportError):
            processor = None
    if processor is None and cfg.model_type == "llava":
        processor = _own_image_processor(cfg, tokenizer)
    tokenizer.padding_side = "left"
    return model.to(device).eval(), tokenizer, processor


def _own_image_processor(cfg, tokenizer):
    """The processor of this project's image models (`models.build_image_processor`) for one of its checkpoints
    saved without it (a training run's ``best/``): recognised by the patch size and the small word-level tokenizer's
    ``<image>`` token. None for anything else (a foreign checkpoint needs its own processor files)."""
    from . import models as M

    vc = cfg.vision_config
    if vc.patch_size == M.PATCH_SIZE and "<image>" in tokenizer.get_vocab() and len(tokenizer.get_vocab()) < 1000:
        return M.build_image_processor(tokenizer, vc.image_size)
    return None


# --- answering --------------------------------------------------------------------------------------------------


class _FirstToken:
    """A stopping criterion that never stops; notes when generate produced its first token."""

    def __init__(self, cuda: bool) -> None:
        self.t: float | None = None
        self.cuda = cuda

    def __call__(self, input_ids, scores, **kwargs):
        if self.t is None:
            if self.cuda:
                torch.cuda.synchronize()
            self.t = time.perf_counter()
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


@dataclass
class Sampling:
    """How frames are taken from a video: `frames` uniformly (lmms-eval's rule), or `fps` per second capped at
    `max_frames`."""

    frames: int | None = 8
    fps: float | None = None
    max_frames: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"frames": self.frames, "fps": self.fps, "max_frames": self.max_frames}


class Answerer:
    """A model that answers benchmark questions.

    Args:
        model, tokenizer: a loaded VLM with an adapter, and its tokenizer.
        processor: the image processor bundle (image models); None for video models.
        fingerprint: the model's identity recorded in result files.
        name: how reports name it (a path or "default").
        sampling: frame sampling for videos.
    """

    def __init__(self, model, tokenizer, processor=None, *, fingerprint: str, name: str,
                 sampling: Sampling | None = None) -> None:
        from tokenreduce.registry import adapter_for

        self.model, self.tokenizer, self.processor = model, tokenizer, processor
        self.fingerprint, self.name = fingerprint, name
        self.sampling = sampling or Sampling()
        self.subtitles = False  # Video-MME's subtitle prompt (lmms-eval's videomme_w_subtitle)
        try:
            adapter = adapter_for(model)(model)
        except Exception as e:  # noqa: BLE001 - any model without an adapter
            raise EvalError(f"--model {name}: {type(model).__name__} has no tokenreduce adapter ({e})") from None
        self.spec = adapter.video_spec() if hasattr(adapter, "video_spec") else None
        #: the kinds of question it can take: videos through its adapter, images through its processor
        self.kinds = tuple(k for k, ok in (("image", processor is not None), ("video", self.spec is not None)) if ok)
        if not self.kinds:
            raise EvalError(f"--model {name}: no processor for images (processor_config.json) and no video support")
        self.cuda = next(model.parameters()).is_cuda

    @classmethod
    def load(cls, spec: str, kind: str, *, device: str = "cpu", dtype: str = "float32", attn: str = "sdpa",
             sampling: Sampling | None = None) -> Answerer:
        """`spec` "default" (the shipped `kind` model) or a checkpoint folder."""
        path = resolve_model(spec, kind)
        model, tok, proc = load_checkpoint(path, device, dtype, attn)
        return cls(model, tok, proc, fingerprint=model_fingerprint(path), name=spec if spec == "default" else
                   str(path), sampling=sampling)

    def describe(self) -> dict[str, Any]:
        dtype = next(self.model.parameters()).dtype
        return {"name": self.name, "class": type(self.model).__name__, "fingerprint": self.fingerprint,
                "kinds": list(self.kinds), "dtype": str(dtype).replace("torch.", ""),
                "attn": getattr(self.model.config, "_attn_implementation", None)}

    # --- inputs ---

    def visual(self, item: Item) -> np.ndarray:
        """(H, W, 3) uint8 image, or (T, H, W, 3) uint8 frames sampled by `sampling`."""
        if item.kind == "image":
            from PIL import Image

            try:
                return np.asarray(Image.open(item.media).convert("RGB"))
            except Exception as e:  # noqa: BLE001 - PIL raises several types
                raise EvalError(f"{item.qid}: cannot read image {item.media} ({e})") from None
        from tokenreduce.video import load_video

        s = self.sampling
        if s.fps is not None:
            return load_video(item.media, fps=s.fps, max_frames=s.max_frames).frames
        return load_video(item.media, num_frames=s.frames).frames

    def prompt(self, item: Item, protocol: str) -> str:
        """The protocol's prompt for `item` in this model's chat template (placeholder included)."""
        subtitles = videomme_subtitles(item) if self.subtitles and item.bench == "videomme" else None
        options = item.options
        system, text, prefill = P.prompt_parts(protocol, item.question, options, item.kind,
                                               raw_question=item.raw_question, subtitles=subtitles)
        if item.raw_options is not None and P.get(protocol).prompt == "videomme":
            lettered = "\n".join(f"{P.LETTERS[i]}. {o}" for i, o in enumerate(options))
            text = text.replace(lettered, "\n".join(item.raw_options), 1)  # the data's own option strings
        return self.chat_text(system, text, prefill, item.kind)

    def chat_text(self, system: str | None, text: str, prefill: str, kind: str) -> str:
        """`text` as the user turn (after one image/video placeholder) in this model's chat template, with an
        optional system turn, and the assistant turn pre-filled with `prefill`. Without a chat template: the
        LLaVA-1.5 turn (`protocols.chat`)."""
        template_owner = self.processor if self.processor is not None else self.tokenizer
        token = self.spec.token if kind == "video" and self.spec is not None else "<image>"
        if getattr(template_owner, "chat_template", None):
            messages = ([{"role": "system", "content": system}] if system else []) + [
                {"role": "user", "content": [{"type": kind}, {"type": "text", "text": text}]}]
            out = template_owner.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            if kind == "video" and token not in out:
                out = out.replace("<video>", token)
            if prefill:
                out += prefill if out.endswith((" ", "\n")) else " " + prefill
            return out
        return P.chat(text, token, system=system, prefill=prefill)

    def inputs(self, item: Item, visual: np.ndarray, protocol: str) -> dict[str, torch.Tensor]:
        """Model inputs of `item`'s prompt under `protocol` with its `visual` (they do not depend on the plan)."""
        if item.kind not in self.kinds:
            raise EvalError(f"{item.qid}: a {item.kind} question, but --model {self.name} takes "
                            f"{' and '.join(self.kinds)} only")
        return self.encode(self.prompt(item, protocol), visual, item.kind)

    def encode(self, text: str, visual: np.ndarray, kind: str) -> dict[str, torch.Tensor]:
        """Model inputs of a full prompt `text` (one placeholder) with an (H, W, 3) image or (T, H, W, 3) video."""
        if kind not in self.kinds:
            raise EvalError(f"a {kind} input, but --model {self.name} takes {' and '.join(self.kinds)} only")
        if kind == "video":
            from tokenreduce.adapters.videollm import video_inputs

            enc = video_inputs(self.tokenizer, self.spec, [text], [visual])
        else:
            from PIL import Image

            enc = dict(self.processor(text=[text], images=[Image.fromarray(visual)], return_tensors="pt"))
        dtype = next(self.model.parameters()).dtype
        device = next(self.model.parameters()).device
        return {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for k, v in enc.items()}

    # --- one question ---

    @torch.inference_mode()
    def ask(self, item: Item, visual: np.ndarray, plan: str, protocol: str, measure_memory: bool = False,
            inputs: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
        """Greedy answer to `item` under `plan` (optionally suffixed " @positions"), scored by `protocol`;
        `inputs` (from `inputs`, they do not depend on the plan) saves rebuilding them for every plan."""
        proto = P.get(protocol)
        inputs = inputs if inputs is not None else self.inputs(item, visual, protocol)
        rec = self.generate(inputs, plan, proto.max_new_tokens, measure_memory)
        rec["extracted"] = proto.raw(rec["completion"])
        rec["pred"] = proto.extract(rec["completion"])
        if item.answer is not None:
            rec["correct"] = proto.score(rec["completion"], item.answer)
        return rec

    @torch.inference_mode()
    def generate(self, inputs: dict[str, torch.Tensor], plan: str, max_new_tokens: int,
                 measure_memory: bool = False) -> dict[str, Any]:
        """Greedy generation (batch 1) with `plan` attached: the completion and the call's efficiency: visual
        tokens entering the LLM (``tokens``) and per LLM layer (``layer_avg``), the LLM sequence length
        (``seq_llm``), analytic FLOPs, vision / prefill / reduction times, TTFT, new tokens, decode tokens/s and,
        on GPU or with `measure_memory`, peak memory in MiB."""
        from transformers import StoppingCriteriaList

        import tokenreduce as tr

        body, keep_positions = split_positions(plan)
        first = _FirstToken(self.cuda)
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base_mem = torch.cuda.memory_allocated()
        mem = _PeakMemory() if measure_memory and not self.cuda else contextlib.nullcontext()
        with mem, tr.apply(self.model, body, tokenizer=self.tokenizer, keep_positions=keep_positions,
                           sync_timing=self.cuda) as run:
            t0 = time.perf_counter()
            out = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                      stopping_criteria=StoppingCriteriaList([first]))
            if self.cuda:
                torch.cuda.synchronize()
            t_end = time.perf_counter()
        call = run.report.calls[0]
        new = out[0, inputs["input_ids"].shape[1]:]
        t_first = first.t or t_end
        n_new = int(new.shape[0])
        rec: dict[str, Any] = {
            "completion": self.tokenizer.decode(new, skip_special_tokens=True),
            "tokens": int(call.tokens()[0]),
            "layer_avg": float(call.visual_layer_average[0]),
            "seq_llm": int(call.seq_llm[0]),
            "flops_prefill": float(call.flops.get("llm_prefill", 0.0)),
            "flops_vision": float(call.flops.get("vision", 0.0)),
            "vision_s": float(call.times.get("vision", 0.0)),
            "prefill_s": float(call.times.get("prefill", 0.0)),
            "reduce_s": float(sum(v for k, v in call.times.items() if k.startswith(("reduce:", "score:")))),
            "ttft_s": t_first - t0,
            "new_tokens": n_new,
            "decode_tps": (n_new - 1) / (t_end - t_first) if n_new > 1 and t_end > t_first else None,
        }
        if self.cuda:
            rec["peak_mib"] = (torch.cuda.max_memory_allocated() - base_mem) / 2**20
        elif measure_memory:
            rec["peak_mib"] = mem.mib
        return rec


class _PeakMemory:
    """Peak resident memory above the level at entry (CPU), from the bench's `PeakRSS`."""

    def __enter__(self):
        from .bench import PeakRSS

        self._inner = PeakRSS().__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._inner.__exit__(*exc)

    @property
    def mib(self) -> float:
        return self._inner.mib
