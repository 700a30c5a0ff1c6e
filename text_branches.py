"""Text branches of TPR: the multi-positive contrastive loss (TPR Eq. (15)-(17)), the BiEfficient authors'
multi-hot loss, then the Chinese-CLIP BERT text tower, its loader and its WordPiece tokenizer.

Needs: torch, `clip.py` (its `read_weights`, the one reader of weights files from outside, and `download`,
the one downloader) and `assets/vocab.txt` (Chinese-CLIP's WordPiece vocabulary) in an `assets/` folder beside
this file. Copy the three to use this module alone (clip.py also needs assets/bpe_simple_vocab_16e6.txt.gz).

TPR (Electronics 2024), Sec. 3.4-3.5: the English branch (the frozen CLIP text tower on "This is a video about
{label}.", Table 5's prefixes, the label's word embeddings of TPR Eq. (6)) and the Chinese branch (the frozen
ChineseCLIPText below on each class's Chinese label) are run once per label set by `prompts.TPR.set_classes`;
TPR Eq. (18)'s fusion is `prompts.TPR.scores`. Here: the losses the engine trains with.

Chinese-CLIP text tower
-----------------------
TPR (Sec. 3.3 and 4.1) encodes a predefined Chinese label dictionary with the frozen text encoder of
Chinese-CLIP (Yang et al. 2022, "Chinese CLIP: Contrastive Vision-Language Pretraining in Chinese"), the
RoBERTa-wwm-ext-base-chinese BERT of its ViT-B/16 checkpoint: the Chinese label embeddings epsilon_C that
TPR Eq. (16) contrasts with the video embeddings. This part mirrors the official code, OFA-Sys/Chinese-CLIP:
- `cn_clip/clip/modeling_bert.py` (BertModel without the pooler, post-LayerNorm blocks, exact erf GELU,
  additive -10000 padding mask) and `cn_clip/clip/model.py` `CLIP.encode_text` (mask = ids != [PAD],
  the [CLS] output @ `text_projection`), with the official parameter names so the checkpoint's text keys
  load with `strict=True` and no renaming;
- `cn_clip/clip/utils.py` (`_MODELS`, `tokenize`) and `cn_clip/clip/bert_tokenizer.py` (`FullTokenizer`:
  basic tokenization, then greedy longest-match-first WordPiece), context length 52.

Public API:
    multi_positive_contrastive_loss(logits (B, A), labels (B,), candidates (A,), label_smoothing=0.0)
    multi_hot_contrastive_loss(logits (B, A), labels (B,), candidates (A,))
    ChineseCLIPText(embed_dim, width, layers, heads, ...)   .encode_text(ids (A, N)) -> (A, E), = forward
    load_chinese_clip(name_or_path, device=None, download_root="~/.cache/chinese-clip") -> ChineseCLIPText
        (an official name, an official checkpoint, or a Hugging Face ChineseCLIPModel `model.safetensors`,
        `pytorch_model.bin` or its folder)
    available_models() -> list[str]
    ChineseTokenizer(vocab_file=assets/vocab.txt)           .tokenize(text) -> list[str], .encode(text)
    tokenize_chinese(texts, context_length=52) -> LongTensor (A, context_length)
"""
import collections
import functools
import logging
import os
import sys
import unicodedata
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import clip  # clip.read_weights and clip.download: the one reader of weights files and the one downloader

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------------------
# TPR Eq. (15)-(17): the multi-positive contrastive loss; the BiEfficient authors' multi-hot loss
# ---------------------------------------------------------------------------------------------------------


def _positives(logits, labels, candidates):
    """The (B, A) float mask of positives K(i) = {a : candidates[a] == labels[i]}; every video needs one."""
    if logits.dim() != 2 or logits.shape != (labels.shape[0], candidates.shape[0]):
        raise ValueError(f"logits {tuple(logits.shape)} must be (B, A) = ({labels.shape[0]}, {candidates.shape[0]})")
    positive = (labels[:, None] == candidates[None, :]).to(torch.float32)  # (B, A)
    if not bool((positive.sum(dim=1) > 0).all()):
        missing = labels[positive.sum(dim=1) == 0].tolist()
        raise ValueError(f"labels {missing} are not among the candidates; every video needs a positive text")
    return positive


