"""Tests of the Chinese-CLIP text tower and tokenizer in text_branches.py: parity with the official cn_clip code
(installed test-only with --no-deps) on checkpoints built in both official forms, and the loader's errors."""
import importlib
import logging
import sys
import types

import pytest
import torch

import text_branches as tb

CHINESE_LABELS = ["梳头", "画眼妆", "用相机靠近某物", "从左往右推某物", "打篮球", "骑自行车", "弹吉他", "倒立",
                  "把某物放在某物上面", "假装把某物扔向空中然后接住它"]
MIXED = ["用iPhone 12拍照", "打乒乓球(table tennis)，很开心！", "ViT-B/16模型：准确率95.3%", "Hello世界 2024年",
         "跳舞 #dance @home ~~~", "“引号”与『括号』、顿号……", "ｆｕｌｌｗｉｄｔｈ　全角ＡＢＣ１２３",
         "naïve café résumé Ångström 中文", "tabs\tand\nnewlines\r中", "😀表情符号🎉", "한국어 日本語のかな",
         "", "   ", "\x00\ufffd控制\u200b字符\x07", "unaffable embedding tokenization", "x" * 250 + " 长词"]
OVER_LONG = ["这是一个非常非常长的句子，" * 10, "word " * 80, "混合mixed文本text" * 20]


# ---------------------------------------------------------------------------------------------------------
# The reference: cn_clip's own modules. Its package __init__ imports torchvision (absent here) only for image
# transforms, so a stand-in torchvision.transforms is put in sys.modules while cn_clip imports, then removed.
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cn_clip():
    try:
        return importlib.import_module("cn_clip.clip")
    except ImportError:
        pass
    for name in [n for n in sys.modules if n == "cn_clip" or n.startswith("cn_clip.")]:
        del sys.modules[name]  # drop a half-imported package from the failed attempt
    transforms = types.ModuleType("torchvision.transforms")
    for attr in ("Compose", "ToTensor", "Normalize", "Resize", "InterpolationMode"):
        setattr(transforms, attr, object)
    torchvision = types.ModuleType("torchvision")
    torchvision.transforms = transforms
    saved = {n: sys.modules.get(n) for n in ("torchvision", "torchvision.transforms")}
    sys.modules.update({"torchvision": torchvision, "torchvision.transforms": transforms})
    try:
        return importlib.import_module("cn_clip.clip")
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


@pytest.fixture(scope="module")
def reference(cn_clip):
    """cn_clip's CLIP with the full-size RoBERTa-wwm-ext-base-chinese text tower (embed_dim 512) and a tiny
    ViT (its keys only test skipping), every parameter moved off its initial value."""
    model_module = sys.modules["cn_clip.clip.model"]
    torch.manual_seed(0)
    model = model_module.CLIP(
        embed_dim=512, image_resolution=32, vision_layers=1, vision_width=64, vision_patch_size=16,
        vocab_size=21128, text_attention_probs_dropout_prob=0.1, text_hidden_act="gelu",
        text_hidden_dropout_prob=0.1, text_hidden_size=768, text_initializer_range=0.02,
        text_intermediate_size=3072, text_max_position_embeddings=512, text_num_attention_heads=12,
        text_num_hidden_layers=12, text_type_vocab_size=2)
    with torch.no_grad():
        for p in model.parameters():  # LayerNorm ones/zeros, zero biases and the [PAD] row all move
            p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


def _official_form(model):
    return {"epoch": 1, "step": 10, "name": "random",
            "state_dict": {"module." + k: v.clone() for k, v in model.state_dict().items()}}


def _hf_form(model):
    sd = {}
    for k, v in model.state_dict().items():
        if k.startswith("bert."):
            sd["text_model." + k[len("bert."):]] = v.clone()
        elif k == "text_projection":
            sd["text_projection.weight"] = v.t().clone()  # Linear weight (E, D)
        elif k.startswith("visual."):
            sd["vision_model." + k[len("visual."):]] = v.clone()
    sd["text_model.embeddings.position_ids"] = torch.arange(512)[None]  # persisted by older transformers
    sd["visual_projection.weight"] = torch.randn(512, 64)
    sd["logit_scale"] = torch.tensor(4.6052)
    return sd


@pytest.fixture(scope="module")
def checkpoint_files(reference, tmp_path_factory):
    root = tmp_path_factory.mktemp("chinese_clip")
    official, hf = root / "clip_cn_vit-b-16.pt", root / "pytorch_model.bin"
    torch.save(_official_form(reference), official)
    torch.save(_hf_form(reference), hf)
    return {"official": official, "hf": hf}


@pytest.fixture(scope="module")
def parity_batch(reference):
    """Tokenized label sentences, mixed text and one full-length row, with cn_clip's embeddings of them."""
    ids = tb.tokenize_chinese(CHINESE_LABELS + MIXED[:4] + OVER_LONG[:1])  # (A, 52)
    with torch.no_grad():
        return ids, reference.encode_text(ids)


