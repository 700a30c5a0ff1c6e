"""CLIP ViT from the official OpenAI weights: model, loader, BPE tokenizer and preprocessing.

Needs: torch, numpy, ftfy, regex, pillow, and the file `assets/bpe_simple_vocab_16e6.txt.gz` (OpenAI's BPE
vocabulary) in an `assets/` folder beside this file. Copy both to use this module alone.

Mirrors openai/CLIP `clip/model.py` (VisionTransformer, Transformer, ResidualAttentionBlock, CLIP) and
`clip/clip.py` (`load`, `tokenize`, the weight registry), with the official parameter names, so that an
official checkpoint loads with `load_state_dict(strict=True)` and no renaming. Differences, all numerically
neutral for the official models:
- Attention runs through `torch.nn.functional.scaled_dot_product_attention` in a batch-first layout
  (B, N, D) instead of `nn.MultiheadAttention` in (N, B, D); the parameters keep MultiheadAttention's names
  (`attn.in_proj_weight`, `attn.in_proj_bias`, `attn.out_proj`).
- Hooks the two papers need, so that neither forks this file:
  * `ResidualAttentionBlock.forward(x, prompts)`: extra prompt tokens join the block's attention as keys and
    values and are dropped before its MLP (TPR Eq. (13)-(14)).
  * `VisionTransformer.embed` / `.head`: the token sequence before the blocks, and the class embedding plus
    the patch tokens after `ln_post` (BiEfficient's patch memory).
  * `CLIP.encode_text_embeddings`: the text tower on token embeddings that learned prompt vectors may
    replace (BiEfficient Eq. (5)-(6)), returning the EOT feature and every position's output after
    `ln_final` @ `text_projection` (the "word embeddings" of TPR Eq. (6) and BiEfficient Eq. (8)).
- `load` never runs code from a weights file and never trusts a size the file declares: the official
  TorchScript archives are read as data (their `data.pkl` through a restricted unpickler of our own) instead
  of by `torch.jit.load`, which would run the archive's code; every other torch file goes through the same
  bounded unpickler (`read_checkpoint`). It also takes Hugging Face CLIPModel checkpoints
  (`model.safetensors`, read in plain Python + torch, `pytorch_model.bin`, or their folder), renamed onto
  OpenAI's parameters. `read_weights` is the one reader of weights files from outside for this file and
  text_branches.py; `download` the one downloader.
ResNet CLIP models are not supported (neither paper uses them). The benchmark against OpenAI's code is
`python bench/clip_forward.py`.
"""
import gzip
import hashlib
import html
import io
import json
import math
import os
import pickle
import sys
import warnings
import zipfile
from collections import OrderedDict
from functools import lru_cache, partial
from pathlib import Path

import ftfy
import numpy as np
import regex as re
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.checkpoint import checkpoint

ASSETS = Path(__file__).resolve().parent / "assets"

# The official registry: the SHA256 of each file is the second-to-last component of its URL.
_MODELS = {
    "ViT-B/32": "https://openaipublic.azureedge.net/clip/models/40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af/ViT-B-32.pt",
    "ViT-B/16": "https://openaipublic.azureedge.net/clip/models/5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f/ViT-B-16.pt",
    "ViT-L/14": "https://openaipublic.azureedge.net/clip/models/b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836/ViT-L-14.pt",
    "ViT-L/14@336px": "https://openaipublic.azureedge.net/clip/models/3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02/ViT-L-14-336px.pt",
}
_RESNET_MODELS = ("RN50", "RN101", "RN50x4", "RN50x16", "RN50x64")

# Architectures by name, as read from the official checkpoints, for building a model without weights
# (`build_random`). "tiny" exists only for smoke tests and the synthetic demo.
ARCHS = {
    "ViT-B/32": dict(embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768, vision_patch_size=32,
                     context_length=77, vocab_size=49408, transformer_width=512, transformer_heads=8,
                     transformer_layers=12),
    "ViT-B/16": dict(embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768, vision_patch_size=16,
                     context_length=77, vocab_size=49408, transformer_width=512, transformer_heads=8,
                     transformer_layers=12),
    "ViT-L/14": dict(embed_dim=768, image_resolution=224, vision_layers=24, vision_width=1024, vision_patch_size=14,
                     context_length=77, vocab_size=49408, transformer_width=768, transformer_heads=12,
                     transformer_layers=12),
    "ViT-L/14@336px": dict(embed_dim=768, image_resolution=336, vision_layers=24, vision_width=1024,
                           vision_patch_size=14, context_length=77, vocab_size=49408, transformer_width=768,
                           transformer_heads=12, transformer_layers=12),
    "tiny": dict(embed_dim=64, image_resolution=32, vision_layers=4, vision_width=128, vision_patch_size=16,
                 context_length=77, vocab_size=49408, transformer_width=128, transformer_heads=2,
                 transformer_layers=2),
}

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def available_models():
    """Names accepted by `load`."""
    return list(_MODELS)


# ----------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------

class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 whatever the input and weight dtypes (as OpenAI's, for fp16 weights)."""

    def forward(self, x):
        w = None if self.weight is None else self.weight.float()
        b = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(x.dtype)


class QuickGELU(nn.Module):
    def forward(self, x):
        if torch.is_grad_enabled() and x.requires_grad:
            return x * torch.sigmoid(1.702 * x)
        # Choice: without autograd the same values are computed in one buffer, in place (about 7% of a ViT-B
        # forward on CPU, whose MLP activations are the largest tensors).
        return (x * 1.702).sigmoid_().mul_(x)


class Attention(nn.Module):
    """Multi-head attention with nn.MultiheadAttention's parameter names, computed by SDPA, batch first.

    `extra` tokens (B, P, D) join as keys and values only: TPR Eq. (13) and TPR Eq. (14) drop their outputs,
    so no queries are computed for them. `save_attention = True` keeps softmax(q k^T / sqrt(D/H)) of the last
    call in `self.attention` (B, H, N, N + P), for visualisation (TPR Fig. 7); the output is SDPA's either way.
    """

    def __init__(self, d_model: int, n_head: int):
        super().__init__()
        assert d_model % n_head == 0, f"width {d_model} is not divisible by {n_head} heads"
        self.n_head = n_head
        self.save_attention, self.attention = False, None
        self.in_proj_weight = nn.Parameter(torch.empty(3 * d_model, d_model))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * d_model))
        self.out_proj = nn.Linear(d_model, d_model)
        nn.init.xavier_uniform_(self.in_proj_weight)  # nn.MultiheadAttention's own initialisation
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x, extra=None, is_causal=False):
        B, N, D = x.shape
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)  # 3 x (B, N, D)
        if extra is not None:
            ek, ev = F.linear(extra, self.in_proj_weight[D:], self.in_proj_bias[D:]).chunk(2, dim=-1)  # (B, P, D)
            k, v = torch.cat([k, ek], dim=1), torch.cat([v, ev], dim=1)  # (B, N + P, D)
        q, k, v = (t.unflatten(-1, (self.n_head, -1)).transpose(1, 2) for t in (q, k, v))  # (B, H, N(+P), D/H)
        if self.save_attention:  # the weights SDPA applies, spelled out: (B, H, N, N + P)
            logits = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5
            if is_causal:
                logits = logits.masked_fill(torch.ones(N, N, dtype=torch.bool, device=x.device).triu(1), float("-inf"))
            self.attention = logits.float().softmax(dim=-1).detach()
        out = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal)  # (B, H, N, D/H)
        return self.out_proj(out.transpose(1, 2).reshape(B, N, D))  # (B, N, D)