def multi_positive_contrastive_loss(logits, labels, candidates, label_smoothing=0.0):
    """TPR Eq. (15)/(16): the symmetric multi-positive contrastive loss.

    logits (B, A): s(eps_V_i, eps_X_a) / tau for B videos and A candidate texts (already divided by tau).
    labels (B,): each video's class; candidates (A,): each text's class (duplicates allowed; in training the
    labels of the whole global batch, so A = B_global). Positives: K(i) = {a : candidates[a] == labels[i]}.

      rows    = -1/B sum_i 1/|K(i)| sum_{a in K(i)} log softmax_over_a(logits[i])[a]    (the paper's L_T->V)
      columns = -1/A' sum_a 1/|K(a)| sum_{i in K(a)} log softmax_over_i(logits[:, a])[i] (the paper's L_V->T)
      L = (rows + columns) / 2

    each direction one cross-entropy with probability targets 1/|K| on the positives.
    Paper: TPR Eq. (15) writes both directions over a batch of B (video, text) pairs; with candidates = the
    batch's labels this is exactly it. Choice: a column whose class has no video in `labels` has no positive
    and no term in TPR Eq. (15); it is left out of the column average (A' = columns with a positive). Every row
    must have a positive. TPR Eq. (17) sums this loss over the English and Chinese logits (done by the caller).

    label_smoothing eps (TPR Sec. 4.4: SSv1 uses label smoothing): each direction's target distribution becomes
    (1 - eps) * that + eps / (number of texts in a row, of videos in a column): cross_entropy's own
    label_smoothing, identical to the single-positive form with one positive each.
    """
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing={label_smoothing} must lie in [0, 1)")
    positive = _positives(logits, labels, candidates)  # (B, A)
    logits, has_pos = logits.float(), positive.sum(dim=0) > 0  # columns with a positive; (A,)
    to_texts = positive / positive.sum(dim=1, keepdim=True)  # (B, A), rows sum to 1
    to_videos = (positive / positive.sum(dim=0, keepdim=True).clamp(min=1)).t()[has_pos]  # (A', B), rows sum to 1
    loss_rows = F.cross_entropy(logits, to_texts, label_smoothing=label_smoothing)  # TPR Eq. (15): L_T->V
    loss_cols = F.cross_entropy(logits.t()[has_pos], to_videos, label_smoothing=label_smoothing)  # TPR Eq. (15) L_V->T
    return (loss_rows + loss_cols) / 2  # TPR Eq. (15) / TPR Eq. (16)


def multi_hot_contrastive_loss(logits, labels, candidates):
    """The loss of the BiEfficient authors' code (WbLiuBJTULab/BiEfficient train.py): nn.CrossEntropyLoss on
    multi-hot targets y[i, a] = 1 where labels[i] == candidates[a] (their `gen_label`), NOT row-normalised,
    in both directions, each averaged over its rows.

      rows    = -1/B sum_i sum_{a in K(i)} log softmax_over_a(logits[i])[a]
      columns = -1/A sum_a sum_{i in K(a)} log softmax_over_i(logits[:, a])[i]
      L = (rows + columns) / 2

    Paper: BiEfficient writes a contrastive loss (BiEfficient Eq. (10)) and does not say what a repeated class
    does; the code sums the log-probabilities of all k positives of a row (TPR Eq. (15),
    multi_positive_contrastive_loss, divides by k). With no repeated class both are the symmetric InfoNCE. In
    the code A = B (the batch's own labels); every column then has a positive. A column without one
    contributes 0 and still counts in the 1/A average, as nn.CrossEntropyLoss on an all-zero target row does.
    """
    target = _positives(logits, labels, candidates)  # (B, A) multi-hot, gen_label
    logits = logits.float()
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target.t())) / 2  # rows, columns


# ---------------------------------------------------------------------------------------------------------
# Chinese-CLIP BERT text tower (cn_clip/clip/modeling_bert.py, cn_clip/clip/model.py)
# ---------------------------------------------------------------------------------------------------------

