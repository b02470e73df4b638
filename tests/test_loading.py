"""The shared model loader (`tokenreduce.loading`) and the command-line options built on it.

Real checkpoints are stand-ins written with `save_pretrained` from tiny models (fp32 and bf16), and a hub cache is
a real folder in the cache layout (`models--org--name/snapshots/<commit>/`, `refs/main`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from tokenreduce.adapters.llava.zoo import build_llava_with_processor
from tokenreduce.adapters.videollm.zoo import build_video_llm
from tokenreduce.eval.models import model_dir

import tokenreduce as tr
from tokenreduce.cli import main
from tokenreduce.loading import hub_cache, load_model, resolve_device, resolve_dtype

SHAPES = Path(tr.__file__).resolve().parent / "assets" / "shapes.png"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def run_cli(argv, capsys):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def tiny_image():
    """(model, processor, folder) of the tiny random LLaVA, saved with save_pretrained."""
    return _saved("tiny", torch.float32)


@pytest.fixture(scope="module")
def tiny_image_bf16():
    return _saved("tiny", torch.bfloat16)


def _saved(preset: str, dtype: torch.dtype):
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix=f"ckpt-{preset}-"))
    model, processor = build_llava_with_processor(preset, dtype=dtype)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return model, processor, folder


@pytest.fixture(scope="module")
def tiny_video(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt-video")
    model, tok = build_video_llm("tiny-onevision")
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return model, tok, folder


def _logits(model, processor, dtype=torch.float32):
    from PIL import Image

    image = Image.open(SHAPES).convert("RGB")
    inputs = processor(text="USER: <image>\nWhat shapes? ASSISTANT:", images=image, return_tensors="pt")
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    with torch.no_grad():
        return model(**inputs).logits.float()


def test_a_checkpoint_folder_loads_as_saved(tiny_image):
    model, processor, folder = tiny_image
    loaded = load_model(str(folder))
    assert type(loaded.model) is type(model) and loaded.kind == "image" and loaded.path == folder
    assert loaded.processor is not None and loaded.tokenizer.padding_side == "left"
    assert next(loaded.model.parameters()).dtype == torch.float32 and not loaded.model.training
    # the same inputs for both (an environment with torchvision loads the fast processor, whose resize of a
    # textured picture differs from the PIL one's by ~1e-4): the weights are what must load as saved
    torch.testing.assert_close(_logits(loaded.model, loaded.processor), _logits(model, loaded.processor), rtol=1e-5,
                               atol=1e-5)
    assert "checkpoint" in loaded.source and str(folder) in loaded.source


@pytest.mark.parametrize("dtype, torch_dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16),
                                                ("fp32", torch.float32), ("bfloat16", torch.bfloat16)])
def test_dtype_of_a_bf16_checkpoint(tiny_image_bf16, dtype, torch_dtype):
    """A checkpoint saved in bf16 loads in whatever precision is asked for."""
    _, _, folder = tiny_image_bf16
    loaded = load_model(str(folder), dtype=dtype)
    assert {p.dtype for p in loaded.model.parameters()} == {torch_dtype}


def test_bf16_reduction_runs_and_counts(tiny_image_bf16):
    """A reduced bf16 model: finite logits, and the report's counts equal the real shapes."""
    _, _, folder = tiny_image_bf16
    loaded = load_model(str(folder), dtype="bf16")
    with tr.apply(loaded.model, "pool(tokens=16)") as run:
        logits = _logits(loaded.model, loaded.processor, torch.bfloat16)
    assert torch.isfinite(logits).all()
    call = run.report.last
    assert call.tokens()[0] == 16 and logits.shape[1] == call.seq_llm[0]


def test_llm_layers_keeps_the_first_layers(tiny_image):
    model, _, folder = tiny_image
    loaded = load_model(str(folder), llm_layers=1, vision_layers=1)
    lm = loaded.model.model.language_model
    assert len(lm.layers) == 1 and loaded.model.config.vision_config.num_hidden_layers == 1
    want = model.model.language_model.layers[0].mlp.down_proj.weight
    torch.testing.assert_close(lm.layers[0].mlp.down_proj.weight, want, rtol=0, atol=0)
    with pytest.raises(tr.InputError, match="llm_layers=9, but the checkpoint has 2"):
        load_model(str(folder), llm_layers=9)


def test_a_video_checkpoint_loads_with_its_tokenizer(tiny_video):
    model, _, folder = tiny_video
    loaded = load_model(str(folder), "video")
    assert type(loaded.model) is type(model) and loaded.processor is None
    assert loaded.tokenizer.convert_tokens_to_ids("<video>") == model.config.video_token_id


