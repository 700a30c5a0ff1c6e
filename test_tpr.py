"""Tests of TPR (Electronics 2024): Eq. (6)-(7), (8)-(11), (12), (13)-(14), (15)-(17), (18), the frozen label
branches, gradient flow, and forward + backward on tiny and on full ViT-B/16 shapes (CPU, fp32)."""
import importlib.util
import math
import sysconfig
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import clip
import text_branches as tb
from prompts import TPR, TPR_PREFIXES, TemporalPrompts, tpr_label_tokens, word_frame_weights
from reparam import BETAS, ReparamEncoder

CLASSES = ["brush hair", "ride bike", "climb stairs"]
CLASSES_ZH = ["梳头", "骑自行车", "爬楼梯"]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return clip.build_random("tiny")


def tiny_chinese(E=64):
    torch.manual_seed(1)
    return tb.ChineseCLIPText(embed_dim=E, width=32, layers=1, heads=2, intermediate=64)


class StandInChinese(nn.Module):
    """Duck-typed Chinese tower: .encode_text(ids (A, N)) -> (A, E)."""

    def __init__(self, E):
        super().__init__()
        self.emb = nn.EmbeddingBag(21128, E, mode="mean")

    def encode_text(self, ids):
        return self.emb(ids)


def tiny_tpr(tiny, T=3, S=2, beta="r2plus1d", chinese=True, **kw):
    D = tiny.visual.conv1.weight.shape[0]
    reparam = ReparamEncoder(beta, D, T, 1 + S + T) if beta else None
    zh = dict(chinese_text=tiny_chinese(), chinese_tokenize=tb.tokenize_chinese) if chinese else {}
    model = TPR(tiny, T=T, S=S, reparam=reparam, **zh, **kw)
    model.set_classes(CLASSES, CLASSES_ZH if chinese else None)
    return model


def hand_weights(frames, words, tau):
    """Eq. (6) with Python loops: frames [T][E], words [N][E] (lists) -> [T]."""
    def cos(a, b):
        return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))
    T, N = len(frames), len(words)
    W = [0.0] * T
    for w in words:
        e = [math.exp(cos(f, w) / tau) for f in frames]
        for t in range(T):
            W[t] += e[t] / sum(e) / N
    return W


def set_features(model, text, words, mask):
    model.register_buffer("text_en", text, persistent=False)
    model.register_buffer("words", words, persistent=False)
    model.register_buffer("word_mask", mask, persistent=False)


# ---------------------------------------------------------------------------------------------------------
# Eq. (6)-(7): word-guided pooling, training and both test forms
# ---------------------------------------------------------------------------------------------------------

def test_tpr_eq6_word_weights_by_hand():
    frames = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]]])  # (B=1, T=3, E=2)
    words = torch.tensor([[[1.0, 0.0], [1.0, 3.0], [9.0, 9.0]]])  # (A=1, N=3, E); the third is padding
    mask = torch.tensor([[True, True, False]])
    W = word_frame_weights(frames, words, mask, tau=0.5)  # (1, 1, 3)
    expect = hand_weights(frames[0].tolist(), words[0, :2].tolist(), 0.5)
    assert torch.allclose(W[0, 0], torch.tensor(expect), atol=1e-6)
    assert abs(W.sum().item() - 1) < 1e-6