PAD_ID, UNK_TOKEN, CLS_TOKEN, SEP_TOKEN = 0, "[UNK]", "[CLS]", "[SEP]"  # [PAD] is line 0 of vocab.txt
CONTEXT_LENGTH = 52  # cn_clip.clip.tokenize's default; all released models were trained with it
LAYER_NORM_EPS = 1e-12  # BertConfig(layer_norm_eps=1e-12) in cn_clip/clip/model.py
MASK_VALUE = -10000.0  # BertModel.forward: (1 - mask) * -10000, added to the attention scores
# The head count is not readable from tensor shapes. cn_clip/clip/model_configs give
# RoBERTa-wwm-ext-base-chinese and RBT3-chinese width 768 with 12 heads and RoBERTa-wwm-ext-large-chinese
# width 1024 with 16 heads: 64-wide heads in every official config.
HEADS_BY_WIDTH = {768: 12, 1024: 16}


class BertEmbeddings(nn.Module):
    def __init__(self, vocab_size, width, max_positions, type_vocab_size, dropout=0.0):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab_size, width, padding_idx=PAD_ID)
        self.position_embeddings = nn.Embedding(max_positions, width)
        self.token_type_embeddings = nn.Embedding(type_vocab_size, width)
        self.LayerNorm = nn.LayerNorm(width, eps=LAYER_NORM_EPS)
        self.dropout = dropout

    def forward(self, input_ids):  # (A, N)
        A, N = input_ids.shape
        if N > self.position_embeddings.num_embeddings:
            raise ValueError(f"input has {N} tokens, more than the model's "
                             f"{self.position_embeddings.num_embeddings} positions")
        positions = torch.arange(N, device=input_ids.device)
        # cn_clip passes no token_type_ids, so every token gets type 0 (a single-segment input).
        token_types = torch.zeros_like(input_ids)
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions) \
            + self.token_type_embeddings(token_types)  # (A, N, D)
        return F.dropout(self.LayerNorm(x), self.dropout, self.training)


class BertSelfAttention(nn.Module):
    def __init__(self, width, heads, dropout=0.0):
        super().__init__()
        assert width % heads == 0, f"width {width} is not a multiple of heads {heads}"
        self.heads, self.dropout = heads, dropout
        self.query = nn.Linear(width, width)
        self.key = nn.Linear(width, width)
        self.value = nn.Linear(width, width)

    def forward(self, x, attn_mask):  # x (A, N, D), attn_mask (A, 1, 1, N) additive
        A, N, D = x.shape
        q, k, v = (proj(x).view(A, N, self.heads, D // self.heads).transpose(1, 2)  # (A, heads, N, D/heads)
                   for proj in (self.query, self.key, self.value))
        # softmax(q k^T / sqrt(D/heads) + mask) v; the mask follows q's dtype so fp16/bf16 and autocast work.
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask.to(q.dtype),
                                           dropout_p=self.dropout if self.training else 0.0)
        return x.transpose(1, 2).reshape(A, N, D)  # (A, N, D)


class BertResidualOutput(nn.Module):
    """dense -> dropout -> LayerNorm(. + residual): BertSelfOutput and BertOutput of the official code."""

    def __init__(self, width_in, width, dropout=0.0):
        super().__init__()
        self.dense = nn.Linear(width_in, width)
        self.LayerNorm = nn.LayerNorm(width, eps=LAYER_NORM_EPS)
        self.dropout = dropout

    def forward(self, x, residual):
        return self.LayerNorm(F.dropout(self.dense(x), self.dropout, self.training) + residual)


class BertAttention(nn.Module):
    def __init__(self, width, heads, dropout=0.0):
        super().__init__()
        self.self = BertSelfAttention(width, heads, dropout)
        self.output = BertResidualOutput(width, width, dropout)

    def forward(self, x, attn_mask):
        return self.output(self.self(x, attn_mask), x)


class BertIntermediate(nn.Module):
    def __init__(self, width, intermediate):
        super().__init__()
        self.dense = nn.Linear(width, intermediate)

    def forward(self, x):
        # cn_clip's "gelu" is the exact erf form x * 0.5 * (1 + erf(x / sqrt 2)), not the tanh approximation.
        return F.gelu(self.dense(x), approximate="none")


