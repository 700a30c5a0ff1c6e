"""CLIP ViT from the official OpenAI weights: model, loader, BPE tokenizer and preprocessing.

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
    replace (BiEfficient Eq. 5-6), returning the EOT feature and every position's output after `ln_final` @
    `text_projection` (the "word embeddings" of TPR Eq. 6 and BiEfficient Eq. 8).
ResNet CLIP models are not supported (neither paper uses them).

`python clip.py --bench` times `encode_image` against OpenAI's clip/model.py on the same random weights.
"""
import gzip
import hashlib
import html
import os
import sys
import urllib.request
import warnings
import zipfile
from collections import OrderedDict
from functools import lru_cache
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
        y = x * 1.702
        return y.sigmoid_().mul_(x)


class Attention(nn.Module):
    """Multi-head attention with nn.MultiheadAttention's parameter names, computed by SDPA, batch first.

    `extra` tokens (B, P, D) join as keys and values only: their own outputs would be dropped anyway
    (TPR Eq. (13) and TPR Eq. (14) keep only the frame tokens), so computing queries for them is skipped.

    `save_attention = True` keeps the attention weights softmax(q k^T / sqrt(D/H)) of the last call in
    `self.attention` (B, H, N, N + P) (the prompts' keys included) for visualisation (TPR Fig. 7); the output is
    the same SDPA either way.
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
        H = self.n_head
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)  # 3 x (B, N, D)
        if extra is not None:
            ek, ev = F.linear(extra, self.in_proj_weight[D:], self.in_proj_bias[D:]).chunk(2, dim=-1)  # (B, P, D)
            k, v = torch.cat([k, ek], dim=1), torch.cat([v, ev], dim=1)  # (B, N + P, D)
        q = q.view(B, N, H, D // H).transpose(1, 2)  # (B, H, N, D/H)
        k = k.view(B, k.shape[1], H, D // H).transpose(1, 2)  # (B, H, N + P, D/H)
        v = v.view(B, v.shape[1], H, D // H).transpose(1, 2)
        if self.save_attention:  # the weights SDPA applies, spelled out: (B, H, N, N + P)
            logits = q @ k.transpose(-2, -1) * (D // H) ** -0.5
            if is_causal:
                logits = logits.masked_fill(torch.ones(N, N, dtype=torch.bool, device=x.device).triu(1), float("-inf"))
            self.attention = logits.float().softmax(dim=-1).detach()
        out = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal)  # (B, H, N, D/H)
        out = out.transpose(1, 2).reshape(B, N, D)  # (B, N, D)
        return self.out_proj(out)


class ResidualAttentionBlock(nn.Module):
    def __init__(self, d_model: int, n_head: int, causal: bool = False):
        super().__init__()
        self.attn = Attention(d_model, n_head)
        self.ln_1 = LayerNorm(d_model)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(d_model, d_model * 4)),
            ("gelu", QuickGELU()),
            ("c_proj", nn.Linear(d_model * 4, d_model)),
        ]))
        self.ln_2 = LayerNorm(d_model)
        self.causal = causal

    def forward(self, x, prompts=None):
        """x (B, N, D); prompts (B, P, D) or None.

        Without prompts this is exactly CLIP's block (TPR Eq. (2)). With prompts, TPR Eq. (13):
        [Z^, P_R] = MHSA(LN([Z, P_R])) + [Z, P_R], keeping the Z rows (LN acts per token, so
        LN([Z, P_R]) = [LN(Z), LN(P_R)]); TPR Eq. (14): Z = MLP(LN(Z^)) + Z^, the prompts dropped.
        """
        if prompts is not None and self.causal:
            raise ValueError("prompt tokens can only join the (non-causal) vision blocks")
        extra = None if prompts is None else self.ln_1(prompts)
        x = x + self.attn(self.ln_1(x), extra, is_causal=self.causal)  # TPR Eq. (13)
        x = x + self.mlp(self.ln_2(x))  # TPR Eq. (14)
        return x


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, causal: bool = False):
        super().__init__()
        self.width = width
        self.layers = layers
        self.resblocks = nn.Sequential(*[ResidualAttentionBlock(width, heads, causal) for _ in range(layers)])
        self.grad_checkpointing = False  # recompute each block in backward instead of storing its activations

    def forward(self, x):
        for block in self.resblocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x


class VisionTransformer(nn.Module):
    def __init__(self, input_resolution: int, patch_size: int, width: int, layers: int, heads: int,
                 output_dim: int):
        super().__init__()
        self.input_resolution = input_resolution
        self.output_dim = output_dim
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
        x = self.conv1(x.to(self.conv1.weight.dtype))  # (B, D, H/p, W/p)
        x = x.flatten(2).transpose(1, 2)  # (B, N, D)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)  # (B, 1, D)
        x = torch.cat([cls, x], dim=1)  # (B, 1 + N, D)
        return x + self.positional_embedding.to(x.dtype)

    def head(self, x):
        """Tokens after the last block (B, 1 + N, D) -> class embedding (B, E) and patch tokens after
        ln_post (B, N, D)."""
        x = self.ln_post(x)
        return x[:, 0] @ self.proj, x[:, 1:]

    def forward(self, x, return_tokens: bool = False):
        x = self.ln_pre(self.embed(x))
        x = self.transformer(x)
        cls, patches = self.head(x)
        return (cls, patches) if return_tokens else cls


class CLIP(nn.Module):
    def __init__(self, embed_dim: int, image_resolution: int, vision_layers: int, vision_width: int,
                 vision_patch_size: int, context_length: int, vocab_size: int, transformer_width: int,
                 transformer_heads: int, transformer_layers: int):
        super().__init__()
        self.context_length = context_length
        self.visual = VisionTransformer(input_resolution=image_resolution, patch_size=vision_patch_size,
                                        width=vision_width, layers=vision_layers, heads=vision_width // 64 or 1,
                                        output_dim=embed_dim)
        self.transformer = Transformer(transformer_width, transformer_layers, transformer_heads, causal=True)
        self.vocab_size = vocab_size
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
        proj_std = (width ** -0.5) * ((2 * layers) ** -0.5)
        attn_std = width ** -0.5
        fc_std = (2 * width) ** -0.5
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
        eot_index = text.argmax(dim=-1)  # (A,)
        return self.encode_text_embeddings(self.token_embedding(text).type(self.dtype), eot_index)[0]

    def encode_text_embeddings(self, x, eot_index, return_words: bool = False, truncate: bool = True):
        """The text tower on token embeddings x (A, N, W), positional embedding added here.

        Returns (eot (A, E), words (A, N', E) or None): the output at `eot_index` and, if asked, at every
        position, both after ln_final @ text_projection. With `truncate`, only the first
        max(eot_index) + 1 positions are computed (N' = that length; otherwise N' = N).
        """
        # Choice: the causal mask means no position can change the EOT output or any earlier one, so the
        # padding after the longest sequence is skipped; the result equals the full-length computation.
        if truncate:
            x = x[:, : int(eot_index.max()) + 1]  # (A, N', W)
        x = x + self.positional_embedding[: x.shape[1]].to(x.dtype)
        x = self.ln_final(self.transformer(x))  # (A, N', W)
        eot = x[torch.arange(x.shape[0], device=x.device), eot_index] @ self.text_projection  # (A, E)
        words = x @ self.text_projection if return_words else None  # (A, N', E)
        return eot, words

    def forward(self, image, text):
        image_features = F.normalize(self.encode_image(image), dim=-1)
        text_features = F.normalize(self.encode_text(text), dim=-1)
        logits_per_image = self.logit_scale.exp() * image_features @ text_features.t()
        return logits_per_image, logits_per_image.t()


def build_model(state_dict: dict, copy: bool = True):
    """Build a CLIP ViT from a state dict's tensor shapes and load it strictly, keeping its values exactly
    (the model is fp32: fp32 tensors load bit-exact, fp16 ones are widened without rounding).

    `copy=False` lets the model take over the state dict's fp32 tensors instead of copying them (for `load`,
    whose state dict nobody else holds)."""
    state_dict = dict(state_dict)
    if any(k.startswith("visual.layer1.") or k.startswith("visual.attnpool.") for k in state_dict):
        raise ValueError(f"this is a ResNet CLIP checkpoint ({'/'.join(_RESNET_MODELS)}); only ViT models are "
                         f"supported: {', '.join(_MODELS)}")
    required = ["visual.conv1.weight", "visual.positional_embedding", "visual.proj", "text_projection",
                "positional_embedding", "token_embedding.weight", "ln_final.weight"]
    missing = [k for k in required if k not in state_dict]
    if missing:
        raise ValueError(f"not a CLIP ViT checkpoint: missing keys {missing} (it has {len(state_dict)} keys, "
                         f"e.g. {list(state_dict)[:5]})")
    for key in ["input_resolution", "context_length", "vocab_size"]:  # attributes stored in the TorchScript files
        state_dict.pop(key, None)
    not_tensors = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise ValueError(f"checkpoint entries {not_tensors} are not tensors; a CLIP state dict holds only tensors")

    vision_width = state_dict["visual.conv1.weight"].shape[0]
    # Layer counts from the block indices present under any key, so that a block missing one tensor is
    # reported as that missing key rather than silently built one layer shorter.
    vision_layers = len({k.split(".")[3] for k in state_dict if k.startswith("visual.transformer.resblocks.")})
    vision_patch_size = state_dict["visual.conv1.weight"].shape[-1]
    grid_size = round((state_dict["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    transformer_width = state_dict["ln_final.weight"].shape[0]
    # Choice: the model is built on the meta device and the checkpoint's tensors are assigned to it, widened
    # to fp32 (exact for fp16 values), which skips a random initialisation that would be overwritten anyway
    # (seconds for ViT-B, tens of seconds for ViT-L). It also means no random value can survive the load.
    state_dict = {k: v.to(torch.float32, copy=copy) for k, v in state_dict.items()}
    with torch.device("meta"):
        model = CLIP(
            embed_dim=state_dict["text_projection"].shape[1],
            image_resolution=vision_patch_size * grid_size,
            vision_layers=vision_layers, vision_width=vision_width, vision_patch_size=vision_patch_size,
            context_length=state_dict["positional_embedding"].shape[0],
            vocab_size=state_dict["token_embedding.weight"].shape[0],
            transformer_width=transformer_width,
            transformer_heads=transformer_width // 64,
            transformer_layers=len({k.split(".")[2] for k in state_dict if k.startswith("transformer.resblocks.")}),
        )
    try:
        missing, unexpected = model.load_state_dict(state_dict, strict=False, assign=True)
    except RuntimeError as e:  # shape mismatches
        raise ValueError(f"checkpoint does not match the CLIP ViT built from its shapes: {e}") from e
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match the CLIP ViT built from its shapes: missing keys {missing}, "
                         f"unexpected keys {unexpected}")
    on_meta = [n for n, t in model.state_dict().items() if t.is_meta]
    assert not on_meta, f"tensors left without a value after loading: {on_meta}"
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
# Loading
# ----------------------------------------------------------------------------------------------------------

def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _download(url: str, root: str) -> str:
    """Download `url` into `root` unless a file with the right SHA256 (the URL's second-to-last part) is there.
    A cached file with the wrong hash is downloaded again once; a download with the wrong hash is refused."""
    os.makedirs(root, exist_ok=True)
    expected = url.split("/")[-2]
    target = os.path.join(root, os.path.basename(url))
    if os.path.isfile(target):
        if _sha256(target) == expected:
            return target
        warnings.warn(f"{target} exists but its SHA256 does not match {expected}; downloading it again")
    tmp = target + ".part"
    try:
        with urllib.request.urlopen(url) as source, open(tmp, "wb") as out:
            total = int(source.headers.get("Content-Length") or 0)
            done, shown = 0, -1
            while chunk := source.read(1 << 20):
                out.write(chunk)
                done += len(chunk)
                if total and done * 20 // total != shown:
                    shown = done * 20 // total
                    print(f"\rdownloading {os.path.basename(url)}: {100 * done // total}% of {total >> 20} MiB",
                          end="", file=sys.stderr)
        print(file=sys.stderr)
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise RuntimeError(f"could not download {url} ({e}). Download it elsewhere and pass the local file "
                           f"path instead of the model name, or place it at {target}") from e
    got = _sha256(tmp)
    if got != expected:
        os.remove(tmp)
        raise RuntimeError(f"downloaded {url} has SHA256 {got}, expected {expected}; refusing to use it")
    os.replace(tmp, target)
    return target


def _read_state_dict(path: str) -> dict:
    """The state dict of an official TorchScript archive, a plain state dict, or {"state_dict": ...};
    `module.` prefixes (DDP) removed."""
    if zipfile.is_zipfile(path) and any(n.endswith("constants.pkl") for n in zipfile.ZipFile(path).namelist()):
        state_dict = torch.jit.load(path, map_location="cpu").state_dict()  # only the weights are read
    else:
        try:
            state_dict = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"{path} is neither a TorchScript archive nor a tensors-only checkpoint: {e}") from e
        if isinstance(state_dict, dict) and isinstance(state_dict.get("state_dict"), dict):
            state_dict = state_dict["state_dict"]
    if not isinstance(state_dict, dict):
        raise ValueError(f"{path} holds a {type(state_dict).__name__}, not a state dict")
    return {k.removeprefix("module."): v for k, v in state_dict.items()}


def load(name_or_path: str, device=None, download_root: str = "~/.cache/clip", dtype=None):
    """Load a CLIP ViT: an official name (downloaded once into `download_root`, SHA256-checked) or a local
    file (official TorchScript archive, state dict, {"state_dict": ...}, `module.` prefixes).

    Returns (model in eval mode, preprocess). `dtype` None keeps the file's precision on CUDA and uses fp32
    on CPU (as OpenAI's `load`); pass torch.float32 to train with autocast on fp32 master weights.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if name_or_path in _MODELS:
        path = _download(_MODELS[name_or_path], os.path.expanduser(download_root))
    elif name_or_path in _RESNET_MODELS:
        raise ValueError(f"ResNet CLIP {name_or_path!r} is not supported; supported: {', '.join(_MODELS)}")
    elif os.path.isfile(os.path.expanduser(name_or_path)):
        path = os.path.expanduser(name_or_path)
    elif os.sep in name_or_path or name_or_path.endswith((".pt", ".pth", ".bin")):
        raise FileNotFoundError(f"CLIP checkpoint {name_or_path!r} does not exist (nor is it a model name; valid "
                                f"names: {', '.join(_MODELS)})")
    else:
        raise ValueError(f"unknown CLIP model {name_or_path!r}; valid names: {', '.join(_MODELS)}, or the path to "
                         f"a checkpoint file")
    state_dict = _read_state_dict(path)
    file_dtype = state_dict["visual.proj"].dtype if "visual.proj" in state_dict else torch.float32
    model = build_model(state_dict, copy=False)
    if dtype is None:
        dtype = file_dtype if device.type == "cuda" else torch.float32
    model = model.to(device=device, dtype=dtype)
    return model, Preprocess(model.visual.input_resolution)


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
# Benchmark: `python clip.py --bench` (encode_image throughput against OpenAI's code, same weights)
# ----------------------------------------------------------------------------------------------------------

def _openai_model_module():
    """OpenAI's clip/model.py from the installed `openai-clip` package, loaded by path under another module
    name (this file shadows `clip`; the package's __init__ needs torchvision). Benchmark only."""
    import importlib.metadata
    import importlib.util
    try:
        path = importlib.metadata.distribution("openai-clip").locate_file("clip/model.py")
    except importlib.metadata.PackageNotFoundError:
        raise SystemExit("the benchmark compares against OpenAI's reference code, which is not installed: "
                         "pip install --no-deps openai-clip") from None
    spec = importlib.util.spec_from_file_location("openai_clip_model", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def bench(arch: str = "ViT-B/16", batch: int = 8, iters: int = 5, device=None):
    """Print `encode_image` throughput (images/s) of this file's CLIP and of OpenAI's on the same random
    weights: fp32 on CPU, bf16 autocast on CUDA. Returns {"ours": ips, "openai": ips}."""
    import time
    reference = _openai_model_module()
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(0)
    ours = CLIP(**ARCHS[arch]).eval()
    theirs = reference.CLIP(**ARCHS[arch]).eval()  # fp32: OpenAI's build_model would convert it to fp16
    theirs.load_state_dict(ours.state_dict())
    ours, theirs = ours.to(device), theirs.to(device)
    res = ARCHS[arch]["image_resolution"]
    images = torch.randn(batch, 3, res, res, device=device)
    # Choice: fp32 on CPU (bf16 matmuls are slow on most CPUs); bf16 autocast on CUDA, as training runs.
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def run(model):
        with torch.inference_mode(), autocast:
            out = model.encode_image(images)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return out

    a, b = run(ours).float(), run(theirs).float()  # warm-up, and a check that both compute the same
    rel = ((a - b).norm() / b.norm()).item()
    times = {"ours": [], "openai": []}
    for _ in range(iters):  # interleaved, so that a slow spell of the machine hits both alike
        for name, model in (("ours", ours), ("openai", theirs)):
            start = time.perf_counter()
            run(model)
            times[name].append(time.perf_counter() - start)
    ips = {name: batch / min(t) for name, t in times.items()}  # best of `iters`: the least disturbed run
    precision = "bf16 autocast" if device.type == "cuda" else "fp32"
    print(f"encode_image {arch} on {device.type} ({precision}), batch {batch}, best of {iters}, "
          f"{torch.get_num_threads()} threads; relative difference of the outputs {rel:.1e}")
    print(f"  clip.py : {ips['ours']:8.1f} images/s")
    print(f"  OpenAI  : {ips['openai']:8.1f} images/s")
    print(f"  speed-up: {ips['ours'] / ips['openai']:.2f}x")
    return ips


def main(argv=None):
    import argparse
    parser = argparse.ArgumentParser(description="CLIP ViT (clip.py): benchmark against OpenAI's code.")
    parser.add_argument("--bench", action="store_true", help="time encode_image against OpenAI's clip/model.py")
    parser.add_argument("--arch", default="ViT-B/16", choices=list(ARCHS), help="architecture (random weights)")
    parser.add_argument("--batch", type=int, default=8, help="images per forward")
    parser.add_argument("--iters", type=int, default=5, help="timed forwards per model (the best is reported)")
    parser.add_argument("--device", default=None, choices=["cpu", "cuda"],
                        help="one device (default: cpu, then cuda too if available)")
    args = parser.parse_args(argv)
    if not args.bench:
        parser.print_help()
        return None
    devices = [args.device] if args.device else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return {device: bench(args.arch, args.batch, args.iters, device) for device in devices}


if __name__ == "__main__":
    main()
