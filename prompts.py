"""Prompt modules of both papers on a frozen CLIP: TPR's section first, then BiEfficient's.

Needs torch and clip.py, which reads assets/bpe_simple_vocab_16e6.txt.gz (copy both beside this file). TPR's
beta is a module passed in (reparam.ReparamEncoder: copy reparam.py too); its Chinese tower and tokenizer are
passed in (text_branches.py). Every equation tag names its paper: `TPR Eq. (8)` is TPR's (Electronics 2024),
`BiEfficient Eq. (8)` BiEfficient's (ACCV 2024); the two number their equations independently.

TPR (Sec. 3.1-3.5): temporal embedding (TPR Eq. (1)), temporal prompts C, G, I (TPR Eq. (8)-(11)) re-encoded
by beta (TPR Eq. (12), reparam.py), the prompts joining the frozen attention (TPR Eq. (13)-(14), in
clip.ResidualAttentionBlock, TPR Eq. (2)), F_t (TPR Eq. (3)), word-guided pooling (TPR Eq. (6)-(7)) or mean
pooling (TPR Eq. (4)), the frozen English and Chinese label features and the fused score (TPR Eq. (18)). The loss
(TPR Eq. (15)-(17)) is text_branches.multi_positive_contrastive_loss. No public code exists: every decision the
paper leaves open is marked `# Choice:`, every deviation `# Paper:`.
BiEfficient (Sec. 3): Pre-Prompt with Meta-Net (BiEfficient Eq. (5)-(6)), Post-Prompt (BiEfficient Eq. (7)),
Word-Guided Visual Prompt (BiEfficient Eq. (8)-(9)), the logits of BiEfficient Eq. (10); the paper by default,
the authors' code with code_compat=True (BIEFFICIENT_DEFAULTS lists every difference).
"""
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import clip

# ==== TPR ====
# Shapes: B videos, T frames, N patch tokens (TPR Eq. (6)-(7): N label words), D vision width, W text width, E joint
# embed dim, L layers, S global prompts per frame, P = 1 + S + T prompt tokens per frame, K classes, U unique
# candidates, A candidates.

# Table 5's hand-crafted prefixes, selectable by name (or pass any format string with one "{}").
TPR_PREFIXES = {
    "this-is-a-video-about": "This is a video about {}.",  # the paper's default
    "a-video-about": "a video about {}.",
    "the-video-is-about": "the video is about {}.",
}
TPR_POOLINGS = ("word", "mean")
TPR_TEST_WORDS = ("class", "top1")
TPR_FUSIONS = ("prob", "cosine")
# Choice: lambda = 0.5 (the paper gives no value): TPR Eq. (17)-(18) weigh the two branches equally.
TPR_LAMBDA = 0.5


def word_frame_weights(frames, words, mask, tau=0.01):
    """TPR Eq. (6): W_t = 1/N sum_n softmax_t(F_t . w_n / tau), for every video and every class's words.

    TPR Eq. (6)-(7) are BIKE's Video Concept Spotting (Wu et al., "Bidirectional Cross-Modal Knowledge
    Exploration for Video Recognition with Pre-trained Vision-Language Models", CVPR 2023), where each word
    weights the frames and the frame weights are averaged over the words.
    frames (B, T, E) frame features F_t; words (A, N, E) word embeddings w_n; mask (A, N) real words.
    Returns W (B, A, T), summing to 1 over T.
    """
    # Choice: F_t and w_n are L2-normalised (their dot product is the cosine of TPR Eq. (5)); with raw CLIP
    # features and tau = 0.01 the softmax would be a hard argmax on feature norms.
    f = F.normalize(frames.float(), dim=-1)  # (B, T, E)
    w = F.normalize(words.float(), dim=-1)  # (A, N, E)
    sim = torch.einsum("bte,ane->bant", f, w) / tau  # (B, A, N, T)
    prob = sim.softmax(dim=-1)  # softmax over the T frames, per word; TPR Eq. (6)
    m = mask.to(prob.dtype)[None, :, :, None]  # (1, A, N, 1)
    return (prob * m).sum(dim=2) / m.sum(dim=2)  # mean over the label's N words; (B, A, T)


class TemporalPrompts(nn.Module):
    """TPR Eq. (8)-(11): the temporal prompts P (B, T, 1 + S + T, D) of layer l from Z^(l-1)'s class tokens.

    X_cls = P_cls z_{t,0}                      (TPR Eq. (8), linear projection of each frame's class token)
    C = MHSA(LN(X_cls)) + X_cls                (TPR Eq. (8), across the T frames of a video)
    G(l) in R^{T x S x D}                      global prompts
    I^(l)[t, t'] = I(l)[t, t'] + X_cls[t']     (TPR Eq. (9): every frame sees every frame's class token)
    P[t] = [C_t, G_t, I^_t]                    (TPR Eq. (10); written P = [C, G, I^] in TPR Eq. (11))

    D: vision width. T: frames. S: global prompts per frame. L: layers. heads: of the MHSA.
    shared: one P_cls / LN / MHSA for all layers instead of one per layer (G and I stay per layer).
    """

    def __init__(self, D: int, T: int, S: int, L: int, heads: int, shared: bool = False):
        super().__init__()
        # Choice: P_cls, LN and MHSA are per layer by default (TPR Eq. (8) indexes them by l, as X-CLIP's
        # per-layer cross-frame attention); `shared=True` is the cheap alternative (1/L of their parameters).
        n = 1 if shared else L
        self.shared, self.T, self.S = shared, T, S
        self.cls_proj = nn.ModuleList([nn.Linear(D, D) for _ in range(n)])  # P_cls
        self.cls_ln = nn.ModuleList([nn.LayerNorm(D) for _ in range(n)])
        self.cls_attn = nn.ModuleList([nn.MultiheadAttention(D, heads, batch_first=True) for _ in range(n)])
        # Choice: prompts drawn from N(0, 0.02^2) ("randomly initialized" in the paper; the scale is ViT's
        # token init); they reach the frozen attention through its own ln_1, so their scale is free.
        self.global_prompts = nn.Parameter(torch.randn(L, T, S, D) * 0.02)  # G(l)
        self.interchange_prompts = nn.Parameter(torch.randn(L, T, T, D) * 0.02)  # I(l)

    def forward(self, cls, layer: int):  # cls (B, T, D): class tokens of Z^(l-1)
        j = 0 if self.shared else layer
        B, T, D = cls.shape
        cls = cls.to(self.cls_proj[j].weight.dtype)
        x = self.cls_proj[j](cls)  # X_cls; TPR Eq. (8); (B, T, D)
        h = self.cls_ln[j](x)
        c = self.cls_attn[j](h, h, h, need_weights=False)[0] + x  # C; TPR Eq. (8); (B, T, D)
        g = self.global_prompts[layer].to(c.dtype).expand(B, T, self.S, D)  # G; (B, T, S, D)
        i_hat = self.interchange_prompts[layer] + x[:, None, :, :]  # I^; TPR Eq. (9); (B, T, T, D)
        return torch.cat([c[:, :, None], g, i_hat.to(c.dtype)], dim=2)  # P; TPR Eq. (10)-(11); (B, T, P, D)