def test_tpr_eq7_training_and_test_forms_by_hand(tiny):
    torch.manual_seed(0)
    tau = 0.1
    model = TPR(tiny, T=3, temporal_prompts=False, tau=tau)
    text = torch.randn(2, 4)  # K = 2 classes, E = 4
    words = torch.randn(2, 2, 4)
    mask = torch.tensor([[True, True], [True, False]])
    set_features(model, text, words, mask)
    frames = torch.randn(2, 3, 4)  # (B, T, E)

    def cos(a, b):
        return (F.normalize(a, dim=-1) * F.normalize(b, dim=-1)).sum(-1).item()

    def hand(b, k):
        W = hand_weights(frames[b].tolist(), words[k][mask[k]].tolist(), tau)
        return W, sum(W[t] * frames[b, t] for t in range(3))  # Eq. (7)

    # Training: each video pooled with its ground-truth label's words, scored against the candidates.
    labels, candidates = torch.tensor([1, 0]), torch.tensor([1, 0, 1])
    out = model.head(frames, labels, candidates)
    for b in range(2):
        W, v = hand(b, labels[b].item())
        assert torch.allclose(out["frame_weights"][b], torch.tensor(W), atol=1e-5)
        for a in range(3):
            assert abs(out["logits"]["en"][b, a].item() - cos(v, text[candidates[a]]) / tau) < 1e-4
    # Class-conditional test form: class k is scored with the video pooled by class k's words.
    model.test_words = "class"
    out = model.head(frames)
    for b in range(2):
        scores = [cos(hand(b, k)[1], text[k]) / tau for k in range(2)]
        assert torch.allclose(out["logits"]["en"][b], torch.tensor(scores), atol=1e-4)
        assert torch.allclose(out["frame_weights"][b], torch.tensor(hand(b, max(range(2), key=scores.__getitem__))[0]),
                              atol=1e-5)
    # Top-1 test form: the class nearest to the mean-pooled video picks the words for every class.
    model.test_words = "top1"
    out = model.head(frames)
    for b in range(2):
        top = max(range(2), key=lambda k: cos(frames[b].mean(0), text[k]))
        W, v = hand(b, top)
        assert torch.allclose(out["logits"]["en"][b], torch.tensor([cos(v, text[k]) / tau for k in range(2)]), atol=1e-4)
        assert torch.allclose(out["frame_weights"][b], torch.tensor(W), atol=1e-5)
    # Mean pooling (Eq. 4).
    model.pooling = "mean"
    out = model.head(frames)
    for b in range(2):
        assert torch.allclose(out["logits"]["en"][b],
                              torch.tensor([cos(frames[b].mean(0), text[k]) / tau for k in range(2)]), atol=1e-4)


def test_tpr_label_words_are_the_label_tokens(tiny):
    ids, positions, mask = tpr_label_tokens(["brush hair", "run"], "This is a video about {}.")
    # <sot> this is a video about | brush hair | . <eot>
    assert positions.tolist() == [[6, 7], [6, 0]] and mask.tolist() == [[True, True], [True, False]]
    assert torch.equal(ids[0, 6:8], clip.tokenize("brush hair")[0, 1:3])
    # A label ending in punctuation fuses with the prefix's "." ("sport)."): the fused token is a label word.
    ids, positions, mask = tpr_label_tokens(["hurling (sport)"])
    span = positions[0][mask[0]]
    assert span[0] == 6 and ids[0, 6] == clip.tokenize("hurling")[0, 1] and span[-1] + 1 == ids[0].argmax()
    model = TPR(tiny, T=2, temporal_prompts=False, prefix="a-video-about")
    assert model.prefix == TPR_PREFIXES["a-video-about"] == "a video about {}."
    model.set_classes(CLASSES)
    ids = clip.tokenize([f"a video about {c}." for c in CLASSES])
    with torch.no_grad():
        assert torch.allclose(model.text_en, tiny.encode_text(ids), atol=1e-5)  # eps_T, once per label set
        _, words = tiny.encode_text_embeddings(tiny.token_embedding(ids), ids.argmax(-1), return_words=True,
                                               truncate=False)
    assert torch.allclose(model.words[0, :2], words[0, 4:6], atol=1e-5)  # <sot> a video about | brush hair
    assert model.word_mask[0].tolist() == [True, True] and model.word_mask[2].tolist() == [True, True]
    with pytest.raises(ValueError, match="prefix"):
        TPR(tiny, T=2, temporal_prompts=False, prefix="no slot")


# ---------------------------------------------------------------------------------------------------------
# Eq. (8)-(11): temporal prompts
# ---------------------------------------------------------------------------------------------------------

def test_tpr_eq8_11_temporal_prompts_by_hand():
    torch.manual_seed(0)
    B, T, S, D, L = 2, 3, 2, 4, 2
    tp = TemporalPrompts(D, T, S, L, heads=1)
    layer = 1
    with torch.no_grad():
        tp.cls_proj[layer].weight.copy_(2 * torch.eye(D))
        tp.cls_proj[layer].bias.fill_(1.0)
    cls = torch.randn(B, T, D)
    P = tp(cls, layer)
    assert P.shape == (B, T, 1 + S + T, D)
    x = 2 * cls + 1  # X_cls = P_cls z
    h = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-5)  # LN (1, 0)
    attn = tp.cls_attn[layer]
    Wq, Wk, Wv = attn.in_proj_weight.detach().chunk(3)
    bq, bk, bv = attn.in_proj_bias.detach().chunk(3)
    for b in range(B):
        q, k, v = h[b] @ Wq.T + bq, h[b] @ Wk.T + bk, h[b] @ Wv.T + bv  # (T, D)
        a = torch.softmax(q @ k.T / math.sqrt(D), dim=-1) @ v
        C = a @ attn.out_proj.weight.detach().T + attn.out_proj.bias.detach() + x[b]  # Eq. (8)
        assert torch.allclose(P[b, :, 0], C, atol=1e-5)
        assert torch.equal(P[b, :, 1:1 + S], tp.global_prompts[layer].detach())  # G(l)
        for t in range(T):
            for t2 in range(T):  # Eq. (9): I^[t, t'] = I[t, t'] + X_cls[t']
                assert torch.allclose(P[b, t, 1 + S + t2], tp.interchange_prompts[layer, t, t2] + x[b, t2], atol=1e-6)
    shared = TemporalPrompts(D, T, S, L, heads=1, shared=True)
    assert len(shared.cls_attn) == 1 and shared(cls, 1).shape == (B, T, 1 + S + T, D)