class ResidualAttentionBlock(nn.Module):
    def __init__(self, d_model: int, n_head: int, causal: bool = False):
        super().__init__()
        self.attn = Attention(d_model, n_head)
        self.ln_1 = LayerNorm(d_model)
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(d_model, d_model * 4)), ("gelu", QuickGELU()),
                                              ("c_proj", nn.Linear(d_model * 4, d_model))]))
        self.ln_2 = LayerNorm(d_model)
        self.causal = causal

    def forward(self, x, prompts=None):
        """x (B, N, D); prompts (B, P, D) or None. Without prompts this is CLIP's block (TPR Eq. (2)). With
        prompts, TPR Eq. (13): [Z^, P_R] = MHSA(LN([Z, P_R])) + [Z, P_R], keeping the Z rows (LN acts per
        token, so LN([Z, P_R]) = [LN(Z), LN(P_R)]); TPR Eq. (14): Z = MLP(LN(Z^)) + Z^, the prompts dropped."""
        if prompts is not None and self.causal:
            raise ValueError("prompt tokens can only join the (non-causal) vision blocks")
        extra = None if prompts is None else self.ln_1(prompts)
        x = x + self.attn(self.ln_1(x), extra, is_causal=self.causal)  # TPR Eq. (13)
        return x + self.mlp(self.ln_2(x))  # TPR Eq. (14)


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, causal: bool = False):
        super().__init__()
        self.width, self.layers = width, layers
        self.resblocks = nn.Sequential(*[ResidualAttentionBlock(width, heads, causal) for _ in range(layers)])
        # recompute each block in backward instead of storing its activations: False, True or "selective"
        self.grad_checkpointing = False

    def forward(self, x):
        for block in self.resblocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, **checkpoint_options(self.grad_checkpointing))
            else:
                x = block(x)
        return x


class VisionTransformer(nn.Module):
    def __init__(self, input_resolution: int, patch_size: int, width: int, layers: int, heads: int,
                 output_dim: int):
        super().__init__()
        self.input_resolution, self.output_dim = input_resolution, output_dim
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        scale = width ** -0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn((input_resolution // patch_size) ** 2 + 1, width))
        self.ln_pre = LayerNorm(width)
        self.transformer = Transformer(width, layers, heads)
        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))

    def embed(self, x):
        """Images (B, 3, H, W) -> tokens (B, 1 + N, D): patches, class token, positional embedding (before ln_pre)."""
        x = self.conv1(x.to(self.conv1.weight.dtype)).flatten(2).transpose(1, 2)  # (B, N, D)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)  # (B, 1, D)
        return torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)  # (B, 1 + N, D)

    def head(self, x):
        """Tokens after the last block (B, 1 + N, D) -> class embedding (B, E), patch tokens after ln_post (B, N, D)."""
        x = self.ln_post(x)
        return x[:, 0] @ self.proj, x[:, 1:]

    def forward(self, x, return_tokens: bool = False):
        cls, patches = self.head(self.transformer(self.ln_pre(self.embed(x))))
        return (cls, patches) if return_tokens else cls


class CLIP(nn.Module):
    def __init__(self, embed_dim: int, image_resolution: int, vision_layers: int, vision_width: int,
                 vision_patch_size: int, context_length: int, vocab_size: int, transformer_width: int,
                 transformer_heads: int, transformer_layers: int):
        super().__init__()
        self.context_length, self.vocab_size = context_length, vocab_size
        self.visual = VisionTransformer(input_resolution=image_resolution, patch_size=vision_patch_size,
                                        width=vision_width, layers=vision_layers, heads=vision_width // 64 or 1,
                                        output_dim=embed_dim)
        self.transformer = Transformer(transformer_width, transformer_layers, transformer_heads, causal=True)
        self.token_embedding = nn.Embedding(vocab_size, transformer_width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, transformer_width))
        self.ln_final = LayerNorm(transformer_width)
        self.text_projection = nn.Parameter(torch.empty(transformer_width, embed_dim))
        self.logit_scale = nn.Parameter(torch.ones([]) * np.log(1 / 0.07))
        if not self.text_projection.is_meta:  # built on the meta device by build_model, to be assigned
            self.initialize_parameters()

    def initialize_parameters(self):
        """OpenAI's initialisation (only matters for randomly initialised models)."""
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        width, layers = self.transformer.width, self.transformer.layers
        proj_std, attn_std, fc_std = width ** -0.5 * (2 * layers) ** -0.5, width ** -0.5, (2 * width) ** -0.5
        for block in self.transformer.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        nn.init.normal_(self.text_projection, std=width ** -0.5)

    @property
    def dtype(self):
        return self.visual.conv1.weight.dtype

    @property
    def embed_dim(self):
        return self.text_projection.shape[1]

    def encode_image(self, image):
        """Images (B, 3, H, W) -> (B, E)."""
        return self.visual(image.type(self.dtype))

    def encode_text(self, text):
        """Token ids (A, 77) -> (A, E), the output at the EOT token (the largest id in each row)."""
        return self.encode_text_embeddings(self.token_embedding(text).type(self.dtype), text.argmax(dim=-1))[0]

    def encode_text_embeddings(self, x, eot_index, return_words: bool = False, truncate: bool = True):
        """The text tower on token embeddings x (A, N, W), positional embedding added here. Returns (eot (A, E),
        words (A, N', E) or None): the output at `eot_index` and, if asked, at every position, both after
        ln_final @ text_projection. With `truncate`, only the first max(eot_index) + 1 positions are computed
        (N' = that length; otherwise N' = N)."""
        # Choice: the causal mask means no position can change the EOT output or any earlier one, so the
        # padding after the longest sequence is skipped; the result equals the full-length computation.
        if truncate:
            x = x[:, : int(eot_index.max()) + 1]  # (A, N', W)
        x = self.ln_final(self.transformer(x + self.positional_embedding[: x.shape[1]].to(x.dtype)))  # (A, N', W)
        eot = x[torch.arange(x.shape[0], device=x.device), eot_index] @ self.text_projection  # (A, E)
        return eot, (x @ self.text_projection if return_words else None)  # (A, N', E)

    def forward(self, image, text):
        image_features = F.normalize(self.encode_image(image), dim=-1)
        text_features = F.normalize(self.encode_text(text), dim=-1)
        logits_per_image = self.logit_scale.exp() * image_features @ text_features.t()
        return logits_per_image, logits_per_image.t()