class BertLayer(nn.Module):
    """One post-LayerNorm BERT block: x = LN(x + Attn(x)); x = LN(x + MLP(x))."""

    def __init__(self, width, heads, intermediate, dropout=0.0):
        super().__init__()
        self.attention = BertAttention(width, heads, dropout)
        self.intermediate = BertIntermediate(width, intermediate)
        self.output = BertResidualOutput(intermediate, width, dropout)

    def forward(self, x, attn_mask):  # (A, N, D)
        x = self.attention(x, attn_mask)
        return self.output(self.intermediate(x), x)


class BertEncoder(nn.Module):
    def __init__(self, width, layers, heads, intermediate, dropout=0.0):
        super().__init__()
        self.layer = nn.ModuleList([BertLayer(width, heads, intermediate, dropout) for _ in range(layers)])

    def forward(self, x, attn_mask):
        for block in self.layer:
            x = block(x, attn_mask)
        return x


class BertModel(nn.Module):
    """cn_clip's BertModel without the pooler (Chinese-CLIP drops `bert.pooler` from its checkpoints)."""

    def __init__(self, vocab_size, width, layers, heads, intermediate, max_positions, type_vocab_size,
                 dropout=0.0):
        super().__init__()
        self.embeddings = BertEmbeddings(vocab_size, width, max_positions, type_vocab_size, dropout)
        self.encoder = BertEncoder(width, layers, heads, intermediate, dropout)

    def forward(self, input_ids):  # (A, N) -> (A, N, D)
        keep = input_ids.ne(PAD_ID)  # (A, N) True for real tokens
        # (1 - mask) * -10000 exactly as cn_clip, rather than a boolean mask: identical for any row with one
        # real token, and an all-[PAD] row still gets finite (uniform) attention instead of NaN.
        attn_mask = (~keep).float()[:, None, None, :] * MASK_VALUE  # (A, 1, 1, N)
        return self.encoder(self.embeddings(input_ids), attn_mask)