def _rel_error(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("form", ["official", "hf"])
def test_chinese_encode_text_parity(form, reference, checkpoint_files, parity_batch, caplog):
    caplog.set_level(logging.INFO, logger="text_branches")
    model = tb.load_chinese_clip(str(checkpoint_files[form]))
    assert not model.training and model.text_projection.dtype == torch.float32
    assert len(model.bert.encoder.layer) == 12 and model.text_projection.shape == (768, 512)
    # visual keys + logit_scale (+ position_ids and visual_projection in the HF form) are counted as skipped
    n_visual = sum(k.startswith("visual.") for k in reference.state_dict())
    skipped = n_visual + 1 + (2 if form == "hf" else 0)
    assert f"{skipped} visual / logit_scale / pooler / buffer keys skipped" in caplog.text
    ids, theirs = parity_batch
    with torch.no_grad():
        ours = model(ids)  # forward is encode_text
    assert ours.shape == (len(ids), 512)
    for a, b in zip(ours, theirs):  # every text within 1e-5, not just the batch on average
        assert _rel_error(a, b) <= 1e-5


def test_chinese_fp16_official_file_loads_as_fp32(tmp_path):
    _, ckpt = _small_official_checkpoint()
    ckpt["state_dict"] = {k: v.half() for k, v in ckpt["state_dict"].items()}  # as released
    torch.save(ckpt, tmp_path / "fp16.pt")
    model = tb.load_chinese_clip(str(tmp_path / "fp16.pt"))
    got = model.state_dict()
    for k, v in ckpt["state_dict"].items():
        k = k[len("module."):]
        if k.startswith("bert.") or k == "text_projection":
            assert got[k].dtype == torch.float32 and torch.equal(got[k], v.float()), k


# ---------------------------------------------------------------------------------------------------------
# Tokenizer parity
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("texts", [CHINESE_LABELS, MIXED, OVER_LONG], ids=["labels", "mixed", "over_long"])
def test_chinese_tokenizer_parity(texts, cn_clip):
    ours = tb.tokenize_chinese(texts)
    assert torch.equal(ours, cn_clip.tokenize(texts))
    for text in texts:  # tokens too, so a wrong id mapping cannot hide behind [UNK]
        assert tb._default_tokenizer().tokenize(text) == cn_clip._tokenizer.tokenize(text)


def test_chinese_tokenizer_truncation_and_lengths(cn_clip):
    text = OVER_LONG[0]
    for context_length in (2, 5, 52, 77):
        ours = tb.tokenize_chinese(text, context_length=context_length)
        assert torch.equal(ours, cn_clip.tokenize(text, context_length=context_length))
    full = tb.tokenize_chinese(text)[0]
    assert full[0] == 101 and full[-1] == 102 and (full != 0).all()  # [CLS] 50 tokens [SEP], no padding


def test_chinese_tokenizer_known_ids():
    # Hand-checked against vocab.txt: [CLS]=101, [SEP]=102, 梳=3463, 头=1928.
    t = tb._default_tokenizer()
    assert t.vocab["梳"] == 3463 and t.vocab["头"] == 1928
    assert tb.tokenize_chinese("梳头")[0, :5].tolist() == [101, 3463, 1928, 102, 0]
    assert t.tokenize("Naïve, CAFÉ!") == ["na", "##ive", ",", "cafe", "!"]
    assert t.tokenize("x" * 201) == ["[UNK]"]


# ---------------------------------------------------------------------------------------------------------
# Loader errors: never random weights
# ---------------------------------------------------------------------------------------------------------
def test_chinese_unknown_model_name_lists_valid_ones():
    with pytest.raises(ValueError, match="ViT-B-32.*ViT-B-16.*RN50"):
        tb.load_chinese_clip("ViT-B-32")
    assert tb.available_models() == ["ViT-B-16", "ViT-L-14", "ViT-L-14-336", "ViT-H-14", "RN50"]


def test_chinese_missing_file_names_it(tmp_path):
    missing = tmp_path / "nowhere" / "clip_cn_vit-b-16.pt"
    with pytest.raises(FileNotFoundError, match="nowhere/clip_cn_vit-b-16.pt"):
        tb.load_chinese_clip(str(missing))


def _small_official_checkpoint(layers=2):
    torch.manual_seed(1)
    model = tb.ChineseCLIPText(embed_dim=16, width=768, layers=layers, heads=12, intermediate=32,
                               vocab_size=200, max_positions=60)
    sd = {"module." + k: v for k, v in model.state_dict().items()}
    sd["module.visual.conv1.weight"] = torch.zeros(4, 3, 2, 2)
    sd["module.logit_scale"] = torch.zeros(())
    return model, {"state_dict": sd}


@pytest.mark.parametrize("key", ["module.bert.encoder.layer.1.attention.self.key.bias", "module.text_projection",
                                 "module.bert.embeddings.LayerNorm.weight"])
def test_chinese_missing_key_is_named(key, tmp_path):
    _, ckpt = _small_official_checkpoint()
    del ckpt["state_dict"][key]
    torch.save(ckpt, tmp_path / "bad.pt")
    with pytest.raises(RuntimeError, match=key[len("module."):].replace(".", r"\.")):
        tb.load_chinese_clip(str(tmp_path / "bad.pt"))


def test_chinese_unexpected_key_and_foreign_checkpoint(tmp_path):
    _, ckpt = _small_official_checkpoint()
    ckpt["state_dict"]["module.bert.encoder.layer.0.attention.self.extra"] = torch.zeros(3)
    torch.save(ckpt, tmp_path / "extra.pt")
    with pytest.raises(RuntimeError, match="unexpected keys.*self.extra"):
        tb.load_chinese_clip(str(tmp_path / "extra.pt"))
    torch.save({"state_dict": {"transformer.resblocks.0.ln_1.weight": torch.ones(3)}}, tmp_path / "openai.pt")
    with pytest.raises(ValueError, match="'bert.'.*'text_model.'"):
        tb.load_chinese_clip(str(tmp_path / "openai.pt"))


def test_chinese_small_sizes_read_from_shapes(tmp_path):
    model, ckpt = _small_official_checkpoint(layers=3)
    torch.save(ckpt, tmp_path / "small.pt")
    loaded = tb.load_chinese_clip(str(tmp_path / "small.pt"))
    assert len(loaded.bert.encoder.layer) == 3 and loaded.text_projection.shape == (768, 16)
    ids = torch.tensor([[11, 7, 8, 12, 0, 0]])  # small ids: the vocabularies here are tiny
    assert torch.equal(loaded.encode_text(ids), model.eval().encode_text(ids))
    # a width outside the official configs needs its head count spelled out
    odd = tb.ChineseCLIPText(embed_dim=8, width=96, layers=1, heads=3, intermediate=16, vocab_size=50,
                             max_positions=10)
    torch.save(odd.state_dict(), tmp_path / "odd.pt")
    with pytest.raises(ValueError, match="width 96.*heads="):
        tb.load_chinese_clip(str(tmp_path / "odd.pt"))
    assert torch.equal(tb.load_chinese_clip(str(tmp_path / "odd.pt"), heads=3).encode_text(ids[:, :4]),
                       odd.eval().encode_text(ids[:, :4]))


def test_chinese_download_cache_and_refusal(tmp_path, monkeypatch, capsys):
    # file:// URLs stand in for the network: the registry path, cache, re-download and refusal all run.
    _, ckpt = _small_official_checkpoint()
    good = tmp_path / "served" / "clip_cn_vit-b-16.pt"
    good.parent.mkdir()
    torch.save(ckpt, good)
    cache = tmp_path / "cache"
    monkeypatch.setitem(tb._MODELS, "ViT-B-16", ("RoBERTa-wwm-ext-base-chinese", good.as_uri()))
    assert len(tb.load_chinese_clip("ViT-B-16", download_root=str(cache)).bert.encoder.layer) == 2
    assert (cache / good.name).is_file() and "downloading" in capsys.readouterr().err
    # a corrupt cached file is downloaded again once
    (cache / good.name).write_bytes(b"not a checkpoint")
    tb.load_chinese_clip("ViT-B-16", download_root=str(cache))
    assert torch.load(cache / good.name, weights_only=True).keys() == ckpt.keys()
    # a source that stays bad is refused after the one retry, never replaced by random weights
    bad = tmp_path / "served_bad" / "clip_cn_vit-b-16.pt"
    bad.parent.mkdir()
    bad.write_bytes(b"garbage")
    monkeypatch.setitem(tb._MODELS, "ViT-B-16", ("RoBERTa-wwm-ext-base-chinese", bad.as_uri()))
    with pytest.raises(RuntimeError, match="failed to load twice"):
        tb.load_chinese_clip("ViT-B-16", download_root=str(tmp_path / "cache2"))


def test_chinese_padding_mask_and_autocast():
    torch.manual_seed(2)
    model = tb.ChineseCLIPText(embed_dim=8, width=64, layers=2, heads=4, intermediate=32, vocab_size=50,
                               max_positions=16).eval()
    ids = torch.tensor([[11, 5, 6, 12, 0, 0, 0, 0]])
    with torch.no_grad():
        short = model.encode_text(ids[:, :4])
        padded = model.encode_text(ids)
        assert _rel_error(padded, short) < 1e-6  # [PAD] positions do not leak into [CLS]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model.encode_text(ids)
    assert low.dtype == torch.bfloat16 and _rel_error(low.float(), padded) < 5e-2