def build_model(state_dict: dict, copy: bool = True, source: str = "checkpoint"):
    """Build a CLIP ViT from a state dict's tensor shapes and load it strictly, keeping its values exactly
    (the model is fp32: fp32 tensors load bit-exact, fp16 ones are widened without rounding). `copy=False`
    lets the model take over the state dict's fp32 tensors (for `load`, whose state dict nobody else holds)."""
    state_dict = {k: v for k, v in state_dict.items() if k not in ("input_resolution", "context_length", "vocab_size")}
    if any(k.startswith(("visual.layer1.", "visual.attnpool.")) for k in state_dict):
        raise ValueError(f"{source} is a ResNet CLIP checkpoint ({'/'.join(_RESNET_MODELS)}); only ViT models are "
                         f"supported: {', '.join(_MODELS)}")
    not_tensors = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    missing = [k for k in ("visual.conv1.weight", "visual.positional_embedding", "text_projection",
                           "positional_embedding", "token_embedding.weight", "ln_final.weight") if k not in state_dict]
    if missing or not_tensors:
        raise ValueError(f"{source} is not a CLIP ViT state dict: missing keys {missing}, entries that are not "
                         f"tensors {not_tensors} (it has {len(state_dict)} keys, e.g. {list(state_dict)[:5]})")
    # Layer counts from the block indices present under any key, so that a block missing one tensor is
    # reported as that missing key rather than silently built one layer shorter.
    def layers(prefix):
        return len({k[len(prefix):].split(".")[0] for k in state_dict if k.startswith(prefix)})

    conv, width = state_dict["visual.conv1.weight"].shape, state_dict["ln_final.weight"].shape[0]
    with torch.device("meta"):  # no memory and no random init: every value comes from the checkpoint
        model = CLIP(embed_dim=state_dict["text_projection"].shape[1],
                     image_resolution=conv[-1] * round((state_dict["visual.positional_embedding"].shape[0] - 1) ** 0.5),
                     vision_layers=layers("visual.transformer.resblocks."), vision_width=conv[0],
                     vision_patch_size=conv[-1], context_length=state_dict["positional_embedding"].shape[0],
                     vocab_size=state_dict["token_embedding.weight"].shape[0], transformer_width=width,
                     transformer_heads=width // 64, transformer_layers=layers("transformer.resblocks."))
    try:  # keys and shapes are compared on the meta device first: nothing is widened for a file that fails
        model.load_state_dict({k: v.to("meta") for k, v in state_dict.items()}, strict=True, assign=True)
    except RuntimeError as e:
        raise ValueError(f"{source} does not match the CLIP ViT built from its shapes: {_one_line(e)}") from None
    # Choice: the tensors are widened to fp32 (exact for fp16 values) and assigned, not copied into a model.
    model.load_state_dict({k: v.to(torch.float32, copy=copy) for k, v in state_dict.items()}, strict=True, assign=True)
    return model.eval()


def build_random(arch: str):
    """A randomly initialised CLIP of a named architecture: for smoke tests and the synthetic demo only."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; valid: {', '.join(ARCHS)}")
    print(f"WARNING: building a RANDOMLY INITIALISED CLIP {arch} (no pretrained weights). Results mean nothing "
          f"beyond smoke tests and the synthetic demo.", file=sys.stderr)
    model = CLIP(**ARCHS[arch]).eval()
    if arch == "tiny":
        # Choice: for the random "tiny" tower only, the class token enters the first block as zero (its
        # class_embedding and positional embedding zeroed; ln_pre maps zero to zero), so it is built from the
        # patches alone. With CLIP's random init it starts as a fixed random vector of norm sqrt(width) that
        # dominates every output: frame features of different videos have cosine ~0.97 (~0.85 with this).
        with torch.no_grad():
            model.visual.class_embedding.zero_()
            model.visual.positional_embedding[0].zero_()
    return model


# ----------------------------------------------------------------------------------------------------------
# Gradient checkpointing modes of Transformer.grad_checkpointing (below the paper: memory, not the model)
# ----------------------------------------------------------------------------------------------------------

# Selective activation checkpointing (torch >= 2.4): keep the attention outputs and the outputs of the matmuls
# that widen the token (the QKV projection, the MLP's first layer: what attention and GELU need in backward);
# recompute the cheap element-wise ops (LayerNorm, GELU, additions, casts) and the matmuls back to the residual
# width, which feed only an addition (whose backward needs nothing) and cost a twelfth of a block's matmuls.
ATTENTION_OPS = {getattr(torch.ops.aten, name).default for name in (
    "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu")
    if hasattr(torch.ops.aten, name)}
# op -> position of A in its arguments (A @ B; addmm: bias + A @ B)
MATMUL_OPS = {torch.ops.aten.mm.default: 0, torch.ops.aten.bmm.default: 0, torch.ops.aten.addmm.default: 1}


def _selective_policy(ctx, op, *args, **kwargs):
    i = MATMUL_OPS.get(op)
    widens = i is not None and args[i + 1].shape[-1] > args[i].shape[-1]  # (M, K) @ (K, N) with N > K
    policy = torch.utils.checkpoint.CheckpointPolicy
    return policy.MUST_SAVE if op in ATTENTION_OPS or widens else policy.PREFER_RECOMPUTE


def checkpoint_options(mode):
    """Keyword arguments of torch.utils.checkpoint.checkpoint for a grad_checkpointing mode: True (recompute the
    whole block) or "selective" (recompute what _selective_policy does not keep)."""
    if mode == "selective":
        contexts = torch.utils.checkpoint.create_selective_checkpoint_contexts
        return dict(use_reentrant=False, context_fn=partial(contexts, _selective_policy))
    return dict(use_reentrant=False)



# ----------------------------------------------------------------------------------------------------------
# The official load: registry, download with SHA256, the TorchScript archive read as data
# ----------------------------------------------------------------------------------------------------------

class DownloadError(RuntimeError):
    """An official file could not be fetched (offline, server error); the message names the file and URL."""


class FileRefused(ValueError):
    """A file from outside that is not read: one line naming the file and what is wrong with it."""


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download(url: str, root: str, sha256: str | None = None) -> str:
    """The one downloader: `url` into `root` once, through `torch.hub.download_url_to_file` (a temporary file,
    renamed only when complete and, with `sha256`, only when its hash matches). A cached file with the wrong
    hash is downloaded again once; a download with the wrong hash is refused and never replaces it."""
    os.makedirs(root, exist_ok=True)
    target = os.path.join(root, os.path.basename(url))
    if os.path.isfile(target):
        if sha256 is None or _sha256(target) == sha256:
            return target
        warnings.warn(f"{target} exists but its SHA256 does not match {sha256}; downloading it again")
    print(f"downloading {url} to {target}", file=sys.stderr)
    try:
        torch.hub.download_url_to_file(url, target, hash_prefix=sha256, progress=True)
    except OSError as e:
        raise DownloadError(f"cannot download {os.path.basename(target)} from {url} ({_one_line(e)}); download it "
                            f"elsewhere and pass its path, or place it at {target}") from None
    except RuntimeError as e:  # torch.hub's hash refusal
        raise RuntimeError(f"downloaded {url}: {_one_line(e)}; refusing to use it") from None
    return target


def _one_line(error) -> str:
    """An exception's message on one line."""
    return " ".join(str(error).split()) or type(error).__name__


# Reading a torch file from outside: tensors and builtins only, no code in the file runs, and no size the file
# declares is trusted. torch's own weights-only unpickler allows `builtins.bytearray(10**10)` and allocates
# what zip entries and storage records claim; this unpickler allocates only bytes the file really holds.
_STORAGE_DTYPES = {"FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
                   "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
                   "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
                   "BoolStorage": torch.bool, "UntypedStorage": torch.uint8}
MAX_OBJECTS = 1_000_000  # objects in what a file holds, counted as a tree (shared references counted each time)
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # torch.serialization.MAGIC_NUMBER of the pre-zip format


class _ScriptObject:
    """Stands in for every TorchScript class (`__torch__.*`) of an archive: it keeps the state the archive
    pickled and has none of the archive's methods, so nothing of the archive can run."""
    type_name = "?"

    def __setstate__(self, state):  # what pickle's BUILD calls: keep the data, run nothing
        self.state = state


def _same(value, *_):
    return value


def _refuse_opcode(self):
    raise pickle.UnpicklingError("refusing a pickled bytearray or out-of-band buffer: a weights file holds tensors")


class _BoundedUnpickler(pickle._Unpickler):
    """The pure-Python unpickler (whose opcodes can be controlled) reading a weights-only pickle: tensors rebuilt
    from the file's storages, containers, builtins; with `script`, TorchScript classes as `_ScriptObject`. Any
    other global (os.system, builtins.bytearray, ...) is refused. Every tensor is a view of a storage the file
    really holds; the bytes of all views together (and of decompressed entries) are charged to `budget`."""
    dispatch = dict(pickle._Unpickler.dispatch)
    for _op in (pickle.BYTEARRAY8, pickle.NEXT_BUFFER, pickle.READONLY_BUFFER):
        dispatch[_op[0]] = _refuse_opcode
    del _op

    def __init__(self, file: io.BytesIO, storage, budget: list, script: bool = False):
        super().__init__(file)  # a BytesIO, whose read(n) never allocates more than it holds
        self.storage, self.budget, self.script = storage, budget, script
        self.storages, self.classes = {}, {}

    def find_class(self, module, name):
        if self.script and (module == "__torch__" or module.startswith("__torch__.")):
            qualified = f"{module}.{name}"
            if qualified not in self.classes:
                self.classes[qualified] = type(name, (_ScriptObject,), {"type_name": qualified})
            return self.classes[qualified]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        allowed = {("torch._utils", "_rebuild_tensor_v2"): self._rebuild_tensor,
                   ("torch._utils", "_rebuild_parameter"): lambda data, grad, *_: nn.Parameter(data, grad),
                   ("collections", "OrderedDict"): OrderedDict, ("torch", "Size"): torch.Size,
                   ("builtins", "set"): set, ("builtins", "frozenset"): frozenset,
                   ("torch.jit._pickle", "restore_type_tag"): _same}
        allowed.update({("torch.jit._pickle", f"build_{kind}list"): _same
                        for kind in ("int", "double", "bool", "tensor")})
        if (module, name) not in allowed:
            raise pickle.UnpicklingError(f"refusing '{module}.{name}': only tensors, containers and builtins are "
                                         f"read from a weights file")
        return allowed[module, name]

    def persistent_load(self, pid):
        """('storage', dtype, key, location, numel[, view]) -> the storage `key` as a flat tensor."""
        if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage"
                and isinstance(pid[1], torch.dtype) and isinstance(pid[2], str) and type(pid[4]) is int
                and pid[4] >= 0 and (len(pid) == 5 or pid[5] is None)):
            raise pickle.UnpicklingError(f"unknown persistent id {str(pid)[:100]}")
        _, dtype, key, _, numel = pid[:5]
        if key not in self.storages:
            self.storages[key] = self.storage(key, dtype, numel)
        return self.storages[key]

    def _rebuild_tensor(self, storage, offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
        ints = [offset, *size, *stride] if isinstance(size, tuple) and isinstance(stride, tuple) else None
        if not (isinstance(storage, torch.Tensor) and ints and all(type(i) is int and i >= 0 for i in ints)
                and len(size) == len(stride)):
            raise pickle.UnpicklingError("malformed tensor record")
        numel = math.prod(size)  # Python integers: no wrap
        last = offset + sum((n - 1) * s for n, s in zip(size, stride)) if numel else -1
        if last >= storage.numel():
            raise pickle.UnpicklingError(f"a tensor of shape {list(size)} reaches past its storage of "
                                         f"{storage.numel()} elements")
        _charge(self.budget, numel * storage.element_size(), f"a tensor of shape {list(size)}")
        return storage.as_strided(size, stride, offset)  # a view, no copy


def _charge(budget: list, nbytes: int, what: str):
    """Take `nbytes` from budget [bytes left, what the budget is]; refuse when it runs out."""
    budget[0] -= nbytes
    if budget[0] < 0:
        raise pickle.UnpicklingError(f"{what} takes the tensors past {budget[1]}")


def _count_objects(value, path, limit=MAX_OBJECTS):
    """Refuse a structure that holds more than `limit` objects as a tree (nested shared lists can describe
    2**40 of them in a few hundred bytes, which any later walk over it would take hours for)."""
    stack, seen = [value], 0
    while stack:
        item = stack.pop()
        seen += 1
        if seen > limit:
            raise FileRefused(f"{path} holds more than {limit} objects (nested shared references); refusing it")
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple, set, frozenset)):
            stack.extend(item)
        elif isinstance(item, _ScriptObject):
            stack.append(getattr(item, "state", None))