class ChineseCLIPText(nn.Module):
    """Chinese-CLIP's text tower: BERT, the [CLS] output, `text_projection` to the CLIP embedding width E.

    embed_dim: E, the joint image-text embedding width (512 for ViT-B/16 and ViT-L/14).
    width, layers, heads, intermediate: the BERT's hidden size D, depth L, attention heads and MLP width.
    vocab_size, max_positions, type_vocab_size: embedding table sizes (21128, 512, 2 in every release).
    dropout: inside BERT in training mode.
    """

    def __init__(self, embed_dim=512, width=768, layers=12, heads=12, intermediate=3072, vocab_size=21128,
                 max_positions=512, type_vocab_size=2, dropout=0.0):
        super().__init__()
        # Choice: dropout 0 by default (cn_clip trains with 0.1): TPR keeps this encoder frozen, so its
        # label embeddings should not change between train() and eval().
        self.bert = BertModel(vocab_size, width, layers, heads, intermediate, max_positions, type_vocab_size,
                              dropout)
        self.text_projection = nn.Parameter(torch.empty(width, embed_dim))
        self.initialize_parameters()

    def initialize_parameters(self):
        """cn_clip's init (BertPreTrainedModel._init_weights and CLIP.initialize_parameters)."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
            if isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.text_projection, std=self.text_projection.shape[0] ** -0.5)

    def encode_text(self, input_ids):
        """CLIP.encode_text of cn_clip: (A, N) ids from `tokenize_chinese` -> (A, E) text embeddings."""
        x = self.bert(input_ids)  # (A, N, D)
        return x[:, 0, :] @ self.text_projection  # [CLS] is position 0; (A, E)

    def forward(self, input_ids):
        return self.encode_text(input_ids)


# ---------------------------------------------------------------------------------------------------------
# Official weights: registry, download, the two checkpoint forms
# ---------------------------------------------------------------------------------------------------------

# cn_clip/clip/utils.py `_MODELS` (Hugging Face repository under OFA-Sys, file name) and `_MODEL_INFO`
# (which text tower each model uses). cn_clip downloads them with huggingface_hub; the same files are plain
# HTTPS downloads at these "resolve" URLs.
# Paper: Chinese-CLIP publishes no SHA256 for its checkpoints, so there is no hash to check. A downloaded
# file is verified by loading it strictly (every text key present, none left over, every shape right); a
# cached file that fails that is set aside and downloaded again once; it is deleted only when the new copy
# loads, and put back otherwise (an offline retry must not cost the user the file they had).
_HF_URL = "https://huggingface.co/OFA-Sys/{repo}/resolve/main/{file}"
_MODELS = {
    "ViT-B-16": ("RoBERTa-wwm-ext-base-chinese", _HF_URL.format(
        repo="chinese-clip-vit-base-patch16", file="clip_cn_vit-b-16.pt")),
    "ViT-L-14": ("RoBERTa-wwm-ext-base-chinese", _HF_URL.format(
        repo="chinese-clip-vit-large-patch14", file="clip_cn_vit-l-14.pt")),
    "ViT-L-14-336": ("RoBERTa-wwm-ext-base-chinese", _HF_URL.format(
        repo="chinese-clip-vit-large-patch14-336px", file="clip_cn_vit-l-14-336.pt")),
    "ViT-H-14": ("RoBERTa-wwm-ext-large-chinese", _HF_URL.format(
        repo="chinese-clip-vit-huge-patch14", file="clip_cn_vit-h-14.pt")),
    "RN50": ("RBT3-chinese", _HF_URL.format(repo="chinese-clip-rn50", file="clip_cn_rn50.pt")),
}
_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors")


def available_models():
    """Names of the official Chinese-CLIP checkpoints (the text tower of each is what gets loaded)."""
    return list(_MODELS)


DownloadError = clip.DownloadError  # an official file could not be fetched (offline, server error)


def _text_state_dict(checkpoint, source):
    """Text-tower keys of either checkpoint form, renamed to this module's names.

    Official Chinese-CLIP: {"state_dict": {"module.bert.*", "module.text_projection" (D, E),
    "module.visual.*", "module.logit_scale"}}. Hugging Face (ChineseCLIPModel): {"text_model.*",
    "text_projection.weight" (E, D) as a Linear, "vision_model.*", "visual_projection.weight",
    "logit_scale", maybe the "text_model.embeddings.position_ids" buffer}. Returns (state dict, form name,
    number of keys skipped on purpose); keys of neither tower stay in, so strict loading reports them.
    """
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{source}: expected a dict of tensors or {{'state_dict': ...}}, "
                         f"got {type(checkpoint).__name__}")
    sd = checkpoint.get("state_dict", checkpoint)
    sd = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in sd.items()}
    text, skipped = {}, 0
    if any(k.startswith("text_model.") for k in sd):
        form = "Hugging Face"
        for k, v in sd.items():
            rest = k[len("text_model."):]
            if k.startswith("text_model.") and (rest.startswith("pooler.") or rest in (
                    "embeddings.position_ids", "embeddings.token_type_ids")):
                skipped += 1  # unused pooler (cn_clip has none) and index buffers rebuilt in forward
            elif k.startswith("text_model."):
                text["bert." + rest] = v
            elif k == "text_projection.weight":
                text["text_projection"] = v.t()  # nn.Linear (E, D) -> Parameter (D, E)
            elif k.startswith(("vision_model.", "visual_projection.")) or k == "logit_scale":
                skipped += 1
            else:
                text[k] = v
    elif any(k.startswith("bert.") for k in sd):
        form = "official Chinese-CLIP"
        for k, v in sd.items():
            if k.startswith(("visual.", "bert.pooler.")) or k == "logit_scale":
                skipped += 1  # cn_clip drops bert.pooler itself (utils.create_model)
            else:
                text[k] = v
    else:
        raise ValueError(f"{source}: no Chinese-CLIP text tower in this checkpoint: expected keys under "
                         f"'bert.' (official form) or 'text_model.' (Hugging Face form); first keys: "
                         f"{list(sd)[:5]}")
    return text, form, skipped


def _require(sd, key, source):
    if key not in sd:
        raise RuntimeError(f"{source}: checkpoint is missing key '{key}' of the Chinese-CLIP text tower")
    return sd[key]


def _build_and_load(sd, source, heads=None):
    """Build ChineseCLIPText from the tensor shapes of `sd`, then load it strictly."""
    word = _require(sd, "bert.embeddings.word_embeddings.weight", source)  # (vocab, D)
    positions = _require(sd, "bert.embeddings.position_embeddings.weight", source)  # (max positions, D)
    types = _require(sd, "bert.embeddings.token_type_embeddings.weight", source)  # (types, D)
    projection = _require(sd, "text_projection", source)  # (D, E)
    intermediate = _require(sd, "bert.encoder.layer.0.intermediate.dense.weight", source)  # (4D, D)
    width = word.shape[1]
    layers = len({k.split(".")[3] for k in sd if k.startswith("bert.encoder.layer.")})
    if heads is None:
        if width not in HEADS_BY_WIDTH:
            raise ValueError(f"{source}: text width {width} is not one of Chinese-CLIP's "
                             f"{sorted(HEADS_BY_WIDTH)}; pass heads= to say how many attention heads it has")
        heads = HEADS_BY_WIDTH[width]
    with torch.device("meta"):  # no memory, no random init: every tensor comes from the checkpoint
        model = ChineseCLIPText(embed_dim=projection.shape[1], width=width, layers=layers, heads=heads,
                                intermediate=intermediate.shape[0], vocab_size=word.shape[0],
                                max_positions=positions.shape[0], type_vocab_size=types.shape[0])
    try:  # keys and shapes compared on the meta device first: nothing is widened for a file that fails
        model.load_state_dict({k: v.to("meta") for k, v in sd.items()}, strict=True, assign=True)
    except RuntimeError as e:
        raise RuntimeError(f"{source}: checkpoint does not match the Chinese-CLIP text tower (width {width}, "
                           f"{layers} layers): {clip._one_line(e)}") from None
    # Choice: fp32 weights whatever the file holds (the official files are fp16); use autocast for bf16/fp16.
    model.load_state_dict({k: v.float().contiguous() for k, v in sd.items()}, strict=True, assign=True)
    return model.eval()


def _check_hf_config(config, source):
    """Refuse a Hugging Face Chinese-CLIP whose text configuration computes something this tower does not;
    returns its head count (not readable from shapes) or None."""
    if config.get("model_type") not in (None, "chinese_clip"):
        raise ValueError(f"{source}: config.json says model_type {config['model_type']!r}, not 'chinese_clip'")
    text = config.get("text_config") or {}
    if text.get("hidden_act", "gelu") != "gelu":  # exact erf GELU, as cn_clip's BERT
        raise ValueError(f"{source}: text_config.hidden_act is {text['hidden_act']!r}; this tower is "
                         f"cn_clip's BERT with the exact 'gelu'")
    if text.get("layer_norm_eps", LAYER_NORM_EPS) != LAYER_NORM_EPS:
        raise ValueError(f"{source}: text_config.layer_norm_eps is {text['layer_norm_eps']}, not cn_clip's "
                         f"{LAYER_NORM_EPS}")
    return text.get("num_attention_heads")


def _load_file(path, heads=None):
    """A local file or Hugging Face folder -> the text tower, read by clip.read_weights (safetensors without
    pickle; pickles with torch.load(weights_only=True); no code in the file runs)."""
    try:
        checkpoint, config = clip.read_weights(path)
    except (OSError, ValueError) as error:
        raise RuntimeError(f"not a readable checkpoint: {clip._one_line(error)}") from None
    if config is not None:
        heads = heads or _check_hf_config(config, path)
    sd, form, skipped = _text_state_dict(checkpoint, path)
    model = _build_and_load(sd, path, heads)
    logger.info(f"loaded Chinese-CLIP text tower from {path} ({form} form): {len(sd)} text tensors, "
                f"{skipped} visual / logit_scale / pooler / buffer keys skipped on purpose")
    return model


def load_chinese_clip(name_or_path, device=None, download_root="~/.cache/chinese-clip", heads=None):
    """The frozen-ready (eval mode, fp32) Chinese-CLIP text tower of an official model or a local file.

    name_or_path: one of `available_models()` (downloaded into `download_root` once), or a path to an
        official Chinese-CLIP checkpoint, or to a Hugging Face ChineseCLIPModel `model.safetensors` /
        `pytorch_model.bin` or the folder holding it (its config.json is checked and gives the head count).
    device: where to put it (default: CPU).
    heads: attention heads, only for a text width outside the official ones.
    """
    if name_or_path in _MODELS:
        url = _MODELS[name_or_path][1]
        root = os.path.expanduser(download_root)
        path = clip.download(url, root)
        try:
            model = _load_file(path, heads)
        except Exception as first_error:
            model = _download_again(url, root, path, heads, first_error)
    else:
        path = os.path.expanduser(str(name_or_path))
        if not os.path.exists(path):
            looks_like_path = (path.endswith(_CHECKPOINT_SUFFIXES) or os.sep in path
                               or (os.altsep is not None and os.altsep in path))
            if looks_like_path and str(name_or_path).replace("/", "-") not in _MODELS:
                raise FileNotFoundError(f"no checkpoint file at {path}; or give one of the model names "
                                        f"{available_models()}")
            raise ValueError(f"unknown Chinese-CLIP model '{name_or_path}'; valid names are "
                             f"{available_models()}, or give the path of a checkpoint file or Hugging Face model folder")
        model = _load_file(path, heads)
    return model.to(device) if device is not None else model


def _download_again(url, root, path, heads, first_error):
    """The cached `path` failed to load: set it aside, download a fresh copy, and delete the old one only
    once the new one loads; otherwise put it back (the failed new copy removed) and refuse."""
    aside = path + ".failed-to-load"
    logger.warning(f"cached {path} failed to load ({clip._one_line(first_error)}); downloading it again, "
                   f"keeping the old file as {aside} until the new one loads")
    os.replace(path, aside)
    try:
        clip.download(url, root)
        model = _load_file(path, heads)
    except BaseException as error:  # whatever happened (Ctrl-C too), the old file goes back in its place
        os.replace(aside, path)
        if isinstance(error, DownloadError):
            raise DownloadError(f"cached {path} failed to load ({clip._one_line(first_error)}) and {error}; the "
                                f"cached file is kept as it was") from None
        if isinstance(error, Exception):
            raise RuntimeError(f"{url} failed to load twice, refusing it: {clip._one_line(error)}; the cached "
                               f"file is kept as it was") from None
        raise
    os.remove(aside)
    return model


# Sizes for building a tower without weights (`build_random_chinese`): "base" is RoBERTa-wwm-ext-base-chinese
# (the text tower of Chinese-CLIP ViT-B-16, the one TPR uses); "tiny" exists only for smoke tests and the
# synthetic demo (its width 128 and embed_dim 64 match clip.ARCHS["tiny"]).
CHINESE_ARCHS = {
    "base": dict(embed_dim=512, width=768, layers=12, heads=12, intermediate=3072),
    "tiny": dict(embed_dim=64, width=128, layers=2, heads=2, intermediate=512),
}


def build_random_chinese(arch="tiny", embed_dim=None):
    """A randomly initialised Chinese text tower: for smoke tests and the synthetic demo only, never a
    fallback for missing weights. `embed_dim` overrides the arch's (it must equal the CLIP embed dim)."""
    if arch not in CHINESE_ARCHS:
        raise ValueError(f"unknown Chinese text tower arch {arch!r}; valid: {', '.join(CHINESE_ARCHS)}")
    config = dict(CHINESE_ARCHS[arch])
    if embed_dim is not None:
        config["embed_dim"] = embed_dim
    print(f"WARNING: building a RANDOMLY INITIALISED Chinese-CLIP text tower ({arch}); no pretrained weights.",
          file=sys.stderr)
    return ChineseCLIPText(**config).eval()