# ---------------------------------------------------------------------------------------------------------
# Eq. (12): R(P) = beta(P) + P, each beta, with and without the residual
# ---------------------------------------------------------------------------------------------------------

def _randomize(module):
    torch.manual_seed(3)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.3)


def _receptive_field(beta, T, P, t0, p0):
    """The (t, p) outputs a change of input (t0, p0) may reach, for each beta's operating shape."""
    near_t = [abs(t - t0) <= 1 for t in range(T)]
    near_p = [abs(p - p0) <= 1 for p in range(P)]
    if beta == "mlp":  # per token
        return [[t == t0 and p == p0 for p in range(P)] for t in range(T)]
    if beta in ("r2plus1d", "c3d"):  # (1, 3) + (3, 1) convs, or one 3 x 3 conv, over (T, P)
        return [[near_t[t] and near_p[p] for p in range(P)] for t in range(T)]
    if beta == "tada":  # alpha_t from two kernel-3 temporal convs of the frames' means scales whole frames
        return [[abs(t - t0) <= 2 for p in range(P)] for t in range(T)]
    if beta == "lstm":  # one bidirectional sequence over T per prompt position
        return [[p == p0 for p in range(P)] for t in range(T)]
    return [[True] * P for _ in range(T)]  # transformer: all T * P tokens


@pytest.mark.parametrize("beta", BETAS)
def test_tpr_eq12_reparam_each_beta(beta):
    B, T, P, D = 2, 7, 5, 16
    torch.manual_seed(0)
    p = torch.randn(B, T, P, D)
    res = ReparamEncoder(beta, D, T, P, residual=True)
    assert torch.equal(res(p), p)  # zero-initialised last layer: P_R = P at the start
    nores = ReparamEncoder(beta, D, T, P, residual=False)
    assert nores(p).abs().sum() > 0  # without the residual beta starts non-zero (it must still learn)
    _randomize(res)
    nores.load_state_dict(res.state_dict())
    assert torch.allclose(res(p), nores(p) + p, atol=1e-6)  # Eq. (12)
    # beta acts on the shape the docs say: perturb one prompt token, see which outputs move.
    t0, p0 = 3, 2
    q = p.clone()
    q[:, t0, p0] += torch.randn(D)  # not a constant: the input LayerNorm would remove it
    moved = (nores(q) - nores(p)).abs().amax(dim=(0, 3)) > 1e-6  # (T, P)
    assert moved.tolist() == _receptive_field(beta, T, P, t0, p0)
    # Without the residual, beta learns from the start: every parameter gets a gradient.
    fresh = ReparamEncoder(beta, D, T, P, residual=False)
    opt = torch.optim.SGD(fresh.parameters(), lr=0.1)
    for _ in range(2):  # TAda's alpha starts at 1 (zero last conv): its first conv learns from step 2
        opt.zero_grad()
        (fresh(p) - p.flip(1)).square().mean().backward()
        opt.step()
    assert all(prm.grad is not None and prm.grad.abs().sum() > 0 for prm in fresh.parameters())
    with pytest.raises(ValueError, match="P=5"):
        res(torch.randn(1, T, P + 1, D))


def test_tpr_reparam_per_layer_and_bad_name():
    enc = ReparamEncoder("mlp", 8, 2, 3, layers=3)
    assert len(enc.betas) == 3
    with pytest.raises(ValueError, match="r2plus1d"):
        ReparamEncoder("gru", 8, 2, 3)


# ---------------------------------------------------------------------------------------------------------
# Eq. (13)-(14): prompts join the frozen attention only
# ---------------------------------------------------------------------------------------------------------

