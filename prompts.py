"""Prompt modules of both papers, one section each, each importing only torch and clip.py.

The two papers number their equations independently, so every tag names its paper: `TPR Eq. (8)` is TPR's
(Electronics 2024), `BiEfficient Eq. (8)` BiEfficient's (ACCV 2024); grep either.

TPR: temporal prompts C, G, I of TPR Eq. (8)-(11), prompts joining the frozen attention (TPR Eq. (13)-(14)),
word-guided frame weighting (TPR Eq. (6)-(7)).
  TPR(clip_model, T=8, S=8, reparam=None, temporal_prompts=True, pooling="word", test_words="class",
      train_words="class",
      prefix="This is a video about {}.", chinese_text=None, chinese_tokenize=None, lam=0.5, tau=0.01, ...):
  temporal embedding (TPR Eq. (1)), TemporalPrompts (TPR Eq. (8)-(11)), reparam.ReparamEncoder injected
  (TPR Eq. (12)), the frozen CLIP blocks with the prompts as extra keys/values (TPR Eq. (13)-(14)), F_t
  (TPR Eq. (3)), word-guided or mean pooling (TPR Eq. (6)-(7) / TPR Eq. (4)), frozen English and Chinese label
  features cached by set_classes, the fused score (TPR Eq. (18)). No public code exists; every decision the
  paper leaves open is marked `# Choice:`.
BiEfficient: Pre-Prompt with Meta-Net (BiEfficient Eq. (5)-(6)), Post-Prompt (BiEfficient Eq. (7)), Word-Guided
Visual Prompt (BiEfficient Eq. (8)-(9)), the logits of BiEfficient Eq. (10); the paper by default, the authors'
code with code_compat=True.
`python prompts.py --bench-biefficient` times BiEfficient's training step against the authors' computation.
"""


# ==== TPR ====
# TPR (Electronics 2024), Sec. 3.2-3.5: the video encoder with temporal prompts (TPR Eq. (1), (3), (8)-(11),
# (13)-(14)), the reparameterization encoder injected from reparam.py (TPR Eq. (12)), word-guided pooling
# (TPR Eq. (6)-(7)), the frozen English and Chinese label branches and the fused score (TPR Eq. (18)). The loss
# (TPR Eq. (15)-(17)) is text_branches.multi_positive_contrastive_loss, applied by the engine to
# `out["logits"][key]`. The frozen ViT blocks are TPR Eq. (2) (clip.ResidualAttentionBlock).
import torch  # noqa: E402  (section imports: this section can be copied out alone)
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.checkpoint import checkpoint  # noqa: E402

import clip  # noqa: E402

# Table 5's hand-crafted prefixes, selectable by name (or pass any format string with one "{}").
TPR_PREFIXES = {
    "this-is-a-video-about": "This is a video about {}.",  # the paper's default
    "a-video-about": "a video about {}.",
    "the-video-is-about": "the video is about {}.",
}
TPR_POOLINGS = ("word", "mean")
TPR_TEST_WORDS = ("class", "top1")
TPR_TRAIN_WORDS = ("class", "label")
TPR_FUSIONS = ("prob", "cosine")


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
        spans.append(torch.arange(start, start + len(body) - n_tail))
    N = max(len(s) for s in spans)
    positions = torch.zeros(len(names), N, dtype=torch.long)  # (K, N)
    mask = torch.zeros(len(names), N, dtype=torch.bool)  # (K, N)
    for k, s in enumerate(spans):
        positions[k, : len(s)], mask[k, : len(s)] = s, True
    return ids, positions, mask


