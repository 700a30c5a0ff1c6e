"""Tests of clip.py: parity with OpenAI's reference code on full-size ViT-B/32 and ViT-B/16 checkpoints built in
the official formats, tokenizer parity on HMDB51/UCF101 class names and hard strings, preprocessing against a
hand computation of OpenAI's torchvision transform, and the loader's errors.

The reference is the `openai-clip` package (installed test-only with --no-deps). Our top-level clip.py shadows the
name `clip` and the package's __init__ needs torchvision, so its files are loaded by path as the submodules of a
differently named package, with stand-ins for the modules that only its image transforms and download bar use.
"""
import hashlib
import importlib.metadata
import importlib.util
import re
import sys
import types
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import clip

CLIP_REF = "_openai_clip_reference"

CLIP_HMDB51 = ["brush_hair", "cartwheel", "catch", "chew", "clap", "climb", "climb_stairs", "dive", "draw_sword",
               "dribble", "drink", "eat", "fall_floor", "fencing", "flic_flac", "golf", "handstand", "hit", "hug",
               "jump", "kick", "kick_ball", "kiss", "laugh", "pick", "pour", "pullup", "punch", "push", "pushup",
               "ride_bike", "ride_horse", "run", "shake_hands", "shoot_ball", "shoot_bow", "shoot_gun", "sit", "situp",
               "smile", "smoke", "somersault", "stand", "swing_baseball", "sword", "sword_exercise", "talk", "throw",
               "turn", "walk", "wave"]
CLIP_UCF101 = ["ApplyEyeMakeup", "ApplyLipstick", "Archery", "BabyCrawling", "BalanceBeam", "BandMarching",
               "BaseballPitch", "Basketball", "BasketballDunk", "BenchPress", "Biking", "Billiards", "BlowDryHair",
               "BlowingCandles", "BodyWeightSquats", "Bowling", "BoxingPunchingBag", "BoxingSpeedBag", "BreastStroke",
               "BrushingTeeth", "CleanAndJerk", "CliffDiving", "CricketBowling", "CricketShot", "CuttingInKitchen",
               "Diving", "Drumming", "Fencing", "FieldHockeyPenalty", "FloorGymnastics", "FrisbeeCatch", "FrontCrawl",
               "GolfSwing", "Haircut", "Hammering", "HammerThrow", "HandstandPushups", "HandstandWalking",
               "HeadMassage", "HighJump", "HorseRace", "HorseRiding", "HulaHoop", "IceDancing", "JavelinThrow",
               "JugglingBalls", "JumpingJack", "JumpRope", "Kayaking", "Knitting", "LongJump", "Lunges",
               "MilitaryParade", "Mixing", "MoppingFloor", "Nunchucks", "ParallelBars", "PizzaTossing", "PlayingCello",
               "PlayingDaf", "PlayingDhol", "PlayingFlute", "PlayingGuitar", "PlayingPiano", "PlayingSitar",
               "PlayingTabla", "PlayingViolin", "PoleVault", "PommelHorse", "PullUps", "Punch", "PushUps", "Rafting",
               "RockClimbingIndoor", "RopeClimbing", "Rowing", "SalsaSpin", "ShavingBeard", "Shotput", "SkateBoarding",
               "Skiing", "Skijet", "SkyDiving", "SoccerJuggling", "SoccerPenalty", "StillRings", "SumoWrestling",
               "Surfing", "Swing", "TableTennisShot", "TaiChi", "TennisSwing", "ThrowDiscus", "TrampolineJumping",
               "Typing", "UnevenBars", "VolleyballSpiking", "WalkingWithDog", "WallPushups", "WritingOnBoard", "YoYo"]
CLIP_HARD = ["café naïve résumé Ångström Øresund", "cafÃ© naÃ¯ve â€œquotedâ€\x9d", "😀 jumping 🎉🏀 with 👍🏽 and ❤️",
             "中文动作识别 打篮球", "日本語のテキスト 한국어", "tabs\tand\nnewlines\r\n and  spaces ",
             "HTML &amp; entities &lt;b&gt; &#39;", "don't it's we're I've I'm you'll he'd", "numbers 12345 3.14 1e-5",
             "UPPER lower MiXeD", "<|startoftext|> inside <|endoftext|>", "a" * 120, "ﬁ ligature ｆｕｌｌｗｉｄｔｈ",
             "\u200bzero\u200bwidth", "", "   ", "x", "punctuation!!! ??? ... --- ___"]