def _zip_entry(archive, name, file_size, budget, path, expected=None) -> bytearray:
    """The bytes of one zip entry, its sizes checked against the real file before anything is allocated:
    stored entries hold what they take in the file; deflated ones are charged to the budget (zip bombs)."""
    try:
        info = archive.getinfo(name)
    except KeyError:
        raise FileRefused(f"{path}: {name} is missing from the archive") from None
    stored = info.compress_type == zipfile.ZIP_STORED
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        raise FileRefused(f"{path}: {name} uses zip compression method {info.compress_type}; torch writes stored "
                          f"entries")
    if info.header_offset + info.compress_size > file_size or (stored and info.file_size != info.compress_size):
        raise FileRefused(f"{path}: zip entry {name} claims {info.file_size} bytes ({info.compress_size} in the file) "
                          f"but the file has {file_size} bytes; refusing it")
    if expected is not None and info.file_size != expected:
        raise FileRefused(f"{path}: {name} holds {info.file_size} bytes, not the {expected} its tensors need")
    if not stored:
        try:
            _charge(budget, info.file_size, f"zip entry {name} ({info.file_size} bytes deflated from "
                                            f"{info.compress_size})")
        except pickle.UnpicklingError as e:
            raise FileRefused(f"{path}: {e}; refusing it (a zip bomb?)") from None
    buffer = bytearray(info.file_size)
    with archive.open(info) as f:
        view, done = memoryview(buffer), 0
        while done < len(buffer) and (got := f.readinto(view[done:])):
            done += got
    if done != len(buffer):
        raise FileRefused(f"{path}: zip entry {name} ended after {done} of {len(buffer)} bytes (truncated)")
    return buffer


