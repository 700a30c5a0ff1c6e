"""TPR's reparameterization encoder P_R = R(P) = beta(P) + P (Eq. 12, Fig. 4) and the beta networks of its
Table 3 / Table 4 ablations.

Paper: "Adapting CLIP for Action Recognition via Dual Semantic Supervision and Temporal Prompt
Reparameterization" (Electronics 2024), Sec. 3.3.2 and 4.2.4-4.2.5. The idea follows the prompt encoders of
P-tuning (a small network re-encodes the learned prompts before they reach the frozen model). There is no
public code; every shape decision below is marked `# Choice:`.

Input and output: the temporal prompts of one layer, P (B, T, P, D): for each of the T frames of a video, its
P = 1 + S + T prompt tokens [C_t, G_t, I^_t] of width D (Eq. 10-11).

Every beta has the same frame: LayerNorm -> down-projection D -> h -> core -> GELU -> up-projection h -> D.
The cores (beta names as accepted by `ReparamEncoder(beta=...)`):
  "r2plus1d"    ST-block after R(2+1)D (default, Fig. 4b): the (T, P) grid of a video is a tiny
                space-time volume whose "space" is the prompt-token axis; a "spatial" 2D conv with kernel
                (1, 3) over the prompt axis, GELU, then a 1D temporal conv with kernel (3, 1) over the frames.
  "c3d"         C3D: one full 3 x 3 space-time conv over (T, P).
  "tada"        TAdaConv: the (1, 3) conv over the prompt axis with weights calibrated per frame,
                W_t = alpha_t * W_b, alpha_t = 1 + conv1d(GELU(conv1d(x_t + g(x_bar))))[t] over the frames,
                x_t = mean_P(x) the frame descriptors, x_bar their mean over the video (TAdaConv's global
                context, through a 1x1 conv g), calibrating the input channels (TAdaConv's `cal_dim="cin"`).
  "mlp"         bottleneck MLP: down, GELU, up, per token.
  "transformer" two pre-LN Transformer encoder layers (width h) over the T * P tokens of a video.
  "lstm"        bidirectional LSTM over the T frames, one sequence per prompt-token position.
"""
import torch
import torch.nn.functional as F
from torch import nn

BETAS = ("r2plus1d", "c3d", "tada", "mlp", "transformer", "lstm")


class _ConvCore(nn.Module):
    """R(2+1)D and C3D cores on (B, T, P, h) by 2D convolutions over the (T, P) grid."""

    def __init__(self, h: int, kind: str):
        super().__init__()
        self.kind = kind
        if kind == "r2plus1d":
            self.spatial = nn.Conv2d(h, h, kernel_size=(1, 3), padding=(0, 1))  # over the prompt axis P
            self.temporal = nn.Conv2d(h, h, kernel_size=(3, 1), padding=(1, 0))  # over the frame axis T
        else:  # c3d
            self.conv = nn.Conv2d(h, h, kernel_size=(3, 3), padding=(1, 1))  # joint space-time kernel

    def forward(self, x):  # (B, T, P, h)
        x = x.permute(0, 3, 1, 2)  # (B, h, T, P)
        if self.kind == "r2plus1d":
            x = self.temporal(F.gelu(self.spatial(x)))
        else:
            x = self.conv(x)
        return x.permute(0, 2, 3, 1)  # (B, T, P, h)