# ---------------------------------------------------------------------------------------------------------
# WordPiece tokenizer (cn_clip/clip/bert_tokenizer.py FullTokenizer, cn_clip/clip/utils.py tokenize)
# ---------------------------------------------------------------------------------------------------------

MAX_CHARS_PER_WORD = 200  # WordpieceTokenizer: a longer whitespace-separated word becomes one [UNK]


def _is_whitespace(char):
    return char in " \t\n\r" or unicodedata.category(char) == "Zs"


def _is_control(char):
    return char not in "\t\n\r" and unicodedata.category(char) in ("Cc", "Cf")


def _is_punctuation(char):
    # All ASCII non-letters/digits count as punctuation (e.g. "$", "^", "`"), as in Google's BERT.
    cp = ord(char)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(char).startswith("P")


def _is_chinese_char(cp):
    # The CJK Unified Ideographs blocks (and compatibility ideographs); not Japanese kana or Hangul,
    # which are split by whitespace like any other script.
    return (0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2A6DF
            or 0x2A700 <= cp <= 0x2B73F or 0x2B740 <= cp <= 0x2B81F or 0x2B820 <= cp <= 0x2CEAF
            or 0xF900 <= cp <= 0xFAFF or 0x2F800 <= cp <= 0x2FA1F)


class ChineseTokenizer:
    """BERT's FullTokenizer with lower-casing, as Chinese-CLIP uses it: text -> WordPiece tokens -> ids."""

    def __init__(self, vocab_file=Path(__file__).parent / "assets" / "vocab.txt"):
        if not os.path.isfile(vocab_file):
            raise FileNotFoundError(f"the Chinese-CLIP vocabulary {vocab_file} is missing: copy assets/vocab.txt of "
                                    f"this repository into an assets/ folder beside text_branches.py")
        self.vocab = collections.OrderedDict()
        with open(vocab_file, encoding="utf-8") as f:
            for index, line in enumerate(f):
                self.vocab[line.strip()] = index  # a later duplicate wins, as in bert_tokenizer.load_vocab
        self.inv_vocab = {i: token for token, i in self.vocab.items()}

    def basic_tokenize(self, text):
        """Clean, put spaces around CJK characters, split on whitespace, lower-case, strip accents, split
        off punctuation."""
        if isinstance(text, bytes):
            text = text.decode("utf-8", "ignore")
        text = "".join(" " if _is_whitespace(c) else c for c in text
                       if not (ord(c) in (0, 0xFFFD) or _is_control(c)))
        text = "".join(f" {c} " if _is_chinese_char(ord(c)) else c for c in text)
        pieces = []
        for word in text.split():
            word = "".join(c for c in unicodedata.normalize("NFD", word.lower())
                           if unicodedata.category(c) != "Mn")  # strip accents
            current = None
            for c in word:
                if _is_punctuation(c):
                    pieces.append(c)
                    current = None
                else:
                    if current is None:
                        pieces.append("")
                        current = len(pieces) - 1
                    pieces[current] += c
        return " ".join(pieces).split()

    def wordpiece(self, word):
        """Greedy longest-match-first split of one word into vocabulary pieces ('##' marks a continuation)."""
        if len(word) > MAX_CHARS_PER_WORD:
            return [UNK_TOKEN]
        pieces, start = [], 0
        while start < len(word):
            for end in range(len(word), start, -1):
                piece = word[start:end] if start == 0 else "##" + word[start:end]
                if piece in self.vocab:
                    break
            else:
                return [UNK_TOKEN]  # no prefix of the rest is in the vocabulary: the whole word is unknown
            pieces.append(piece)
            start = end
        return pieces

    def tokenize(self, text):
        return [piece for word in self.basic_tokenize(text) for piece in self.wordpiece(word)]

    def encode(self, text):
        return [self.vocab[token] for token in self.tokenize(text)]

    def decode(self, ids):
        return [self.inv_vocab[int(i)] for i in ids]


@functools.lru_cache(maxsize=1)
def _default_tokenizer():
    return ChineseTokenizer()


def tokenize_chinese(texts, context_length=CONTEXT_LENGTH, tokenizer=None):
    """cn_clip.clip.tokenize: `[CLS] tokens[:context_length - 2] [SEP]`, padded with [PAD] (0).

    Over-long text is cut silently to its first context_length - 2 tokens, as cn_clip does.
    Returns a LongTensor (A, context_length).
    """
    if isinstance(texts, str):
        texts = [texts]
    if context_length < 2:
        raise ValueError(f"context_length {context_length} leaves no room for [CLS] and [SEP]; use >= 2")
    tokenizer = tokenizer or _default_tokenizer()
    cls, sep = tokenizer.vocab[CLS_TOKEN], tokenizer.vocab[SEP_TOKEN]
    result = torch.full((len(texts), context_length), PAD_ID, dtype=torch.long)  # (A, N)
    for i, text in enumerate(texts):
        ids = [cls] + tokenizer.encode(text)[:context_length - 2] + [sep]
        result[i, :len(ids)] = torch.tensor(ids)
    return result