class TPR(nn.Module):
    """TPR: frozen CLIP with temporal prompts (+ beta) and English/Chinese label supervision.

    clip_model: a clip.CLIP; frozen here. T: frames per video. S: global prompts per frame (Fig. 5c).
    reparam: a reparam.ReparamEncoder(beta, D, T, 1 + S + T) or None (no beta: Fig. 5a's "+TP" row).
    temporal_prompts: TPR Eq. (8)-(11) prompts in every layer (False: Fig. 5a's "baseline").
    pooling: "word" (TPR Eq. (6)-(7)) or "mean" (TPR Eq. (4): Fig. 5a's CLIP row).
    test_words: whose words weight the frames when a candidate is scored, in training and at test time:
        "class" (its own words) or "top1" (those of the class nearest to the mean-pooled video).
    prefix: English prompt template with one "{}", or a name in TPR_PREFIXES (Table 5).
    chinese_text, chinese_tokenize: frozen Chinese tower with .encode_text(ids) -> (A, E) and its tokenizer
        (text_branches.ChineseCLIPText / tokenize_chinese); None = no Chinese branch.
    lam: lambda of TPR Eq. (18). tau: temperature of TPR Eq. (6), (15) and (16).
    fusion: what S of TPR Eq. (18) is: "prob" (softmax over the candidates) or "cosine".
    temporal_embedding: TPR Eq. (1)'s e_temporal; None = on, except for frame-wise CLIP (temporal_prompts=False
        with pooling="mean", Fig. 5a's CLIP row).
    temporal_embedding_site: "pre_ln" (added with e_spatial, before ln_pre) or "post_ln".
    share_cls_attention: one P_cls/MHSA for all layers (TemporalPrompts(shared=True)).
    """

    def __init__(self, clip_model, T: int = 8, S: int = 8, reparam: nn.Module | None = None,
                 temporal_prompts: bool = True, pooling: str = "word", test_words: str = "class",
                 prefix: str = "This is a video about {}.", chinese_text: nn.Module | None = None,
                 chinese_tokenize=None, lam: float = TPR_LAMBDA, tau: float = 0.01, fusion: str = "prob",
                 temporal_embedding: bool | None = None, temporal_embedding_site: str = "pre_ln",
                 share_cls_attention: bool = False):
        super().__init__()
        self.prefix = check_tpr_arguments(pooling, test_words, fusion, temporal_embedding_site, lam, prefix,
                                          reparam, temporal_prompts, chinese_text, chinese_tokenize)
        self.clip, self.chinese_text, self.chinese_tokenize = clip_model, chinese_text, chinese_tokenize
        for frozen in (clip_model, chinese_text):
            if frozen is not None:
                frozen.requires_grad_(False).eval()
        visual = clip_model.visual
        D = visual.conv1.weight.shape[0]
        L = len(visual.transformer.resblocks)
        self.T, self.S, self.pooling, self.test_words = T, S, pooling, test_words
        self.lam, self.tau, self.fusion = lam, tau, fusion
        # Paper: Sec. 4.1.3 names no trainable part of the "baseline" (CLIP + word-guided pooling, no temporal
        # prompts, no Chinese branch), yet Table 7's baseline improves with K (HMDB 49.6 -> 60.3), so something
        # in it trains; the only candidate its equations offer is TPR Eq. (1)'s e_temporal (Sec. 3.1, shared by
        # every model of the paper). It is on for every model except frame-wise CLIP itself (no temporal
        # prompts and mean pooling: Fig. 5a's "CLIP" row, "the original CLIP model", nothing to train).
        if temporal_embedding is None:
            temporal_embedding = temporal_prompts or pooling != "mean"
        # Choice: zero-initialised, so the model starts as frame-wise CLIP; added where CLIP adds e_spatial
        # (before ln_pre), as TPR Eq. (1) sums them together.
        self.temporal_embedding = nn.Parameter(torch.zeros(T, D)) if temporal_embedding else None
        self.temporal_embedding_site = temporal_embedding_site
        # Choice: D // 64 heads in TPR Eq. (8)'s MHSA (64-wide heads, as CLIP's own blocks: 12 for ViT-B); the
        # paper gives no head count.
        self.prompts = (TemporalPrompts(D, T, S, L, heads=max(D // 64, 1), shared=share_cls_attention)
                        if temporal_prompts else None)
        self.reparam = reparam
        self.grad_checkpointing = False  # or clip_model.visual.transformer.grad_checkpointing
        self.loss_keys = ("en", "zh") if chinese_text is not None else ("en",)

    @torch.no_grad()
    def set_classes(self, names_en, names_zh=None):
        """Cache the frozen English features eps_T (K, E), the label words w_n (K, N, E) with mask (K, N), and
        the Chinese features eps_C (K, E): computed once per label set."""
        if self.chinese_text is not None and (names_zh is None or len(names_zh) != len(names_en)):
            raise ValueError(f"the Chinese branch needs one Chinese label per class: got "
                             f"{None if names_zh is None else len(names_zh)} for {len(names_en)} classes")
        device = self.clip.token_embedding.weight.device
        ids, positions, mask = tpr_label_tokens(list(names_en), self.prefix)  # w_n: the label's own tokens
        ids = ids.to(device)
        x = self.clip.token_embedding(ids).type(self.clip.dtype)  # (K, 77, W)
        eot, words = self.clip.encode_text_embeddings(x, ids.argmax(dim=-1), return_words=True)
        E = eot.shape[-1]
        words = words.gather(1, positions.to(device)[..., None].expand(-1, -1, E))  # (K, N, E)
        self.register_buffer("text_en", eot.float(), persistent=False)  # eps_T (K, E)
        self.register_buffer("words", words.float(), persistent=False)  # w_n (K, N, E)
        self.register_buffer("word_mask", mask.to(device), persistent=False)  # (K, N)
        if self.chinese_text is not None:
            zh_device = next(self.chinese_text.parameters()).device
            ids_zh = self.chinese_tokenize(list(names_zh)).to(zh_device)  # (K, N_zh)
            self.register_buffer("text_zh", self.chinese_text.encode_text(ids_zh).float().to(device),
                                 persistent=False)  # eps_C (K, E)

    def encode_frames(self, video):
        """Video (B, T, 3, H, W) -> frame features F (B, T, E) (TPR Eq. (1), (8)-(14), (3))."""
        if video.dim() != 5 or video.shape[1] != self.T:
            raise ValueError(f"video of shape {tuple(video.shape)}; expected (B, T={self.T}, 3, H, W)")
        visual = self.clip.visual
        B, T = video.shape[:2]
        x = visual.embed(video.flatten(0, 1))  # patches + class token + e_spatial; (B * T, 1 + N, D)
        D = x.shape[-1]
        if self.temporal_embedding is not None and self.temporal_embedding_site == "pre_ln":
            x = (x.view(B, T, -1, D) + self.temporal_embedding.to(x.dtype)[:, None]).flatten(0, 1)  # TPR Eq. (1)
        x = visual.ln_pre(x)  # (B * T, 1 + N, D)
        if self.temporal_embedding is not None and self.temporal_embedding_site == "post_ln":
            x = (x.view(B, T, -1, D) + self.temporal_embedding.to(x.dtype)[:, None]).flatten(0, 1)  # TPR Eq. (1)
        for layer, block in enumerate(visual.transformer.resblocks):
            prompts = None
            if self.prompts is not None:
                p = self.prompts(x[:, 0].view(B, T, D), layer)  # TPR Eq. (8)-(11) from Z^(l-1); (B, T, P, D)
                if self.reparam is not None:
                    p = self.reparam(p, layer)  # P_R; TPR Eq. (12); (B, T, P, D)
                prompts = p.flatten(0, 1).to(x.dtype)  # frame t's own P_R[t]; (B * T, P, D)
            # TPR Eq. (2), with the prompts joining the attention (TPR Eq. (13)) and dropped after it (TPR Eq. (14))
            x = self._run_block(block, x, prompts)  # (B * T, 1 + N, D)
        frames = visual.ln_post(x[:, 0]) @ visual.proj  # F_t; TPR Eq. (3); (B * T, E)
        return frames.view(B, T, -1)  # (B, T, E)

    def _cosine_logits(self, video, text):
        """Cosine similarity (TPR Eq. (5)) / tau: video (B, E) or (B, U, E) (one per class), text (U, E) -> (B, U)."""
        v = F.normalize(video.float(), dim=-1)
        t = F.normalize(text.float(), dim=-1)  # (U, E)
        if v.dim() == 2:
            return v @ t.t() / self.tau  # (B, U)
        return (v * t[None]).sum(dim=-1) / self.tau  # class-conditional: (B, U)

    def head(self, frames, labels=None, candidates=None):
        """Frame features (B, T, E) -> {"logits": {"en": (B, A), "zh": (B, A)}, "frame_weights": (B, T)}.

        candidates (A,): class indices to score (default: all K). labels: unused; training scores every
        candidate by the same rule as test time (see the README's choices: pooling by the label's own words
        leaks it)."""
        texts, uniq, inverse = self._candidate_texts(candidates, frames.device)  # {"en", "zh"}: (U, E) each
        B, T, _ = frames.shape
        frames = frames.float()
        if self.pooling == "mean":
            weights = frames.new_full((B, T), 1.0 / T)
            video = frames.mean(dim=1)  # TPR Eq. (4); (B, E)
        else:
            w_all = word_frame_weights(frames, self.words[uniq], self.word_mask[uniq], self.tau)  # (B, U, T)
            # Choice: test_words="class" by default: TPR Eq. (6)-(7) make eps_V a function of the label it is
            # compared with, so each class is scored with the video pooled by its own words; no first-pass guess
            # whose errors would compound. "top1" is BiEfficient's rule (one pooled video per clip).
            if self.test_words == "class":
                video = torch.einsum("but,bte->bue", w_all, frames)  # TPR Eq. (7) per class; (B, U, E)
            else:  # top1: the class nearest to the mean-pooled video picks the words
                top = self._cosine_logits(frames.mean(dim=1), texts["en"]).argmax(dim=-1)  # (B,)
                weights = w_all[torch.arange(B, device=frames.device), top]  # (B, T)
                video = torch.einsum("bt,bte->be", weights, frames)  # TPR Eq. (7); (B, E)
        logits = {key: self._cosine_logits(video, text)[:, inverse] for key, text in texts.items()}  # (B, A)
        if video.dim() == 3:  # class-conditional: report the weights of the best-scoring class
            best = logits["en"].argmax(dim=-1)  # (B,) into A
            weights = w_all[torch.arange(B, device=frames.device), inverse[best]]  # (B, T)
        return {"logits": logits, "frame_weights": weights}

    def forward(self, video, labels=None, candidates=None):
        return self.head(self.encode_frames(video), labels, candidates)

    def scores(self, out, fusion=None):
        """TPR Eq. (18): S = lambda * S_VT + (1 - lambda) * S_VC; fusion (default self.fusion): S a softmax
        probability over the candidates ("prob") or the cosine of TPR Eq. (5) ("cosine"). (B, A)."""
        # Paper: TPR Eq. (18) fuses S_V<->T and S_V<->C, which TPR Eq. (5) defines as cosine similarities
        # ("cosine"). We default to the softmax probabilities over the candidates ("prob"), a deviation:
        # Chinese-CLIP's and CLIP's cosines live on different scales (each tower has its own spread), the
        # probabilities share [0, 1], and they are what the multi-view average of Sec. 4.1.1 averages.
        # evaluate.py reports top-1 for both (train.evaluate's top1_by_fusion).
        fusion = fusion or self.fusion
        if fusion not in TPR_FUSIONS:
            raise ValueError(f"fusion={fusion!r}; valid: {', '.join(TPR_FUSIONS)}")
        s = {k: (v.float().softmax(dim=-1) if fusion == "prob" else v.float() * self.tau)  # cosine: logits * tau
             for k, v in out["logits"].items()}
        if "zh" not in s:
            return s["en"]
        return self.lam * s["en"] + (1 - self.lam) * s["zh"]  # TPR Eq. (18)

    # -- below the paper: frozen towers in eval mode, candidates de-duplicated, checkpointing, parameters ------
    def train(self, mode: bool = True):
        super().train(mode)
        self.clip.eval()
        if self.chinese_text is not None:
            self.chinese_text.eval()
        return self

    def _candidate_texts(self, candidates, device):
        """The cached label features of the unique candidates: candidates repeat (the global batch's labels),
        so the heads compute on the U unique classes and expand with `inverse` (A,) at the end."""
        if not hasattr(self, "text_en"):
            raise RuntimeError("call set_classes(names_en, names_zh) before the forward pass")
        if candidates is None:
            candidates = torch.arange(self.text_en.shape[0], device=device)
        uniq, inverse = torch.unique(candidates, return_inverse=True)  # (U,), (A,)
        texts = {"en": self.text_en[uniq]}  # (U, E)
        if self.chinese_text is not None:
            texts["zh"] = self.text_zh[uniq]
        return texts, uniq, inverse

    def _run_block(self, block, x, prompts):
        """One frozen block; recomputed in backward instead of stored under gradient checkpointing."""
        mode = self.grad_checkpointing or self.clip.visual.transformer.grad_checkpointing  # False, True, "selective"
        if mode and torch.is_grad_enabled():
            return checkpoint(block, x, prompts, **clip.checkpoint_options(mode))
        return block(x, prompts)

    def parameter_table(self):
        """Trainable parameters per component: list of (name, count)."""
        def count(module):
            return sum(p.numel() for p in module.parameters() if p.requires_grad) if module is not None else 0
        rows = [("temporal embedding e_temporal (TPR Eq. (1))",
                 self.temporal_embedding.numel() if self.temporal_embedding is not None else 0)]
        if self.prompts is not None:
            rows += [("P_cls (TPR Eq. (8))", count(self.prompts.cls_proj)),
                     ("LN + MHSA (TPR Eq. (8))", count(self.prompts.cls_ln) + count(self.prompts.cls_attn)),
                     ("global prompts G (TPR Eq. (10))", self.prompts.global_prompts.numel()),
                     ("interchange prompts I (TPR Eq. (9))", self.prompts.interchange_prompts.numel())]
        rows.append(("reparameterization encoder beta (TPR Eq. (12))", count(self.reparam)))
        return rows


# ---- TPR below the paper: argument checks, the label's tokens in the prompt sentence ----

def check_tpr_arguments(pooling, test_words, fusion, site, lam, prefix, reparam, temporal_prompts, chinese_text,
                        chinese_tokenize):
    """TPR(...)'s argument checks: a bad value raises ValueError naming it and the valid ones. Returns the prefix
    template (a name in TPR_PREFIXES resolved)."""
    for name, value, valid in [("pooling", pooling, TPR_POOLINGS), ("test_words", test_words, TPR_TEST_WORDS),
                               ("fusion", fusion, TPR_FUSIONS),
                               ("temporal_embedding_site", site, ("pre_ln", "post_ln"))]:
        if value not in valid:
            raise ValueError(f"{name}={value!r}; valid: {', '.join(valid)}")
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam={lam} must lie in [0, 1] (TPR Eq. (18))")
    if reparam is not None and not temporal_prompts:
        raise ValueError("reparam (beta) re-encodes the temporal prompts: it needs temporal_prompts=True")
    if (chinese_text is None) != (chinese_tokenize is None):
        raise ValueError("give both chinese_text and chinese_tokenize, or neither (no Chinese branch)")
    template = TPR_PREFIXES.get(prefix, prefix)
    if template.count("{}") != 1:
        raise ValueError(f"prefix {prefix!r} is neither a name in {list(TPR_PREFIXES)} nor a template with one "
                         f"'{{}}'")
    return template


def tpr_label_tokens(names, prefix="This is a video about {}.", context_length=77):
    """Tokenize prefix.format(name) for each class and locate the name's own tokens in the sentence.

    Returns ids (K, context_length), positions (K, N) of the label's tokens (padded with 0) and mask (K, N)
    (True at real label tokens), N = the longest label in tokens.
    """
    if prefix.count("{}") != 1:
        raise ValueError(f"prefix {prefix!r} must contain exactly one '{{}}' for the label")
    head, tail = (part.strip() for part in prefix.split("{}"))

    def tokens(text):  # BPE ids of text without <sot>/<eot>
        row = clip.tokenize(text, context_length)[0]
        return row[1: int((row > 0).sum()) - 1] if text else row[:0]

    head_ids, tail_ids = tokens(head), tokens(tail)
    ids = clip.tokenize([prefix.format(name) for name in names], context_length)  # (K, 77)
    spans = []
    for k, name in enumerate(names):
        sentence = ids[k, 1: int(ids[k].argmax())]  # between <sot> and <eot>
        body = sentence[len(head_ids):]  # the label, then the tail
        # The BPE splits the text into words (and runs of punctuation) before merging, so the head and the tail
        # keep their own tokens. Choice: when the label's last punctuation fuses with the tail's
        # ("hurling (sport)." -> ... "sport", ")."), the fused token counts as a label word.
        n_tail = len(tail_ids) if len(body) > len(tail_ids) and torch.equal(body[len(body) - len(tail_ids):], tail_ids) else 0
        if not torch.equal(sentence[: len(head_ids)], head_ids) or len(body) - n_tail <= 0:
            raise ValueError(f"cannot locate class name {name!r} inside prefix {prefix!r} after tokenization")
        start = 1 + len(head_ids)  # after <|startoftext|> and the prefix head
        # Choice: TPR Eq. (6)'s N words are the label's BPE tokens: a word split into pieces counts once per
        # piece, punctuation counts ("handstand pushups" is 5 tokens); each token is one w_n of the text tower.
        spans.append(torch.arange(start, start + len(body) - n_tail))
    N = max(len(s) for s in spans)
    positions = torch.zeros(len(names), N, dtype=torch.long)  # (K, N)
    mask = torch.zeros(len(names), N, dtype=torch.bool)  # (K, N)
    for k, s in enumerate(spans):
        positions[k, : len(s)], mask[k, : len(s)] = s, True
    return ids, positions, mask


# ==== BiEfficient ====
# He, Liu, Xing: "BiEfficient: Bidirectionally Prompting Vision-Language Models for Parameter-Efficient Video
# Recognition" (ACCV 2024), Sec. 3, BiEfficient Eq. (1)-(10). The paper is the default; `code_compat=True`
# reproduces what the authors' code (WbLiuBJTULab/BiEfficient, utils/modules/) does, every difference marked `# Paper:`.
# Shapes: B videos, T frames, N patch tokens, D vision width, E joint embed dim, W text width, M context
# tokens, P prompt tokens between SOS and the class name, U unique candidate classes, A candidates, J text
# positions (the class name's words are BiEfficient Eq. (8)'s N words; J, a letter outside the shared alphabet,
# because N is the patches and L the layers).

# Paper: every row below is a place where the authors' code differs from the paper: (paper, code); file:line
# cite the authors' repository. `None` in a constructor argument picks the column of the mode (code_compat); an
# explicit value overrides it. The rows from `loss` on are the training step's and the data pipeline's: the model
# records them in `config`, train.py and data.py apply them (the model applies `linear_init`). `wgvp_tau` and
# `view_average` are the same in both columns (see their comments).
BIEFFICIENT_DEFAULTS = {
    # name:             (paper,   code)
    "M":                (16,      12),           # number of learned context tokens (Sec. 3.2 "M = 16"; code m = 12)
    "head_layers":      (3,       2),            # temporal transformer layers (Sec. 4.1 "3-layer, 9M"; code 2)
    "head_residual":    (True,    False),        # residual around the temporal head (ActionCLIP [50]; code none)
    "frame_pos_std":    (0.02,    1.0),          # init std of the frame position embedding (code nn.Embedding N(0, 1))
    "meta_attn_scale":  (True,    False),        # 1/sqrt(head dim) in the Meta-Net attention (code: never applied)
    "meta_out_proj":    (True,    False),        # output projection in the Meta-Net attention (code: none)
    "adapter_act":      ("gelu",  "quickgelu"),  # Adapter activation (paper "GELU [15]"; code QuickGELU)
    "post_layers":      (1,       2),            # Post-Prompt blocks (Table 4: +3M, one block; code 2 = 6.3M)
    "post_heads":       (None,    8),            # Post-Prompt heads (None = E // 64; code fixed 8)
    "patch_proj_init":  ("clip",  "normal"),     # patch projection init (CLIP's visual.proj; code N(0, 1))
    # BiEfficient Eq. (8)'s words: the class-name tokens only, or all 77 positions (code)
    "words":            ("name",  "all"),
    "wgvp_layernorm":   (False,   True),         # LayerNorm on words and class embeddings before WGVP (code)
    # Paper: BiEfficient Eq. (8)-(9) write the softmax over frames with no temperature, but Sec. 4.1 sets "the
    # temperature parameter" to 0.01 and at temperature 1 a softmax over cosines (all within [-1, 1]) is nearly uniform,
    # which would reduce WGVP to mean pooling. Both modes use 0.01 (the code's value); wgvp_tau=1.0 gives the
    # literal reading.
    "wgvp_tau":         (0.01,    0.01),         # temperature of the softmax over frames
    "beta_init":        (0.1,     0.01),         # initial beta of BiEfficient Eq. (9) (Table 10: 0.1; code 0.01)
    "learn_logit_scale": (False,  True),         # fixed tau = 0.01 (Sec. 4.1) or CLIP's logit_scale, trainable
    "normalize_video":  (True,    False),        # BiEfficient Eq. (10)'s cosine: L2-normalise v-hat (code: not)
    "weight_decay":     (0.2,     0.05),         # AdamW weight decay (Sec. 4.1: 0.2; code 0.05)
    # Choice: the paper's 0.2 on weight matrices only (the usual practice; biases, LayerNorms, alpha, beta,
    # logit_scale, tokens and position embeddings undecayed); the code decays every parameter.
    "decay_all":        (False,   True),
    # The training step (train.py). Paper: BiEfficient Eq. (10) is a contrastive loss over "the batch"; with a
    # class repeated in the batch, TPR Eq. (15)'s multi-positive loss (each positive 1/|K(i)|) or the code's
    # nn.CrossEntropyLoss on multi-hot targets that are not row-normalised (text_branches.multi_hot_contrastive_loss).
    "loss":             ("multi_positive", "multi_hot"),
    # Contrastive batch: the global batch gathered from every rank (the objective does not depend on the number
    # of GPUs) or one B x B problem per rank, no gathering (the code: 32 per GPU x 4 GPUs).
    "contrastive_batch": ("global", "local"),
    # Init of the Meta-Net, Adapter fc1, Post-Prompt and temporal-head Linears: PyTorch's default (Kaiming
    # uniform, biases up to +-1/sqrt(fan_in)) or the code's trunc_normal(std 0.02) with zero biases.
    "linear_init":      ("pytorch", "trunc_normal"),
    # Learning rate: warm-up then cosine set every step, or the code's ActionCLIP scheduler stepped with the
    # fractional epoch at iteration 0 of every epoch and then every 10th iteration (lr 0 for the first 9 steps).
    "lr_schedule":      ("step",  "every10"),
    # What `--precision auto` picks on a CUDA GPU: bf16 autocast where supported (our choice, the paper is
    # silent) or the code's fp16 autocast + GradScaler.
    "amp":              ("bf16",  "fp16"),
    # The data pipeline and the protocol (data.py, train.py, evaluate.py).
    # Training crop: MultiScaleCrop, or the code's GroupScale(256) then an Inception-style random sized crop (area
    # 0.08-1, aspect 3/4-4/3, 10 tries, else scale + random crop) resized to 224 (utils/Augmentation.py:14-18,
    # 29-35, 43-54; datasets/transforms.py:343-390).
    "train_crop":       ("multiscale", "inception"),
    # Training frames: TSN, frame int((t + U) * n / T) of segment t; the code: seg = (n - 1) / T, frame
    # randint(round(seg * t), round(seg * (t + 1))), both ends inclusive (datasets/video.py:97-104).
    "frame_sampling":   ("tsn",   "authors"),
    # Validation during training (picks best.pt): the segment centres at short side 224; the code: the first frame
    # of each segment, int(n / T * t) (datasets/video.py:115-119), GroupScale(256) + CenterCrop(224)
    # (utils/Augmentation.py:56-60, train.py:157-162).
    "val_clip":         ("centre", "first"),
    # Test: this project's views (the paper's Table 1: 3 clips x 1 crop); the code: 3 clips x 1 crop at scale 256,
    # clip starts linspace(0, tick - 1, 3), tick = n / T (datasets/video.py:135-145; test.py:40-41, 70-84).
    "test_protocol":    ("paper", "authors"),
    # What is averaged over the views. Choice: the paper is silent (Table 1 gives the views only); the code
    # averages each view's softmax (test.py:179-180; its second softmax, line 181, keeps the ranking), as X-CLIP's
    # test code does; "logit" averages the logits.
    "view_average":     ("prob",  "prob"),
    # Batch: None = --batch-size is the global batch (Sec. 4.1: "batch size of 32"); the code: 32 per GPU
    # (configs/k400/k400_train_vitb_16_f8.yaml:9) on 4 GPUs (scripts/run_train.sh:11), 128 in all.
    "batch_per_gpu":    (None,    32),
}
BIEFFICIENT_CHOICES = {"words": ("name", "all"), "patch_proj_init": ("clip", "normal"),
                       "loss": ("multi_positive", "multi_hot"), "contrastive_batch": ("global", "local"),
                       "linear_init": ("pytorch", "trunc_normal"), "lr_schedule": ("step", "every10"),
                       "amp": ("bf16", "fp16"), "train_crop": ("multiscale", "inception"),
                       "frame_sampling": ("tsn", "authors"), "val_clip": ("centre", "first"),
                       "test_protocol": ("paper", "authors"), "view_average": ("prob", "logit")}
BIEFFICIENT_DESIGNS = ("metanet", "A1", "A2", "A3", "context")  # Table 6 (A1-A3) and Table 5's learnable prompt


class BiEfficientCrossBlock(nn.Module):
    """Pre-LN cross-attention block: x = x + MHA(LN1(x), LN2(mem)); x = x + FFN(LN3(x)).

    The "Attention block" of Meta-Net (BiEfficient Eq. (6)) and the Post-Prompt block (BiEfficient Eq. (7)):
    queries x (B, Q, W), keys and values the patch memory mem (B, N, E) ("standard multi-head self-attention and
    feed-forward network [47]").
    """

    def __init__(self, width: int, mem_width: int, heads: int, qkv_bias: bool = True, out_proj: bool = True,
                 scaled: bool = True):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads={heads}")
        self.heads, self.scaled = heads, scaled
        self.ln_1 = clip.LayerNorm(width)
        self.ln_2 = clip.LayerNorm(mem_width)
        self.ln_3 = clip.LayerNorm(width)
        self.q_proj = nn.Linear(width, width, bias=qkv_bias)
        self.k_proj = nn.Linear(mem_width, width, bias=qkv_bias)
        self.v_proj = nn.Linear(mem_width, width, bias=qkv_bias)
        self.out_proj = nn.Linear(width, width) if out_proj else None
        # Choice: a 4x QuickGELU MLP as CLIP's blocks and the authors' code (the paper says only "FFN [47]").
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), clip.QuickGELU(), nn.Linear(4 * width, width))

    def attention(self, x, mem):
        B, Q, W = x.shape
        H, N = self.heads, mem.shape[1]
        q = self.q_proj(x).view(B, Q, H, W // H).transpose(1, 2)  # (B, H, Q, W/H)
        k = self.k_proj(mem).view(B, N, H, W // H).transpose(1, 2)  # (B, H, N, W/H)
        v = self.v_proj(mem).view(B, N, H, W // H).transpose(1, 2)  # (B, H, N, W/H)
        # Paper: standard scaled attention; the authors' Meta-Net defines the scale but never applies it.
        out = F.scaled_dot_product_attention(q, k, v, scale=None if self.scaled else 1.0)  # (B, H, Q, W/H)
        out = out.transpose(1, 2).reshape(B, Q, W)  # (B, Q, W)
        return out if self.out_proj is None else self.out_proj(out)

    def forward(self, x, mem):
        x = x + self.attention(self.ln_1(x), self.ln_2(mem))
        return x + self.mlp(self.ln_3(x))


class BiEfficientAdapter(nn.Module):
    """Meta-Net's Adapter (BiEfficient Eq. (6)): Linear-GELU-Linear bottleneck, hidden 0.25x.

    Choice: a residual around it with the second Linear zero-initialised (identity at the start), as the
    authors' code; the paper names only the three layers.
    """

    def __init__(self, width: int, act: str = "gelu"):
        super().__init__()
        if act not in ("gelu", "quickgelu"):
            raise ValueError(f"adapter_act={act!r}; valid: 'gelu', 'quickgelu'")
        self.fc1 = nn.Linear(width, width // 4)
        self.act = nn.GELU() if act == "gelu" else clip.QuickGELU()  # Paper: GELU [15]; code QuickGELU
        self.fc2 = nn.Linear(width // 4, width)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, x):
        return x + self.fc2(self.act(self.fc1(x)))


class BiEfficientPrePrompt(nn.Module):
    """Pre-Prompt (BiEfficient Eq. (5)-(6)): M context tokens c_1..c_M and the Meta-Net token
    c_v = Adapter(Attention(v, c_init)).

    forward(mem (B, N, E), video (B, E)) -> prompt tokens (B, P, W) placed between SOS and the class name:
    t_i = {c_1..c_M, c_v, c-bar_i}. Designs of Table 6: "A1" [c_1..c_M, visual encoder output] (needs W == E),
    "A2" Attention(query c_1..c_M, key/value v) as the M prompt tokens, "A3" Meta-Net without the Adapter;
    Table 5's "context" is the learnable prompt alone (CoOp-style, P = M).
    """

    def __init__(self, width: int, mem_width: int, M: int, design: str = "metanet", attn_scale: bool = True,
                 out_proj: bool = True, adapter_act: str = "gelu"):
        super().__init__()
        if design not in BIEFFICIENT_DESIGNS:
            raise ValueError(f"pre_prompt_design={design!r}; valid: {BIEFFICIENT_DESIGNS}")
        if design == "A1" and width != mem_width:
            raise ValueError(f"pre_prompt_design='A1' puts the visual embedding (width {mem_width}) into the text "
                             f"sequence (width {width}); it needs equal widths")
        self.design = design
        # Choice: initial std 0.01 (context) and 0.02 (meta token), as the authors' code; the paper is silent.
        self.ctx = nn.Parameter(0.01 * torch.randn(M, width))
        self.n_prompt = M + (0 if design in ("A2", "context") else 1)  # P
        if design in ("metanet", "A3"):
            self.meta_token = nn.Parameter(0.02 * torch.randn(width))  # c_init
        if design in ("metanet", "A2", "A3"):
            self.attn = BiEfficientCrossBlock(width, mem_width, max(width // 64, 1), qkv_bias=True,
                                              out_proj=out_proj, scaled=attn_scale)
        if design == "metanet":
            self.adapter = BiEfficientAdapter(width, adapter_act)

    def forward(self, mem, video):
        B = mem.shape[0]
        ctx = self.ctx.to(mem.dtype).expand(B, -1, -1)  # (B, M, W)
        if self.design == "context":
            return ctx
        if self.design == "A1":
            return torch.cat([ctx, video[:, None].to(ctx.dtype)], dim=1)  # (B, M + 1, W)
        if self.design == "A2":
            return self.attn(ctx, mem)  # (B, M, W)
        c_v = self.attn(self.meta_token.to(mem.dtype).expand(B, 1, -1), mem)  # BiEfficient Eq. (6) Attention: (B, 1, W)
        if self.design == "metanet":
            c_v = self.adapter(c_v)  # BiEfficient Eq. (6) Adapter
        return torch.cat([ctx, c_v.to(ctx.dtype)], dim=1)  # (B, M + 1, W)


class BiEfficientPostPrompt(nn.Module):
    """Post-Prompt (BiEfficient Eq. (7)): c-hat = c + alpha * FFN(MHSA(query c, key/value v)).

    Choice: the block keeps its internal residuals and alpha is a per-channel vector, as X-CLIP's prompt
    generator and the authors' code (the paper writes only the outer combination).
    """

    def __init__(self, width: int, layers: int = 1, heads: int | None = None, alpha_init: float = 0.1):
        super().__init__()
        heads = heads or max(width // 64, 1)
        self.resblocks = nn.ModuleList(
            [BiEfficientCrossBlock(width, width, heads, qkv_bias=False, out_proj=True) for _ in range(layers)])
        self.alpha = nn.Parameter(torch.full((width,), float(alpha_init)))

    def forward(self, c, mem):
        x = c  # (B, A, E)
        for block in self.resblocks:
            x = block(x, mem)
        return c + self.alpha * x  # BiEfficient Eq. (7)


class BiEfficientTemporalHead(nn.Module):
    """The baseline's temporal transformer on frozen CLIP frame embeddings (Sec. 4.1): (B, T, E) -> (B, T, E)."""

    def __init__(self, width: int, T: int, layers: int = 3, residual: bool = True, pos_std: float = 0.02):
        super().__init__()
        self.T, self.residual = T, residual
        self.frame_position_embeddings = nn.Parameter(pos_std * torch.randn(T, width))
        self.resblocks = nn.Sequential(
            *[clip.ResidualAttentionBlock(width, max(width // 64, 1)) for _ in range(layers)])

    def forward(self, x):
        if x.shape[1] != self.T:
            raise ValueError(f"the temporal head was built for T={self.T} frames, got {x.shape[1]}")
        y = self.resblocks(x + self.frame_position_embeddings.to(x.dtype))  # (B, T, E)
        # Paper: a residual around the stack as ActionCLIP's head [50] that the paper cites; code: none.
        return x + y if self.residual else y


class WordGuidedVisualPrompt(nn.Module):
    """Word-Guided Visual Prompt (BiEfficient Eq. (8)-(9)).

    forward(frames (B, T, E), classes (B, U, E), words (B, U, J, E), word_mask (U, J)) ->
    (v-hat (B, E), S (B, T), top-1 index into U (B,)).
    The top-1 class is the model's own prediction among the candidates (never the ground-truth label):
    "class" (Table 8 default) argmax_a cos(z_a, v-bar), "word" argmax_a sum_n cos(w_a^n, v-bar).
    """

    def __init__(self, width: int, beta_init: float = 0.1, tau: float = 1.0, layernorm: bool = False,
                 mean_pooling: bool = True, top1_source: str = "class"):
        super().__init__()
        if top1_source not in ("class", "word"):
            raise ValueError(f"top1_source={top1_source!r}; valid: 'class', 'word'")
        self.tau, self.mean_pooling, self.top1_source = tau, mean_pooling, top1_source
        # Choice: beta per channel, as alpha and the authors' code; the paper calls it "a learnable parameter".
        self.beta = nn.Parameter(torch.full((width,), float(beta_init)))
        # Paper: no LayerNorm; the code normalises words and class embeddings (the latter only for the top-1).
        self.ln_word = clip.LayerNorm(width) if layernorm else nn.Identity()
        self.ln_class = clip.LayerNorm(width) if layernorm else nn.Identity()

    def forward(self, frames, classes, words, word_mask, words_of=None):
        """words_of: instead of words (then None), a function top1 (B,) -> the top-1 classes' words (B, J, E)
        (top1_source "class" only: the top-1 is then chosen without the words)."""
        B = frames.shape[0]
        v = F.normalize(frames, dim=-1)  # (B, T, E); Choice: unit frames, as the code (BiEfficient Eq. (8): cosines)
        v_bar = v.mean(dim=1)  # (B, E) mean pooling
        # Paper (Sec. 3.3, Table 8): the top-1 among the candidates (in training the batch's labels) by the model's
        # own similarity, never the ground-truth label; the code does the same.
        with torch.no_grad():  # the argmax has no gradient
            if self.top1_source == "class":
                sim = torch.einsum("bue,be->bu", F.normalize(self.ln_class(classes), dim=-1), v_bar)  # (B, U)
            else:
                w_all = F.normalize(self.ln_word(words), dim=-1)  # (B, U, J, E)
                cos = torch.einsum("buje,be->buj", w_all, F.normalize(v_bar, dim=-1))  # (B, U, J)
                sim = (cos * word_mask.to(cos.dtype)).sum(-1)  # (B, U)
            top1 = sim.argmax(dim=1)  # (B,)
        rows = torch.arange(B, device=frames.device)
        w = words[rows, top1] if words_of is None else words_of(top1)  # (B, J, E) the top-1 class's words
        w = F.normalize(self.ln_word(w), dim=-1)  # w-hat
        mask = word_mask[top1].to(w.dtype)  # (B, J)
        s = torch.einsum("bje,bte->bjt", w, v.to(w.dtype))  # BiEfficient Eq. (8): word-frame cosines (B, J, T)
        # Paper: a plain softmax over frames (tau = 1); the code divides by 0.01.
        s = torch.softmax(s / self.tau, dim=-1)  # (B, J, T)
        S = (s * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)  # mean over words: (B, T)
        vts = torch.einsum("bt,bte->be", S, v.to(S.dtype))  # v^T S (B, E)
        v_hat = v_bar + self.beta * vts if self.mean_pooling else vts  # BiEfficient Eq. (9); Table 7 "w/o meanpooling"
        return v_hat, S, top1


class BiEfficient(nn.Module):
    """BiEfficient (ACCV 2024): frozen CLIP, temporal head, Pre-Prompt (BiEfficient Eq. (5)-(6)), Post-Prompt
    (BiEfficient Eq. (7)), Word-Guided Visual Prompt (BiEfficient Eq. (8)-(9)); logits of the contrastive loss of
    BiEfficient Eq. (10) (divided by tau).

    clip_model: a `clip.CLIP`, frozen here. T: frames per clip. M: context tokens.
    pre_prompt / post_prompt / wgvp: the components of Table 4 (all False = the baseline).
    code_compat: the authors' code instead of the paper (BIEFFICIENT_DEFAULTS lists every difference); each
    difference can also be set alone with the keyword of the same name (None = the mode's value).
    pre_prompt_design: Table 6 ("metanet", "A1", "A2", "A3") or Table 5's learnable prompt ("context").
    mean_pooling: Table 7. top1_source: Table 8 ("class" or "word"). alpha_init: Table 9. beta_init: Table 10.
    tau: the fixed temperature (Sec. 4.1: 0.01) unless learn_logit_scale.
    grad_checkpointing: recompute the text blocks in backward (sets clip_model.transformer.grad_checkpointing).
    text_truncate / visual_no_grad: the speed-by-design switches; False only to check against the
    straightforward version (every text at 77 positions, visual tower in the graph).
    """

    def __init__(self, clip_model, T: int = 8, M: int | None = None, pre_prompt: bool = True,
                 post_prompt: bool = True, wgvp: bool = True, code_compat: bool = False, *,
                 pre_prompt_design: str = "metanet", mean_pooling: bool = True, top1_source: str = "class",
                 alpha_init: float = 0.1, tau: float = 0.01, grad_checkpointing: bool = False,
                 text_truncate: bool = True, visual_no_grad: bool = True, **differences):
        super().__init__()
        unknown = set(differences) - set(BIEFFICIENT_DEFAULTS)
        if unknown:
            raise TypeError(f"unknown BiEfficient arguments {sorted(unknown)}; valid: {sorted(BIEFFICIENT_DEFAULTS)}")
        differences["M"] = M
        cfg = {k: (differences.get(k) if differences.get(k) is not None else v[int(bool(code_compat))])
               for k, v in BIEFFICIENT_DEFAULTS.items()}
        for key, valid in BIEFFICIENT_CHOICES.items():
            if cfg[key] not in valid:
                raise ValueError(f"{key}={cfg[key]!r}; valid: {', '.join(map(repr, valid))}")
        self.config = dict(cfg, T=T, pre_prompt=pre_prompt, post_prompt=post_prompt, wgvp=wgvp,
                           code_compat=code_compat, pre_prompt_design=pre_prompt_design,
                           mean_pooling=mean_pooling, top1_source=top1_source, alpha_init=alpha_init, tau=tau)
        self.clip_model = clip_model
        for p in clip_model.parameters():
            p.requires_grad_(False)
        clip_model.eval()
        clip_model.transformer.grad_checkpointing = grad_checkpointing
        self.text_truncate, self.visual_no_grad = text_truncate, visual_no_grad
        self.words, self.normalize_video = cfg["words"], cfg["normalize_video"]
        self.weight_decay, self.decay_all = cfg["weight_decay"], cfg["decay_all"]
        self.loss_keys = ("en",)

        E = clip_model.embed_dim
        D = clip_model.visual.conv1.weight.shape[0]
        W = clip_model.token_embedding.weight.shape[1]
        # Paper: 3 layers (9M), frame position embedding std 0.02 (Choice, as ActionCLIP); code 2 layers, N(0, 1).
        self.head = BiEfficientTemporalHead(E, T, cfg["head_layers"], cfg["head_residual"], cfg["frame_pos_std"])
        if pre_prompt or post_prompt:
            # Patch memory v for both text prompts: LayerNorm(D), then a learned (D, E) projection.
            # Choice: the paper does not say how v reaches the prompts; this is the authors' code.
            self.patch_ln = clip.LayerNorm(D)
            if cfg["patch_proj_init"] == "clip":
                # Paper: silent; we start from CLIP's own projection of ln_post tokens into the joint space.
                self.patch_proj = nn.Parameter(clip_model.visual.proj.detach().clone().float())
            else:
                self.patch_proj = nn.Parameter(torch.randn(D, E))  # the code's N(0, 1), from X-CLIP
        # Paper: M = 16, standard attention (scaled, output projection), GELU; code: m = 12, unscaled, no output
        # projection, QuickGELU.
        self.pre = (BiEfficientPrePrompt(W, E, cfg["M"], pre_prompt_design, cfg["meta_attn_scale"],
                                         cfg["meta_out_proj"], cfg["adapter_act"]) if pre_prompt else None)
        # Paper: one block (Table 4: +3M), E // 64 heads (Choice); code: 2 blocks (6.3M), 8 heads.
        self.post = (BiEfficientPostPrompt(E, cfg["post_layers"], cfg["post_heads"], alpha_init)
                     if post_prompt else None)
        # Paper: beta 0.1 (Table 10), no temperature, no LayerNorms; code: beta 0.01, tau 0.01, LayerNorms.
        self.wgvp = (WordGuidedVisualPrompt(E, cfg["beta_init"], cfg["wgvp_tau"], cfg["wgvp_layernorm"],
                                            mean_pooling, top1_source) if wgvp else None)
        if cfg["learn_logit_scale"]:
            # Paper: a fixed temperature 0.01; the code trains CLIP's logit_scale (ln 100), unclamped.
            self.logit_scale = nn.Parameter(clip_model.logit_scale.detach().clone().float())
        else:
            self.register_buffer("logit_scale", torch.tensor(math.log(1.0 / tau)), persistent=False)
        if cfg["linear_init"] == "trunc_normal":
            self._init_linears_as_the_code()
        self.n_prompt = self.pre.n_prompt if self.pre is not None else 0  # P
        self.class_names = None
        # Paper: the code's class-embedding LayerNorm is trainable (in its parameter count) but feeds only the
        # top-1 argmax, so it never gets a gradient; DDP has to be told (the code: find_unused_parameters=True).
        self.has_unused_parameters = self.wgvp is not None and cfg["wgvp_layernorm"]

    # Std of the code's trunc_normal_ (timm): its bounds are absolute (+-2), i.e. 100 std, so in effect a normal.
    CODE_INIT_STD = 0.02

    @torch.no_grad()
    def _init_linears_as_the_code(self):
        """The code's `_init_weights` (VisualToTextual, PostVisualToTextual, VideoHead): every nn.Linear of the
        Meta-Net (with its Adapter), the Post-Prompt and the temporal head gets trunc_normal(std 0.02) weights
        and zero biases; the Adapter's fc2 stays zero (identity at the start). Not touched, as in the code:
        attention in_proj matrices of the temporal head (not Linears: nn.MultiheadAttention's xavier init),
        LayerNorms (already 1 and 0), tokens and embeddings."""
        for part in (self.head, self.pre, self.post):
            for m in ([] if part is None else part.modules()):
                if isinstance(m, nn.Linear):
                    nn.init.trunc_normal_(m.weight, std=self.CODE_INIT_STD, a=-2.0, b=2.0)
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)
        if self.pre is not None and hasattr(self.pre, "adapter"):
            nn.init.zeros_(self.pre.adapter.fc2.weight)
            nn.init.zeros_(self.pre.adapter.fc2.bias)

    def train(self, mode: bool = True):
        super().train(mode)
        self.clip_model.eval()  # the frozen tower stays in eval mode
        return self

    def set_classes(self, names_en, names_zh=None):
        """Tokenise the class names once: rows [SOS, name tokens, EOT, 0...] of length 77 - P (BiEfficient Eq. (5)).
        names_zh is ignored (BiEfficient has no Chinese branch)."""
        names = list(names_en)
        if not names:
            raise ValueError("set_classes needs at least one class name")
        length = self.clip_model.context_length - self.n_prompt
        try:
            ids = clip.tokenize(names, context_length=length)
        except RuntimeError as e:
            raise ValueError(f"a class name does not fit the {length} text positions left after {self.n_prompt} "
                             f"prompt tokens: {e}") from e
        self.register_buffer("name_ids", ids.to(self.clip_model.token_embedding.weight.device), persistent=False)
        self.class_names = names

    def _text(self, prompts, uniq, need_words=True):
        """BiEfficient Eq. (5): t_i = [SOS, prompts, class-name tokens, EOT] for every (video, class) through the
        frozen text tower. prompts (B', P, W) with B' = B, or None (P = 0, no Pre-Prompt, B' = 1).
        Returns class embeddings (B', U, E), word embeddings (B', U, J, E) (None unless need_words) and the word
        mask (U, J)."""
        ids = self.name_ids[uniq]  # (U, 77 - P)
        U, P = ids.shape[0], self.n_prompt
        emb = self.clip_model.token_embedding(ids)  # BiEfficient Eq. (5): (U, 77 - P, W)
        eot = ids.argmax(dim=-1) + P  # (U,) EOT position in the prompted sequence
        full = (self.words == "all" and need_words) or not self.text_truncate
        # Paper: words = the class name's tokens; the code takes all 77 positions, so those must be computed.
        J = self.clip_model.context_length if full else int(eot.max()) + 1
        Bp = 1 if prompts is None else prompts.shape[0]
        parts = [emb[None, :, :1].expand(Bp, U, 1, -1)]  # SOS (B', U, 1, W)
        if prompts is not None:
            parts.append(prompts.to(emb.dtype)[:, None].expand(Bp, U, P, -1))  # (B', U, P, W)
        parts.append(emb[None, :, 1:J - P].expand(Bp, U, J - P - 1, -1))  # name, EOT, padding
        x = torch.cat(parts, dim=2).reshape(Bp * U, J, -1)  # (B' U, J, W)
        c, words = self.clip_model.encode_text_embeddings(x, eot.repeat(Bp), return_words=need_words,
                                                          truncate=not full)  # (B' U, E), (B' U, J, E)
        pos = torch.arange(J, device=ids.device)
        if self.words == "all":
            mask = torch.ones(U, self.clip_model.context_length, dtype=torch.bool, device=ids.device)  # (code)
        else:
            mask = (pos[None] > P) & (pos[None] < eot[:, None])  # (U, J) the class name's tokens
        words = None if words is None else words.view(Bp, U, J, -1)
        return c.view(Bp, U, -1), words, mask

    def _top1_words(self, prompts, classes):
        """All 77 word embeddings (B, 77, E) of one prompted text per video: video b's prompts (B, P, W) (or
        None) with class index classes[b] (B,), through the frozen text tower (words == "all", the code)."""
        ids = self.name_ids[classes]  # (B, 77 - P)
        emb = self.clip_model.token_embedding(ids)  # (B, 77 - P, W)
        if prompts is not None:
            emb = torch.cat([emb[:, :1], prompts.to(emb.dtype), emb[:, 1:]], dim=1)  # (B, 77, W)
        eot = ids.argmax(dim=-1) + self.n_prompt  # (B,)
        return self.clip_model.encode_text_embeddings(emb, eot, return_words=True, truncate=False)[1]

    def forward(self, video, labels=None, candidates=None):
        """video (B, T, 3, H, W); labels (B,) unused (the top-1 is the model's own); candidates (A,) class
        indices, default all classes. Returns {"logits": {"en": (B, A)}, "frame_weights": (B, T), "top1": (B,)}."""
        if self.class_names is None:
            raise RuntimeError("call set_classes(names) before the forward pass")
        B, T = video.shape[:2]
        K = len(self.class_names)
        if candidates is None:
            candidates = torch.arange(K, device=self.name_ids.device)
        candidates = candidates.to(self.name_ids.device)
        if candidates.numel() and (int(candidates.min()) < 0 or int(candidates.max()) >= K):
            raise ValueError(f"candidates must index the {K} classes of set_classes, got values in "
                             f"[{int(candidates.min())}, {int(candidates.max())}]")
        uniq, inverse = torch.unique(candidates, return_inverse=True)  # (U,), (A,)

        visual = self.clip_model.visual
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.visual_no_grad):
            cls, patches = visual(video.flatten(0, 1), return_tokens=True)  # BiEfficient Eq. (1): (B T, E), (B T, N, D)
        dt = self.head.frame_position_embeddings.dtype  # our modules' dtype (autocast still picks the op dtype)
        frames_clip = cls.view(B, T, -1).to(dt)  # (B, T, E)
        frames = self.head(frames_clip)  # (B, T, E)

        mem = None
        if self.pre is not None or self.post is not None:
            p = self.patch_ln(patches.to(dt)).view(B, T, *patches.shape[1:]).mean(dim=1)  # (B, N, D)
            # The code projects then averages over frames; projecting the average is the same (linear) and T x cheaper.
            mem = p @ self.patch_proj.to(p.dtype)  # (B, N, E)
        # BiEfficient Eq. (2): p = f(v | phi_pre), the Pre-Prompt of BiEfficient Eq. (6); (B, P, W)
        prompts = self.pre(mem, frames_clip.mean(dim=1)) if self.pre is not None else None
        # Choice: with words == "all" (the code) WGVP reads the 77 positions of one text per video, its top-1
        # class, and the top-1 depends only on the EOT outputs. So every (video, class) text runs up to its EOT
        # and only the B top-1 texts run at all 77 positions: the same function, B x 77 positions instead of
        # B x U x 77 (the code computes all of them).
        lazy = (self.wgvp is not None and self.words == "all" and self.text_truncate
                and self.wgvp.top1_source == "class")
        c, words, mask = self._text(prompts, uniq, need_words=self.wgvp is not None and not lazy)
        # BiEfficient Eq. (3) c; (B or 1, U, E), (B or 1, U, J, E) or None, (U, J)
        c = c.to(dt).expand(B, -1, -1)  # (B, U, E)
        if self.post is not None:
            c = self.post(c, mem)  # BiEfficient Eq. (3) c-hat, by BiEfficient Eq. (7)
        out = {}
        if self.wgvp is not None:
            words_of = None
            if lazy:
                words_of = lambda top1: self._top1_words(prompts, uniq[top1]).to(dt)  # noqa: E731  (B, 77, E)
            else:
                words = words.to(dt).expand(B, -1, -1, -1)  # (B, U, J, E)
            v_hat, S, top1 = self.wgvp(frames, c, words, mask, words_of)  # BiEfficient Eq. (4), by BiEfficient Eq. (8)-(9)
            out["frame_weights"], out["top1"] = S, uniq[top1]
        else:
            v_hat = F.normalize(frames, dim=-1).mean(dim=1)  # mean pooling (B, E)
        # Paper: BiEfficient Eq. (10)'s s(., .) is a cosine; the code does not re-normalise v-hat
        if self.normalize_video:
            v_hat = F.normalize(v_hat, dim=-1)
        logits = self.logit_scale.exp() * torch.einsum("be,bue->bu", v_hat, F.normalize(c, dim=-1))  # (B, U)
        out["logits"] = {"en": logits[:, inverse]}  # (B, A): duplicates expanded from the unique classes
        return out

    def scores(self, out):
        return out["logits"]["en"]

    def parameter_table(self):
        """Trainable parameters per component: list of (name, count)."""
        def count(*modules):
            return sum(p.numel() for m in modules if m is not None
                       for p in ([m] if isinstance(m, nn.Parameter) else m.parameters()) if p.requires_grad)
        rows = [("temporal head (frame position embedding + blocks)", count(self.head))]
        if self.pre is not None:
            rows.append((f"Pre-Prompt ({self.pre.design}: context tokens + Meta-Net)", count(self.pre)))
        if self.post is not None:
            rows.append(("Post-Prompt (blocks + alpha)", count(self.post)))
        if hasattr(self, "patch_proj"):
            rows.append(("patch memory projection", count(self.patch_proj)))
            rows.append(("patch memory LayerNorm", count(self.patch_ln)))
        if self.wgvp is not None:
            rows.append(("WGVP (beta + LayerNorms)", count(self.wgvp)))
        if isinstance(self.logit_scale, nn.Parameter):
            rows.append(("logit_scale", 1))
        return rows

    def optimizer_groups(self):
        """AdamW parameter groups: [{"params": decayed, "weight_decay": self.weight_decay},
        {"params": the rest, "weight_decay": 0.0}].

        Paper: 0.2 (Sec. 4.1) on weight matrices only (Choice: the usual practice; biases, LayerNorms, alpha,
        beta, logit_scale, learned tokens and position embeddings are not decayed); the code: 0.05 on every
        parameter."""
        decay, rest = [], []
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            token = name.endswith(("ctx", "meta_token", "frame_position_embeddings"))
            (decay if self.decay_all or (p.ndim >= 2 and not token) else rest).append(p)
        return [{"params": decay, "weight_decay": self.weight_decay}, {"params": rest, "weight_decay": 0.0}]