CLIP_LONG = ("A person does brush_hair, then 1 2 3 jumps! " * 8)[:300]  # 300 characters, 89 tokens


def clip_words(name):
    """A class folder name as words: 'brush_hair' -> 'brush hair', 'ApplyEyeMakeup' -> 'apply eye makeup'."""
    return " ".join(re.findall(r"[A-Z]?[a-z]+|[A-Z]+(?![a-z])|\d+", name.replace("_", " "))).lower()


# ---------------------------------------------------------------------------------------------------------
# The reference: clip/model.py, clip/simple_tokenizer.py and clip/clip.py of the openai-clip package
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def clip_ref():
    root = Path(importlib.metadata.distribution("openai-clip").locate_file("clip"))
    if CLIP_REF in sys.modules:
        return sys.modules[CLIP_REF]
    transforms = types.ModuleType("torchvision.transforms")  # only clip.py's _transform uses these
    for attr in ("Compose", "Resize", "CenterCrop", "ToTensor", "Normalize"):
        setattr(transforms, attr, object)
    transforms.InterpolationMode = types.SimpleNamespace(BICUBIC="bicubic")
    torchvision = types.ModuleType("torchvision")
    torchvision.transforms = transforms
    tqdm = types.ModuleType("tqdm")
    tqdm.tqdm = object
    import packaging.version
    pkg_resources = types.ModuleType("pkg_resources")  # clip.py takes `packaging` from it
    pkg_resources.packaging = packaging
    stubs = {"torchvision": torchvision, "torchvision.transforms": transforms, "tqdm": tqdm,
             "pkg_resources": pkg_resources}
    saved = {n: sys.modules.get(n) for n in stubs}
    package = types.ModuleType(CLIP_REF)
    package.__path__ = [str(root)]
    sys.modules[CLIP_REF] = package
    sys.modules.update(stubs)
    try:
        for name in ("model", "simple_tokenizer", "clip"):
            spec = importlib.util.spec_from_file_location(f"{CLIP_REF}.{name}", root / f"{name}.py")
            module = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = module
            spec.loader.exec_module(module)
            setattr(package, name, module)
    finally:
        for n, m in saved.items():  # the stand-ins must not leak into other tests
            if m is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = m
    return package


def test_clip_reference_is_openai_code(clip_ref):
    assert clip_ref.model.__file__ != clip.__file__ and Path(clip_ref.model.__file__).parent.name == "clip"
    assert hasattr(clip_ref.model, "ModifiedResNet") and hasattr(clip_ref.clip, "tokenize")


# ---------------------------------------------------------------------------------------------------------
# Full-size checkpoints in the official formats, from perturbed reference models
# ---------------------------------------------------------------------------------------------------------
CLIP_TS_ATTRIBUTES = ("input_resolution", "context_length", "vocab_size")  # ints in the official archives