def word_frame_weights(frames, words, mask, tau=0.01):
    """TPR Eq. (6): W_t = 1/N sum_n softmax_t(F_t . w_n / tau), for every video and every class's words.

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
    P[t] = [C_t, G_t, I^_t]                    (TPR Eq. (10); written P = [C, G, I^] in TPR Eq. (11);
                                                P = 1 + S + T tokens per frame; (B, T, 1 + S + T, D))

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
        return torch.cat([c[:, :, None], g, i_hat.to(c.dtype)], dim=2)  # P; TPR Eq. (10), TPR Eq. (11)


class TPR(nn.Module):
    """TPR: frozen CLIP with temporal prompts (+ beta) and English/Chinese label supervision.

    clip_model: a clip.CLIP; frozen here. T: frames per video. S: global prompts per frame (Fig. 5c).
    reparam: a reparam.ReparamEncoder(beta, D, T, 1 + S + T) or None (no beta: Fig. 5a's "+TP" row).
    temporal_prompts: TPR Eq. (8)-(11) prompts in every layer (False: Fig. 5a's "baseline").
    pooling: "word" (TPR Eq. (6)-(7)) or "mean" (TPR Eq. (4): Fig. 5a's CLIP row).
    test_words: whose words weight the frames when a candidate is scored: "class" (its own words) or "top1"
        (those of the class nearest to the mean-pooled video); used at evaluation, and in training too unless
        train_words="label".
    train_words: in training (labels given): "class" (the test_words rule) or "label" (each video's
        ground-truth label's words).
    prefix: English prompt template with one "{}", or a name in TPR_PREFIXES (Table 5).
    chinese_text, chinese_tokenize: frozen Chinese tower with .encode_text(ids) -> (A, E) and its tokenizer
        (text_branches.ChineseCLIPText / tokenize_chinese); None = no Chinese branch.
    lam: lambda of TPR Eq. (18). tau: temperature of TPR Eq. (6), TPR Eq. (15) and TPR Eq. (16).
    fusion: what S of TPR Eq. (18) is: "prob" (softmax over the candidates) or "cosine".
    temporal_embedding: TPR Eq. (1)'s e_temporal; None = on, except for frame-wise CLIP (temporal_prompts=False with
        pooling="mean", Fig. 5a's CLIP row); on in the baseline, whose only trainable part it is.
    temporal_embedding_site: "pre_ln" (added with e_spatial, before ln_pre) or "post_ln".
    share_cls_attention: one P_cls/MHSA for all layers (TemporalPrompts(shared=True)).
    """

    def __init__(self, clip_model, T: int = 8, S: int = 8, reparam: nn.Module | None = None,
                 temporal_prompts: bool = True, pooling: str = "word", test_words: str = "class",
                 train_words: str = "class",
                 prefix: str = "This is a video about {}.", chinese_text: nn.Module | None = None,
                 chinese_tokenize=None, lam: float = 0.5, tau: float = 0.01, fusion: str = "prob",
                 temporal_embedding: bool | None = None, temporal_embedding_site: str = "pre_ln",
                 share_cls_attention: bool = False):
        super().__init__()
        for name, value, valid in [("pooling", pooling, TPR_POOLINGS), ("test_words", test_words, TPR_TEST_WORDS),
                                   ("train_words", train_words, TPR_TRAIN_WORDS),
                                   ("fusion", fusion, TPR_FUSIONS),
                                   ("temporal_embedding_site", temporal_embedding_site, ("pre_ln", "post_ln"))]:
            if value not in valid:
                raise ValueError(f"{name}={value!r}; valid: {', '.join(valid)}")
        if not 0.0 <= lam <= 1.0:
            raise ValueError(f"lam={lam} must lie in [0, 1] (TPR Eq. (18))")
        if reparam is not None and not temporal_prompts:
            raise ValueError("reparam (beta) re-encodes the temporal prompts: it needs temporal_prompts=True")
        if (chinese_text is None) != (chinese_tokenize is None):
            raise ValueError("give both chinese_text and chinese_tokenize, or neither (no Chinese branch)")
        self.prefix = TPR_PREFIXES.get(prefix, prefix)
        if self.prefix.count("{}") != 1:
            raise ValueError(f"prefix {prefix!r} is neither a name in {list(TPR_PREFIXES)} nor a template with "
                             f"one '{{}}'")
        self.clip = clip_model
        self.chinese_text, self.chinese_tokenize = chinese_text, chinese_tokenize
        for frozen in (clip_model, chinese_text):
            if frozen is not None:
                frozen.requires_grad_(False)
                frozen.eval()
        visual = clip_model.visual
        D = visual.conv1.weight.shape[0]
        L = len(visual.transformer.resblocks)
        self.T, self.S, self.pooling, self.test_words = T, S, pooling, test_words
        self.train_words = train_words
        # Choice: lam = 0.5 by default (the paper gives no value): TPR Eq. (17) weighs the two losses equally.
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
        self.prompts = (TemporalPrompts(D, T, S, L, heads=max(D // 64, 1), shared=share_cls_attention)
                        if temporal_prompts else None)
        self.reparam = reparam
        self.grad_checkpointing = False  # or clip_model.visual.transformer.grad_checkpointing
        self.loss_keys = ("en", "zh") if chinese_text is not None else ("en",)

    # -- frozen towers stay in eval mode -------------------------------------------------------------------
    def train(self, mode: bool = True):
        super().train(mode)
        self.clip.eval()
        if self.chinese_text is not None:
            self.chinese_text.eval()
        return self

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

    def describe(self):
        rows = self.parameter_table()
        width = max(len(name) for name, _ in rows)
        lines = [f"{name:<{width}}  {n:>12,}" for name, n in rows]
        lines.append(f"{'total trainable':<{width}}  {sum(n for _, n in rows):>12,}")
        return "\n".join(lines)

    # -- class features: computed once per label set --------------------------------------------------------
    @torch.no_grad()
    def set_classes(self, names_en, names_zh=None):
        """Cache the frozen English features eps_T (K, E), the label words (K, N, E) with mask (K, N), and the
        Chinese features eps_C (K, E)."""
        if self.chinese_text is not None:
            if names_zh is None or len(names_zh) != len(names_en):
                raise ValueError(f"the Chinese branch needs one Chinese label per class: got "
                                 f"{None if names_zh is None else len(names_zh)} for {len(names_en)} classes")
        device = self.clip.token_embedding.weight.device
        ids, positions, mask = tpr_label_tokens(list(names_en), self.prefix)
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

    # -- video encoder ----------------------------------------------------------------------------------------
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
        ckpt = torch.is_grad_enabled() and (self.grad_checkpointing or visual.transformer.grad_checkpointing)
        for layer, block in enumerate(visual.transformer.resblocks):
            prompts = None
            if self.prompts is not None:
                p = self.prompts(x[:, 0].view(B, T, D), layer)  # TPR Eq. (8)-(11) from Z^(l-1); (B, T, P, D)
                if self.reparam is not None:
                    p = self.reparam(p, layer)  # P_R; TPR Eq. (12); (B, T, P, D)
                prompts = p.flatten(0, 1).to(x.dtype)  # frame t's own P_R[t]; (B * T, P, D)
            if ckpt:
                x = checkpoint(block, x, prompts, **clip.checkpoint_options(ckpt))  # TPR Eq. (2) as (13)-(14)
            else:
                # TPR Eq. (2), with the prompts TPR Eq. (13) (they join the attention) and TPR Eq. (14) (dropped)
                x = block(x, prompts)  # (B * T, 1 + N, D)
        frames = visual.ln_post(x[:, 0]) @ visual.proj  # F_t; TPR Eq. (3); (B * T, E)
        return frames.view(B, T, -1)  # (B, T, E)

    # -- pooling and similarities -----------------------------------------------------------------------------
    def _cosine_logits(self, video, text):
        """Cosine similarity (TPR Eq. (5)) / tau: video (B, E) or (B, U, E) (one per class), text (U, E) -> (B, U)."""
        v = F.normalize(video.float(), dim=-1)
        t = F.normalize(text.float(), dim=-1)  # (U, E)
        if v.dim() == 2:
            return v @ t.t() / self.tau  # (B, U)
        return (v * t[None]).sum(dim=-1) / self.tau  # class-conditional: (B, U)

    def head(self, frames, labels=None, candidates=None):
        """Frame features (B, T, E) -> {"logits": {"en": (B, A), "zh": (B, A)}, "frame_weights": (B, T)}."""
        if not hasattr(self, "text_en"):
            raise RuntimeError("call set_classes(names_en, names_zh) before the forward pass")
        B, T, _ = frames.shape
        K = self.text_en.shape[0]
        if candidates is None:
            candidates = torch.arange(K, device=frames.device)
        # Candidates repeat (the global batch's labels): compute on the unique classes, expand at the end.
        uniq, inverse = torch.unique(candidates, return_inverse=True)  # (U,), (A,)
        texts = {"en": self.text_en[uniq]}  # (U, E)
        if self.chinese_text is not None:
            texts["zh"] = self.text_zh[uniq]
        frames = frames.float()
        video = None  # (B, E) one pooled video, or (B, U, E) one per class (class-conditional)
        if self.pooling == "mean":
            weights = frames.new_full((B, T), 1.0 / T)
            video = frames.mean(dim=1)  # TPR Eq. (4); (B, E)
        elif labels is not None and self.train_words == "label":
            # Each video is pooled with its ground-truth label's words (train_words="label").
            # Choice: not the default. It leaks the label into eps_V: pooling by y_i's words pulls eps_V toward
            # y_i's text whatever the video shows, so the loss of TPR Eq. (15) falls without looking at the video
            # (on the synthetic set: training loss down, test accuracy at chance). By default training scores
            # each candidate with the rule used at test time (test_words), so train and test match.
            classes, which = torch.unique(labels, return_inverse=True)  # (C,), (B,)
            weights = word_frame_weights(frames, self.words[classes], self.word_mask[classes], self.tau)  # (B, C, T)
            weights = weights[torch.arange(B, device=frames.device), which]  # (B, T)
            video = torch.einsum("bt,bte->be", weights, frames)  # TPR Eq. (7); (B, E)
        else:
            w_all = word_frame_weights(frames, self.words[uniq], self.word_mask[uniq], self.tau)  # (B, U, T)
            # Choice: test_words="class" by default: TPR Eq. (6)-(7) make eps_V a function of the label it is
            # compared with, so each class is scored with the video pooled by its own words; no first-pass guess whose
            # errors would compound. "top1" is BiEfficient's rule (one pooled video per clip).
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
        # ("cosine").
        # We default to the softmax probabilities over the candidates ("prob"), a deviation: Chinese-CLIP's
        # and CLIP's cosines live on different scales (each tower has its own spread), the probabilities share
        # [0, 1], and they are what the multi-view average of Sec. 4.1.1 averages. evaluate.py reports top-1
        # for both (train.evaluate's top1_by_fusion).
        fusion = fusion or self.fusion
        if fusion not in TPR_FUSIONS:
            raise ValueError(f"fusion={fusion!r}; valid: {', '.join(TPR_FUSIONS)}")
        s = {k: (v.float().softmax(dim=-1) if fusion == "prob" else v.float() * self.tau)  # cosine: logits * tau
             for k, v in out["logits"].items()}
        if "zh" not in s:
            return s["en"]
        return self.lam * s["en"] + (1 - self.lam) * s["zh"]  # TPR Eq. (18)


# ==== BiEfficient ====
# He, Liu, Xing: "BiEfficient: Bidirectionally Prompting Vision-Language Models for Parameter-Efficient Video
# Recognition" (ACCV 2024), Sec. 3, BiEfficient Eq. (1)-(10). The paper is the default; `code_compat=True`
# reproduces what the authors' code (WbLiuBJTULab/BiEfficient, utils/modules/) does, every difference marked `# Paper:`.
# Shapes: B videos, T frames, N patch tokens, D vision width, E joint embed dim, W text width, M context
# tokens, P prompt tokens between SOS and the class name, U unique candidate classes, A candidates, L text
# positions (the class name's words are BiEfficient Eq. (8)'s N words; called L here to keep N for patches).

import math  # noqa: E402  (section imports: this section can be copied out alone)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.checkpoint import checkpoint  # noqa: E402

import clip  # noqa: E402

# Paper: every row below is a place where the authors' code differs from the paper: (paper, code).
# `None` in a constructor argument picks the column of the mode (code_compat); an explicit value overrides it.
# The last five rows are the training step's: the model records them in `config` and train.py applies them
# (the model applies `linear_init`). Only `wgvp_tau` is the same in both columns (see its comment).
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
    "decay_all":        (False,   True),         # weight decay on every parameter (code) or on weight matrices only
    # The training step (train.py). Paper: Eq. (10) is a contrastive loss over "the batch"; with a class repeated
    # in the batch, TPR's multi-positive Eq. (15) (each positive 1/|K(i)|) or the code's nn.CrossEntropyLoss on
    # multi-hot targets that are not row-normalised (text_branches.multi_hot_contrastive_loss).
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
}
BIEFFICIENT_CHOICES = {"words": ("name", "all"), "patch_proj_init": ("clip", "normal"),
                       "loss": ("multi_positive", "multi_hot"), "contrastive_batch": ("global", "local"),
                       "linear_init": ("pytorch", "trunc_normal"), "lr_schedule": ("step", "every10"),
                       "amp": ("bf16", "fp16")}
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

    forward(frames (B, T, E), classes (B, U, E), words (B, U, L, E), word_mask (U, L)) ->
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
        """words_of: instead of words (then None), a function top1 (B,) -> the top-1 classes' words (B, L, E)
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
                w_all = F.normalize(self.ln_word(words), dim=-1)  # (B, U, L, E)
                cos = torch.einsum("bule,be->bul", w_all, F.normalize(v_bar, dim=-1))  # (B, U, L)
                sim = (cos * word_mask.to(cos.dtype)).sum(-1)  # (B, U)
            top1 = sim.argmax(dim=1)  # (B,)
        rows = torch.arange(B, device=frames.device)
        w = words[rows, top1] if words_of is None else words_of(top1)  # (B, L, E) the top-1 class's words
        w = F.normalize(self.ln_word(w), dim=-1)  # w-hat
        mask = word_mask[top1].to(w.dtype)  # (B, L)
        s = torch.einsum("ble,bte->blt", w, v.to(w.dtype))  # BiEfficient Eq. (8): word-frame cosines (B, L, T)
        # Paper: a plain softmax over frames (tau = 1); the code divides by 0.01.
        s = torch.softmax(s / self.tau, dim=-1)  # (B, L, T)
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
        Returns class embeddings (B', U, E), word embeddings (B', U, L, E) (None unless need_words) and the word
        mask (U, L)."""
        ids = self.name_ids[uniq]  # (U, 77 - P)
        U, P = ids.shape[0], self.n_prompt
        emb = self.clip_model.token_embedding(ids)  # BiEfficient Eq. (5): (U, 77 - P, W)
        eot = ids.argmax(dim=-1) + P  # (U,) EOT position in the prompted sequence
        full = (self.words == "all" and need_words) or not self.text_truncate
        # Paper: words = the class name's tokens; the code takes all 77 positions, so those must be computed.
        L = self.clip_model.context_length if full else int(eot.max()) + 1
        Bp = 1 if prompts is None else prompts.shape[0]
        parts = [emb[None, :, :1].expand(Bp, U, 1, -1)]  # SOS (B', U, 1, W)
        if prompts is not None:
            parts.append(prompts.to(emb.dtype)[:, None].expand(Bp, U, P, -1))  # (B', U, P, W)
        parts.append(emb[None, :, 1:L - P].expand(Bp, U, L - P - 1, -1))  # name, EOT, padding
        x = torch.cat(parts, dim=2).reshape(Bp * U, L, -1)  # (B' U, L, W)
        c, words = self.clip_model.encode_text_embeddings(x, eot.repeat(Bp), return_words=need_words,
                                                          truncate=not full)  # (B' U, E), (B' U, L, E)
        pos = torch.arange(L, device=ids.device)
        if self.words == "all":
            mask = torch.ones(U, self.clip_model.context_length, dtype=torch.bool, device=ids.device)  # (code)
        else:
            mask = (pos[None] > P) & (pos[None] < eot[:, None])  # (U, L) the class name's tokens
        words = None if words is None else words.view(Bp, U, L, -1)
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
        # BiEfficient Eq. (3) c; (B or 1, U, E), (B or 1, U, L, E) or None, (U, L)
        c = c.to(dt).expand(B, -1, -1)  # (B, U, E)
        if self.post is not None:
            c = self.post(c, mem)  # BiEfficient Eq. (3) c-hat, by BiEfficient Eq. (7)
        out = {}
        if self.wgvp is not None:
            words_of = None
            if lazy:
                words_of = lambda top1: self._top1_words(prompts, uniq[top1]).to(dt)  # noqa: E731  (B, 77, E)
            else:
                words = words.to(dt).expand(B, -1, -1, -1)  # (B, U, L, E)
            v_hat, S, top1 = self.wgvp(frames, c, words, mask, words_of)  # BiEfficient Eq. (4), by Eq. (8)-(9)
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


# ---- the --bench-biefficient benchmark: our training step against the authors' computation ----

def _authors_logits(model, video, texts):
    """The BiEfficient authors' forward pass (WbLiuBJTULab/BiEfficient, utils/modules/biefficient.py) re-stated
    on our model's modules and weights, for the benchmark only: the same function as `model(...)` in
    code_compat mode, computed the way their code computes it. video (B, T, 3, H, W); texts: A class names.
    Returns logits (B, A).

    As their code: the frozen visual tower gets no graph; the patch memory is projected per frame, then
    averaged; the prompts are tokenised in every forward from placeholder text "X ... X name"; a Python loop
    over the B videos runs the text tower on all 77 positions of the A texts, block by block under gradient
    checkpointing; LayerNorm and the WGVP of Eq. (8)-(9) in a second loop over the videos; no deduplication
    of repeated class names."""
    cm, P = model.clip_model, model.n_prompt
    B, T = video.shape[:2]
    with torch.no_grad():  # their visual tower: frozen, outside the graph
        cls, patches = cm.visual(video.flatten(0, 1), return_tokens=True)  # (B T, E), (B T, N, D)
    frames = model.head(cls.view(B, T, -1))  # VideoHead: (B, T, E)
    mem = model.patch_ln(patches) @ model.patch_proj  # (B T, N, E): projected per frame ...
    mem = mem.view(B, T, *mem.shape[1:]).mean(dim=1)  # ... then averaged: (B, N, E)
    prompts = model.pre(mem, None)  # Meta-Net: (B, P, W) = [context, meta token]
    ids = clip.tokenize([" ".join(["X"] * P) + " " + name for name in texts]).to(video.device)  # (A, 77)
    with torch.no_grad():
        emb = cm.token_embedding(ids)  # (A, 77, W)
    eot = ids.argmax(dim=-1)  # (A,)
    cls_embs, word_embs = [], []
    for p in prompts:  # one video at a time: (P, W)
        x = torch.cat([emb[:, :1], p[None].expand(len(texts), -1, -1), emb[:, 1 + P:]], dim=1)  # (A, 77, W)
        x = x + cm.positional_embedding
        for block in cm.transformer.resblocks:
            x = checkpoint(block, x, use_reentrant=False)  # (A, 77, W)
        x = cm.ln_final(x)
        word_embs.append(x @ cm.text_projection)  # (A, 77, E)
        cls_embs.append(x[torch.arange(len(texts)), eot] @ cm.text_projection)  # (A, E)
    c = model.post(torch.stack(cls_embs), mem)  # Post-Prompt: (B, A, E)
    words = torch.stack(word_embs)  # (B, A, 77, E)
    wgvp, pooled = model.wgvp, []
    for c_b, w_b, v_b in zip(c, words, frames):  # get_logits_vcs: one video at a time
        w_b = F.normalize(wgvp.ln_word(w_b), dim=-1)  # (A, 77, E)
        v_b = F.normalize(v_b, dim=-1)  # (T, E)
        v_mean = v_b.mean(dim=0)  # (E,)
        top1 = (F.normalize(wgvp.ln_class(c_b), dim=-1) @ v_mean).argmax()
        weights = torch.softmax(w_b[top1] @ v_b.T / wgvp.tau, dim=-1).mean(dim=0)  # (T,)
        pooled.append(v_mean + wgvp.beta * (weights @ v_b))  # (E,)
    return model.logit_scale.exp() * torch.einsum("be,bae->ba", torch.stack(pooled), F.normalize(c, dim=-1))


def _bench_setup(arch, B, T, A, device, grad_checkpointing=False):
    """The benchmark's model (code_compat, every trainable parameter moved off its init), batch and labels.
    Deterministic: every process that calls it gets the same weights and data. One class repeats in the batch
    (when B >= 3), as in most Kinetics-400 batches of 32; A - B further candidate classes have no video."""
    import contextlib
    import io
    torch.manual_seed(0)
    with contextlib.redirect_stderr(io.StringIO()):  # the random-init warning: timing needs no real weights
        clip_model = clip.build_random(arch)
    model = BiEfficient(clip_model, T=T, code_compat=True, grad_checkpointing=grad_checkpointing)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.02 * torch.randn_like(p))
    model = model.to(device).train()
    labels = torch.arange(B)
    if B >= 3:
        labels[-1] = 0
    candidates = torch.cat([labels, torch.arange(B, B + A - B)])  # (A,) the batch's labels first
    model.set_classes([f"action {i}" for i in range(B + A)])
    R = clip_model.visual.input_resolution
    video = torch.randn(B, T, 3, R, R)
    return model, video.to(device), labels.to(device), candidates.to(device)


def _bench_loss(row, model, video, labels, candidates):
    """Forward and the authors' loss (multi-hot targets, text_branches' formula restated to keep this
    section free of imports of ours) for one row."""
    if row == "authors":
        logits = _authors_logits(model, video, list(model.class_names[i] for i in candidates.tolist()))
    else:
        logits = model(video, labels, candidates)["logits"]["en"]
    target = (labels[:, None] == candidates[None]).float()  # (B, A) gen_label, not row-normalised
    logits = logits.float()
    loss = -((logits.log_softmax(1) * target).sum(1).mean() + (logits.log_softmax(0) * target).sum(0).mean()) / 2
    return logits, loss


def _bench_row(row, arch, B, T, A, device, precision, steps):
    """One row, in its own process (so its peak memory is its own): warm-up step, then `steps` timed training
    steps (forward, loss, backward, AdamW, as train.py with --biefficient-code-compat). Prints one JSON line."""
    import json
    import resource
    import time
    device = torch.device(device)
    model, video, labels, candidates = _bench_setup(arch, B, T, A, device, grad_checkpointing=row == "ours+ckpt")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            _, loss = _bench_loss(row.split("+")[0], model, video, labels, candidates)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    step()  # warm-up (and the AdamW state)
    sync()
    # What the process holds between steps (weights, AdamW state): CUDA memory_allocated, or the resident set
    # now (Linux /proc); the peaks below count from the timed steps on (CUDA) or over the process (max RSS).
    if device.type == "cuda":
        held = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        with open("/proc/self/statm") as f:
            held = int(f.read().split()[1]) * resource.getpagesize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    elapsed = (time.perf_counter() - t0) / steps
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # ru_maxrss: KiB
    print(json.dumps(dict(row=row, step_s=elapsed, peak=peak, held=held)), flush=True)


def _bench_check(arch, B, T, A, device):
    """Before timing: the re-statement must compute our model's numbers (logits, loss, gradients) in fp32.
    Returns the largest differences; raises AssertionError if they are not float rounding."""
    model, video, labels, candidates = _bench_setup(arch, B, T, A, torch.device(device))
    params = [p for p in model.parameters() if p.requires_grad]
    results = []
    for row in ("ours", "authors"):
        logits, loss = _bench_loss(row, model, video, labels, candidates)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        results.append((logits.detach(), loss.detach(), [torch.zeros_like(p) if g is None else g
                                                         for p, g in zip(params, grads)]))
    (l1, s1, g1), (l2, s2, g2) = results
    d_logits = float((l1 - l2).abs().max() / l2.abs().max().clamp_min(1e-12))
    d_loss = abs(float(s1 - s2)) / max(abs(float(s2)), 1e-12)
    # Per parameter, relative to its own scale, floored at 1e-3 of the largest gradient: the key biases of the
    # attentions have a true gradient of 0 (a shift shared by all keys leaves the softmax unchanged), so theirs
    # is float noise in both.
    g_max = max(float(b.abs().max()) for b in g2)
    d_grad = max(float((a - b).abs().max()) / max(float(b.abs().max()), 1e-3 * g_max, 1e-30) for a, b in zip(g1, g2))
    assert max(d_logits, d_loss, d_grad) < 1e-3, (
        f"the authors' re-statement does not compute our numbers (relative differences: logits {d_logits:.2e}, "
        f"loss {d_loss:.2e}, gradients {d_grad:.2e}); the timing would compare different functions")
    return d_logits, d_loss, d_grad, float(s1)


def benchmark_biefficient(arch="ViT-B/16", B=None, T=8, A=None, steps=None, device=None, precision=None):
    """Prints the training step time and peak memory of our BiEfficient (code_compat) against the authors'
    computation of the same function (`_authors_logits`), after checking that both give the same logits, loss
    and gradients. Each row runs in its own process. Memory: on CUDA torch.cuda.max_memory_allocated, on a
    CPU the process's max RSS; both in total and above what the process holds between steps (the weights and
    the AdamW state). Random CLIP weights: timing and memory do not depend on their values."""
    import json
    import subprocess
    import sys
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.startswith("cuda")
    # The authors' K400 config on a GPU (batch 32 per rank, the batch's 32 labels as the texts); on a CPU a
    # shape that fits in minutes: 2 videos, their 2 labels.
    B = B or (32 if cuda else 2)
    A = A or B
    if A < B:
        raise ValueError(f"--candidates {A} < --batch-size {B}: the candidates are the batch's labels, then others")
    steps = steps or (5 if cuda else 2)
    precision = precision or ("fp16" if cuda else "fp32")
    print(f"BiEfficient benchmark (training step, --biefficient-code-compat, the authors' loss): arch={arch} "
          f"B={B} T={T} A={A} device={device} precision={precision} steps={steps} (+1 warm-up)", flush=True)
    d_logits, d_loss, d_grad, loss = _bench_check(arch, B, T, A, device)
    print(f"  check (fp32, same weights and batch): authors' re-statement vs ours, relative max differences: "
          f"logits {d_logits:.1e}, loss {d_loss:.1e} (loss {loss:.4f}), gradients {d_grad:.1e}", flush=True)
    rows = {}
    for row in ("ours", "ours+ckpt", "authors"):
        cmd = [sys.executable, __file__, "--bench-biefficient", "--bench-row", row, "--arch", arch,
               "--batch-size", str(B), "--frames", str(T), "--candidates", str(A), "--steps", str(steps),
               "--device", device, "--precision", precision]
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode != 0:
            raise RuntimeError(f"benchmark row {row} failed ({p.returncode}):\n{p.stderr[-3000:]}")
        rows[row] = json.loads(p.stdout.strip().splitlines()[-1])
    what = "peak CUDA memory (max_memory_allocated)" if cuda else "peak process memory (max RSS)"
    print(f"  {'row':28s} {'step':>10s}   {what}: total / above weights + AdamW state")
    names = {"ours": "ours", "ours+ckpt": "ours + --grad-checkpointing", "authors": "authors' way"}
    mib = 2 ** 20
    for row, r in rows.items():
        print(f"  {names[row]:28s} {r['step_s'] * 1000:10.1f} ms   {r['peak'] / mib:9.1f} MiB / "
              f"{(r['peak'] - r['held']) / mib:9.1f} MiB")
    ref = rows["authors"]
    for row in ("ours", "ours+ckpt"):
        r = rows[row]
        print(f"  {names[row]} vs authors' way: {ref['step_s'] / r['step_s']:.2f}x faster, memory "
              f"{r['peak'] / ref['peak']:.2f}x total, {(r['peak'] - r['held']) / max(ref['peak'] - ref['held'], 1):.2f}x "
              f"above weights + state (goal on a GPU: >= 2x faster, <= 0.5x memory)")
    return rows


# ==== command line (shared by both sections) ====

def main(argv=None):
    import argparse
    import sys
    parser = argparse.ArgumentParser(description="Benchmarks of the prompt models (random CLIP weights).")
    parser.add_argument("--bench-biefficient", action="store_true",
                        help="BiEfficient training step (code-compat): ours against the authors' computation")
    parser.add_argument("--arch", default="ViT-B/16", choices=list(clip.ARCHS), help="CLIP architecture shapes")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="videos per step, B (default: 32 on cuda, the authors' per-GPU batch; 2 on cpu)")
    parser.add_argument("--frames", type=int, default=8, help="frames per video, T (the authors' K400 config: 8)")
    parser.add_argument("--candidates", type=int, default=None,
                        help="candidate class texts, A >= B: the batch's labels, then others (default: A = B)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps after one warm-up (cuda 5, cpu 2)")
    parser.add_argument("--device", default=None, choices=("cpu", "cuda"), help="default: cuda if available")
    parser.add_argument("--precision", default=None, choices=("fp32", "fp16", "bf16"),
                        help="autocast (default: fp16 + GradScaler on cuda, as the authors; fp32 on cpu)")
    parser.add_argument("--bench-row", default=None, choices=("ours", "ours+ckpt", "authors"),
                        help=argparse.SUPPRESS)  # internal: one row in its own process
    args = parser.parse_args(argv)
    if not args.bench_biefficient:
        parser.error("nothing to do: pass --bench-biefficient")
    for name in ("batch_size", "frames", "candidates", "steps"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} {value}: must be >= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU is available here; use --device cpu")
    if args.device == "cpu" and args.precision == "fp16":
        parser.error("--precision fp16 needs --device cuda (fp16 autocast is a GPU mode); use fp32 or bf16 on cpu")
    if args.bench_row:
        return _bench_row(args.bench_row, args.arch, args.batch_size, args.frames, args.candidates, args.device,
                          args.precision, args.steps)
    try:
        benchmark_biefficient(args.arch, args.batch_size, args.frames, args.candidates, args.steps, args.device,
                              args.precision)
    except (ValueError, AssertionError) as e:
        print(f"prompts.py: error: {e}", file=sys.stderr)
        sys.exit(2 if isinstance(e, ValueError) else 1)


if __name__ == "__main__":
    main()