def _zip_prefix(archive, marker=None):
    """The folder of a torch zip inside it ('ViT-B-32/', 'archive/'): the one holding data.pkl (and, for a
    TorchScript archive, constants.pkl). None if there is none."""
    names = set(archive.namelist())
    for name in names:
        folder = name[: -len("data.pkl")]
        if name.endswith("data.pkl") and folder.count("/") == 1 and (marker is None or folder + marker in names):
            return folder
    return None


def _read_zip(path, max_bytes=None, script=False):
    """What the data.pkl of a torch zip (torch.save's format, or a TorchScript archive with `script`) holds."""
    file_size = os.path.getsize(path)
    budget = [4 * file_size + (1 << 20) if max_bytes is None else max_bytes, None]
    budget[1] = f"{budget[0]} bytes (max_bytes, by default 4x the file's size plus 1 MiB)"
    try:
        with zipfile.ZipFile(path) as archive:
            prefix = _zip_prefix(archive, "constants.pkl" if script else None)
            if prefix is None:
                raise FileRefused(f"{path} is a zip file but not a torch file (no data.pkl"
                                  f"{' beside constants.pkl' if script else ''})")
            if prefix + "byteorder" in archive.namelist():
                order = _zip_entry(archive, prefix + "byteorder", file_size, budget, path).decode(errors="replace")
                if order.strip() != sys.byteorder:
                    raise FileRefused(f"{path} was written on a {order.strip()[:20]}-endian machine; this one is "
                                      f"{sys.byteorder}-endian")

            def storage(key, dtype, numel):
                data = _zip_entry(archive, f"{prefix}data/{key}", file_size, budget, path, numel * dtype.itemsize)
                return torch.frombuffer(data, dtype=dtype) if numel else torch.empty(0, dtype=dtype)

            data = _zip_entry(archive, prefix + "data.pkl", file_size, budget, path)
            value = _BoundedUnpickler(io.BytesIO(data), storage, budget, script).load()
    except FileRefused:
        raise
    except (pickle.UnpicklingError, zipfile.BadZipFile, EOFError, RuntimeError, ValueError, TypeError,
            KeyError, IndexError, AttributeError, OverflowError, MemoryError) as e:
        what = "TorchScript archive" if script else "torch file"
        raise FileRefused(f"{path}: unreadable {what}: {_one_line(e)}") from None
    _count_objects(value, path)
    return value


def _read_legacy(path, max_bytes=None):
    """torch.save's pre-zip format: magic number, protocol, system info and the object as pickles, the list
    of storage keys, then each storage as an 8-byte element count and its bytes."""
    with open(path, "rb") as f:
        raw = f.read()  # the real content, nothing more
    budget = [4 * len(raw) + (1 << 20) if max_bytes is None else max_bytes, None]
    budget[1] = f"{budget[0]} bytes (max_bytes, by default 4x the file's size plus 1 MiB)"
    storages, stream, claimed = {}, io.BytesIO(raw), [0]

    def storage(key, dtype, numel):  # filled from the end of the file once the object is read
        claimed[0] += numel * dtype.itemsize
        if claimed[0] > len(raw):
            raise pickle.UnpicklingError(f"storage {key} claims {numel} x {dtype}, more than the file's "
                                         f"{len(raw)} bytes")
        storages[key] = (dtype, numel, bytearray(numel * dtype.itemsize))
        return torch.frombuffer(storages[key][2], dtype=dtype) if numel else torch.empty(0, dtype=dtype)

    def unpickle():  # the pure-Python unpickler reads no further than its pickle: the next one continues there
        return _BoundedUnpickler(stream, storage, budget).load()

    try:
        if unpickle() != LEGACY_MAGIC:
            raise FileRefused(f"{path} is neither a safetensors file, a TorchScript archive nor a torch checkpoint "
                              f"(torch.save's zip or legacy format)")
        unpickle(), unpickle()  # protocol version, system information
        value, keys = unpickle(), unpickle()
        if not (isinstance(keys, list) and sorted(keys) == sorted(storages)):
            raise pickle.UnpicklingError("the list of storages does not match the tensors")
        for key in keys:
            dtype, numel, buffer = storages[key]
            if int.from_bytes(stream.read(8), "little") != numel or stream.readinto(buffer) != len(buffer):
                raise pickle.UnpicklingError(f"storage {key} is not the {numel} x {dtype} its tensors need "
                                             f"(truncated?)")
    except FileRefused:
        raise
    except Exception as e:  # noqa: BLE001  any pickle-level failure of a file from outside is one line
        raise FileRefused(f"{path} is neither a safetensors file, a TorchScript archive nor a readable torch "
                          f"checkpoint: {_one_line(e)}") from None
    _count_objects(value, path)
    return value


def read_checkpoint(path, max_bytes: int | None = None):
    """What a `torch.save` file (zip or legacy format) holds, like `torch.load(weights_only=True)` but bounded:
    tensors, containers and builtins only, nothing in the file runs, and memory stays within `max_bytes` of
    tensors (default 4x the file's size plus 1 MiB) and MAX_OBJECTS objects. Raises FileRefused, one line."""
    path = os.path.expanduser(str(path))
    if zipfile.is_zipfile(path):
        return _read_zip(path, max_bytes)
    return _read_legacy(path, max_bytes)


def _module_tensors(obj, prefix, out, source):
    """The tensors of a TorchScript module tree, named as its `state_dict()` names them."""
    state = getattr(obj, "state", None)
    if not isinstance(state, dict):
        # Choice: an object whose state is what its own `__getstate__` returned (custom TorchScript
        # serialisation) can only be understood by running its `__setstate__`. Without tensors it is
        # skipped; with tensors it is refused rather than guessed.
        if _holds_tensor(state):
            raise FileRefused(f"{source}: {prefix.rstrip('.') or 'the root module'} ({obj.type_name}) stores its "
                              f"tensors through its own __setstate__ code, which is never run here; save its "
                              f"state_dict() with torch.save instead")
        return
    for name, value in state.items():
        if isinstance(value, torch.Tensor):
            out[prefix + name] = value
        elif isinstance(value, _ScriptObject):
            _module_tensors(value, f"{prefix}{name}.", out, source)