def clip_perturb(model, seed):
    """Move every parameter off its initial value (LayerNorm gains off 1, biases off 0) with seeded noise."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            std = p.std().item() if p.numel() > 1 else 0.0
            noise = torch.randn(p.shape, generator=g) * (0.5 * std if std > 0 else 0.1)
            before = p.clone()
            p.add_(noise)
            assert not torch.equal(before, p), f"{name} did not move"


@pytest.fixture(scope="module", params=["ViT-B/32", "ViT-B/16"])
def clip_official(request, clip_ref, tmp_path_factory):
    """Checkpoint files of one perturbed full-size reference model in every official form, the reference's
    outputs on fixed inputs, and the reference model itself."""
    arch = request.param
    torch.manual_seed(1 if arch == "ViT-B/32" else 2)
    model = clip_ref.model.CLIP(**clip.ARCHS[arch]).eval()  # fp32 (OpenAI's build_model would make it fp16)
    clip_perturb(model, seed=3 if arch == "ViT-B/32" else 4)
    state_dict = {k: v.clone() for k, v in model.state_dict().items()}
    res = clip.ARCHS[arch]["image_resolution"]
    images = torch.randn(2, 3, res, res, generator=torch.Generator().manual_seed(5))
    texts = clip_ref.clip.tokenize(["a photo of a cat", "This is a video about brush hair.", "",
                                    "word " * 80], truncate=True).long()  # the last fills all 77 positions
    with torch.no_grad():
        expected = {"image": model.encode_image(images), "text": model.encode_text(texts)}
        for key in CLIP_TS_ATTRIBUTES:  # as in the official archives, whose state dicts carry these three
            value = clip.ARCHS[arch][key if key != "input_resolution" else "image_resolution"]
            model.__dict__.pop(key, None)  # a plain int attribute of the reference's CLIP, unused in forward
            model.register_buffer(key, torch.tensor(value))
        archive = torch.jit.trace(model, (images[:1], texts[:1]), check_trace=False)
    d = tmp_path_factory.mktemp(arch.replace("/", "-"))
    files = {"torchscript": d / "archive.pt", "state_dict": d / "state_dict.pt", "wrapped": d / "wrapped.pth",
             "fp16": d / "fp16.pt"}
    torch.jit.save(archive, files["torchscript"])
    del archive
    torch.save(state_dict, files["state_dict"])
    torch.save({"state_dict": {"module." + k: v for k, v in state_dict.items()}, "epoch": 7}, files["wrapped"])
    torch.save({k: v.half() for k, v in state_dict.items()}, files["fp16"])
    yield types.SimpleNamespace(arch=arch, files=files, state_dict=state_dict, images=images, texts=texts,
                                expected=expected, model=model)
    for f in files.values():  # ~2 GB per architecture
        f.unlink()


def clip_rel_err(a, b):
    """Largest per-row relative error ||a - b|| / ||b||."""
    return ((a - b).norm(dim=-1) / b.norm(dim=-1)).max().item()


@pytest.mark.parametrize("form", ["torchscript", "state_dict", "wrapped"])
def test_clip_load_official_formats_parity(clip_official, form, monkeypatch):
    jit_loads = []
    real_jit_load = torch.jit.load
    monkeypatch.setattr(torch.jit, "load", lambda *a, **k: jit_loads.append(a) or real_jit_load(*a, **k))
    model, preprocess = clip.load(str(clip_official.files[form]), device="cpu")
    assert len(jit_loads) == (form == "torchscript"), "a TorchScript archive is read as one, the others not"
    if form == "torchscript":
        assert set(CLIP_TS_ATTRIBUTES) <= set(real_jit_load(str(clip_official.files[form])).state_dict())
    assert preprocess.n_px == model.visual.input_resolution == clip.ARCHS[clip_official.arch]["image_resolution"]
    assert not model.training and model.dtype == torch.float32
    # fp32 file -> bit-exact weights, every tensor, no key left over or added
    ours = model.state_dict()
    assert set(ours) == set(clip_official.state_dict)
    for k, v in clip_official.state_dict.items():
        assert ours[k].dtype == torch.float32 and torch.equal(ours[k], v), k
    with torch.no_grad():
        image = model.encode_image(clip_official.images)
        text = model.encode_text(clip_official.texts)
    assert clip_rel_err(image, clip_official.expected["image"]) < 1e-5
    assert clip_rel_err(text, clip_official.expected["text"]) < 1e-5


def test_clip_load_fp16_state_dict_becomes_fp32(clip_official):
    model, _ = clip.load(str(clip_official.files["fp16"]), device="cpu")
    half = torch.load(clip_official.files["fp16"], weights_only=True)
    ours = model.state_dict()
    assert set(ours) == set(half)
    for k, v in half.items():
        assert v.dtype == torch.float16 and ours[k].dtype == torch.float32 and torch.equal(ours[k], v.float()), k
    if clip_official.arch != "ViT-B/32":
        return
    with torch.no_grad():  # still OpenAI's function, of the fp16-rounded weights
        clip_official.model.load_state_dict({k: v.float() for k, v in half.items()}, strict=False)
        expected = clip_official.model.encode_image(clip_official.images)
        clip_official.model.load_state_dict(clip_official.state_dict, strict=False)
        assert clip_rel_err(model.encode_image(clip_official.images), expected) < 1e-5


@pytest.fixture(scope="module")
def clip_ours(clip_official):
    return clip.build_model(clip_official.state_dict)


def test_clip_truncated_text_tower_equals_full(clip_ours, clip_official):
    ids = clip_official.texts[:3]  # EOT at different positions, none at the last one
    eot_index = ids.argmax(dim=-1)
    x = clip_ours.token_embedding(ids)  # (A, 77, W)
    with torch.no_grad():
        eot_t, words_t = clip_ours.encode_text_embeddings(x, eot_index, return_words=True, truncate=True)
        eot_f, words_f = clip_ours.encode_text_embeddings(x, eot_index, return_words=True, truncate=False)
    n = int(eot_index.max()) + 1
    assert n < 77 and words_t.shape == (3, n, clip_ours.embed_dim) and words_f.shape == (3, 77, clip_ours.embed_dim)
    # equal up to float rounding (SDPA blocks a shorter sequence differently): per-vector relative error
    assert clip_rel_err(eot_t, eot_f) < 1e-5
    assert clip_rel_err(words_t, words_f[:, :n]) < 1e-5
    assert clip_rel_err(words_t[torch.arange(3), eot_index], eot_t) < 1e-6  # the EOT output is the word output there
    assert clip_rel_err(eot_t, clip_official.expected["text"][:3]) < 1e-5
    assert not torch.allclose(words_t[:, 1], words_t[:, 2])  # the words really differ by position


def test_clip_block_matches_reference_and_takes_prompts(clip_ours, clip_official):
    if clip_official.arch != "ViT-B/16":
        pytest.skip("the block is the same in both architectures")
    g = torch.Generator().manual_seed(6)
    block, ref_block = clip_ours.visual.transformer.resblocks[5], clip_official.model.visual.transformer.resblocks[5]
    x = torch.randn(2, 197, 768, generator=g)  # (B, N, D)
    prompts = torch.randn(2, 8, 768, generator=g)  # (B, P, D)
    with torch.no_grad():
        out = block(x)
        expected = ref_block(x.transpose(0, 1)).transpose(0, 1)  # the reference is (N, B, D)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        assert torch.equal(block(x, prompts=None), out)
        with_prompts = block(x, prompts=prompts)
        # TPR Eq. (13)-(14) by hand with the reference's own pieces: prompts join the attention, leave before MLP
        z = torch.cat([x, prompts], dim=1).transpose(0, 1)  # (N + P, B, D)
        z = z + ref_block.attention(ref_block.ln_1(z))
        z = z[:197]  # (N, B, D)
        hand = (z + ref_block.mlp(ref_block.ln_2(z))).transpose(0, 1)
    assert with_prompts.shape == x.shape
    assert (with_prompts - out).abs().max() > 1e-2  # the prompts change the frame tokens
    torch.testing.assert_close(with_prompts, hand, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="causal"):
        clip_ours.transformer.resblocks[0](torch.randn(1, 5, 512), prompts=torch.randn(1, 2, 512))


def test_clip_model_pieces_compose_to_encode_image(clip_ours, clip_official):
    if clip_official.arch != "ViT-B/32":
        pytest.skip("one architecture is enough")
    v = clip_ours.visual
    with torch.no_grad():
        x = v.ln_pre(v.embed(clip_official.images))  # (B, 1 + N, D)
        for block in v.transformer.resblocks:
            x = block(x)
        cls, patches = v.head(x)
        cls2, patches2 = v(clip_official.images, return_tokens=True)
    assert x.shape == (2, 50, 768) and patches.shape == (2, 49, 768)
    assert torch.equal(cls, cls2) and torch.equal(patches, patches2)
    assert clip_rel_err(cls, clip_official.expected["image"]) < 1e-5


# ---------------------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------------------
def test_clip_class_lists_match_assets():
    assert len(CLIP_HMDB51) == len(set(CLIP_HMDB51)) == 51 and len(CLIP_UCF101) == len(set(CLIP_UCF101)) == 101
    assert clip_words("brush_hair") == "brush hair" and clip_words("ApplyEyeMakeup") == "apply eye makeup"
    assert clip_words("YoYo") == "yo yo" and clip_words("HandstandPushups") == "handstand pushups"
    for name, literal in (("hmdb51", CLIP_HMDB51), ("ucf101", CLIP_UCF101)):
        path = Path(clip.__file__).parent / "assets" / "classes" / f"{name}.txt"
        if path.exists():
            assert path.read_text().split() == literal, path


@pytest.mark.parametrize("dataset", ["hmdb51", "ucf101"])
def test_clip_tokenize_class_names_parity(clip_ref, dataset):
    names = CLIP_HMDB51 if dataset == "hmdb51" else CLIP_UCF101
    texts = names + [clip_words(n) for n in names]
    texts += ["This is a video about {}.".format(t) for t in list(texts)]
    ours = clip.tokenize(texts)
    theirs = clip_ref.clip.tokenize(texts)
    assert ours.dtype == torch.long and ours.shape == theirs.shape == (len(texts), 77)
    assert torch.equal(ours, theirs.long())


def test_clip_tokenize_hard_strings_parity(clip_ref):
    for text in CLIP_HARD:
        assert torch.equal(clip.tokenize(text), clip_ref.clip.tokenize(text).long()), repr(text)
    assert torch.equal(clip.tokenize(CLIP_HARD), clip_ref.clip.tokenize(CLIP_HARD).long())
    assert clip.tokenize("").tolist()[0][:3] == [49406, 49407, 0]
    ours = clip._tokenizer if clip._tokenizer is not None else clip.SimpleTokenizer()
    theirs = clip_ref.simple_tokenizer.SimpleTokenizer()
    for text in CLIP_HARD:  # encode and decode, not only the padded ids
        assert ours.encode(text) == theirs.encode(text), repr(text)
        assert ours.decode(ours.encode(text)) == theirs.decode(theirs.encode(text)), repr(text)


def test_clip_tokenize_truncate_and_overlong_error(clip_ref):
    assert len(CLIP_LONG) == 300 and len(clip.SimpleTokenizer().encode(CLIP_LONG)) > 77
    ours, theirs = clip.tokenize(CLIP_LONG, truncate=True), clip_ref.clip.tokenize(CLIP_LONG, truncate=True)
    assert torch.equal(ours, theirs.long()) and ours[0, -1] == 49407 and (ours[0] > 0).all()
    for texts in (CLIP_LONG, [CLIP_HMDB51[0], CLIP_LONG]):
        with pytest.raises(Exception) as e_ours:
            clip.tokenize(texts)
        with pytest.raises(Exception) as e_theirs:
            clip_ref.clip.tokenize(texts)
        assert type(e_ours.value) is type(e_theirs.value) is RuntimeError
        assert "too long" in str(e_ours.value) and "77" in str(e_ours.value)
    for n in (5, 8, 20):  # other context lengths, with and without truncation
        texts = ["This is a video about apply eye makeup.", "a b", ""]
        assert torch.equal(clip.tokenize(texts, context_length=n, truncate=True),
                           clip_ref.clip.tokenize(texts, context_length=n, truncate=True).long())
    with pytest.raises(RuntimeError):
        clip.tokenize("This is a video about apply eye makeup.", context_length=8)
    exact = clip_ref.clip.tokenize("a b c", context_length=5)  # exactly full: no error in either
    assert torch.equal(clip.tokenize("a b c", context_length=5), exact.long())


# ---------------------------------------------------------------------------------------------------------
# Preprocessing: OpenAI's Compose([Resize(n, BICUBIC), CenterCrop(n), to RGB, ToTensor(), Normalize(mean, std)])
# ---------------------------------------------------------------------------------------------------------
def clip_by_hand(image, n, size, left, top):
    """torchvision's semantics with the resize target and crop offsets worked out by hand."""
    resized = image.resize(size, Image.BICUBIC) if size != image.size else image
    rgb = np.asarray(resized.convert("RGB"), dtype=np.float64)[top:top + n, left:left + n] / 255.0  # (n, n, 3)
    out = (rgb - np.array(clip.OPENAI_MEAN)) / np.array(clip.OPENAI_STD)
    return torch.from_numpy(out).permute(2, 0, 1).float()  # (3, n, n)