def _fake_cache(root: Path, folder: Path, repo: str = "someorg/tiny-llava", ref: str | None = COMMIT) -> Path:
    """`folder` placed in a hub cache at `root` as the hub client lays it out."""
    base = root / f"models--{repo.replace('/', '--')}"
    shutil.copytree(folder, base / "snapshots" / COMMIT)
    if ref is not None:
        (base / "refs").mkdir(parents=True)
        (base / "refs" / "main").write_text(ref)
    return base


def test_a_hub_id_resolves_from_the_local_cache(tiny_image, tmp_path, monkeypatch):
    model, processor, folder = tiny_image
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    assert hub_cache() == tmp_path
    _fake_cache(tmp_path, folder)
    for spec in ("someorg/tiny-llava", f"someorg/tiny-llava@{COMMIT[:8]}", f"someorg/tiny-llava@{COMMIT}"):
        loaded = load_model(spec)
        assert loaded.path == tmp_path / "models--someorg--tiny-llava" / "snapshots" / COMMIT
        assert "Hugging Face cache" in loaded.source
    torch.testing.assert_close(_logits(loaded.model, loaded.processor), _logits(model, loaded.processor), rtol=1e-5,
                               atol=1e-5)


def test_hf_home_is_honoured(tiny_image, tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    _fake_cache(tmp_path / "hub", tiny_image[2], ref=None)  # no refs: the only snapshot is used
    assert load_model("someorg/tiny-llava").path.name == COMMIT


def test_a_hub_id_not_in_the_cache_is_refused_with_a_hint(tiny_image, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(tr.InputError) as e:
        load_model("llava-hf/llava-1.5-7b-hf")
    msg = str(e.value)
    assert "not in the Hugging Face cache" in msg and "pass its folder" in msg and "hf download" in msg
    assert "\n" not in msg
    _fake_cache(tmp_path, tiny_image[2], ref="f" * 40)  # refs/main names a snapshot that is not there
    with pytest.raises(tr.InputError, match="pass the snapshot folder"):
        load_model("someorg/tiny-llava")
    with pytest.raises(tr.InputError, match="revision 'v9'"):
        load_model("someorg/tiny-llava@v9")


def test_shipped_models_load_by_name():
    image = load_model("default")
    video = load_model("default", "video")
    assert image.path == model_dir("image") and video.path == model_dir("video")
    assert type(image.model).__name__ == "LlavaForConditionalGeneration" and image.processor is not None
    assert type(video.model).__name__ == "LlavaOnevisionForConditionalGeneration"
    assert image.card["prompt_forms"] and video.card["vocabulary"] == "closed"


def test_presets_are_random_weight_models():
    loaded = load_model("tiny", dtype="bf16")
    assert loaded.path is None and "random weights" in loaded.source
    assert next(loaded.model.parameters()).dtype == torch.bfloat16
    assert load_model("tiny-onevision", "video").tokenizer is not None


@pytest.mark.parametrize("kwargs, needle", [
    (dict(spec="nonexistent-model"), "not a local checkpoint folder"),
    (dict(spec="tiny-onevision"), "is a video preset"),
    (dict(spec="tiny", dtype="int8"), "dtype 'int8'"),
    (dict(spec="tiny", device="tpu"), "device 'tpu'"),
    (dict(spec="tiny", device="gpu:0"), "device 'gpu:0'"),
    (dict(spec="tiny", attn="flex"), "attention 'flex'"),
    (dict(spec="tiny", llm_layers=0), "llm_layers"),
])
def test_bad_arguments_are_one_line_errors(kwargs, needle):
    with pytest.raises(tr.InputError) as e:
        load_model(**kwargs)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_devices_and_dtypes():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_dtype("fp16") is torch.float16 and resolve_dtype(torch.bfloat16) is torch.bfloat16
    if not torch.cuda.is_available():
        with pytest.raises(tr.InputError, match="no CUDA device"):
            resolve_device("cuda")


def test_flash_attention_needs_flash_attn_and_cuda():
    """On a CPU device flash_attention_2 is refused whether or not flash-attn is installed, with what it needs."""
    with pytest.raises(tr.InputError, match="flash"):
        load_model("tiny", attn="flash_attention_2", device="cpu")


# --- the command line -------------------------------------------------------------------------------------------


def test_run_on_a_checkpoint_folder_in_bf16(tiny_image_bf16, capsys):
    code, out, err = run_cli(["run", "--model", str(tiny_image_bf16[2]), "--dtype", "bf16", "--image", str(SHAPES),
                              "--prompt", "What shapes?", "--plan", "pool(tokens=9)", "--max-new-tokens", "2",
                              "--json"], capsys)
    assert code == 0, err
    rec = json.loads(out)
    assert rec["report"]["calls"][0]["stages"][-1]["tokens"] == [9]
    assert str(tiny_image_bf16[2]) in rec["model"]


def test_run_with_a_cached_hub_id(tiny_image, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    _fake_cache(tmp_path, tiny_image[2])
    code, out, err = run_cli(["run", "--model", "someorg/tiny-llava", "--image", str(SHAPES), "--prompt", "Shapes?",
                              "--max-new-tokens", "2"], capsys)
    assert code == 0, err
    assert "someorg/tiny-llava from the Hugging Face cache" in out


@pytest.mark.parametrize("extra, needle", [
    (["--device", "cuda:7"], "--device 'cuda:7'"),
    (["--device", "nowhere"], "--device 'nowhere'"),
    (["--attn", "flash_attention_2"], "--attn 'flash_attention_2'"),
    (["--dtype", "fp8"], "--dtype"),
    (["--model", "someorg/not-cached"], "--model 'someorg/not-cached'"),
])
def test_run_rejects_bad_model_options_before_loading(extra, needle, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    argv = ["run", "--image", str(SHAPES), "--prompt", "Shapes?", *extra]
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own checks (a --dtype outside the choices)
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and needle in err and "Traceback" not in err


def test_bench_on_a_checkpoint_folder(tiny_image, tmp_path, capsys):
    out = tmp_path / "b.json"
    code = main(["bench", "--model", str(tiny_image[2]), "--plans", "pool(keep=0.5)", "--repeats", "1",
                 "--warmup", "0", "--dtype", "bf16", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    data = json.loads(out.read_text())
    assert [r["visual_tokens"] for r in data["results"]] == [64, 32]
    assert data["config"]["model"] == str(tiny_image[2]) and data["config"]["dtype"] == "bf16"
    assert data["config"]["llm_layers"] is None  # a checkpoint runs at its full depth unless told


def test_bench_preset_and_model_are_exclusive(capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "--preset", "tiny", "--model", "tiny"])
    assert e.value.code == 2 and "not allowed with" in capsys.readouterr().err


def test_bare_command_prints_help_and_version(capsys):
    code, out, _ = run_cli([], capsys)
    assert code == 0 and "usage: tokenreduce" in out and "run" in out and "bench" in out
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"tokenreduce {tr.__version__}"


# --- what the model can answer ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mc_only_model(tmp_path_factory) -> Path:
    """The shipped image model with a card saying it was trained on multiple choice only."""
    folder = tmp_path_factory.mktemp("mc") / "image"
    shutil.copytree(model_dir("image"), folder)
    card = json.loads((folder / "training.json").read_text())
    card["prompt_forms"] = ["mlvu", "mlvu-lmms"]
    (folder / "training.json").write_text(json.dumps(card))
    return folder


def test_run_says_when_the_model_answers_multiple_choice_only(mc_only_model, capsys):
    args = ["run", "--model", str(mc_only_model), "--image", str(SHAPES), "--max-new-tokens", "2"]
    code, out, _ = run_cli([*args, "--prompt", "What colour is the object at the top middle?"], capsys)
    assert code == 0 and "note: this model was trained only on multiple-choice prompts (mlvu, mlvu-lmms)" in out
    code, out, _ = run_cli([*args, "--prompt", "What colour is the object at the top middle?", "--options", "red",
                            "blue"], capsys)
    assert code == 0 and "note:" not in out  # asked in the form it was trained on
    code, out, _ = run_cli(["run", "--image", str(SHAPES), "--max-new-tokens", "2", "--prompt",
                            "What colour is the object at the top middle?"], capsys)
    assert code == 0 and "note:" not in out  # the shipped model was trained on open questions too


def test_run_names_the_words_a_closed_vocabulary_model_does_not_know(capsys):
    code, out, _ = run_cli(["run", "--image", str(SHAPES), "--max-new-tokens", "2", "--json", "--prompt",
                            "What happens in this picture? Describe it."], capsys)
    assert code == 0
    notes = json.loads(out)["notes"]
    assert len(notes) == 1 and "unknown to this model (happens, Describe)" in notes[0]