def _holds_tensor(value) -> bool:
    if isinstance(value, (list, tuple)):
        return any(_holds_tensor(v) for v in value)
    if isinstance(value, dict):
        return any(_holds_tensor(v) for v in value.values())
    if isinstance(value, _ScriptObject):
        return _holds_tensor(getattr(value, "state", None))
    return isinstance(value, torch.Tensor)


def read_torchscript(path: str) -> dict:
    """The parameters and buffers of a TorchScript archive ({name: tensor}, the names of its state_dict()),
    read from `data.pkl` and `data/<key>` without `torch.jit.load`: no code of the archive runs."""
    root = _read_zip(path, script=True)
    if not isinstance(root, _ScriptObject):
        raise FileRefused(f"{path}: the archive's data.pkl holds a {type(root).__name__}, not a module")
    tensors = {}
    _module_tensors(root, "", tensors, path)
    return tensors


def read_weights(path: str):
    """Everything a weights file (or Hugging Face model folder) holds, and its config.json if any:
    returns (checkpoint, config). `checkpoint` is a {name: tensor} dict for safetensors and TorchScript
    archives, and what `read_checkpoint` gives for other torch files ({"state_dict": ...} forms included).
    The format is read from the file's first bytes, not its name (Hugging Face cache blobs have none). No
    code in the file runs, and no size it declares is trusted."""
    path = os.path.expanduser(str(path))
    config = hf_config(path)
    if os.path.isdir(path):
        found = [os.path.join(path, name) for name in HF_WEIGHTS_FILES if os.path.isfile(os.path.join(path, name))]
        if not found:
            sharded = [n for n in os.listdir(path) if n.endswith(".index.json")]
            detail = f"; sharded checkpoints ({', '.join(sharded)}) are not read" if sharded else ""
            raise FileNotFoundError(f"folder {path} holds none of {', '.join(HF_WEIGHTS_FILES)}{detail}")
        path = found[0]
    with open(path, "rb") as f:
        head = f.read(9)
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            is_torchscript = _zip_prefix(archive, "constants.pkl") is not None
        return (read_torchscript(path) if is_torchscript else _read_zip(path)), config
    if path.endswith(".safetensors") or head[8:9] == b"{":  # an 8-byte length, then the JSON header
        return read_safetensors(path), config
    return _read_legacy(path), config


def _read_state_dict(path: str) -> dict:
    """The state dict, in OpenAI's names, of any accepted form: official TorchScript archive, plain state
    dict, {"state_dict": ...}, `module.` prefixes (DDP), Hugging Face CLIPModel (.safetensors, .bin, folder)."""
    state_dict, config = read_weights(path)
    if isinstance(state_dict, dict) and isinstance(state_dict.get("state_dict"), dict):
        state_dict = state_dict["state_dict"]
    if not isinstance(state_dict, dict):
        raise ValueError(f"{path} holds a {type(state_dict).__name__}, not a state dict")
    state_dict = {k.removeprefix("module."): v for k, v in state_dict.items()}
    # Choice: a config.json describes the weights beside it whatever their names (a folder of another model
    # type holding OpenAI-named keys is refused, not read as CLIP). Without one the architecture comes from
    # the shapes and the activation is assumed to be OpenAI's QuickGELU, as for every OpenAI model on the hub.
    if config is not None:
        _check_hf_clip_config(config, path)
    if any(k.startswith(("text_model.", "vision_model.")) for k in state_dict):
        state_dict = from_hugging_face(state_dict)
    return state_dict


def load(name_or_path: str, device=None, download_root: str = "~/.cache/clip", dtype=None):
    """Load a CLIP ViT: an official name (downloaded once into `download_root`, SHA256-checked) or a local
    file or folder: official TorchScript archive, state dict, {"state_dict": ...}, `module.` prefixes, or a
    Hugging Face CLIPModel (`model.safetensors`, `pytorch_model.bin`, or the folder holding it and its
    config.json). See `read_weights`: no code in the file runs.

    Returns (model in eval mode, preprocess). `dtype` None keeps the file's precision on CUDA and uses fp32
    on CPU (as OpenAI's `load`); pass torch.float32 to train with autocast on fp32 master weights.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if name_or_path in _MODELS:
        url = _MODELS[name_or_path]
        path = download(url, os.path.expanduser(download_root), sha256=url.split("/")[-2])
    elif name_or_path in _RESNET_MODELS:
        raise ValueError(f"ResNet CLIP {name_or_path!r} is not supported; supported: {', '.join(_MODELS)}")
    elif os.path.exists(os.path.expanduser(name_or_path)):
        path = os.path.expanduser(name_or_path)
    elif os.sep in name_or_path or name_or_path.endswith((".pt", ".pth", ".bin", ".safetensors")):
        raise FileNotFoundError(f"CLIP checkpoint {name_or_path!r} does not exist (nor is it a model name; valid "
                                f"names: {', '.join(_MODELS)})")
    else:
        raise ValueError(f"unknown CLIP model {name_or_path!r}; valid names: {', '.join(_MODELS)}, or the path to "
                         f"a checkpoint file or Hugging Face model folder")
    state_dict = _read_state_dict(path)
    file_dtype = state_dict["visual.proj"].dtype if "visual.proj" in state_dict else torch.float32
    model = build_model(state_dict, copy=False, source=path)
    if dtype is None:
        dtype = file_dtype if device.type == "cuda" else torch.float32
    model = model.to(device=device, dtype=dtype)
    return model, Preprocess(model.visual.input_resolution)


# ----------------------------------------------------------------------------------------------------------
# Tokenizer: OpenAI's byte-level BPE (clip/simple_tokenizer.py)
# ----------------------------------------------------------------------------------------------------------

@lru_cache()
def bytes_to_unicode():
    """Reversible map from utf-8 bytes to printable unicode characters, avoiding whitespace/control chars."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(2 ** 8):
        if b not in bs:
            bs.append(b)
            cs.append(2 ** 8 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def get_pairs(word):
    return {(a, b) for a, b in zip(word[:-1], word[1:])}


def basic_clean(text):
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text))
    return text.strip()


def whitespace_clean(text):
    return re.sub(r"\s+", " ", text).strip()