# (w, h) -> resized (w, h) by torchvision's rule (short side n, long side int(n * long / short)), crop left/top by
# int(round((size - n) / 2)) (Python's round: half to even)
CLIP_PREPROCESS_CASES = [
    ((301, 203), 224, (332, 224), 54, 0),  # landscape: 224 * 301 / 203 = 332.1
    ((203, 301), 224, (224, 332), 0, 54),  # portrait
    ((225, 224), 224, (225, 224), 0, 0),  # no resize; (225 - 224) / 2 = 0.5 rounds to 0
    ((227, 224), 224, (227, 224), 2, 0),  # (227 - 224) / 2 = 1.5 rounds to 2
    ((50, 37), 224, (302, 224), 39, 0),  # upscaled: 224 * 50 / 37 = 302.7
    ((640, 480), 336, (448, 336), 56, 0),  # ViT-L/14@336px
]


@pytest.mark.parametrize("wh,n,size,left,top", CLIP_PREPROCESS_CASES)
def test_clip_preprocess_matches_openai_transform(wh, n, size, left, top):
    rng = np.random.default_rng(wh[0] * 1000 + wh[1])
    image = Image.fromarray(rng.integers(0, 256, (wh[1], wh[0], 3), dtype=np.uint8))
    out = clip.Preprocess(n)(image)
    assert out.shape == (3, n, n) and out.dtype == torch.float32
    torch.testing.assert_close(out, clip_by_hand(image, n, size, left, top), rtol=0, atol=2e-6)