def _reference_clip_model():
    path = Path(sysconfig.get_paths()["purelib"]) / "clip" / "model.py"
    if not path.exists():
        pytest.skip("openai-clip reference (clip/model.py) is not installed")
    spec = importlib.util.spec_from_file_location("openai_clip_model_ref", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tpr_eq13_14_block_without_prompts_is_clips(tiny):
    ref = _reference_clip_model()
    block = tiny.visual.transformer.resblocks[0]
    D = block.ln_1.weight.shape[0]
    ref_block = ref.ResidualAttentionBlock(D, block.attn.n_head)
    ref_block.load_state_dict(block.state_dict(), strict=True)
    x = torch.randn(2, 5, D)
    with torch.no_grad():
        expect = ref_block(x.transpose(0, 1)).transpose(0, 1)  # the reference is (N, B, D)
        assert torch.allclose(block(x), expect, atol=1e-5)
        assert torch.allclose(block(x, None), expect, atol=1e-5)


def test_tpr_eq13_14_prompts_by_hand(tiny):
    block = tiny.visual.transformer.resblocks[1]
    D, H = block.ln_1.weight.shape[0], block.attn.n_head
    torch.manual_seed(0)
    x, p = torch.randn(2, 5, D), torch.randn(2, 3, D)  # (B, N, D) frame tokens, (B, P, D) prompts
    seen = []
    hook = block.mlp.register_forward_hook(lambda m, i, o: seen.append(i[0].shape))
    with torch.no_grad():
        out = block(x, p)
    hook.remove()
    assert out.shape == x.shape and seen == [torch.Size([2, 5, D])]  # prompts gone before the MLP (Eq. 14)

    def ln(m, z):
        return (z - z.mean(-1, keepdim=True)) / torch.sqrt(z.var(-1, unbiased=False, keepdim=True) + m.eps) \
            * m.weight + m.bias

    with torch.no_grad():
        W, bias = block.attn.in_proj_weight, block.attn.in_proj_bias
        zx, zp = ln(block.ln_1, x), ln(block.ln_1, p)
        kv_in = torch.cat([zx, zp], dim=1)  # LN([Z, P_R]) = [LN(Z), LN(P_R)]
        q = zx @ W[:D].T + bias[:D]
        k = kv_in @ W[D:2 * D].T + bias[D:2 * D]
        v = kv_in @ W[2 * D:].T + bias[2 * D:]
        heads = []
        for h in range(H):
            s = slice(h * D // H, (h + 1) * D // H)
            a = torch.softmax(q[..., s] @ k[..., s].transpose(1, 2) / math.sqrt(D // H), dim=-1)
            heads.append(a @ v[..., s])
        z_hat = x + block.attn.out_proj(torch.cat(heads, dim=-1))  # Eq. (13), frame rows only
        fc = block.mlp.c_fc(ln(block.ln_2, z_hat))
        expect = z_hat + block.mlp.c_proj(fc * torch.sigmoid(1.702 * fc))  # Eq. (14)
        assert torch.allclose(out, expect, atol=1e-5)
        assert (out - block(x)).abs().max() > 1e-3  # the prompts changed the frame tokens' attention output


def test_tpr_baseline_mean_pooling_is_frame_wise_clip(tiny):
    model = TPR(tiny, T=2, temporal_prompts=False, pooling="mean")
    assert sum(n for _, n in model.parameter_table()) == 0  # baseline: CLIP frozen, nothing else
    video = torch.randn(2, 2, 3, 32, 32)
    with torch.no_grad():
        frames = model.encode_frames(video)
        assert torch.allclose(frames, tiny.encode_image(video.flatten(0, 1)).view(2, 2, -1), atol=1e-5)
        # Prompts and temporal embedding at their initial values: the frames change (prompts join attention).
        tp = TPR(tiny, T=2, S=2, reparam=ReparamEncoder("r2plus1d", 128, 2, 5))
        assert (tp.encode_frames(video) - frames).abs().max() > 1e-4


# ---------------------------------------------------------------------------------------------------------
# Eq. (15)-(17): multi-positive loss; Eq. (18): fusion
# ---------------------------------------------------------------------------------------------------------

def test_tpr_eq15_17_multi_positive_loss_by_hand():
    logits = torch.tensor([[2.0, 1.0, -1.0], [0.5, 3.0, 0.0], [1.0, -2.0, 4.0]])  # (B, A)
    labels = candidates = torch.tensor([0, 0, 1])  # videos 0 and 1 share a label
    B = A = 3
    l = logits.tolist()
    y = labels.tolist()
    rows = 0.0
    for i in range(B):  # paper's L_T->V: for video i, softmax over the texts, positives = texts of its class
        pos = [a for a in range(A) if y[a] == y[i]]
        z = sum(math.exp(l[i][j]) for j in range(A))
        rows += -sum(math.log(math.exp(l[i][a]) / z) for a in pos) / len(pos) / B
    cols = 0.0
    for a in range(A):  # paper's L_V->T: for text a, softmax over the videos, positives = videos of its class
        pos = [i for i in range(B) if y[i] == y[a]]
        z = sum(math.exp(l[j][a]) for j in range(B))
        cols += -sum(math.log(math.exp(l[i][a]) / z) for i in pos) / len(pos) / A
    loss = tb.multi_positive_contrastive_loss(logits, labels, candidates)
    assert abs(loss.item() - (rows + cols) / 2) < 1e-5
    # Eq. (17): the engine sums the English and Chinese terms.
    total = sum(tb.multi_positive_contrastive_loss(x, labels, candidates) for x in (logits, 2 * logits))
    assert abs(total.item() - loss.item() - tb.multi_positive_contrastive_loss(2 * logits, labels, candidates).item()) < 1e-6
    # A candidate class with no video has no positive: its column is left out.
    wide = torch.cat([logits, torch.tensor([[0.0], [1.0], [2.0]])], dim=1)
    l2 = wide.tolist()
    rows2 = 0.0
    for i in range(B):
        pos = [a for a in range(A) if y[a] == y[i]]
        z = sum(math.exp(v) for v in l2[i])
        rows2 += -sum(math.log(math.exp(l2[i][a]) / z) for a in pos) / len(pos) / B
    got = tb.multi_positive_contrastive_loss(wide, labels, torch.tensor([0, 0, 1, 2]))
    assert abs(got.item() - (rows2 + cols) / 2) < 1e-5
    with pytest.raises(ValueError, match="not among the candidates"):
        tb.multi_positive_contrastive_loss(logits, torch.tensor([0, 0, 5]), candidates)


def test_tpr_eq18_fusion_by_hand(tiny):
    s_en, s_zh = torch.tensor([[0.2, 0.8]]), torch.tensor([[0.6, 0.4]])
    assert torch.allclose(tb.fuse_scores(s_en, s_zh, 0.25), torch.tensor([[0.25 * 0.2 + 0.75 * 0.6, 0.25 * 0.8 + 0.75 * 0.4]]))
    assert torch.equal(tb.fuse_scores(s_en, None), s_en)
    with pytest.raises(ValueError, match="lam"):
        tb.fuse_scores(s_en, s_zh, 1.5)
    model = tiny_tpr(tiny, lam=0.3)
    out = {"logits": {"en": torch.tensor([[1.0, 2.0]]), "zh": torch.tensor([[0.0, -1.0]])}}
    e = [math.exp(1) / (math.exp(1) + math.exp(2)), math.exp(2) / (math.exp(1) + math.exp(2))]
    z = [1 / (1 + math.exp(-1)), math.exp(-1) / (1 + math.exp(-1))]
    assert torch.allclose(model.scores(out), torch.tensor([[0.3 * e[k] + 0.7 * z[k] for k in range(2)]]), atol=1e-6)
    assert torch.allclose(model.scores(out), tb.fuse_scores(out["logits"]["en"].softmax(-1),
                                                            out["logits"]["zh"].softmax(-1), 0.3))


# ---------------------------------------------------------------------------------------------------------
# Whole model: branches, ablation switches, gradient flow, dtypes, full shapes
# ---------------------------------------------------------------------------------------------------------

def test_tpr_ablation_switches(tiny):
    base = TPR(tiny, T=2, temporal_prompts=False)
    tp = TPR(tiny, T=2, S=2)
    tpb = TPR(tiny, T=2, S=2, reparam=ReparamEncoder("r2plus1d", 128, 2, 5))
    full = TPR(tiny, T=2, S=2, reparam=ReparamEncoder("r2plus1d", 128, 2, 5), chinese_text=tiny_chinese(),
               chinese_tokenize=tb.tokenize_chinese)
    assert base.prompts is None and base.temporal_embedding is None and base.loss_keys == ("en",)
    assert tp.prompts is not None and tp.reparam is None and tp.temporal_embedding is not None
    assert tpb.reparam is not None and tpb.loss_keys == ("en",) and full.loss_keys == ("en", "zh")
    with pytest.raises(ValueError, match="temporal_prompts"):
        TPR(tiny, T=2, temporal_prompts=False, reparam=ReparamEncoder("mlp", 128, 2, 5))
    with pytest.raises(ValueError, match="test_words"):
        TPR(tiny, T=2, test_words="all")
    with pytest.raises(ValueError, match="one Chinese label per class"):
        full.set_classes(CLASSES)


def test_tpr_gradient_reaches_trainable_only(tiny):
    model = tiny_tpr(tiny, T=3, S=2, beta="r2plus1d", chinese=True)
    model.train()
    assert not model.clip.training and not model.chinese_text.training and model.prompts.training
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    assert all(n.startswith(("clip.", "chinese_text.")) for n in frozen)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert {n.split(".")[0] for n, _ in trainable} == {"temporal_embedding", "prompts", "reparam"}
    assert sum(p.numel() for _, p in trainable) == sum(n for _, n in model.parameter_table())
    opt = torch.optim.SGD([p for _, p in trainable], lr=0.1)
    video, labels = torch.randn(4, 3, 3, 32, 32), torch.tensor([0, 2, 0, 1])
    for _ in range(2):  # step 1 moves beta's zero-initialised last layer, so step 2 reaches all of beta
        opt.zero_grad()
        out = model(video, labels, labels)
        loss = sum(tb.multi_positive_contrastive_loss(out["logits"][k], labels, labels) for k in model.loss_keys)
        loss.backward()
        opt.step()
    for n, p in trainable:
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, n
    for n, p in model.named_parameters():
        if n in frozen:
            assert p.grad is None and torch.equal(p, frozen[n]), n


def test_tpr_chinese_stand_in_and_candidates(tiny):
    model = TPR(tiny, T=2, S=2, chinese_text=StandInChinese(64), chinese_tokenize=tb.tokenize_chinese)
    model.set_classes(CLASSES, CLASSES_ZH)
    assert model.text_zh.shape == (3, 64)
    video = torch.randn(2, 2, 3, 32, 32)
    with torch.no_grad():
        out = model(video, torch.tensor([1, 0]), torch.tensor([1, 0, 1, 2]))
        assert out["logits"]["zh"].shape == (2, 4)
        assert torch.equal(out["logits"]["zh"][:, 0], out["logits"]["zh"][:, 2])  # repeated candidate
        model.eval()
        ev = model(video)
        assert ev["logits"]["en"].shape == (2, 3) and ev["frame_weights"].shape == (2, 2)
        assert torch.allclose(model.scores(ev).sum(-1), torch.ones(2))
        model.set_classes(CLASSES[:2], CLASSES_ZH[:2])  # a new label set replaces the cached features
        assert model.text_en.shape[0] == model.text_zh.shape[0] == 2 and model(video)["logits"]["en"].shape == (2, 2)


def test_tpr_autocast_bf16_and_checkpointing(tiny):
    model = tiny_tpr(tiny, T=2, S=2, beta="tada", chinese=False)
    video, labels = torch.randn(2, 2, 3, 32, 32), torch.tensor([0, 1])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(video, labels, labels)
    assert torch.isfinite(out["logits"]["en"]).all()
    ref = model(video, labels, labels)["logits"]["en"]
    model.grad_checkpointing = True
    got = model(video, labels, labels)["logits"]["en"]
    got.sum().backward()
    assert torch.allclose(got, ref, atol=1e-4) and model.prompts.global_prompts.grad is not None


def test_tpr_vit_b16_shapes_one_step():
    torch.manual_seed(0)
    base = clip.build_random("ViT-B/16")
    T, S = 2, 8
    model = TPR(base, T=T, S=S, reparam=ReparamEncoder("r2plus1d", 768, T, 1 + S + T),
                chinese_text=StandInChinese(512), chinese_tokenize=tb.tokenize_chinese)
    model.set_classes(CLASSES, CLASSES_ZH)
    model.train()
    labels = torch.tensor([1])
    out = model(torch.randn(1, T, 3, 224, 224), labels, labels)
    loss = sum(tb.multi_positive_contrastive_loss(out["logits"][k], labels, labels) for k in model.loss_keys)
    loss.backward()
    assert out["logits"]["en"].shape == (1, 1) and torch.isfinite(loss)
    assert model.prompts.cls_attn[0].in_proj_weight.grad is not None and model.temporal_embedding.grad is not None
    assert model.prompts.global_prompts.shape == (12, T, S, 768)