class SimpleTokenizer:
    def __init__(self, bpe_path: str = str(ASSETS / "bpe_simple_vocab_16e6.txt.gz")):
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {v: k for k, v in self.byte_encoder.items()}
        if not os.path.isfile(bpe_path):
            raise FileNotFoundError(f"the BPE vocabulary {bpe_path} is missing: copy "
                                    f"assets/bpe_simple_vocab_16e6.txt.gz of this repository into an assets/ folder "
                                    f"beside clip.py")
        merges = gzip.open(bpe_path).read().decode("utf-8").split("\n")
        merges = [tuple(m.split()) for m in merges[1:49152 - 256 - 2 + 1]]
        vocab = list(bytes_to_unicode().values())
        vocab = vocab + [v + "</w>" for v in vocab]
        vocab += ["".join(m) for m in merges]
        vocab += ["<|startoftext|>", "<|endoftext|>"]
        self.encoder = dict(zip(vocab, range(len(vocab))))
        self.decoder = {v: k for k, v in self.encoder.items()}
        self.bpe_ranks = dict(zip(merges, range(len(merges))))
        self.cache = {"<|startoftext|>": "<|startoftext|>", "<|endoftext|>": "<|endoftext|>"}
        self.pat = re.compile(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
                              re.IGNORECASE)

    def bpe(self, token):
        if token in self.cache:
            return self.cache[token]
        word = tuple(token[:-1]) + (token[-1] + "</w>",)
        pairs = get_pairs(word)
        if not pairs:
            return token + "</w>"
        while True:
            bigram = min(pairs, key=lambda pair: self.bpe_ranks.get(pair, float("inf")))
            if bigram not in self.bpe_ranks:
                break
            first, second = bigram
            new_word = []
            i = 0
            while i < len(word):
                try:
                    j = word.index(first, i)
                except ValueError:
                    new_word.extend(word[i:])
                    break
                new_word.extend(word[i:j])
                i = j
                if word[i] == first and i < len(word) - 1 and word[i + 1] == second:
                    new_word.append(first + second)
                    i += 2
                else:
                    new_word.append(word[i])
                    i += 1
            word = tuple(new_word)
            if len(word) == 1:
                break
            pairs = get_pairs(word)
        word = " ".join(word)
        self.cache[token] = word
        return word

    def encode(self, text):
        bpe_tokens = []
        text = whitespace_clean(basic_clean(text)).lower()
        for token in re.findall(self.pat, text):
            token = "".join(self.byte_encoder[b] for b in token.encode("utf-8"))
            bpe_tokens.extend(self.encoder[bpe_token] for bpe_token in self.bpe(token).split(" "))
        return bpe_tokens

    def decode(self, tokens):
        text = "".join(self.decoder[token] for token in tokens)
        return bytearray([self.byte_decoder[c] for c in text]).decode("utf-8", errors="replace").replace("</w>", " ")


_tokenizer = None


def tokenize(texts, context_length: int = 77, truncate: bool = False) -> torch.Tensor:
    """Texts -> (A, context_length) token ids: <|startoftext|> text <|endoftext|>, zero padded.

    An over-long text raises RuntimeError, or with `truncate` keeps its first context_length tokens with the
    last replaced by <|endoftext|>, as OpenAI's. Returns int64 (OpenAI's returns int32; same values).
    """
    global _tokenizer
    if _tokenizer is None:
        _tokenizer = SimpleTokenizer()
    if isinstance(texts, str):
        texts = [texts]
    sot, eot = _tokenizer.encoder["<|startoftext|>"], _tokenizer.encoder["<|endoftext|>"]
    result = torch.zeros(len(texts), context_length, dtype=torch.long)
    for i, text in enumerate(texts):
        tokens = [sot] + _tokenizer.encode(text) + [eot]
        if len(tokens) > context_length:
            if not truncate:
                raise RuntimeError(f"Input {text} is too long for context length {context_length}")
            tokens = tokens[:context_length]
            tokens[-1] = eot
        result[i, : len(tokens)] = torch.tensor(tokens)
    return result


# ----------------------------------------------------------------------------------------------------------
# Preprocessing (torchvision-free equivalent of OpenAI's Resize(bicubic), CenterCrop, ToTensor, Normalize)
# ----------------------------------------------------------------------------------------------------------

class Preprocess:
    """PIL image -> (3, n_px, n_px) float tensor: bicubic resize of the short side to n_px, centre crop,
    CLIP mean/std."""

    def __init__(self, n_px: int):
        self.n_px = n_px

    def __call__(self, image: Image.Image) -> torch.Tensor:
        w, h = image.size
        short, long = min(w, h), max(w, h)
        new_long = int(self.n_px * long / short)  # torchvision's rounding of the long side
        size = (self.n_px, new_long) if w <= h else (new_long, self.n_px)
        if size != (w, h):
            image = image.resize(size, Image.BICUBIC)
        w, h = image.size
        left, top = int(round((w - self.n_px) / 2.0)), int(round((h - self.n_px) / 2.0))
        image = image.crop((left, top, left + self.n_px, top + self.n_px))
        # RGB conversion after resize and crop, in OpenAI's order: it matters for palette and RGBA images.
        image = image.convert("RGB")
        x = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255  # (3, H, W)
        mean = torch.tensor(OPENAI_MEAN).view(3, 1, 1)
        std = torch.tensor(OPENAI_STD).view(3, 1, 1)
        return (x - mean) / std

    def __repr__(self):
        return f"Preprocess(n_px={self.n_px}, bicubic short-side resize, centre crop, CLIP mean/std)"


# ----------------------------------------------------------------------------------------------------------
# Other weight forms: Hugging Face CLIPModel (safetensors, pytorch_model.bin, folders)
# ----------------------------------------------------------------------------------------------------------

SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}
SAFETENSORS_MAX_HEADER = 100_000_000  # bytes; the limit of the safetensors library itself
HF_WEIGHTS_FILES = ("model.safetensors", "pytorch_model.bin")  # in Hugging Face's order of preference