def test_clip_preprocess_modes_and_constant_colour():
    rng = np.random.default_rng(0)
    rgba = Image.fromarray(rng.integers(0, 256, (203, 301, 4), dtype=np.uint8), "RGBA")
    palette = Image.fromarray(rng.integers(0, 256, (203, 301, 3), dtype=np.uint8)).convert("P")
    gray = Image.fromarray(rng.integers(0, 256, (203, 301), dtype=np.uint8), "L")
    for image in (rgba, palette, gray):  # resized in their own mode, converted to RGB after the crop, as OpenAI
        torch.testing.assert_close(clip.Preprocess(224)(image), clip_by_hand(image, 224, (332, 224), 54, 0),
                                   rtol=0, atol=2e-6)
    out = clip.Preprocess(224)(Image.new("RGB", (400, 300), (10, 128, 250)))
    for c, value in enumerate((10, 128, 250)):
        expected = (value / 255 - clip.OPENAI_MEAN[c]) / clip.OPENAI_STD[c]
        assert torch.allclose(out[c], torch.tensor(expected, dtype=torch.float32), rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------
# Loader errors: never random weights
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def clip_tiny_file(tmp_path_factory):
    model = clip.build_random("tiny")
    clip_perturb(model, seed=8)
    path = tmp_path_factory.mktemp("tiny") / "tiny.pt"
    torch.save(model.state_dict(), path)
    return path


def clip_assert_same_weights(model, path):
    state_dict = torch.load(path, weights_only=True)
    assert set(model.state_dict()) == set(state_dict)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state_dict[k]), k