class _TAdaCore(nn.Module):
    """TAdaConv (Huang et al., ICLR 2022) on the prompt axis: a (1, 3) conv whose weights are calibrated per
    frame by alpha_t (B, h, T) generated from the frames' prompt descriptors and the video's global context by
    two temporal 1D convs (TAdaConv's RouteFuncMLP: a(x + g(globalpool(x))), then b).

    Choice: GELU between the two convs instead of RouteFuncMLP's BatchNorm + ReLU (a batch of B videos of
    prompts is small, and every beta here uses GELU)."""

    def __init__(self, h: int, reduction: int = 4):
        super().__init__()
        self.conv = nn.Conv2d(h, h, kernel_size=(1, 3), padding=(0, 1))  # W_b, over the prompt axis P
        self.globe = nn.Conv1d(h, h, kernel_size=1)  # g: the global context term of TAdaConv's calibration
        self.alpha_a = nn.Conv1d(h, max(h // reduction, 1), kernel_size=3, padding=1)
        self.alpha_b = nn.Conv1d(max(h // reduction, 1), h, kernel_size=3, padding=1)
        nn.init.zeros_(self.alpha_b.weight)  # alpha_t = 1 at start, as TAdaConv initialises it
        nn.init.zeros_(self.alpha_b.bias)

    def forward(self, x):  # (B, T, P, h)
        x = x.permute(0, 3, 1, 2)  # (B, h, T, P)
        g = x.mean(dim=3)  # frame descriptors (B, h, T)
        context = self.globe(g.mean(dim=2, keepdim=True))  # global context of the video (B, h, 1)
        alpha = 1 + self.alpha_b(F.gelu(self.alpha_a(g + context)))  # (B, h, T)
        # W_t = alpha_t * W_b on the input channels equals scaling frame t's input channels by alpha_t.
        x = self.conv(x * alpha[..., None])  # (B, h, T, P)
        return x.permute(0, 2, 3, 1)  # (B, T, P, h)


class _TransformerCore(nn.Module):
    """Two pre-LN Transformer encoder layers over the T * P prompt tokens of a video."""

    def __init__(self, h: int, T: int, P: int, layers: int = 2):
        super().__init__()
        # Choice: a learned position embedding over the T * P tokens; without one this beta could not tell the
        # frames or the prompt kinds apart (attention is permutation-equivariant).
        self.positional_embedding = nn.Parameter(torch.randn(T * P, h) * 0.02)
        layer = nn.TransformerEncoderLayer(h, nhead=max(h // 64, 1), dim_feedforward=4 * h, dropout=0.0,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)

    def forward(self, x):  # (B, T, P, h)
        B, T, P, h = x.shape
        x = x.reshape(B, T * P, h) + self.positional_embedding.to(x.dtype)  # (B, T * P, h)
        return self.encoder(x).reshape(B, T, P, h)  # (B, T, P, h)


class _LSTMCore(nn.Module):
    """Bidirectional LSTM over the frames, one sequence per prompt-token position (h/2 per direction)."""

    def __init__(self, h: int):
        super().__init__()
        assert h % 2 == 0, f"the LSTM beta needs an even hidden width, got {h}"
        self.lstm = nn.LSTM(h, h // 2, batch_first=True, bidirectional=True)

    def forward(self, x):  # (B, T, P, h)
        B, T, P, h = x.shape
        x = x.transpose(1, 2).reshape(B * P, T, h)  # (B * P, T, h)
        x = self.lstm(x)[0]  # (B * P, T, h)
        return x.reshape(B, P, T, h).transpose(1, 2)  # (B, T, P, h)


class Beta(nn.Module):
    """One beta network: LN -> Linear(D, h) -> core -> GELU -> Linear(h, D); (B, T, P, D) -> (B, T, P, D)."""

    def __init__(self, beta: str, D: int, T: int, P: int, hidden: int, zero_init: bool):
        super().__init__()
        if beta not in BETAS:
            raise ValueError(f"unknown beta {beta!r}; valid: {', '.join(BETAS)}")
        self.ln = nn.LayerNorm(D)
        self.down = nn.Linear(D, hidden)
        if beta in ("r2plus1d", "c3d"):
            self.core = _ConvCore(hidden, beta)
        elif beta == "tada":
            self.core = _TAdaCore(hidden)
        elif beta == "transformer":
            self.core = _TransformerCore(hidden, T, P)
        elif beta == "lstm":
            self.core = _LSTMCore(hidden)
        else:  # mlp: the bottleneck's own activation is the core
            self.core = nn.Identity()
        self.up = nn.Linear(hidden, D)
        if zero_init:
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)

    def forward(self, p):  # (B, T, P, D)
        return self.up(F.gelu(self.core(self.down(self.ln(p)))))  # (B, T, P, D)


class ReparamEncoder(nn.Module):
    """R(P) = beta(P) + P (Eq. 12), or beta(P) alone with residual=False (Table 4's "x" rows).

    beta: one of BETAS ("r2plus1d" is the paper's default ST-block).
    D: prompt width (the vision width). T: frames. P: prompt tokens per frame, 1 + S + T.
    residual: Eq. (12)'s "+ P".
    hidden: bottleneck width h of beta; default D // 4.
    layers: None = one beta shared by all layers; an int L = one beta per layer (forward's `layer` picks it).
    zero_init: zero the up-projection so that R(P) = P at the start; default = residual.
    """

    def __init__(self, beta: str = "r2plus1d", D: int = 768, T: int = 8, P: int = 17, residual: bool = True,
                 hidden: int | None = None, layers: int | None = None, zero_init: bool | None = None):
        super().__init__()
        # Choice: a bottleneck of width D // 4 keeps beta lightweight (the paper stresses few trainable
        # parameters; ~0.5M for ViT-B/16 with the R(2+1)D block).
        hidden = hidden or max(D // 4, 2)
        # Choice: with the residual, the last layer starts at zero so that P_R = P and training starts from the
        # plain temporal prompts. Without it, a zero start would feed all-zero prompts whose LayerNorm in the
        # frozen block has an ill-conditioned gradient (1 / sqrt(eps)), so beta keeps PyTorch's default init
        # and P_R = beta(P) is a random projection of P from the start and learns from there.
        zero_init = residual if zero_init is None else zero_init
        # Choice: one beta shared by all layers by default (P-tuning's prompt encoder is shared by all prompts,
        # and it keeps beta ~1/L of the per-layer size); `layers=L` gives each layer its own beta.
        self.shared = layers is None
        self.betas = nn.ModuleList([Beta(beta, D, T, P, hidden, zero_init) for _ in range(1 if self.shared else layers)])
        self.beta_name, self.residual, self.T, self.P = beta, residual, T, P

    def forward(self, p, layer: int = 0):  # (B, T, P, D)
        if p.shape[1:3] != (self.T, self.P):
            raise ValueError(f"prompts of shape {tuple(p.shape)} do not match this encoder's (B, T={self.T}, "
                             f"P={self.P}, D)")
        beta = self.betas[0 if self.shared else layer]
        out = beta(p.to(beta.ln.weight.dtype))  # (B, T, P, D)
        return out + p if self.residual else out  # TPR Eq. (12)

    def extra_repr(self):
        return f"beta={self.beta_name}, residual={self.residual}, shared={self.shared}"