def read_safetensors(path: str) -> dict:
    """A `.safetensors` file -> {name: tensor}: an 8-byte little-endian header length N, N bytes of JSON
    ({name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}), then the raw
    little-endian buffers, which must tile the rest of the file exactly. Any header that does not describe
    the file is refused with one line."""
    if sys.byteorder != "little":
        raise FileRefused(f"{path}: safetensors buffers are little-endian; this {sys.byteorder}-endian machine "
                         f"cannot use them as they are")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise FileRefused(f"{path}: not a safetensors file ({size} bytes, shorter than the 8-byte header length)")
        n = int.from_bytes(head, "little")
        if not 2 <= n <= min(SAFETENSORS_MAX_HEADER, size - 8):
            raise FileRefused(f"{path}: safetensors header length {n} does not fit a {size}-byte file (truncated, "
                             f"or not a safetensors file)")
        try:
            header = json.loads(f.read(n).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise FileRefused(f"{path}: safetensors header is not JSON ({e})") from None
        if not isinstance(header, dict):
            raise FileRefused(f"{path}: safetensors header is a JSON {type(header).__name__}, not an object")
        header.pop("__metadata__", None)
        entries = []
        for name, info in header.items():
            ok = (isinstance(info, dict) and info.get("dtype") in SAFETENSORS_DTYPES
                  and isinstance(info.get("shape"), list) and isinstance(info.get("data_offsets"), list)
                  and len(info["data_offsets"]) == 2
                  and all(type(d) is int and 0 <= d < 2 ** 63 for d in info["shape"] + info["data_offsets"]))
            if not ok:
                raise FileRefused(f"{path}: safetensors header entry {name!r} is not {{dtype in "
                                 f"{'/'.join(SAFETENSORS_DTYPES)}, shape, data_offsets}}: {str(info)[:200]}")
            entries.append((info["data_offsets"][0], info["data_offsets"][1], name, info))
        data_size = size - 8 - n
        position = 0
        for begin, end, name, info in sorted(entries):
            nbytes = math.prod(info["shape"]) * SAFETENSORS_DTYPES[info["dtype"]].itemsize  # Python ints: no wrap
            if begin != position or end - begin != nbytes:
                raise FileRefused(f"{path}: safetensors header lies about {name!r}: bytes [{begin}, {end}) for "
                                 f"{info['dtype']} {info['shape']} ({nbytes} bytes), expected to start at {position}")
            position = end
        if position != data_size:
            raise FileRefused(f"{path}: safetensors header describes {position} bytes of tensors but the file holds "
                             f"{data_size} (truncated or padded)")
        buffer = bytearray(data_size)
        if f.readinto(buffer) != data_size:
            raise FileRefused(f"{path}: file ended while reading its tensors (truncated)")
    tensors = {}
    for begin, end, name, info in entries:
        dtype = SAFETENSORS_DTYPES[info["dtype"]]
        if begin == end:
            tensors[name] = torch.empty(info["shape"], dtype=dtype)
        elif begin % dtype.itemsize:  # an odd offset (after an odd-length int8/fp16 tensor): copy to align
            tensors[name] = torch.frombuffer(bytearray(buffer[begin:end]), dtype=dtype).reshape(info["shape"])
        else:  # a view of the one buffer, no copy
            tensors[name] = torch.frombuffer(buffer, dtype=dtype, count=(end - begin) // dtype.itemsize,
                                             offset=begin).reshape(info["shape"])
    return tensors


def hf_config(path: str) -> dict | None:
    """The Hugging Face `config.json` of a folder, or of the folder holding a weights file; None if absent."""
    folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    config = os.path.join(folder, "config.json")
    if not os.path.isfile(config):
        return None
    try:
        with open(config, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{config}: unreadable ({_one_line(e)})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{config}: a JSON {type(value).__name__}, not a model configuration")
    # Choice: beside a single file, only a configuration that describes a (Chinese-)CLIP counts; any other
    # config.json next to it (of a run folder, another model) is not this file's.
    if not os.path.isdir(path) and value.get("model_type") not in ("clip", "chinese_clip"):
        return None
    return value


# Hugging Face CLIPModel names -> OpenAI's. Per block: q/k/v projections are merged into in_proj (below).
_HF_CLIP_NAMES = {
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
    "vision_model.embeddings.class_embedding": "visual.class_embedding",
    "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
    "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
    "vision_model.pre_layrnorm.weight": "visual.ln_pre.weight",  # sic: Hugging Face's spelling
    "vision_model.pre_layrnorm.bias": "visual.ln_pre.bias",
    "vision_model.post_layernorm.weight": "visual.ln_post.weight",
    "vision_model.post_layernorm.bias": "visual.ln_post.bias",
    "logit_scale": "logit_scale",
}
_HF_BLOCK_NAMES = {"self_attn.out_proj.": "attn.out_proj.", "layer_norm1.": "ln_1.", "layer_norm2.": "ln_2.",
                   "mlp.fc1.": "mlp.c_fc.", "mlp.fc2.": "mlp.c_proj."}


def from_hugging_face(state_dict: dict) -> dict:
    """A Hugging Face CLIPModel state dict in OpenAI's names. The projections are nn.Linear weights (E, D)
    there and (D, E) matrices here, so they are transposed; `position_ids` (an index buffer) is dropped. A
    key of neither form keeps its name, so that strict loading reports it."""
    out, qkv = {}, {}
    for key, value in state_dict.items():
        block = re.fullmatch(r"(text|vision)_model\.encoder\.layers\.(\d+)\.(.+)", key)
        if key.endswith("embeddings.position_ids"):
            continue
        elif key in _HF_CLIP_NAMES:
            out[_HF_CLIP_NAMES[key]] = value
        elif key in ("text_projection.weight", "visual_projection.weight"):
            out["text_projection" if key[0] == "t" else "visual.proj"] = value.t().contiguous()  # (E, D) -> (D, E)
        elif block:
            tower, index, rest = block.groups()
            prefix = f"{'visual.' if tower == 'vision' else ''}transformer.resblocks.{index}."
            projection = re.fullmatch(r"self_attn\.([qkv])_proj\.(weight|bias)", rest)
            mapped = [ours + rest[len(hf):] for hf, ours in _HF_BLOCK_NAMES.items() if rest.startswith(hf)]
            if projection:
                qkv.setdefault(f"{prefix}attn.in_proj_{projection[2]}", {})[projection[1]] = (key, value)
            elif mapped:
                out[prefix + mapped[0]] = value
            else:
                out[key] = value
        else:
            out[key] = value
    for name, parts in qkv.items():
        missing = [m for m in "qkv" if m not in parts]
        if missing:
            present, (key, _) = next(iter(parts.items()))  # e.g. text_model.encoder.layers.3.self_attn.q_proj.bias
            raise ValueError(f"Hugging Face CLIP checkpoint is missing key "
                             f"{key.replace(f'.{present}_proj.', f'.{missing[0]}_proj.')}")
        # MultiheadAttention's packed layout: rows [q; k; v]. (3D, D) weights, (3D,) biases.
        out[name] = torch.cat([parts[p][1] for p in "qkv"])
    return out


def _check_hf_clip_config(config: dict, source: str):
    """Refuse a Hugging Face CLIP whose configuration computes something this file's CLIP does not."""
    if config.get("model_type") not in (None, "clip"):
        hint = "; it is Chinese-CLIP: pass it as the Chinese text tower" if config["model_type"] == "chinese_clip" else ""
        raise ValueError(f"{source}: config.json says model_type {config['model_type']!r}, not 'clip'{hint}")
    architectures = config.get("architectures")
    if isinstance(architectures, list) and not any(str(a).startswith("CLIP") for a in architectures):
        raise ValueError(f"{source}: config.json says architectures {architectures}, not a CLIP model")
    for tower in ("text_config", "vision_config"):
        c = config.get(tower) or {}
        if c.get("hidden_act", "quick_gelu") != "quick_gelu":  # transformers' default for CLIP is quick_gelu
            raise ValueError(f"{source}: {tower}.hidden_act is {c['hidden_act']!r}; clip.py implements OpenAI's "
                             f"'quick_gelu' only, so this model's outputs would differ")
        if c.get("layer_norm_eps", 1e-5) != 1e-5:
            raise ValueError(f"{source}: {tower}.layer_norm_eps is {c['layer_norm_eps']}; clip.py uses OpenAI's 1e-5")
        width, heads = c.get("hidden_size"), c.get("num_attention_heads")
        if width and heads and width != 64 * heads:
            raise ValueError(f"{source}: {tower} has {heads} heads of width {width // heads}; clip.py builds "
                             f"OpenAI's 64-wide heads (width / 64 = {width // 64})")