def test_clip_unknown_name_and_missing_file(tmp_path):
    for name in ("ViT-H/14", "vit-b/32", "RN50"):
        with pytest.raises((ValueError, FileNotFoundError)) as e:
            clip.load(name, device="cpu", download_root=str(tmp_path))
        assert name in str(e.value) and all(valid in str(e.value) for valid in clip.available_models())
    with pytest.raises(ValueError, match="unknown CLIP model 'ViT-G'"):
        clip.load("ViT-G", device="cpu")
    missing = tmp_path / "nowhere" / "ViT-B-16.pt"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        clip.load(str(missing), device="cpu")
    assert list(tmp_path.iterdir()) == [], "nothing is downloaded or created"


def clip_registry(tmp_path, clip_tiny_file, sha):
    """A file:// URL in the official shape (.../<sha256>/ViT-B-32.pt) serving the tiny checkpoint."""
    served = tmp_path / "server" / sha / "ViT-B-32.pt"
    served.parent.mkdir(parents=True)
    served.write_bytes(clip_tiny_file.read_bytes())
    return {"ViT-B/32": served.as_uri()}


@pytest.fixture
def clip_urlopen_calls(monkeypatch):
    calls = []
    real = urllib.request.urlopen
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, *a, **k: calls.append(url) or real(url, *a, **k))
    return calls


def test_clip_hash_mismatch_redownloads_once_then_refuses(tmp_path, clip_tiny_file, monkeypatch, clip_urlopen_calls):
    wrong = "0" * 64
    monkeypatch.setattr(clip, "_MODELS", clip_registry(tmp_path, clip_tiny_file, wrong))
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "ViT-B-32.pt").write_bytes(b"stale or corrupted")
    with pytest.warns(UserWarning, match="SHA256"), pytest.raises(RuntimeError, match=wrong):
        clip.load("ViT-B/32", device="cpu", download_root=str(cache))
    assert len(clip_urlopen_calls) == 1
    assert sorted(p.name for p in cache.iterdir()) == ["ViT-B-32.pt"], "no partial download left behind"
    assert (cache / "ViT-B-32.pt").read_bytes() == b"stale or corrupted", "the refused file never replaces it"


