"""Tests of BiEfficient (prompts.py, `# ==== BiEfficient ====`): Eq. (5)-(9) against hand computations on tiny
shapes, the truncated text tower against the 77-position one, gradients, the authors' parameter count, and the
ablation switches. CPU, fp32, random CLIP weights (the behaviour under test does not depend on their values)."""
import math

import pytest
import torch
import torch.nn.functional as F

import clip
from prompts import (BiEfficient, BiEfficientCrossBlock, BiEfficientPostPrompt, BiEfficientPrePrompt,
                     WordGuidedVisualPrompt)

NAMES = ["brush hair", "cartwheel", "catch", "climb stairs", "pick up a very heavy box from the floor"]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return clip.build_random("tiny")  # E = 64, W = 128, D = 128


def _model(clip_model, **kw):
    torch.manual_seed(1)
    kw.setdefault("T", 3)
    kw.setdefault("M", 2)
    model = BiEfficient(clip_model, **kw)
    model.set_classes(NAMES)
    return model


def _video(B=2, T=3, seed=2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, 3, 32, 32, generator=g)


def _randomize(module, seed=3):
    """Non-trivial values everywhere (LayerNorm gains/biases, zero-initialised layers) for hand computations."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=g))
    return module


def _ln(x, ln):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + ln.eps) * ln.weight + ln.bias


def _quick_gelu(x):
    return x * torch.sigmoid(1.702 * x)


def _cross_block_by_hand(blk, x, mem, scaled):
    """x + MHA(LN1(x), LN2(mem)) then + FFN(LN3(.)), written out head by head with explicit softmax."""
    q = _ln(x, blk.ln_1) @ blk.q_proj.weight.T
    m = _ln(mem, blk.ln_2)
    k, v = m @ blk.k_proj.weight.T, m @ blk.v_proj.weight.T
    if blk.q_proj.bias is not None:
        q, k, v = q + blk.q_proj.bias, k + blk.k_proj.bias, v + blk.v_proj.bias
    H, W = blk.heads, x.shape[-1]
    d = W // H
    heads = []
    for h in range(H):
        sl = slice(h * d, (h + 1) * d)
        a = q[..., sl] @ k[..., sl].transpose(-1, -2)
        if scaled:
            a = a / math.sqrt(d)
        heads.append(torch.exp(a - a.amax(-1, keepdim=True)) / torch.exp(a - a.amax(-1, keepdim=True)).sum(-1, keepdim=True)
                     @ v[..., sl])
    o = torch.cat(heads, -1)
    if blk.out_proj is not None:
        o = o @ blk.out_proj.weight.T + blk.out_proj.bias
    y = x + o
    h1 = _quick_gelu(_ln(y, blk.ln_3) @ blk.mlp[0].weight.T + blk.mlp[0].bias)
    return y + h1 @ blk.mlp[2].weight.T + blk.mlp[2].bias


@pytest.mark.parametrize("code", [False, True])
def test_bief_metanet_eq6_by_hand(code):
    """Eq. (6): c_v = Adapter(Attention(v, c_init)); paper: scaled attention, output projection, GELU;
    code: unscaled, no output projection, QuickGELU."""
    torch.manual_seed(0)
    pre = BiEfficientPrePrompt(width=128, mem_width=64, M=3, attn_scale=not code, out_proj=not code,
                               adapter_act="quickgelu" if code else "gelu").double()
    _randomize(pre)
    assert pre.attn.heads == 2 and (pre.attn.out_proj is None) == code
    mem = torch.randn(2, 5, 64, dtype=torch.float64)  # (B, N, E)
    out = pre(mem, None)  # (B, M + 1, W)
    p = _cross_block_by_hand(pre.attn, pre.meta_token.expand(2, 1, -1), mem, scaled=not code)
    hid = p @ pre.adapter.fc1.weight.T + pre.adapter.fc1.bias
    hid = _quick_gelu(hid) if code else 0.5 * hid * (1 + torch.erf(hid / math.sqrt(2)))
    c_v = p + hid @ pre.adapter.fc2.weight.T + pre.adapter.fc2.bias
    assert out.shape == (2, 4, 128)
    torch.testing.assert_close(out[:, :3], pre.ctx.expand(2, -1, -1))
    torch.testing.assert_close(out[:, 3:], c_v, rtol=1e-4, atol=1e-4)  # clip.LayerNorm computes in fp32


def test_bief_metanet_adapter_starts_as_identity():
    pre = BiEfficientPrePrompt(width=128, mem_width=64, M=2)
    x = torch.randn(2, 1, 128)
    torch.testing.assert_close(pre.adapter(x), x)


@pytest.mark.parametrize("heads", [2, 8])
def test_bief_post_prompt_eq7_by_hand(heads):
    """Eq. (7): c-hat = c + alpha * FFN(MHSA(query c, key/value v)), per video, A queries."""
    torch.manual_seed(0)
    post = BiEfficientPostPrompt(width=64, layers=1, heads=heads, alpha_init=0.1).double()
    assert post.resblocks[0].q_proj.bias is None and post.resblocks[0].out_proj is not None
    torch.testing.assert_close(post.alpha, torch.full((64,), 0.1, dtype=torch.float64))  # Table 9 init
    _randomize(post)
    c = torch.randn(2, 4, 64, dtype=torch.float64)  # (B, A, E)
    mem = torch.randn(2, 5, 64, dtype=torch.float64)  # (B, N, E)
    expected = c + post.alpha * _cross_block_by_hand(post.resblocks[0], c, mem, scaled=True)
    torch.testing.assert_close(post(c, mem), expected, rtol=1e-4, atol=1e-4)  # clip.LayerNorm: fp32


@pytest.mark.parametrize("mean_pooling", [True, False])
@pytest.mark.parametrize("tau", [1.0, 0.01])
def test_bief_wgvp_eq8_9_by_hand(mean_pooling, tau):
    """Eq. (8)-(9): cosine of each frame and each word of the top-1 class, softmax over frames, mean over the
    words, v-hat = v-bar + beta * v^T S; the top-1 is argmax_a cos(z_a, v-bar) (Table 8's class embedding)."""
    torch.manual_seed(0)
    B, T, U, L, E = 2, 3, 3, 4, 5
    wg = WordGuidedVisualPrompt(E, beta_init=0.1, tau=tau, mean_pooling=mean_pooling).double()
    torch.testing.assert_close(wg.beta, torch.full((E,), 0.1, dtype=torch.float64))  # Table 10 init
    with torch.no_grad():
        wg.beta.copy_(torch.randn(E))
    frames = torch.randn(B, T, E, dtype=torch.float64)
    classes = torch.randn(B, U, E, dtype=torch.float64)
    words = torch.randn(B, U, L, E, dtype=torch.float64)
    mask = torch.tensor([[0, 1, 1, 0], [0, 1, 0, 0], [0, 1, 1, 1]], dtype=torch.bool)  # name positions
    v_hat, S, top1 = wg(frames, classes, words, mask)
    for b in range(B):
        v = [frames[b, t] / frames[b, t].norm() for t in range(T)]
        v_bar = sum(v) / T
        cos_c = [float(classes[b, u] @ v_bar / (classes[b, u].norm() * v_bar.norm())) for u in range(U)]
        a = max(range(U), key=lambda u: cos_c[u])
        assert int(top1[b]) == a
        idx = [j for j in range(L) if mask[a, j]]
        weights = torch.zeros(T, dtype=torch.float64)
        for j in idx:
            w = words[b, a, j]
            s = torch.stack([v[t] @ w / (v[t].norm() * w.norm()) for t in range(T)])  # Eq. (8)
            weights += torch.exp(s / tau) / torch.exp(s / tau).sum()  # softmax over frames
        weights /= len(idx)  # mean over words
        torch.testing.assert_close(S[b], weights)
        vts = sum(weights[t] * v[t] for t in range(T))
        torch.testing.assert_close(v_hat[b], v_bar + wg.beta * vts if mean_pooling else vts)  # Eq. (9)


def test_bief_wgvp_top1_from_words():
    """Table 8's other source: argmax_a sum_n cos(w_a^n, v-bar) over the class-name words."""
    torch.manual_seed(0)
    wg = WordGuidedVisualPrompt(4, top1_source="word").double()
    frames = torch.randn(3, 2, 4, dtype=torch.float64)
    classes = torch.randn(3, 3, 4, dtype=torch.float64)
    words = torch.randn(3, 3, 5, 4, dtype=torch.float64)
    mask = torch.tensor([[0, 1, 1, 0, 0], [0, 1, 1, 1, 0], [0, 1, 0, 0, 0]], dtype=torch.bool)
    _, _, top1 = wg(frames, classes, words, mask)
    v_bar = F.normalize(frames, dim=-1).mean(1)
    for b in range(3):
        score = [sum(float(F.cosine_similarity(words[b, u, j], v_bar[b], dim=0)) for j in range(5) if mask[u, j])
                 for u in range(3)]
        assert int(top1[b]) == max(range(3), key=lambda u: score[u])


def test_bief_prompt_sequence_eq5(tiny):
    """Eq. (5)-(6): the text tower gets [SOS, c_1..c_M, c_v, class-name tokens, EOT] per (video, class),
    the class names tokenised once in set_classes, only up to the longest real sequence."""
    model = _model(tiny)
    seen = {}
    model.pre.register_forward_hook(lambda m, i, o: seen.__setitem__("prompts", o))
    original = tiny.encode_text_embeddings

    def spy(x, eot_index, **kw):
        seen.update(x=x, eot=eot_index, kw=kw)
        return original(x, eot_index, **kw)
    tiny.encode_text_embeddings = spy
    try:
        cand = torch.tensor([3, 0, 3])
        model(_video(), None, cand)
    finally:
        del tiny.encode_text_embeddings
    x, eot, p = seen["x"], seen["eot"], seen["prompts"]  # (B U, L, W), (B U,), (B, P, W)
    assert seen["kw"]["truncate"] is True and p.shape == (2, 3, 128)
    uniq = [0, 3]
    lengths = [len(clip._tokenizer.encode(NAMES[u])) for u in uniq]
    assert x.shape[1] == 1 + 3 + max(lengths) + 1  # SOS + P + longest name + EOT, not 77
    for b in range(2):
        for i, u in enumerate(uniq):
            ids = clip.tokenize(NAMES[u])[0]
            n = lengths[i]
            row = x[b * 2 + i]
            emb = tiny.token_embedding(ids)
            torch.testing.assert_close(row[0], emb[0])  # SOS
            torch.testing.assert_close(row[1:4], p[b])  # c_1, c_2, c_v
            torch.testing.assert_close(row[4:4 + n + 1], emb[1:n + 2])  # class-name tokens and EOT
            assert int(eot[b * 2 + i]) == 3 + n + 1
            torch.testing.assert_close(row[4 + n + 1:], emb[n + 2:n + 2 + row.shape[0] - (4 + n + 1)])  # padding


def test_bief_truncated_text_tower_equals_77_positions(tiny):
    """The causal text tower run up to the longest sequence gives the 77-position results at EOT and at every
    class-name word position it keeps; and the whole model gives the same logits either way."""
    model = _model(tiny)
    full = _model(tiny, text_truncate=False)
    full.load_state_dict(model.state_dict())
    prompts_ = torch.randn(2, 3, 128)
    uniq = torch.tensor([1, 2, 4])
    c, words, mask = model._text(prompts_, uniq)
    c77, words77, mask77 = full._text(prompts_, uniq)
    L = words.shape[2]
    assert words77.shape[2] == 77 and L < 77
    torch.testing.assert_close(c, c77, rtol=1e-5, atol=1e-5)
    assert mask.sum() > 0 and torch.equal(mask77[:, :L], mask) and not mask77[:, L:].any()
    m = mask[None, :, :, None].expand_as(words)
    torch.testing.assert_close(words[m], words77[:, :, :L][m], rtol=1e-5, atol=1e-5)
    video, cand = _video(), torch.tensor([4, 1, 2, 1])
    torch.testing.assert_close(model(video, None, cand)["logits"]["en"], full(video, None, cand)["logits"]["en"],
                               rtol=1e-4, atol=1e-4)


def _grad_check(model, expect_none=()):
    model.train()
    with torch.no_grad():  # the zero-initialised fc2 would block fc1's gradient at the first step
        model.pre.adapter.fc2.weight.normal_(std=0.1)
    labels = torch.tensor([0, 3])
    cand = torch.tensor([0, 3, 0, 1])
    out = model(_video(), labels, cand)
    loss = out["logits"]["en"].logsumexp(1).sum() - out["logits"]["en"][:, :2].diagonal().sum()
    loss.backward()
    for name, p in model.named_parameters():
        if name.startswith("clip_model."):
            assert not p.requires_grad and p.grad is None, name
        elif any(name.startswith(e) for e in expect_none):
            assert p.grad is None, name
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reaches {name}"


def test_bief_gradient_reaches_every_trainable_parameter_paper(tiny):
    _grad_check(_model(tiny))


def test_bief_gradient_code_compat(tiny):
    """Code-compat: all 77 positions as words, trainable logit_scale; the class-embedding LayerNorm only feeds
    the argmax of the top-1 choice, so (as in the authors' code) no gradient ever reaches it."""
    model = _model(tiny, code_compat=True)
    assert model.words == "all" and isinstance(model.logit_scale, torch.nn.Parameter)
    _grad_check(model, expect_none=("wgvp.ln_class.",))


def test_bief_code_compat_parameter_count():
    """The authors' count for ViT-B/16, T = 8, m = 12: 16,039,553, split as in their module classes."""
    torch.manual_seed(0)
    big = clip.build_random("ViT-B/16")
    table = dict(BiEfficient(big, T=8, code_compat=True).parameter_table())
    assert sum(table.values()) == 16_039_553
    assert table["temporal head (frame position embedding + blocks)"] == 6_308_864
    assert table["Post-Prompt (blocks + alpha)"] == 6_304_256
    assert table["Pre-Prompt (metanet: context tokens + Meta-Net)"] == 3_029_120
    assert table["patch memory projection"] == 393_216
    paper = BiEfficient(big, T=8)
    assert sum(c for _, c in paper.parameter_table()) == 16_302_720  # paper default (3-layer head, M = 16, ...)
    n = sum(p.numel() for p in paper.parameters() if p.requires_grad)
    assert n == 16_302_720 and not any(p.requires_grad for p in big.parameters())


def test_bief_candidates_repeat_and_labels_unused(tiny):
    """Repeated candidates are computed once and expanded; the top-1 class of WGVP is the model's own (the
    labels do not change anything); the logits feed the multi-positive loss of Eq. (10)/TPR Eq. (15)."""
    model = _model(tiny).eval()
    video = _video()
    with torch.no_grad():
        ref = model(video, None, torch.tensor([0, 1, 3]))
        out = model(video, torch.tensor([3, 3]), torch.tensor([3, 0, 3, 1]))
        out2 = model(video, torch.tensor([0, 1]), torch.tensor([3, 0, 3, 1]))
    logits = out["logits"]["en"]
    assert logits.shape == (2, 4) and out["frame_weights"].shape == (2, 3)
    torch.testing.assert_close(logits, ref["logits"]["en"][:, [2, 0, 2, 1]])
    torch.testing.assert_close(logits, out2["logits"]["en"])
    assert set(out["top1"].tolist()) <= {0, 1, 3}
    torch.testing.assert_close(model.scores(out), logits)
    text_branches = pytest.importorskip("text_branches")
    loss_fn = getattr(text_branches, "multi_positive_contrastive_loss", None)
    if loss_fn is None:
        pytest.skip("text_branches.multi_positive_contrastive_loss not written yet")
    model.train()
    labels, cand = torch.tensor([3, 0]), torch.tensor([3, 0, 3, 1])
    loss = loss_fn(model(video, labels, cand)["logits"]["en"], labels, cand)
    loss.backward()
    assert torch.isfinite(loss) and model.post.alpha.grad is not None


def test_bief_eval_all_classes_and_temperature(tiny):
    """Evaluation (candidates None = all K classes); paper logits are cosines / 0.01 in [-100, 100]."""
    model = _model(tiny).eval()
    with torch.no_grad():
        logits = model(_video())["logits"]["en"]
    assert logits.shape == (2, len(NAMES)) and logits.abs().max() <= 100 + 1e-3
    assert float(model.logit_scale.exp()) == pytest.approx(100.0)


@pytest.mark.parametrize("kw", [dict(pre_prompt=False, post_prompt=False, wgvp=False), dict(pre_prompt=False),
                                dict(post_prompt=False), dict(wgvp=False), dict(pre_prompt_design="A2"),
                                dict(pre_prompt_design="A3"), dict(pre_prompt_design="context"),
                                dict(mean_pooling=False, top1_source="word", alpha_init=1.0, beta_init=1.0),
                                dict(grad_checkpointing=True)])
def test_bief_ablations_forward_backward(tiny, kw):
    model = _model(tiny, **kw).train()
    out = model(_video(), torch.tensor([0, 2]), torch.tensor([0, 2]))
    out["logits"]["en"].sum().backward()
    assert torch.isfinite(out["logits"]["en"]).all()
    assert all(p.grad is not None for n, p in model.named_parameters() if n.startswith("head."))
    assert tiny.transformer.grad_checkpointing == kw.get("grad_checkpointing", False)


def test_bief_design_a1_and_bad_values():
    """Table 6's A1 concatenates the visual encoder's output to the context (needs text width == embed dim)."""
    torch.manual_seed(0)
    square = clip.CLIP(embed_dim=64, image_resolution=32, vision_layers=1, vision_width=64, vision_patch_size=16,
                       context_length=77, vocab_size=49408, transformer_width=64, transformer_heads=1,
                       transformer_layers=1).eval()
    model = BiEfficient(square, T=2, M=2, pre_prompt_design="A1")
    model.set_classes(NAMES)
    model(_video(T=2), None, torch.tensor([0, 1]))["logits"]["en"].sum().backward()
    assert model.pre.ctx.grad is not None
    tiny_ = clip.build_random("tiny")
    with pytest.raises(ValueError, match="A1"):
        BiEfficient(tiny_, pre_prompt_design="A1")
    with pytest.raises(ValueError, match="pre_prompt_design"):
        BiEfficient(tiny_, pre_prompt_design="A4")
    with pytest.raises(TypeError, match="unknown"):
        BiEfficient(tiny_, gamma=1)
    model = BiEfficient(tiny_, T=2)
    with pytest.raises(RuntimeError, match="set_classes"):
        model(_video(T=2))
    model.set_classes(NAMES)
    with pytest.raises(ValueError, match="candidates"):
        model(_video(T=2), None, torch.tensor([0, 9]))
    with pytest.raises(ValueError, match="T=2"):
        model(_video(T=3))


def test_bief_frozen_towers_and_optimizer_groups(tiny):
    model = _model(tiny)
    model.train()
    assert model.training and not tiny.training and not tiny.visual.training
    groups = model.optimizer_groups()
    assert model.weight_decay == 0.2 and groups[0]["weight_decay"] == 0.2 and groups[1]["weight_decay"] == 0.0
    decayed = {id(p) for p in groups[0]["params"]}
    assert id(model.post.resblocks[0].q_proj.weight) in decayed
    assert id(model.post.alpha) not in decayed and id(model.pre.ctx) not in decayed
    code = _model(tiny, code_compat=True)
    groups = code.optimizer_groups()
    assert code.weight_decay == 0.05 and not groups[1]["params"]  # the code decays every parameter
    n = sum(p.numel() for p in code.parameters() if p.requires_grad)
    assert sum(p.numel() for g in groups for p in g["params"]) == n


def test_bief_autocast_bf16(tiny):
    model = _model(tiny).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(_video(), torch.tensor([0, 2]), torch.tensor([0, 2]))
    out["logits"]["en"].float().sum().backward()
    assert torch.isfinite(out["logits"]["en"].float()).all() and model.post.alpha.grad is not None