def test_clip_download_and_cache_happy_paths(tmp_path, clip_tiny_file, monkeypatch, clip_urlopen_calls):
    sha = hashlib.sha256(clip_tiny_file.read_bytes()).hexdigest()
    monkeypatch.setattr(clip, "_MODELS", clip_registry(tmp_path, clip_tiny_file, sha))
    cache = tmp_path / "cache"
    model, _ = clip.load("ViT-B/32", device="cpu", download_root=str(cache))  # downloads once
    assert len(clip_urlopen_calls) == 1 and (cache / "ViT-B-32.pt").read_bytes() == clip_tiny_file.read_bytes()
    clip_assert_same_weights(model, clip_tiny_file)
    model, _ = clip.load("ViT-B/32", device="cpu", download_root=str(cache))  # cached and matching: no download
    assert len(clip_urlopen_calls) == 1
    clip_assert_same_weights(model, clip_tiny_file)
    (cache / "ViT-B-32.pt").write_bytes(b"truncated")  # a stale cache is fetched again once, then used
    with pytest.warns(UserWarning, match="SHA256"):
        model, _ = clip.load("ViT-B/32", device="cpu", download_root=str(cache))
    assert len(clip_urlopen_calls) == 2
    clip_assert_same_weights(model, clip_tiny_file)


@pytest.mark.parametrize("key", ["transformer.resblocks.1.mlp.c_fc.bias", "ln_final.weight",
                                 "visual.transformer.resblocks.3.attn.in_proj_weight", "logit_scale"])
def test_clip_checkpoint_missing_key_names_it(tmp_path, clip_tiny_file, key):
    state_dict = torch.load(clip_tiny_file, weights_only=True)
    del state_dict[key]
    torch.save(state_dict, tmp_path / "broken.pt")
    with pytest.raises(ValueError, match=re.escape(key)):
        clip.load(str(tmp_path / "broken.pt"), device="cpu")


def test_clip_checkpoint_unexpected_key_or_shape_is_refused(tmp_path, clip_tiny_file):
    state_dict = torch.load(clip_tiny_file, weights_only=True)
    torch.save({**state_dict, "visual.extra_head.weight": torch.zeros(3)}, tmp_path / "extra.pt")
    with pytest.raises(ValueError, match="visual.extra_head.weight"):
        clip.load(str(tmp_path / "extra.pt"), device="cpu")
    bad = dict(state_dict)
    bad["visual.ln_post.bias"] = torch.zeros(7)
    torch.save(bad, tmp_path / "shape.pt")
    with pytest.raises(ValueError, match="visual.ln_post.bias"):
        clip.load(str(tmp_path / "shape.pt"), device="cpu")
    torch.save({**state_dict, "epoch": 3}, tmp_path / "epoch.pt")
    with pytest.raises(ValueError, match="epoch"):
        clip.load(str(tmp_path / "epoch.pt"), device="cpu")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="list"):
        clip.load(str(tmp_path / "list.pt"), device="cpu")
    (tmp_path / "text.pt").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="text.pt"):
        clip.load(str(tmp_path / "text.pt"), device="cpu")


def test_clip_resnet_checkpoint_is_refused(tmp_path, clip_tiny_file):
    state_dict = {k: v for k, v in torch.load(clip_tiny_file, weights_only=True).items() if not k.startswith("visual.")}
    state_dict["visual.layer1.0.conv1.weight"] = torch.zeros(64, 64, 1, 1)
    state_dict["visual.attnpool.positional_embedding"] = torch.zeros(50, 2048)
    torch.save(state_dict, tmp_path / "RN50.pt")
    with pytest.raises(ValueError) as e:
        clip.load(str(tmp_path / "RN50.pt"), device="cpu")
    assert "ResNet" in str(e.value) and all(name in str(e.value) for name in clip.available_models())


def test_clip_build_model_copies_and_random_is_flagged(clip_tiny_file, capsys):
    state_dict = torch.load(clip_tiny_file, weights_only=True)
    model = clip.build_model(state_dict)
    clip_assert_same_weights(model, clip_tiny_file)
    with torch.no_grad():
        model.visual.proj.add_(1.0)
    assert torch.equal(state_dict["visual.proj"], torch.load(clip_tiny_file, weights_only=True)["visual.proj"])
    clip.build_random("tiny")
    assert "RANDOMLY INITIALISED" in capsys.readouterr().err


def test_clip_bench_runs_on_tiny(capsys):
    ips = clip.main(["--bench", "--arch", "tiny", "--batch", "2", "--iters", "1", "--device", "cpu"])["cpu"]
    assert ips["ours"] > 0 and ips["openai"] > 0
    assert "images/s" in capsys.readouterr().out
