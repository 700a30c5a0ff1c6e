"""Training engine for both methods: TPR (Electronics 2024) and BiEfficient (ACCV 2024).

One script, one code path for both method models of prompts.py, in one process (CPU or one GPU) or under
`torchrun --nproc_per_node=N` (and multi-node) with DistributedDataParallel. Mirrors karpathy/nanoGPT
`train.py` (plain-torch DDP, AMP, checkpointing, one progress line), mlfoundations/open_clip `loss.py`
(contrastive logits gathered from every rank, the local rows keeping their gradient) and pytorch/examples
`imagenet/main.py` (evaluation that counts every video exactly once under DDP).

Objective: TPR Eq. (15)-(17), L = L_VT + L_VC, the multi-positive symmetric contrastive loss over the GLOBAL
batch (BiEfficient Eq. (10) is the same loss with its English branch only); `model.loss_keys` names the
branches. Optimiser and schedule: AdamW, linear warm-up then cosine, per step (TPR Table 2; BiEfficient
Sec. 4.1).

    python train.py --dataset synthetic --random-init                    # the tiny demo, CPU, minutes
    python train.py --method tpr --dataset hmdb51 --root DIR --split 1   # ViT-B/16 weights from ~/.cache/clip
    torchrun --nproc_per_node=4 train.py --method biefficient --dataset k400 --root DIR

The file reads in the order a run executes: 1 setup (arguments, processes), 2 model and data, 3 the training
step, 4 the epoch, 5 evaluation, 6 checkpoints, 7 the run; what keeps a run alive (argument checks, resume,
restart, signals, exit codes) is the last section. Needs clip.py, data.py, prompts.py, reparam.py,
text_branches.py and assets/.

The run folder (--output) receives args.json, metrics.jsonl (one JSON object per line: training progress and
every evaluation with its protocol), last.pt and best.pt (trainable parameters only, never the frozen towers).

Exit codes: 0 done; 2 a user-facing failure, printed as one line (bad flag value or path, split file,
checkpoint, a run folder in use by another run, full disk, non-finite loss; --debug or DEBUG=1 shows the
traceback); 75 stopped by SIGTERM or Ctrl-C after finishing the step and saving last.pt, on every rank, loader
workers included (requeue, then --resume); 130 Ctrl-C before training.
"""
import argparse
import collections
import contextlib
import datetime
import errno
import hashlib
import io
import json
import math
import os
import pickle
import random
import resource
import shutil
import signal
import socket
import sys
import time
import weakref

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.utils import flop_counter
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import clip
import data
import prompts
import reparam
import text_branches

METHODS = ("tpr", "biefficient")
CHECKPOINT_FORMAT = 1
SPEED_WINDOW = 50  # training steps behind the clips/s and ETA of the progress line


# ==========================================================================================================
# 1. Setup: the papers' defaults, the arguments, the processes
# ==========================================================================================================

# Paper defaults per method and protocol; None in the parser means "take it from here".
# TPR: Table 2 (AdamW betas (0.9, 0.999), cosine, 5 warm-up epochs, weight decay 1e-2, 30 epochs ViT-B / 20
# ViT-L), Sec. 4.2.2 (T = 16 after Fig. 5b), Sec. 4.3 (few-shot: batch 64, lr 4e-6), Sec. 4.4 (HMDB51/UCF101:
# lr 5e-6, 30 epochs, batch 32; SSv1: lr 5e-4, 40 epochs, batch 16, RandAugment and random erasing).
# Paper: TPR's Table 2 gives batch 256 for full training while Sec. 4.4 says 32 for HMDB51/UCF101; we follow
# Sec. 4.4 (the text describing the reported experiments); pass --batch-size 256 for Table 2's value.
# BiEfficient Sec. 4.1: AdamW, batch 32, 50 epochs, weight decay 0.2, lr 5e-4, 5 warm-up epochs then cosine
# to zero, T = 8 (its ablation default), temperature 0.01.
# Paper: BiEfficient's authors' code runs 32 per GPU on 4 GPUs (global 128) with weight decay 0.05; the paper's
# "batch size of 32" is taken as the global batch; --biefficient-code-compat takes the code's column of both
# (BIEFFICIENT_DEFAULTS "weight_decay" and "batch_per_gpu") unless --weight-decay / --batch-size is given.
SYNTHETIC = dict(arch="tiny", frames=8, batch_size=16, epochs=None, lr=None, warmup_epochs=1, weight_decay=0.0,
                 prefix="{}.", label_smoothing=0.0, threads=1)
# Choice: the synthetic demo (random frozen tiny towers) prompts TPR with the bare label "{}.", gives BiEfficient
# M = 2 context tokens, trains 15 epochs at lr 2e-3 (TPR) / 3e-3 (BiEfficient) on one CPU thread: random text
# towers read like bags of words. The measurements behind each value: README, "Choices where the papers are silent".
SYNTHETIC_BY_METHOD = {"tpr": dict(epochs=15, lr=2e-3), "biefficient": dict(epochs=15, lr=3e-3, M=2)}


# TPR's Chinese branch follows --arch: the Chinese-CLIP model whose text tower (RoBERTa-wwm-ext-base-chinese, the
# paper's Sec. 4.1.2 choice, in all three) projects to that CLIP's embedding width (512 for ViT-B, 768 for ViT-L).
# Choice: ViT-B/32 (512-d) takes ViT-B-16's tower, Chinese-CLIP has no ViT-B/32.
CHINESE_FOR_ARCH = {"ViT-B/16": "ViT-B-16", "ViT-B/32": "ViT-B-16", "ViT-L/14": "ViT-L-14",
                    "ViT-L/14@336px": "ViT-L-14-336"}


# --preset NAME: (defaults, what it is). Flags given on the command line win over a preset's values.
PRESETS = {
    # The BiEfficient authors' HMDB51 fine-tuning (configs/hmdb51/hmdb_k400_finetune.yaml of their code: lr 5e-5,
    # weight decay 0.2, 16 frames, batch 16 per GPU, 20 epochs, evaluation every 2 epochs), their pipeline.
    # Paper: their config fine-tunes a Kinetics-400 model; which weights it starts from is not in their
    # public copy (`pretrain:` is empty), so this run starts from the frozen CLIP as every run here does.
    "biefficient-hmdb51-finetune": (
        dict(method="biefficient", dataset="hmdb51", biefficient_code_compat=True, lr=5e-5, weight_decay=0.2,
             frames=16, batch_per_gpu=16, epochs=20, eval_every=2),
        "the BiEfficient authors' HMDB51 fine-tuning config (code-compat, lr 5e-5, weight decay 0.2, 16 frames, "
        "16 per GPU, 20 epochs, evaluation every 2)"),
}


def paper_defaults(method, dataset, shots, arch=None):
    """The hyper-parameters of the chosen method and protocol (see the comments above); `arch` is --arch when
    given (TPR's epochs depend on it)."""
    if dataset == "synthetic":
        return {**SYNTHETIC, **SYNTHETIC_BY_METHOD[method]}
    if method == "tpr":
        arch = arch or "ViT-B/16"
        # Table 2: 30 epochs for ViT-B, 20 for ViT-L.
        d = dict(arch="ViT-B/16", frames=16, batch_size=32, epochs=20 if arch.startswith("ViT-L") else 30, lr=5e-6,
                 warmup_epochs=5, weight_decay=1e-2, label_smoothing=0.0)
        if dataset == "ssv1":
            # Sec. 4.4: "RandAugment, random erasing, and label smoothing"; Choice: the usual 0.1 (the paper gives
            # no value). Choice: 40 epochs for any arch (Sec. 4.4 gives one figure for SSv1).
            d.update(lr=5e-4, epochs=40, batch_size=16, label_smoothing=0.1)
        if shots:
            d.update(lr=4e-6, batch_size=64)  # Sec. 4.3 / Table 2 (few-shot)
        return d
    return dict(arch="ViT-B/16", frames=8, batch_size=32, epochs=50, lr=5e-4, warmup_epochs=5, weight_decay=0.2,
                label_smoothing=0.0)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help with one default per flag: '(default: X)' is added only where the help text does not already
    say its default, and never for None (filled in from the papers' values) or off switches."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text.lower() or action.default is None or action.default is False or \
                action.default == argparse.SUPPRESS:
            return text
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """argparse, but a bad flag or value is one line (the usage block would bury it), exit code 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser():
    p = Parser(description="Train TPR or BiEfficient on a video dataset (one process or torchrun).",
               formatter_class=HelpFormatter)
    add_data_flags(p)
    add_backbone_flags(p)
    add_tpr_flags(p)
    add_biefficient_flags(p)
    add_optimisation_flags(p)
    add_run_flags(p)
    return p


def parse_args(argv=None):
    """The command line, a --preset's values as the defaults of the flags not given."""
    p = build_parser()
    cli = p.parse_args(argv)
    if cli.preset:
        p.set_defaults(**PRESETS[cli.preset][0])
        cli = p.parse_args(argv)
    return cli


def add_data_flags(p):
    """What to train on: method, dataset, split, sampling, augmentation."""
    g = p.add_argument_group("what to train")
    g.add_argument("--method", default="tpr", choices=METHODS, help="which paper's model")
    g.add_argument("--dataset", default="synthetic", choices=data.DATASETS, help="dataset, in its authors' layout")
    g.add_argument("--root", default=None, help="dataset folder (not needed for synthetic)")
    g.add_argument("--split", type=int, default=1, choices=(1, 2, 3), help="official split (HMDB51, UCF101)")
    g.add_argument("--list-file", nargs=2, default=None, metavar=("TRAIN", "TEST"),
                   help="dataset 'list': mmaction2 list files for training and testing")
    g.add_argument("--class-file", default=None, help="dataset 'list': class names, one per line or id,name CSV")
    g.add_argument("--filename-tmpl", default="img_{:05d}.jpg", help="frame file names of frame-folder lists")
    g.add_argument("--chinese-labels", default=None, help="Chinese label file for a custom dataset (TPR)")
    g.add_argument("--shots", type=int, default=0, choices=(0,) + data.SHOTS,
                   help="K-shot training (K samples per class, drawn with --seed); 0 = all")
    g.add_argument("--frames", type=int, default=None, help="T sampled frames (default: the paper's)")
    g.add_argument("--sampling", default="sparse", choices=data.SAMPLINGS, help="TSN sparse or dense sampling")
    g.add_argument("--randaugment", action="store_true", default=None,
                   help="RandAugment (TPR Sec. 4.4 uses it on SSv1; default on for ssv1)")
    g.add_argument("--random-erasing", action="store_true", default=None,
                   help="random erasing (TPR Sec. 4.4, SSv1; default on for ssv1)")
    g.add_argument("--synthetic-videos", type=int, default=64, help="synthetic: videos per class and split")
    g.add_argument("--no-flip", action="store_true", help="no horizontal flip (always off for ssv1 and synthetic)")
    g.add_argument("--test-resize", type=int, default=None, metavar="PIXELS",
                   help="short side before the crops of every evaluation; default: 256 for 224 crops with TPR "
                        "(Sec. 4.1.1) and with the BiEfficient authors' validation and test (--val-clip first, "
                        "--test-protocol authors), else the crop size (X-CLIP's test pipeline; the synthetic set)")
    # The data-pipeline rows of prompts.BIEFFICIENT_DEFAULTS (default: the column of the method's mode; TPR and
    # BiEfficient's paper mode take the paper column). A flag given here wins over --biefficient-kwargs.
    g.add_argument("--train-crop", default=None, choices=data.TRAIN_CROPS,
                   help="training crop: MultiScaleCrop, or the BiEfficient authors' GroupScale(256) + Inception-style "
                        "random sized crop. Default: multiscale, inception with --biefficient-code-compat")
    g.add_argument("--frame-sampling", default=None, choices=data.FRAME_SAMPLINGS,
                   help="training frames: TSN's, or the BiEfficient authors' (seg = (n - 1) / T, both segment ends "
                        "included). Default: tsn, authors with --biefficient-code-compat")
    g.add_argument("--val-clip", default=None, choices=prompts.BIEFFICIENT_CHOICES["val_clip"],
                   help="the evaluation during training (picks best.pt): the segment centres, or the BiEfficient "
                        "authors' first frame of each segment at short side 256. Default: centre, first with "
                        "--biefficient-code-compat")
    g.add_argument("--test-protocol", default=None, choices=prompts.BIEFFICIENT_CHOICES["test_protocol"],
                   help="the views evaluate.py tests when not told: this project's (1x1 and 4x3, TSN clips), or the "
                        "BiEfficient authors' (3x1, clip starts linspace(0, tick - 1, 3), short side 256). Default: "
                        "paper, authors with --biefficient-code-compat")
    g.add_argument("--view-average", default=None, choices=prompts.BIEFFICIENT_CHOICES["view_average"],
                   help="what is averaged over the views of a video: each view's softmax probabilities (X-CLIP's "
                        "and the BiEfficient authors' test code) or its logits (default: prob)")
    g.add_argument("--preset", default=None, choices=tuple(PRESETS),
                   help="a published configuration as defaults (flags given win): " +
                        "; ".join(f"{k}: {v[1]}" for k, v in PRESETS.items()))


def add_backbone_flags(p):
    """The frozen towers and where their weights come from."""
    g = p.add_argument_group("backbones")
    g.add_argument("--arch", default=None, choices=tuple(clip.ARCHS), help="CLIP ViT (default: the paper's "
                   "ViT-B/16; tiny for synthetic)")
    g.add_argument("--pretrained", default=None, metavar="NAME|PATH",
                   help="CLIP weights: an official name (downloaded into ~/.cache/clip) or a local file "
                        "(default: the --arch name)")
    g.add_argument("--pretrained-chinese", default=None, metavar="NAME|PATH",
                   help="Chinese-CLIP weights for TPR's Chinese branch: official name (into "
                        "~/.cache/chinese-clip) or a local file; default: the one matching --arch "
                        f"({', '.join(f'{a} -> {c}' for a, c in CHINESE_FOR_ARCH.items())})")
    g.add_argument("--random-init", action="store_true",
                   help="build RANDOMLY INITIALISED towers (smoke tests, synthetic demo); every accuracy line "
                        "then says RANDOM-INIT")


def add_tpr_flags(p):
    """TPR's ablation switches (Fig. 5, Tables 3-5, 7)."""
    g = p.add_argument_group("TPR (ablations: Fig. 5, Tables 3-5, 7)")
    g.add_argument("--S", type=int, default=8, help="global prompts per frame (Fig. 5c)")
    g.add_argument("--beta", default="r2plus1d", choices=reparam.BETAS + ("none",),
                   help="reparameterization network beta of TPR Eq. (12), Table 3; 'none' = no beta (the '+TP' row)")
    g.add_argument("--no-residual", action="store_true", help="P_R = beta(P) without + P (Table 4)")
    g.add_argument("--no-temporal-prompts", action="store_true", help="no temporal prompts (Fig. 5a baseline)")
    g.add_argument("--no-chinese", action="store_true", help="no Chinese label branch (Fig. 5a, Table 7)")
    g.add_argument("--pooling", default="word", choices=("word", "mean"), help="word-guided (TPR Eq. 6-7) or mean "
                   "pooling (TPR Eq. 4) of the frame features")
    g.add_argument("--test-words", default=None, choices=prompts.TPR_TEST_WORDS,
                   help="whose words weight the frames at test time (TPR issue: class-conditional or top-1); "
                        "default: the model's")
    g.add_argument("--prefix", default=None, help="text template with one {} (Table 5); default: the paper's "
                   "'This is a video about {}.' (Sec. 3.4), '{}.' on the synthetic set")
    g.add_argument("--lam", type=float, default=None, help="lambda of TPR Eq. (18); default: the model's")
    g.add_argument("--fusion", default="prob", choices=prompts.TPR_FUSIONS,
                   help="what S of TPR Eq. (18) fuses: softmax probabilities (prob) or the cosines of TPR Eq. (5) "
                        "(the paper's); evaluation reports top-1 for both")
    g.add_argument("--tau", type=float, default=0.01, help="temperature tau (Sec. 4.1)")


def add_biefficient_flags(p):
    """BiEfficient's ablation switches (Tables 4-10)."""
    g = p.add_argument_group("BiEfficient (ablations: Tables 4-10)")
    g.add_argument("--M", type=int, default=None, help="learned context tokens of the Pre-Prompt (default: the "
                   "paper's 16; 12 with --biefficient-code-compat; 2 on the synthetic set)")
    g.add_argument("--no-pre-prompt", action="store_true", help="without Pre-Prompt (Table 4)")
    g.add_argument("--no-post-prompt", action="store_true", help="without Post-Prompt (Table 4)")
    g.add_argument("--no-wgvp", action="store_true", help="without the Word-Guided Visual Prompt (Table 4)")
    g.add_argument("--biefficient-code-compat", action="store_true",
                   help="reproduce the authors' code instead of the paper (every difference: "
                        "BIEFFICIENT_DEFAULTS in prompts.py)")
    g.add_argument("--biefficient-kwargs", default="{}", help="extra BiEfficient keyword arguments as JSON, for "
                   "the ablations of Tables 5-10, e.g. '{\"alpha_init\": 0.01}'")
    g.add_argument("--tpr-kwargs", default="{}", help="extra TPR keyword arguments as JSON")
    g.add_argument("--grad-checkpointing", nargs="?", const="full", default="auto", choices=CHECKPOINTING,
                   help="recompute the frozen towers' blocks in backward instead of storing their activations: full "
                        "(the bare flag), selective (keep matmul and attention outputs, recompute the element-wise "
                        "ops), off; auto: on a GPU, off unless the step's estimated peak memory (estimate_step) "
                        "would not fit its free memory, then selective or full; off on a CPU")


def add_optimisation_flags(p):
    """Optimiser, schedule, precision, seed."""
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=None, help="training epochs (default: the paper's)")
    g.add_argument("--batch-size", type=int, default=None, help="GLOBAL batch (all ranks together); the "
                   "contrastive loss sees all of it (default: the paper's, or --batch-per-gpu x the processes)")
    g.add_argument("--batch-per-gpu", type=int, default=None, help="videos per process; the global batch is this "
                   "times the number of processes (default: none, --batch-size is global; 32 with "
                   "--biefficient-code-compat, as the authors' code)")
    g.add_argument("--micro-batch", type=int, default=None, help="videos per rank per forward; smaller than "
                   "batch-size/world-size turns on gradient accumulation (exact, see accumulate(); default: the "
                   "per-rank batch, no accumulation)")
    g.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the paper's)")
    g.add_argument("--min-lr", type=float, default=0.0, help="learning rate at the end of the cosine")
    g.add_argument("--warmup-epochs", type=float, default=None, help="linear warm-up (default: the paper's 5)")
    g.add_argument("--weight-decay", type=float, default=None, help="AdamW weight decay (default: the paper's)")
    g.add_argument("--betas", type=float, nargs=2, default=(0.9, 0.999), help="AdamW betas (TPR Table 2)")
    g.add_argument("--grad-clip", type=float, default=0.0, help="clip the gradient norm (0 = off, the papers')")
    g.add_argument("--label-smoothing", type=float, default=None, help="label smoothing of the contrastive loss "
                   "(TPR Sec. 4.4 on SSv1; default 0.1 there, else 0)")
    g.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                   help="auto: bf16 autocast on GPUs that support it, fp16 + GradScaler on others, fp32 on CPU; "
                   "with --biefficient-code-compat fp16 + GradScaler on every GPU (the authors' code)")
    g.add_argument("--contrastive-batch", default=None, choices=("global", "local"),
                   help="global: the loss sees the whole global batch (logits gathered from every rank); local: "
                   "one per-rank B x B problem, no gathering (the BiEfficient authors' code). Default: global, "
                   "local with --biefficient-code-compat")
    g.add_argument("--seed", type=int, default=0, help="seed of everything (model init, data order, "
                   "augmentation, few-shot draw)")
    g.add_argument("--threads", type=int, default=None, help="intra-op CPU threads of the main process "
                   "(default: the cores the load leaves free, at least 1; 1 on the synthetic set)")


def add_run_flags(p):
    """Run folder, resume, loader, logging and saving cadence."""
    g = p.add_argument_group("run")
    g.add_argument("--output", default=None, help="run folder (default runs/<method>-<dataset>-<time>)")
    g.add_argument("--resume", default=None, metavar="DIR", help="continue the run in DIR exactly where it "
                   "stopped (mid-epoch included)")
    g.add_argument("--workers", type=int, default=default_workers(), help="data loader processes per rank (0: in "
                   "the main one); default: 4, or fewer if this process may use fewer cores per rank")
    g.add_argument("--print-every", type=int, default=10, help="progress line every N steps")
    g.add_argument("--save-every", type=int, default=0, help="also save last.pt every N steps (0: each epoch)")
    g.add_argument("--eval-every", type=int, default=1, help="evaluate (1 view) every N epochs; 0: at the end")
    g.add_argument("--eval-batch-size", type=int, default=None, help="videos per rank per evaluation forward "
                   "(default: a quarter of --batch-size)")
    g.add_argument("--dry-run", action="store_true", help="build the model, print its trainable parameters, exit")
    g.add_argument("--debug", action="store_true", help=f"show the traceback of an error (also: {DEBUG_ENV}=1)")


def default_workers():
    """Data loader processes per rank by default: min(4, cores per local rank). Choice: never more workers than
    cores, so a 2-core machine neither oversubscribes nor gets PyTorch's "exceeds the suggested max number of
    worker" warning (the DataLoader compares with the same os.sched_getaffinity count)."""
    return min(4, cores_per_rank())


def cores_per_rank():
    """The CPU cores this process may use (its affinity) shared among the local ranks of torchrun, at least 1."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))


def set_cpu_threads(threads=None):
    """Set torch's intra-op CPU threads of this process and return the line that says how many and why:
    `threads` (--threads) if given; else OMP_NUM_THREADS if set (torchrun sets 1 for several ranks); else the
    cores per local rank that the 1-minute load average leaves free, at least 1.
    Choice: torch's default (every core) collapses when other processes load the CPU. On a 2-core machine, TPR
    on 96 tiny list videos (T = 16, --workers 0) ran at 26-47 clips/s on 1 thread and 1.3-2.8 on 2 (or torch's
    default) beside one busy process, 47-50 against 9.6-64 at load 2, with the same losses to 4 digits;
    evaluate.py on them took 2.9-3.5 s on 1 thread against 8.8-9.2 s on 2 (5.8-6.1 s against 13-36 s beside a
    busy process). Free cores are counted at start, so a run and its resume may use different counts (results
    then differ in the last bits, as with any --threads change): pass --threads N to fix it."""
    if threads:
        torch.set_num_threads(threads)
        return f"CPU threads: {threads} (--threads)"
    if os.environ.get("OMP_NUM_THREADS"):
        return f"CPU threads: {torch.get_num_threads()} (OMP_NUM_THREADS; --threads N to choose)"
    per_rank = cores_per_rank()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0  # over all the host's cores
    threads = max(1, min(per_rank, int((os.cpu_count() or 1) - load)))
    torch.set_num_threads(threads)
    return (f"CPU threads: {threads} ({per_rank} cores per process, load {load:.1f} on {os.cpu_count()} cores "
            f"leaves {max(0, (os.cpu_count() or 1) - load):.1f} free; --threads N to choose)")


def resolve_args(args, world=1):
    """Fill the None defaults from the papers' values for the chosen method and protocol (`world` processes);
    validate. A value the user gave always wins over a method, preset or code-compat default."""
    batch_given, decay_given = args.batch_size is not None, args.weight_decay is not None
    if batch_given and args.batch_per_gpu is not None and args.batch_size != global_batch(args.batch_per_gpu, world):
        raise UsageError(f"--batch-size {args.batch_size} (global) and --batch-per-gpu {args.batch_per_gpu} x {world} "
                         f"process(es) disagree; give one of them")
    for k, v in paper_defaults(args.method, args.dataset, args.shots, args.arch).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.pretrained_chinese is None:
        args.pretrained_chinese = CHINESE_FOR_ARCH.get(args.arch, "ViT-B-16")
    if args.prefix is None:
        args.prefix = "This is a video about {}."  # TPR Sec. 3.4
    if args.randaugment is None:
        args.randaugment = args.dataset == "ssv1"
    if args.random_erasing is None:
        args.random_erasing = args.dataset == "ssv1"
    if args.dataset not in ("synthetic",) and args.dataset != "list" and args.root is None:
        raise UsageError(f"--dataset {args.dataset} needs --root DIR (the dataset folder in its authors' layout; "
                         f"see data.py)")
    for flag in ("tpr_kwargs", "biefficient_kwargs"):
        try:
            value = json.loads(getattr(args, flag), object_pairs_hook=_no_repeated_keys)
        except json.JSONDecodeError as e:
            raise UsageError(f"--{flag.replace('_', '-')} {getattr(args, flag)!r} is not JSON: {e}") from None
        except ValueError as e:  # a repeated key: which of its values was meant?
            raise UsageError(f"--{flag.replace('_', '-')} {getattr(args, flag)!r}: {e}") from None
        if not isinstance(value, dict):
            raise UsageError(f"--{flag.replace('_', '-')} must be a JSON object, got {getattr(args, flag)!r}")
    if args.method == "biefficient" and not decay_given and args.dataset != "synthetic":
        # --weight-decay, else --biefficient-kwargs, else the mode's column (Sec. 4.1: 0.2; code 0.05)
        column = int(bool(args.biefficient_code_compat))
        args.weight_decay = json.loads(args.biefficient_kwargs).get(
            "weight_decay", prompts.BIEFFICIENT_DEFAULTS["weight_decay"][column])
    resolve_training_rows(args)
    if batch_given:
        args.batch_per_gpu = None  # --batch-size given: the global batch, whatever the mode's per-GPU row says
    elif args.batch_per_gpu is not None:
        args.batch_size = global_batch(args.batch_per_gpu, world)
    if args.eval_batch_size is None:
        args.eval_batch_size = max(1, args.batch_size // 4)
    validate_args(args)  # value ranges first: a bad value is named even on the synthetic set
    if args.arch == "tiny" and not args.random_init:
        # The tiny towers exist only as random ones: say so instead of "unknown CLIP model 'tiny'".
        what = "the synthetic demo" if args.dataset == "synthetic" else "--arch tiny"
        raise UsageError(f"{what} needs --random-init (its tiny towers have no pretrained weights), or real "
                         f"weights via --arch ViT-B/16 --pretrained NAME|PATH (names: "
                         f"{', '.join(a for a in clip.ARCHS if a != 'tiny')})")
    return args


# The training-step rows of prompts.BIEFFICIENT_DEFAULTS; TPR (and runs saved before these existed) use the
# paper column.
TRAINING_ROWS = ("loss", "contrastive_batch", "lr_schedule", "amp")
# The data-pipeline and protocol rows (data.py, evaluation), each also a flag of the same name.
PIPELINE_ROWS = ("train_crop", "frame_sampling", "val_clip", "test_protocol", "view_average", "batch_per_gpu")
ROW_FLAGS = ("contrastive_batch",) + PIPELINE_ROWS  # the rows a flag sets (it wins over --biefficient-kwargs)


def resolve_training_rows(args):
    """args.loss, .contrastive_batch, .lr_schedule, .amp and the PIPELINE_ROWS: the flag of that name when
    given, else a value given in --biefficient-kwargs, else BiEfficient's column for its mode (paper or
    code-compat); TPR: the paper's."""
    kw = json.loads(args.biefficient_kwargs) if args.method == "biefficient" else {}
    column = int(args.method == "biefficient" and bool(args.biefficient_code_compat))
    flags = {key: getattr(args, key, None) for key in ROW_FLAGS}
    for key in TRAINING_ROWS + PIPELINE_ROWS:
        valid = prompts.BIEFFICIENT_CHOICES.get(key)
        value = kw.get(key, prompts.BIEFFICIENT_DEFAULTS[key][column])
        if valid is not None and value not in valid:
            raise UsageError(f"--biefficient-kwargs {key}={value!r}; valid: {', '.join(map(repr, valid))}")
        setattr(args, key, value if flags.get(key) is None else flags[key])
    if args.batch_per_gpu is not None and (not isinstance(args.batch_per_gpu, int) or args.batch_per_gpu < 1):
        raise UsageError(f"--batch-per-gpu {args.batch_per_gpu}: must be an integer >= 1")
    authors = [f"--{k.replace('_', '-')} {getattr(args, k)}" for k, v in (("frame_sampling", "authors"),
               ("val_clip", "first"), ("test_protocol", "authors")) if getattr(args, k) == v]
    if getattr(args, "sampling", "sparse") != "sparse" and authors:
        raise UsageError(f"--sampling {args.sampling}: {', '.join(authors)} is the BiEfficient authors' sparse "
                         f"sampling; with dense sampling pass --frame-sampling tsn --val-clip centre "
                         f"--test-protocol paper")
    if args.loss == "multi_hot" and getattr(args, "label_smoothing", 0.0):
        raise UsageError(f"--label-smoothing {args.label_smoothing}: smooths the multi-positive loss only; the "
                         f"authors' multi-hot loss (--biefficient-code-compat) has none: pass --biefficient-kwargs "
                         f"'{{\"loss\": \"multi_positive\"}}' or --label-smoothing 0")
    return args


def global_batch(batch_per_gpu, world):
    """The global batch of `batch_per_gpu` videos on each of `world` processes (the BiEfficient authors' batch
    follows the number of GPUs: 32 per GPU on their 4, 128 in all)."""
    return batch_per_gpu * world


def batch_line(args, world):
    """One line at the start: the per-GPU and the global batch, and where they come from."""
    where = (f"--batch-per-gpu {args.batch_per_gpu} x {world} process(es)" if args.batch_per_gpu is not None and
             args.batch_size == global_batch(args.batch_per_gpu, world) else "--batch-size, global")
    return f"batch: {args.batch_size // world} per GPU, {args.batch_size} global ({where})"


def setup_distributed():
    """(rank, world size, device). torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; without them: one process."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world > 1 and not dist.is_initialized():
        local = int(os.environ.get("LOCAL_RANK", 0))
        if torch.cuda.is_available():
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    else:
        device = torch.device("cpu")
    return rank, world, device


def gather_rows(x):
    """(B_local, ...) on every rank -> (B_global, ...) in rank order. Only the local rows carry a gradient
    (open_clip's gather_features): the loss is replicated on every rank, each rank back-propagates through
    its own rows, and the sum over ranks is the full gradient (see train_step)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.detach().contiguous())
    parts[dist.get_rank()] = x
    return torch.cat(parts)


def broadcast_object(obj):
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class Run:
    """What one training run holds: its arguments and ranks, model, optimiser, data, and where it stands in
    the schedule (epoch, step within the epoch, global step, best top-1). The steps below read and advance it."""

    def __init__(self, args, rank, world, device):
        self.args, self.rank, self.world, self.device = args, rank, world, device
        self.log = (lambda *a, **k: print(*a, **k, flush=True)) if rank == 0 else (lambda *a, **k: None)
        self.epoch, self.epoch_step, self.step, self.best = 0, 0, 0, -1.0
        self.test_set, self.metrics = None, None
        self.t_start, self.clips_done = time.time(), 0
        self.speed = Throughput()


def setup(argv=None, stack=None):
    """Arguments, processes, seeds, output folder (locked for this run until `stack` closes), data and model.
    Returns (run, checkpoint to resume or None), or (None, None) after printing the parameter table for
    --dry-run."""
    cli = parse_args(argv)
    rank, world, device = setup_distributed()
    args, ckpt = resolve_run_args(cli, argv, world)
    run = Run(args, rank, world, device)
    run.amp_dtype, use_scaler = amp_settings(args.precision, device, getattr(args, "amp", "bf16"))
    if device.type == "cpu":
        run.log(set_cpu_threads(getattr(args, "threads", None)))
    random.seed(args.seed + rank)
    np.random.seed(args.seed + rank)
    if not cli.resume and not args.dry_run:
        args.output = choose_output(args, rank)
    run.out = args.output
    if not args.dry_run:
        lock_folder(run, stack)
    restart = take_restart(run)
    if restart:
        ckpt = None

    with rank0_only_warnings():
        run.train_set = build_dataset(args, "train", shots_dir=None if args.dry_run else args.output)
        if not args.dry_run:  # what needs no model is checked before the towers are built
            run.test_set = build_dataset(args, "test", views="1x1", stage="val")
            check_data(run)
    texts, zh = class_names(args, run.train_set)
    model = run.model = build_model(args, texts, zh).to(device)
    if args.dry_run:
        if not args.random_init:
            run.log(f"dry run: the towers of {args.arch} built without their weights (nothing downloaded; the "
                    f"trainable parameters depend on the shapes only)")
        for line in describe_setup(args, model) + [batch_line(args, world)]:
            run.log(line)
        print_parameter_table(model, run.log)
        return None, None
    auto_checkpointing(run)
    torch.manual_seed(args.seed + rank)  # after the (identical) model init, each rank its own stream
    if rank == 0 and (not cli.resume or restart or run.branch):  # once the model is built: a failed start leaves no run
        os.makedirs(run.out, exist_ok=True)
        with open(os.path.join(run.out, "args.json"), "w") as f:
            json.dump(vars(args), f, indent=1)
    if dist.is_initialized():
        dist.barrier()
    per_rank = args.batch_size // world
    run.log(f"{args.method} on {args.dataset} (split {args.split}{f', {args.shots}-shot' if args.shots else ''}): "
            f"{len(run.train_set)} training videos, {len(run.train_set.classes)} classes, T={args.frames}, arch "
            f"{args.arch}{' RANDOM-INIT' if args.random_init else ''}; {world} rank(s) on {device.type}, global "
            f"batch {args.batch_size} = {world} x {per_rank // args.micro_batch} x {args.micro_batch}, precision "
            f"{run.amp_dtype or 'fp32'}; run folder {run.out}")
    for line in describe_setup(args, model) + [batch_line(args, world)]:
        run.log(line)
    print_parameter_table(model, run.log)

    build_training(run, use_scaler)
    return run, ckpt


def build_training(run, use_scaler):
    """DDP wrapper, AdamW over the trainable parameters, GradScaler and the schedule length of a set-up run."""
    args, model, device = run.args, run.model, run.device
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable and args.epochs:
        raise UsageError("this configuration has no trainable parameters (e.g. TPR with --no-temporal-prompts "
                         "--beta none --pooling mean: Fig. 5a's CLIP row); pass --epochs 0 to only evaluate it")
    model.train()
    # A model may hold trainable parameters that never get a gradient (BiEfficient code-compat: the LayerNorm
    # used only to pick the top-1); DDP must then look for them every step.
    run.ddp_model = (DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
                         find_unused_parameters=getattr(model, "has_unused_parameters", False))
                     if run.world > 1 and trainable else model)
    run.optimizer = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr, betas=tuple(args.betas))
    run.scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
    run.steps_per_epoch = epoch_steps(len(run.train_set), args)  # >= 1: check_data
    run.total_steps = args.epochs * run.steps_per_epoch
    warn_short_warmup(run)
    run.fingerprint = frozen_fingerprint(model)


# ==========================================================================================================
# 2. Model and data
# ==========================================================================================================

def build_dataset(args, mode, views="1x1", split=None, dataset=None, shots_dir=None, stage="test"):
    """A dataset of data.py for this run's settings; mode 'train', 'test' or 'all' (every labelled video); stage:
    the evaluation a test set serves, 'val' (during training: --val-clip) or 'test' (evaluate.py: --test-protocol)."""
    name = dataset or args.dataset
    list_file = None
    if args.list_file is not None:
        list_file = args.list_file[0 if mode == "train" else 1]
    try:
        ds = data.build_dataset(
            name, root=args.root, split=split or args.split, mode=mode, frames=args.frames,
            input_size=clip.ARCHS[args.arch]["image_resolution"], views=views, sampling=args.sampling,
            shots=args.shots if (mode == "train" and args.shots) else None, seed=args.seed, shots_dir=shots_dir,
            flip=not args.no_flip, randaugment=args.randaugment, random_erasing=args.random_erasing,
            list_file=list_file, class_file=args.class_file, filename_tmpl=args.filename_tmpl,
            videos_per_class=args.synthetic_videos, **pipeline_kwargs(args, stage, name))
    except (OSError, ValueError, KeyError) as e:  # layout, split and list files: data.py names file:line
        raise UsageError(e.args[0] if isinstance(e, KeyError) else str(e)) from None
    return ds


def row(args, key):
    """A resolved row of prompts.BIEFFICIENT_DEFAULTS; runs saved before the row existed used the paper column."""
    return getattr(args, key, prompts.BIEFFICIENT_DEFAULTS[key][0])


def pipeline_kwargs(args, stage="test", dataset=None):
    """data.build_dataset's keywords for the data-pipeline rows: the training crop and frames, and for an
    evaluation ('val' during training, 'test' in evaluate.py) its frames and short side."""
    authors = row(args, "val_clip") == "first" if stage == "val" else row(args, "test_protocol") == "authors"
    return dict(train_crop=row(args, "train_crop"), frame_sampling=row(args, "frame_sampling"),
                test_sampling="authors" if authors else "tsn", test_resize=eval_short_side(args, stage, dataset))


def eval_short_side(args, stage="test", dataset=None):
    """The short side before the crops of an evaluation: --test-resize when given, else
    TPR: 256 for 224 crops (256/224 of other crops), every evaluation (Sec. 4.1.1: "Unless otherwise stated, we
    spatially scale the short side ... to 256");
    BiEfficient: the authors' GroupScale under their validation clip / test protocol (256 for 224 crops, the crop
    size for others: utils/Augmentation.py:29, test.py:70-74), else the crop size (X-CLIP's test pipeline;
    Choice: the paper gives no test scale)."""
    if getattr(args, "test_resize", None) is not None:
        return args.test_resize
    size = clip.ARCHS[args.arch]["image_resolution"]
    if (dataset or args.dataset) == "synthetic":
        return size  # Choice: the synthetic frames are drawn at the crop size; there is no larger frame to scale
    if args.method == "tpr":
        return data.SCALE_SIZE * size // 224
    authors = row(args, "val_clip") == "first" if stage == "val" else row(args, "test_protocol") == "authors"
    return (data.SCALE_SIZE if size == 224 else size) if authors else size


def test_views(args):
    """evaluate.py's views when --views is not given: the BiEfficient authors' 3 clips x 1 crop
    (--test-protocol authors: test.py:40-41), else this project's 1x1 and 4x3 (TPR Sec. 4.1.1)."""
    return ["3x1"] if row(args, "test_protocol") == "authors" else list(data.VIEWS)


class BatchSampler:
    """The global batches of one epoch, this rank's share of each, from `start` on (exact resume).

    Choice: one permutation of the whole dataset per epoch, drawn from (seed, epoch), cut into global batches
    of B (the last incomplete one dropped); rank r takes rows [r * B/W, (r + 1) * B/W) of each. The global
    batch is therefore the same set in the same order for any number of ranks, which is what makes the
    objective independent of the world size.
    keep_last (few-shot): the last incomplete batch is kept, filled up with the first videos of the same
    permutation (as DistributedSampler pads), so every video is seen every epoch and every batch still has B
    videos in equal shares per rank (epoch_steps).
    """

    def __init__(self, n, global_batch, rank, world, seed, epoch, start=0, keep_last=False):
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        self.order = torch.randperm(n, generator=g).tolist()
        self.B, self.b, self.rank, self.start = global_batch, global_batch // world, rank, start
        self.steps = -(-n // global_batch) if keep_last else n // global_batch

    def __len__(self):
        return self.steps - self.start

    def __iter__(self):
        n = len(self.order)
        for s in range(self.start, self.steps):
            rows = [self.order[i % n] for i in range(s * self.B, (s + 1) * self.B)]  # wraps only with keep_last
            yield rows[self.rank * self.b:(self.rank + 1) * self.b]


def epoch_steps(n, args):
    """Optimizer steps per epoch of n training videos: whole global batches, the last incomplete one dropped;
    few-shot (--shots K): every video in every epoch, the last batch filled up (BatchSampler's keep_last).
    Choice / Paper: TPR Sec. 4.3 gives K-shot training batch 64 and says nothing of the last batch; dropping it
    would leave e.g. 38 of HMDB51's 102 2-shot videos out of every epoch (102 // 64 = 1 step)."""
    return -(-n // args.batch_size) if args.shots else n // args.batch_size


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)  # preemption (SLURM, Kubernetes, torchrun) and Ctrl-C


class Loader(torch.utils.data.DataLoader):
    """A DataLoader whose workers ignore SIGTERM and SIGINT. SLURM signals every process of a job step, Ctrl-C
    and torchrun the whole process group: the workers keep serving batches while the main process finishes
    its step and saves (catch_stop_signals), and the main process shuts them down. The signals stay blocked
    while the workers start, so none arrives before a worker ignores it."""

    def __iter__(self):
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)  # inherited by the forked workers
        try:
            return super().__iter__()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _worker_ignores_stop_signals(worker_id):
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


def loader(dataset, batch_sampler=None, batch_size=None, workers=0, indices=None):
    if indices is not None:
        dataset = torch.utils.data.Subset(dataset, indices)
    kw = dict(num_workers=workers, pin_memory=torch.cuda.is_available(), persistent_workers=False,
              worker_init_fn=_worker_ignores_stop_signals if workers > 0 else None)
    if workers > 0:
        kw["prefetch_factor"] = 2
    if batch_sampler is not None:
        return Loader(dataset, batch_sampler=batch_sampler, **kw)
    return Loader(dataset, batch_size=batch_size, shuffle=False, **kw)


def _weights_error(what, name, where, flag, error):
    return UsageError(
        f"cannot load the {what} weights {name!r}: {error}. Official names are downloaded once into {where} "
        f"(this needs network access; or copy the official file there). To use a file you already have, pass "
        f"{flag} PATH. For a smoke test without weights, pass --random-init.")


def build_clip(args):
    if args.random_init:
        return clip.build_random(args.arch)
    if args.dry_run:  # the parameter table depends on the shapes only: no weights, no download
        with contextlib.redirect_stderr(io.StringIO()):
            return clip.build_random(args.arch)
    name = args.pretrained or args.arch
    try:
        model, _ = clip.load(name, device="cpu", dtype=torch.float32)  # fp32 master weights; autocast does AMP
    except (OSError, RuntimeError, ValueError) as e:
        url = clip._MODELS.get(args.arch, "")
        raise _weights_error("CLIP", name, f"~/.cache/clip (from {url})" if url else "~/.cache/clip",
                             "--pretrained", e) from None
    if model.visual.input_resolution != clip.ARCHS[args.arch]["image_resolution"] or \
            model.visual.conv1.weight.shape[0] != clip.ARCHS[args.arch]["vision_width"]:
        raise UsageError(f"--pretrained {name} holds a different CLIP than --arch {args.arch}; pass the --arch "
                         f"that matches the file ({', '.join(clip.ARCHS)})")
    return model


def build_chinese(args, embed_dim):
    """TPR's frozen Chinese tower for --pretrained-chinese; its projection width must equal CLIP's."""
    if args.random_init or args.dry_run:  # --dry-run: shapes only, no download (build_clip)
        with contextlib.redirect_stderr(io.StringIO()) if not args.random_init else contextlib.nullcontext():
            tower = text_branches.build_random_chinese("tiny" if args.arch == "tiny" else "base",
                                                       embed_dim=embed_dim)
    else:
        try:
            tower = text_branches.load_chinese_clip(args.pretrained_chinese)
        except (OSError, RuntimeError, ValueError) as e:
            raise _weights_error("Chinese-CLIP", args.pretrained_chinese, "~/.cache/chinese-clip",
                                 "--pretrained-chinese", e) from None
    if tower.text_projection.shape[1] != embed_dim:
        match = CHINESE_FOR_ARCH.get(args.arch)
        raise UsageError(f"--pretrained-chinese {args.pretrained_chinese} projects to {tower.text_projection.shape[1]} "
                         f"dimensions but CLIP {args.arch} to {embed_dim}; the two must match"
                         + (f": pass --pretrained-chinese {match} (or leave it out)" if match else ""))
    return tower.float().eval()


def rank0_only_warnings():
    """A context in which only rank 0 prints warnings (e.g. the RANDOM-INIT ones of the tower builders): every
    rank builds the same towers, so the other ranks' copies of the message would only repeat it."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    return contextlib.nullcontext() if rank == 0 else contextlib.redirect_stderr(io.StringIO())


def build_model(args, class_texts, classes_zh=None):
    """The method model of prompts.py for these arguments, its classes set. Deterministic in args.seed, so a
    random-init run can be rebuilt identically from its checkpoint's arguments."""
    torch.manual_seed(args.seed)
    with rank0_only_warnings():  # errors still raise on every rank
        clip_model = build_clip(args)
    if args.method == "tpr":
        kw = json.loads(args.tpr_kwargs)
        D = clip_model.visual.conv1.weight.shape[0]
        beta = None
        if not args.no_temporal_prompts and args.beta != "none":
            beta = reparam.ReparamEncoder(beta=args.beta, D=D, T=args.frames, P=1 + args.S + args.frames,
                                          residual=not args.no_residual)
        with rank0_only_warnings():
            chinese = None if args.no_chinese else build_chinese(args, clip_model.embed_dim)
        for key in ("lam", "test_words"):
            if getattr(args, key) is not None:
                kw[key] = getattr(args, key)
        kw.setdefault("fusion", getattr(args, "fusion", "prob"))
        model = prompts.TPR(clip_model, T=args.frames, S=args.S, reparam=beta,
                            temporal_prompts=not args.no_temporal_prompts, pooling=args.pooling,
                            prefix=args.prefix, chinese_text=chinese,
                            chinese_tokenize=None if chinese is None else text_branches.tokenize_chinese,
                            tau=args.tau, **kw)
        model.set_classes(class_texts, None if chinese is None else classes_zh)
    else:
        kw = json.loads(args.biefficient_kwargs)
        if args.M is not None:
            kw["M"] = args.M
        # model.config states what the engine does (runs saved before a row existed: the paper column)
        kw.update({key: getattr(args, key, prompts.BIEFFICIENT_DEFAULTS[key][0])
                   for key in TRAINING_ROWS + PIPELINE_ROWS})
        kw["weight_decay"] = args.weight_decay
        model = prompts.BiEfficient(clip_model, T=args.frames, pre_prompt=not args.no_pre_prompt,
                                    post_prompt=not args.no_post_prompt, wgvp=not args.no_wgvp,
                                    code_compat=args.biefficient_code_compat, **kw)
        model.set_classes(class_texts)
    set_grad_checkpointing(model, args.grad_checkpointing)
    return model


def uses_chinese(args):
    return args.method == "tpr" and not args.no_chinese


def class_names(args, dataset, dataset_name=None):
    """(English class texts, Chinese labels or None) of a dataset object."""
    zh = None
    if uses_chinese(args):
        try:
            zh = data.chinese_labels(dataset_name or args.dataset, dataset.classes, args.chinese_labels)
        except (KeyError, ValueError, FileNotFoundError) as e:
            raise UsageError(f"TPR's Chinese branch needs a Chinese label for every class: {e}. Pass "
                             f"--chinese-labels FILE or --no-chinese") from None
    return list(dataset.class_texts), zh


def describe_setup(args, model):
    """Lines naming what the parameter table depends on (method, dataset, arch, T, S or M, ...) and every
    synthetic-demo value that replaces a paper default, so that a count can be matched with the README."""
    parts = [f"{args.method} on {args.dataset}", f"arch {args.arch}", f"T = {args.frames}"]
    if args.method == "tpr":
        parts += ["no temporal prompts" if args.no_temporal_prompts else f"S = {args.S}", f"beta {args.beta}",
                  f"pooling {args.pooling}", f"Chinese branch {'off' if args.no_chinese else 'on'}"]
        paper = dict(paper_defaults("tpr", "hmdb51", args.shots), prefix="This is a video about {}.")
    else:
        cfg = model.config
        parts += [f"M = {cfg['M']}" if cfg["pre_prompt"] else "no Pre-Prompt", f"head layers {cfg['head_layers']}",
                  f"Post-Prompt blocks {cfg['post_layers'] if cfg['post_prompt'] else 0}",
                  f"WGVP {'on' if cfg['wgvp'] else 'off'}", "authors' code" if cfg["code_compat"] else "paper"]
        paper = dict(paper_defaults("biefficient", "k400", args.shots),
                     M=prompts.BIEFFICIENT_DEFAULTS["M"][int(bool(args.biefficient_code_compat))])
    lines = ["setup: " + ", ".join(parts)]
    if args.dataset == "synthetic":
        demo = {**SYNTHETIC, **SYNTHETIC_BY_METHOD[args.method]}
        changed = [f"{k} {getattr(args, k)!r} (paper {paper[k]!r})" for k, v in demo.items()
                   if k in paper and getattr(args, k) == v != paper[k]]
        lines.append("synthetic demo values instead of the paper's: " + ("; ".join(changed) or "none"))
    return lines


def print_parameter_table(model, log):
    rows = model.parameter_table()
    total = sum(c for _, c in rows)
    width = max([len(n) for n, _ in rows] + [9])
    log(f"{'component':<{width}}  trainable parameters")
    for n, c in rows:
        log(f"{n:<{width}}  {c:>20,}")
    log(f"{'total':<{width}}  {total:>20,}")
    counted = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if counted != total:
        log(f"WARNING: the table sums to {total:,} but the model has {counted:,} trainable parameters")
    return total


# ==========================================================================================================
# 3. The training step: TPR Eq. (15)-(17) / BiEfficient Eq. (10) over the global batch, DDP, autocast, GradScaler
# ==========================================================================================================

def optimizer_step(run, batch):
    """One global batch: learning rate of this step, forward + backward, clip, step. Returns the loss."""
    args, opt = run.args, run.optimizer
    lr = lr_at(run.step, args, run.steps_per_epoch)
    for group in opt.param_groups:
        group["lr"] = lr
    loss = train_step(run.ddp_model, run.model, batch["video"], batch["label"], args, run.world, run.amp_dtype,
                      run.scaler, run.device)
    # Choice: a non-finite loss stops the run (one line, exit 2). The BiEfficient authors' fp16 GradScaler skips
    # that step, lowers its scale and goes on (train.py:344-349 of their code); here only inf/NaN gradients
    # with a finite loss are skipped that way (GradScaler under --precision fp16).
    if not torch.isfinite(loss):
        raise non_finite_loss(run, loss)
    if args.grad_clip > 0:
        run.scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), args.grad_clip)
    run.scaler.step(opt)
    run.scaler.update()
    opt.zero_grad(set_to_none=True)
    return loss, lr


def train_step(ddp_model, model, video, labels, args, world, amp_dtype, scaler, device):
    """Forward and backward of one global batch; returns the loss (identical on every rank).

    global contrastive batch: the loss over the global batch (TPR Eq. 17) is computed on every rank from the
    gathered logits; each rank back-propagates only through its own rows, and DDP AVERAGES gradients over
    ranks, so the loss is multiplied by the world size: the averaged gradient is then exactly the one-process
    gradient. local (the BiEfficient authors' code): each rank's own B x B problem (its videos against its own
    labels), nothing gathered; DDP's average of the per-rank gradients is the gradient of the mean of the
    per-rank losses, and that mean is what is returned.
    """
    labels = labels.to(device, non_blocking=True)
    local = getattr(args, "contrastive_batch", "global") == "local"
    gather = _local_rows if local else gather_rows
    kind = getattr(args, "loss", "multi_positive")
    candidates = gather(labels)  # (B,) the contrastive batch's labels, duplicates kept (contract)
    micro = args.micro_batch
    smoothing = getattr(args, "label_smoothing", 0.0)  # absent from checkpoints of before the flag
    autocast = torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)
    if micro >= labels.shape[0]:
        with autocast:
            out = ddp_model(video.to(device, non_blocking=True), labels, candidates)
        # TPR Eq. (15)-(17): L = L_VT + L_VC over the global batch; BiEfficient Eq. (10): its one (English) term
        loss = sum(contrastive_loss(gather(out["logits"][k]), candidates, candidates, smoothing, kind)
                   for k in model.loss_keys)  # TPR Eq. (17)
        scaler.scale(loss if local else loss * world).backward()
    else:
        loss = accumulate(ddp_model, model, video, labels, candidates, micro, world, autocast, scaler, device,
                          smoothing, gather, kind)
    loss = loss.detach()
    if local and world > 1:
        dist.all_reduce(loss)  # the mean of the per-rank losses, the same on every rank
        loss = loss / world
    return loss


def contrastive_loss(logits, labels, candidates, label_smoothing=0.0, kind="multi_positive"):
    """One branch's symmetric contrastive loss: TPR Eq. (15)-(16) (BiEfficient Eq. (10)) with multi-positive
    targets, or the BiEfficient authors' multi-hot targets (--biefficient-code-compat); in fp32."""
    if kind == "multi_hot":  # label smoothing is refused with it in resolve_training_rows
        return text_branches.multi_hot_contrastive_loss(logits.float(), labels, candidates)
    return text_branches.multi_positive_contrastive_loss(logits.float(), labels, candidates, label_smoothing)


def _local_rows(x):
    """--contrastive-batch local: each rank's rows stay its own (no gathering)."""
    return x


def accumulate(ddp_model, model, video, labels, candidates, micro, world, autocast, scaler, device,
               label_smoothing=0.0, gather=gather_rows, kind="multi_positive"):
    """Gradient accumulation that keeps the contrastive batch = the whole global batch.

    Choice: accumulating per-micro-batch losses would shrink the contrastive batch (fewer negatives) and make
    the objective depend on the micro-batch size. Instead (the "gradient cache" idea): 1) every micro-batch's
    logits rows without a graph, gathered over ranks -> (B, A); 2) the loss on the whole matrix and its
    gradient with respect to the logits; 3) each micro-batch again with a graph, back-propagating those
    logit gradients. Rows of the logits depend only on their own video (and the candidates), so this is the
    exact gradient of the global-batch loss for any micro-batch size and world size, at the price of one extra
    forward pass (without a graph). It assumes the forward pass is deterministic (no dropout in the models).
    """
    chunks = list(zip(video.split(micro), labels.split(micro)))
    with torch.no_grad(), autocast:
        rows = [model(v.to(device, non_blocking=True), l, candidates)["logits"] for v, l in chunks]
    full = {k: gather(torch.cat([r[k] for r in rows]).float()).requires_grad_(True) for k in model.loss_keys}
    loss = sum(contrastive_loss(full[k], candidates, candidates, label_smoothing, kind)
               for k in model.loss_keys)  # TPR Eq. (17)
    grads = torch.autograd.grad(loss, [full[k] for k in model.loss_keys])
    b = labels.shape[0]
    per_rank = gather is _local_rows  # the per-rank problem: the rows are this rank's own, the loss not replicated
    rank = dist.get_rank() if dist.is_initialized() and not per_rank else 0
    local = {k: g[rank * b:(rank + 1) * b].split(micro) for k, g in zip(model.loss_keys, grads)}
    for i, (v, l) in enumerate(chunks):
        sync = i == len(chunks) - 1
        ctx = ddp_model.no_sync() if (isinstance(ddp_model, DDP) and not sync) else contextlib.nullcontext()
        with ctx:
            with autocast:
                out = ddp_model(v.to(device, non_blocking=True), l, candidates)
            surrogate = sum((out["logits"][k].float() * local[k][i]).sum() for k in model.loss_keys)
            scaler.scale(surrogate if per_rank else surrogate * world).backward()
    return loss.detach()


def lr_at(step, args, steps_per_epoch):
    """Linear warm-up from 0 to --lr, then cosine to --min-lr, per step (TPR Table 2, BiEfficient Sec. 4.1).
    With args.lr_schedule == "every10", the BiEfficient authors' cadence (code_lr_at)."""
    if getattr(args, "lr_schedule", "step") == "every10":
        return code_lr_at(step, args, steps_per_epoch)
    total = max(1, args.epochs * steps_per_epoch)
    warmup = min(int(args.warmup_epochs * steps_per_epoch), total - 1)
    if step < warmup:
        return args.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return args.min_lr + 0.5 * (args.lr - args.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


# Paper: the BiEfficient authors' train.py steps its scheduler with the fractional epoch at iteration 0 of every
# epoch and then whenever (iteration + 1) % 10 == 0, so each value holds for up to 10 steps.
CODE_LR_EVERY = 10


def code_lr_at(step, args, steps_per_epoch):
    """The BiEfficient authors' learning rate at global step `step`: their train.py calls
    `lr_scheduler.step(epoch + i / len(train_loader))` when i == 0 or (i + 1) % 10 == 0 (i the iteration within
    the epoch), and the value holds until the next call. Their WarmupCosineAnnealingLR (built in
    utils/solver.py, defined in utils/lr_scheduler.py) is ActionCLIP's: lr * e / warmup for a fractional epoch
    e < warmup, then a cosine from lr to --min-lr over the remaining epochs; this function matches it at every
    step. Hence lr 0 for the first 9 steps of a run."""
    epoch, i = divmod(step, steps_per_epoch)
    i_set = 0 if i + 1 < CODE_LR_EVERY else (i + 1) // CODE_LR_EVERY * CODE_LR_EVERY - 1  # last call's iteration
    e = epoch + i_set / steps_per_epoch  # fractional epoch the scheduler was last stepped with
    if e < args.warmup_epochs:
        return args.lr * e / args.warmup_epochs
    progress = (e - args.warmup_epochs) / max(args.epochs - args.warmup_epochs, 1e-12)
    return args.min_lr + 0.5 * (args.lr - args.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def param_groups(model, weight_decay):
    """AdamW groups. A method model may define `optimizer_groups(weight_decay)`; otherwise decay applies to
    matrices only, not to biases, norms and scalars (the usual rule; BiEfficient's code decays everything,
    which its code_compat model states through optimizer_groups)."""
    if hasattr(model, "optimizer_groups"):  # BiEfficient: which parameters decay (paper or authors' code)
        groups = model.optimizer_groups()
        for g in groups:
            if g["weight_decay"] > 0:
                g["weight_decay"] = weight_decay
        return groups
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [dict(params=decay, weight_decay=weight_decay), dict(params=no_decay, weight_decay=0.0)]


def amp_settings(precision, device, auto_cuda="bf16"):
    """(autocast dtype or None, use GradScaler). auto_cuda: what "auto" picks on a GPU ("bf16" where supported,
    else fp16; "fp16": BiEfficient code-compat, the authors' fp16 autocast + GradScaler)."""
    if precision == "auto":
        if device.type != "cuda":
            precision = "fp32"  # bf16 matmuls are slow on CPUs; fp16 unsupported there
        elif auto_cuda == "fp16":
            precision = "fp16"
        else:
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if precision == "fp32":
        return None, False
    if device.type != "cuda":
        raise UsageError(f"--precision {precision} needs a CUDA GPU; on {device.type} use fp32 or auto")
    return (torch.bfloat16, False) if precision == "bf16" else (torch.float16, True)


# ==========================================================================================================
# 4. The epoch: steps, progress lines, evaluation and checkpoints at its end
# ==========================================================================================================

def train_epoch(run):
    """The rest of the current epoch, from run.epoch_step on: steps, progress lines, mid-epoch last.pt."""
    args, spe = run.args, run.steps_per_epoch
    run.train_set.set_epoch(run.epoch)
    sampler = BatchSampler(len(run.train_set), args.batch_size, run.rank, run.world, args.seed, run.epoch,
                           start=run.epoch_step, keep_last=bool(args.shots))
    run.speed.restart()  # after the evaluation and saving of the previous epoch
    for batch in loader(run.train_set, batch_sampler=sampler, workers=args.workers):
        loss, lr = optimizer_step(run, batch)
        run.speed.step(args.batch_size)
        run.step, run.epoch_step, run.clips_done = run.step + 1, run.epoch_step + 1, run.clips_done + args.batch_size
        if run.epoch_step % args.print_every == 0 or run.epoch_step == spe:
            now = time.time()
            speed = run.speed.clips_per_s()
            eta = run.speed.eta(run.total_steps - run.step, evaluations_left(args, run.epoch))
            run.log(f"epoch {run.epoch + 1}/{args.epochs} step {run.epoch_step}/{spe} loss {loss.item():.4f} "
                    f"lr {lr:.3e} {speed:.1f} clips/s ETA {_hms(eta)} peak mem {_peak_memory_mib(run.device):.0f} MiB")
            write_metrics(run, dict(kind="train", epoch=run.epoch + 1, step=run.step, epoch_step=run.epoch_step,
                                    loss=loss.item(), lr=lr, clips_per_s=speed, eta_s=eta, time_s=now - run.t_start))
        if args.save_every and run.epoch_step % args.save_every == 0 and run.epoch_step < spe:
            save(run, "last.pt")
            run.speed.restart()
        if stop_requested(run):
            save(run, "last.pt")
            raise preempted(run, f"after step {run.epoch_step}/{spe} of epoch {run.epoch + 1} (global step {run.step})")


def end_epoch(run):
    """After an epoch: report replaced videos, evaluate when due, save last.pt (and best.pt on a new best)."""
    args = run.args
    bad = run.train_set.bad_count()
    if bad:
        run.log(f"epoch {run.epoch + 1}: {bad} unreadable videos so far were replaced by others of their class")
    result = None
    if (args.eval_every and (run.epoch + 1) % args.eval_every == 0) or run.epoch + 1 == args.epochs:
        try:
            result = run_eval(run)
        except EvaluationStopped:
            save(run, "last.pt")  # every step of the epoch done, its evaluation not: a resume evaluates it
            where = f"during the evaluation after epoch {run.epoch + 1} (global step {run.step})"
            raise preempted(run, where) from None
    run.epoch, run.epoch_step = run.epoch + 1, 0
    improved = result is not None and result["top1"] > run.best
    if improved:
        run.best = result["top1"]
    last_eval = None if result is None else {k: result[k] for k in ("top1", "top5", "videos", "skipped")}
    # best.pt first: a kill between the two writes leaves best.pt newer than last.pt, never older than what
    # last.pt and the log claim (the resumed run redoes the epoch and writes both again).
    names = ("best.pt", "last.pt") if improved else ("last.pt",)
    save(run, names, last_eval)


def write_metrics(run, record):
    if run.metrics is not None:
        run.metrics.write(json.dumps(record) + "\n")
        run.metrics.flush()


class Throughput:
    """clips/s and ETA of the progress line, from the last `window` training steps only.

    Choice: a moving window of step durations whose clock restarts after every pause that is not a training
    step (evaluation, writing checkpoints), so the speed is that of training now; a cumulative average would
    mix in every evaluation and the slow start. The ETA adds the evaluations still due, each as long as the
    last one measured."""

    def __init__(self, window=SPEED_WINDOW):
        self.steps = collections.deque(maxlen=window)  # (seconds, clips) of the recent steps
        self.t = _now()
        self.eval_s = 0.0  # the last evaluation's duration

    def restart(self):
        self.t = _now()

    def step(self, clips):
        now = _now()
        self.steps.append((now - self.t, clips))
        self.t = now

    def clips_per_s(self):
        return sum(c for _, c in self.steps) / max(sum(t for t, _ in self.steps), 1e-9)

    def eta(self, steps_left, evals_left):
        per_step = sum(t for t, _ in self.steps) / max(len(self.steps), 1)
        return steps_left * per_step + evals_left * self.eval_s


def evaluations_left(args, epoch):
    """Evaluations still due from epoch index `epoch` (0-based, not yet evaluated) to the end of the run."""
    return sum(1 for e in range(epoch + 1, args.epochs + 1)
               if (args.eval_every and e % args.eval_every == 0) or e == args.epochs)


def _peak_memory_mib(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB; the process's peak RSS


def _now():
    return time.monotonic()


# ==========================================================================================================
# 5. Evaluation (exact under DDP; shared with evaluate.py)
# ==========================================================================================================

def view_scores(model, out, B, V, fusion=None, view_average="prob"):
    """The scores of B videos from the model's output on their B * V views (clip-major per video): (B, K).

    One rule for both methods: each view's softmax probabilities over the candidates, averaged over the views.
    X-CLIP's test code (main.py, validate: the softmax of each view summed), whose multi-view protocol TPR Sec.
    4.1.1 follows ("the average score of all views"), averages softmax probabilities, and so does the BiEfficient authors' test.py:179-180; a mean of logits would
    let one confident view outvote the others. TPR: a view's probabilities are Eq. (18)'s S under the "prob"
    fusion (a mix of two softmaxes), and softmax(S / tau) under the paper's "cosine" reading (the same ranking
    within the view). view_average "logit" averages the raw scores instead (TPR: S; BiEfficient: its logits)."""
    if isinstance(model, prompts.TPR):
        fusion = fusion or model.fusion
        s = model.scores(out, fusion).float()  # (B * V, K)
        if view_average == "prob" and fusion == "cosine":
            s = (s / model.tau).softmax(dim=-1)
    else:
        s = model.scores(out).float()  # BiEfficient: the logits of BiEfficient Eq. (10)
        if view_average == "prob":
            s = s.softmax(dim=-1)
    return s.view(B, V, -1).mean(1)  # (B * V, K) -> (B, V, K) -> (B, K)


@torch.no_grad()
def evaluate(model, dataset, device, amp_dtype=None, batch_size=8, workers=0, return_indices=False,
             stop_on_bad=False, progress=None, stop=None, view_average="prob"):
    """Top-1 / top-5 over a test dataset whose items hold all views of one video, (V, T, 3, H, W).

    Each rank takes videos rank, rank + W, ... (no padding: each video is scored exactly once, as
    pytorch/examples imagenet does for its validation set); correct counts are all-reduced, never per-rank
    accuracies. Only real videos are scored: an unreadable one (item "skipped") is counted as skipped and
    named in `skipped_files`, or, with stop_on_bad, stops the evaluation. Returns dict(top1, top5 in % of the
    scored videos, videos (scored), skipped, skipped_files, correct1, correct5[, indices]); for TPR also
    top1_by_fusion {"cosine": %, "prob": %}, top-1 under both readings of TPR Eq. (18).
    progress(done, total), if given, is called after each batch with this rank's counts. stop(), if given, is
    asked before every batch, as often on every rank (a collective under DDP: stop_requested), and a True
    raises EvaluationStopped."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    indices = list(range(rank, len(dataset), world))
    was_training = model.training
    model.eval()
    counts = torch.zeros(4, dtype=torch.float64)  # correct1, correct5, scored, skipped
    # top-1 under both readings of TPR Eq. (18) (the model's own is the one in `top1`)
    variant_counts = dict.fromkeys(prompts.TPR_FUSIONS if isinstance(model, prompts.TPR) else (), 0)
    seen, skipped = [], []
    K = len(dataset.classes)
    candidates = torch.arange(K, device=device)
    batches = iter(loader(dataset, batch_size=batch_size, workers=workers, indices=indices))
    for _ in range(math.ceil(math.ceil(len(dataset) / world) / batch_size)):  # the largest share's batches
        if stop is not None and stop():
            model.train(was_training)
            raise EvaluationStopped
        batch = next(batches, None)
        if batch is None:  # a rank with one video fewer than the others
            continue
        real = batch["skipped"] == 0 if "skipped" in batch else torch.ones(len(batch["label"]), dtype=torch.bool)
        if not real.all():
            bad = [int(i) for i in batch["index"][~real]]
            if stop_on_bad:
                reasons = dataset.bad_files()
                path = dataset.samples[bad[0]][0]
                raise UsageError(f"unreadable test video {path} ({reasons.get(path, 'unreadable')}); the evaluation "
                                 f"stops here (without the stop flag it is skipped and counted as skipped)")
            skipped += bad
            counts[3] += len(bad)
            batch = {k: v[real] for k, v in batch.items()}
            if not real.any():
                if progress is not None:
                    progress(len(seen) + len(skipped), len(indices))
                continue
        video, labels = batch["video"].to(device, non_blocking=True), batch["label"].to(device)
        if video.dim() == 5:
            video = video[:, None]  # (B, 1, T, 3, H, W): one view
        B, V = video.shape[:2]
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            out = model(video.flatten(0, 1), None, candidates)  # (B * V, T, 3, H, W)
        # Each view's probabilities, averaged over the views of each video (view_scores).
        probs = view_scores(model, out, B, V, view_average=view_average)  # (B, K)
        top = probs.topk(min(5, K), dim=-1).indices  # (B, 5)
        counts[0] += (top[:, 0] == labels).sum().item()
        counts[1] += (top == labels[:, None]).any(-1).sum().item()
        counts[2] += B
        for name in variant_counts:
            hit = view_scores(model, out, B, V, name, view_average).argmax(-1) == labels  # (B,)
            variant_counts[name] += int(hit.sum())
        seen += batch["index"].tolist()
        if progress is not None:
            progress(len(seen) + len(skipped), len(indices))  # this rank's videos done (scored or skipped)
    if dist.is_initialized():
        counts = counts.to(device)
        dist.all_reduce(counts)
        counts = counts.cpu()
        if variant_counts:
            vc = torch.tensor(list(variant_counts.values()), dtype=torch.float64, device=device)
            dist.all_reduce(vc)
            variant_counts = dict(zip(variant_counts, vc.cpu().tolist()))
        everyone = [None] * world
        dist.all_gather_object(everyone, skipped)
        skipped = [i for part in everyone for i in part]
        if return_indices:
            everyone = [None] * world
            dist.all_gather_object(everyone, seen)
            seen = [i for part in everyone for i in part]
    model.train(was_training)
    n = int(counts[2])
    result = dict(top1=100 * counts[0].item() / max(n, 1), top5=100 * counts[1].item() / max(n, 1), videos=n,
                  skipped=int(counts[3]), skipped_files=sorted(dataset.samples[i][0] for i in skipped),
                  correct1=int(counts[0]), correct5=int(counts[1]))
    if variant_counts:
        result["top1_by_fusion"] = {k: 100 * c / max(n, 1) for k, c in sorted(variant_counts.items())}
    if return_indices:
        result["indices"] = seen
    return result


def protocol(args, dataset, views, split=None, dataset_name=None):
    """What an accuracy figure means: dataset, split, views, frames, number of videos, the test short side, the
    frames of each view (TSN centres or the BiEfficient authors' clip starts), what is averaged over the views
    and, for TPR, which reading of TPR Eq. (18) `top1` uses."""
    proto = dict(dataset=dataset_name or args.dataset, split=split or args.split, views=views,
                 frames=args.frames, videos=len(dataset), classes=len(dataset.classes),
                 test_resize=dataset.test_resize or clip.ARCHS[args.arch]["image_resolution"],
                 test_sampling=dataset.test_sampling, view_average=row(args, "view_average"))
    if args.method == "tpr":
        proto["fusion"] = getattr(args, "fusion", "prob")
    return proto


def describe(result, proto, random_init):
    tag = " RANDOM-INIT (random towers: meaningless beyond smoke tests)" if random_init else ""
    skipped = result.get("skipped", 0)
    names = f" ({', '.join(result['skipped_files'][:3])}{', ...' if skipped > 3 else ''})" if skipped else ""
    fusion = ""
    if "fusion" in proto and "top1_by_fusion" in result:
        fusion = f", TPR Eq. (18) fusion {proto['fusion']} (" + ", ".join(
            f"{k} {v:.2f}%" for k, v in result["top1_by_fusion"].items()) + ")"
    resize = f", short side {proto['test_resize']}" if proto.get("test_resize") else ""
    if proto.get("test_sampling") == "authors":
        resize += ", the BiEfficient authors' clip starts"
    return (f"top1 {result['top1']:.2f}% top5 {result['top5']:.2f}% on {proto['dataset']} split {proto['split']}"
            f" test, {proto['views']} views, {proto['frames']} frames{resize}, {result['videos']} videos scored, "
            f"{skipped} skipped as unreadable{names}{fusion}{tag}")


def run_eval(run):
    """Single-view evaluation on the test split (built once), logged and written to metrics.jsonl."""
    args = run.args
    if run.test_set is None:
        run.test_set = build_dataset(args, "test", views="1x1", stage="val")
    t0 = _now()
    result = evaluate(run.model, run.test_set, run.device, run.amp_dtype, args.eval_batch_size, args.workers,
                      stop=lambda: stop_requested(run), view_average=row(args, "view_average"))
    run.speed.eval_s = _now() - t0
    proto = protocol(args, run.test_set, "1x1")
    run.log(f"eval epoch {run.epoch + 1}: {describe(result, proto, args.random_init)}")
    write_metrics(run, dict(kind="eval", epoch=run.epoch + 1, step=run.step, protocol=proto, top1=result["top1"],
                            top5=result["top5"], scored=result["videos"], skipped=result["skipped"],
                            skipped_files=result["skipped_files"], random_init=bool(args.random_init),
                            **({"top1_by_fusion": result["top1_by_fusion"]} if "top1_by_fusion" in result else {}),
                            **({"note": "RANDOM-INIT"} if args.random_init else {})))
    return result


def evaluate_only(run):
    """--epochs 0: evaluate the untrained configuration (e.g. frozen CLIP with mean pooling) and save it."""
    result = run_eval(run)
    run.best = result["top1"]
    save(run, ("best.pt", "last.pt"), {k: result[k] for k in ("top1", "top5", "videos", "skipped")})


# ==========================================================================================================
# 6. Checkpoints: trainable state only, atomic, weights_only-loadable
# ==========================================================================================================

def frozen_modules(model):
    """Names of the frozen towers inside a method model (their parameters and buffers are never saved)."""
    return [n for n, m in model.named_modules()
            if isinstance(m, (clip.CLIP, text_branches.ChineseCLIPText)) and n]


def trainable_state(model):
    """Trainable parameters and the persistent buffers outside the frozen towers (e.g. norm statistics of
    beta), as a plain dict of tensors."""
    frozen = tuple(n + "." for n in frozen_modules(model))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    out = {}
    for n, t in model.state_dict().items():
        if n in trainable or (not n.startswith(frozen) and n not in dict(model.named_parameters())):
            out[n] = t.detach().clone().cpu()
    return out


def load_trainable_state(model, state, source):
    mine = trainable_state(model)
    missing, unexpected = sorted(set(mine) - set(state)), sorted(set(state) - set(mine))
    if missing or unexpected:
        raise UsageError(f"{source} does not match this model: missing {missing[:10]}, unexpected "
                         f"{unexpected[:10]} (was it trained with other flags?)")
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    with torch.no_grad():
        for n, t in state.items():
            target = params.get(n, buffers.get(n))
            if target.shape != t.shape:
                raise UsageError(f"{source}: {n} has shape {tuple(t.shape)}, this model {tuple(target.shape)}")
            target.copy_(t)


def rng_state():
    py = random.getstate()
    np_state = np.random.get_state()
    state = dict(python=[py[0], torch.tensor(py[1], dtype=torch.int64), py[2]],
                 numpy=[np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                        int(np_state[3]), float(np_state[4])],
                 torch=torch.get_rng_state())
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    py = state["python"]
    random.setstate((py[0], tuple(py[1].tolist()), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


def save(run, names, last_eval=None):
    """Write the run's trainable state to each file of `names` in the run folder, in that order (rank 0;
    every rank's RNG state)."""
    states = [None] * run.world
    if dist.is_initialized():
        dist.all_gather_object(states, rng_state())
    else:
        states = [rng_state()]
    if run.rank != 0:
        return
    args = run.args
    cadence = ("the BiEfficient authors' cadence (every 10th step)"
               if getattr(args, "lr_schedule", "step") == "every10" else "per step")
    state = dict(format=CHECKPOINT_FORMAT, method=args.method, args=_plain(vars(args)),
                 trainable=trainable_state(run.model), optimizer=run.optimizer.state_dict(),
                 scaler=run.scaler.state_dict(), schedule=dict(kind=f"linear warm-up then cosine, {cadence}",
                                                               step=run.step, total_steps=run.total_steps),
                 epoch=run.epoch, epoch_step=run.epoch_step, step=run.step, best_top1=run.best, rng=states,
                 frozen_fingerprint=run.fingerprint, classes=list(run.train_set.classes), last_eval=last_eval)
    for name in (names,) if isinstance(names, str) else names:
        atomic_save(state, os.path.join(run.out, name))


def atomic_save(obj, path):
    """Write to a temporary file, flush it to disk, then rename: a crash leaves the old file intact. A failed
    write removes the temporary file (a full disk stays no fuller) and is one line naming the file."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        # torch's zip writer reports a short write (a full disk, a quota) as RuntimeError "... unexpected pos N"
        short = isinstance(e, RuntimeError) and ("unexpected pos" in str(e) or "write" in str(e))
        if isinstance(e, OSError) or short:
            full = getattr(e, "errno", None) == errno.ENOSPC or "No space left" in str(e)
            why = ("the disk is full" if full else "the disk is full or over quota (torch: a short write)"
                   if "unexpected pos" in str(e) else (getattr(e, "strerror", None) or str(e).splitlines()[0]))
            raise UsageError(f"cannot write checkpoint {path}: {why}; any earlier {os.path.basename(path)} is "
                             f"intact and {tmp} was removed. Free space in {os.path.dirname(path) or '.'} (or fix "
                             f"it), then continue with --resume {os.path.dirname(path) or '.'}") from None
        raise


def load_checkpoint(path, method=None):
    """A checkpoint of this engine (weights_only); refuses the other method's with a clear error."""
    if os.path.isdir(path):
        path = os.path.join(path, "last.pt")
    if not os.path.isfile(path):
        raise UsageError(f"no checkpoint at {path}")
    try:
        # clip.read_checkpoint: torch.load(weights_only=True)'s result, with the sizes the file declares checked
        # against what it holds before anything is allocated (issue: a 1 KB pickle must not take gigabytes)
        ckpt = clip.read_checkpoint(path)
    except clip.FileRefused as e:
        why = str(e).replace(f"{path}: ", "").replace(str(path), "the file")
        raise UsageError(f"{path} is not a readable checkpoint ({why}); use another checkpoint of the run (best.pt) "
                         f"or start again") from None
    except Exception as e:  # truncated, empty, garbage, or a pickle that weights_only refuses: never run it
        if isinstance(e, pickle.UnpicklingError):  # torch's text would advise weights_only=False: not here
            why = "not a torch file of plain tensors and builtins"
        else:
            text = (str(e).strip().splitlines() or [""])[0].split(". ")[0][:160]
            why = f"{type(e).__name__}: {text}" if text else f"{type(e).__name__}: empty or cut short"
        raise UsageError(f"{path} is not a readable checkpoint ({os.path.getsize(path)} bytes; {why}); use another "
                         f"checkpoint of the run (best.pt) or start again") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT or "trainable" not in ckpt:
        raise UsageError(f"{path} is not a checkpoint of this train.py (format {CHECKPOINT_FORMAT})")
    if method is not None and ckpt["method"] != method:
        raise UsageError(f"{path} is a checkpoint of method {ckpt['method']!r}, not {method!r}; pass --method "
                         f"{ckpt['method']} (valid methods: {', '.join(METHODS)})")
    return ckpt, path


def _plain(d):
    """argparse values as builtins (tuples to lists), for weights_only loading."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


# ==========================================================================================================
# 7. The run, start to end (karpathy/nanoGPT's train.py, in named steps)
# ==========================================================================================================

def main(argv=None):
    with contextlib.ExitStack() as stack:  # closes metrics.jsonl, puts the signal handlers back, unlocks the folder
        run, ckpt = setup(argv, stack)
        if run is None:  # --dry-run
            return None
        if ckpt is not None:
            resume(run, ckpt)
        if run.rank == 0:
            repair_metrics(run)
        run.metrics = stack.enter_context(open(os.path.join(run.out, "metrics.jsonl"), "a")) if run.rank == 0 else None
        stack.callback(restore_signals, catch_stop_signals(run))
        while run.epoch < run.args.epochs:
            train_epoch(run)
            end_epoch(run)
            if stop_requested(run):  # a signal while the epoch ended: last.pt was just saved
                raise preempted(run, f"after epoch {run.epoch} (global step {run.step})")
        if run.args.epochs == 0:
            evaluate_only(run)
        final = finish(run)
    return dict(output=run.out, best_top1=run.best, final=final, model=run.model)


def finish(run):
    """The closing line (best and last top-1 with their protocol). Returns the last evaluation record."""
    if run.test_set is None:
        return None
    last = [json.loads(l) for l in open(os.path.join(run.out, "metrics.jsonl"))] if run.rank == 0 else []
    final = next((r for r in reversed(last) if r["kind"] == "eval"), None)
    if final is not None:
        out = run.out
        run.log(f"done: best top1 {run.best:.2f}%; last: top1 {final['top1']:.2f}% top5 {final['top5']:.2f}% "
                f"({final['protocol']['dataset']} test, 1x1 view, {final.get('scored', final['protocol']['videos'])} "
                f"videos scored, {final.get('skipped', 0)} skipped)"
                f"{' RANDOM-INIT' if run.args.random_init else ''}. Checkpoints: {out}/last.pt, {out}/best.pt")
    return final


# ==========================================================================================================
# Run management: checks of the arguments, resume with an argument diff, restart, the frozen-tower fingerprint,
# best.pt repair, signals, exit codes
# ==========================================================================================================

class UsageError(Exception):
    """Bad input from the user: printed as one line by the command-line entry point."""


class Preempted(Exception):
    """Stopped by SIGTERM or SIGINT; the message says where and what was saved. `code` is the exit code:
    REQUEUE_EXIT for training (the step finished and last.pt was saved)."""

    def __init__(self, message, code=None):
        super().__init__(message)
        self.code = REQUEUE_EXIT if code is None else code


class EvaluationStopped(Exception):
    """evaluate() was asked to stop (its `stop` said so) before a batch; nothing of it was counted."""


# Choice: a run stopped by SIGTERM / SIGINT after saving exits with EX_TEMPFAIL (sysexits.h: "temporary failure,
# retry later"), the code SLURM --requeue wrappers and Kubernetes restart policies take as "run me again".
REQUEUE_EXIT = 75


DEBUG_ENV = "DEBUG"  # DEBUG=1 shows the traceback of a user-facing error, like --debug


def cli_main(main, argv=None):
    """Run a script's main(argv) as a command: a user-facing failure (UsageError, a data set's unreadable
    class) is one line on stderr and exit code 2, Ctrl-C outside training one line and 130, a preempted run
    one line and REQUEUE_EXIT; --debug or DEBUG=1 shows the traceback. Internal bugs still raise."""
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv or os.environ.get(DEBUG_ENV) == "1"
    code = 0
    try:
        main(argv)
    except (UsageError, data.UnreadableClass) as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        code = 2
    except Preempted as e:
        print(f"stopped: {e}", file=sys.stderr)
        code = e.code
    except KeyboardInterrupt:
        if debug:
            raise
        print("interrupted (Ctrl-C) outside a training step: nothing new was saved", file=sys.stderr)
        code = 130
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return code


# --- checks: user input, the data, the schedule

# (flag, smallest valid value, strict): checked before any folder is created
RANGES = (("frames", 1, False), ("batch_size", 1, False), ("micro_batch", 1, False), ("epochs", 0, False),
          ("lr", 0, True), ("min_lr", 0, False), ("warmup_epochs", 0, False), ("weight_decay", 0, False),
          ("grad_clip", 0, False), ("tau", 0, True), ("S", 0, False), ("M", 1, False), ("synthetic_videos", 1, False),
          ("workers", 0, False), ("print_every", 1, False), ("save_every", 0, False), ("eval_every", 0, False),
          ("eval_batch_size", 1, False), ("threads", 1, False))


def _no_repeated_keys(pairs):
    keys = [k for k, _ in pairs]
    twice = sorted({k for k in keys if keys.count(k) > 1})
    if twice:
        raise ValueError(f"{', '.join(map(repr, twice))} given more than once; give each key once")
    return dict(pairs)


def validate_args(args):
    """Ranges and paths of the arguments, each failure one line naming the flag, its value and what is valid."""
    for key, low, strict in RANGES:
        value = getattr(args, key, None)
        if value is not None and (value <= low if strict else value < low):
            raise UsageError(f"--{key.replace('_', '-')} {value}: must be {'>' if strict else '>='} {low}")
    smoothing = getattr(args, "label_smoothing", 0.0)  # absent from checkpoints of before the flag
    if smoothing is not None and not 0.0 <= smoothing < 1.0:
        raise UsageError(f"--label-smoothing {smoothing}: must lie in [0, 1)")
    size = clip.ARCHS[args.arch]["image_resolution"] if args.arch in clip.ARCHS else 0
    if getattr(args, "test_resize", None) is not None and args.test_resize < size:
        raise UsageError(f"--test-resize {args.test_resize}: smaller than the {size}-pixel crop of {args.arch}; "
                         f"give a short side >= {size}")
    if args.lam is not None and not 0 <= args.lam <= 1:
        raise UsageError(f"--lam {args.lam}: lambda of TPR Eq. (18) weighs two probabilities, must be in [0, 1]")
    if args.prefix is not None and args.prefix.count("{}") != 1:
        raise UsageError(f"--prefix {args.prefix!r}: needs exactly one {{}} where the class name goes")
    if args.root is not None and not os.path.isdir(args.root):
        what = "is a file" if os.path.exists(args.root) else "does not exist"
        raise UsageError(f"--root {args.root} {what}; pass the dataset folder ({data.LAYOUTS.get(args.dataset, '')})"
                         if args.dataset != "synthetic" else f"--root {args.root} {what}; pass a folder")
    for key in ("class_file", "chinese_labels"):
        path = getattr(args, key, None)
        if path is not None and not os.path.isfile(path):
            raise UsageError(f"--{key.replace('_', '-')} {path} is not a file")
    for path in args.list_file or ():
        if not os.path.isfile(path):
            raise UsageError(f"--list-file {path} is not a file (give the TRAIN and TEST list files)")
    if getattr(args, "output", None) is not None and os.path.exists(args.output) and not os.path.isdir(args.output):
        raise UsageError(f"--output {args.output} is an existing file; pass a folder (new, or a run's to resume)")


def check_data(run):
    """Before any tower is built: a training set smaller than one batch, a test split without videos; a warning
    when every video probed is shorter than T (its frames would repeat in every clip)."""
    args, train_set, test_set = run.args, run.train_set, run.test_set
    if len(train_set) < args.batch_size:
        raise UsageError(f"--batch-size {args.batch_size} is larger than the training set ({len(train_set)} "
                         f"videos); pass --batch-size {max(1, len(train_set))} or less")
    if len(test_set) == 0:  # (data.py refuses its own empty splits; this covers any other)
        raise UsageError(f"the test split of {args.dataset} (split {args.split}) holds no videos: nothing to evaluate "
                         f"the run on; check the split or list file")
    if run.rank == 0 and hasattr(train_set, "probe"):
        paths = [train_set.samples[i][0] for i in range(0, len(train_set), max(1, len(train_set) // 16))][:16]
        counts = []
        for path in paths:
            try:
                meta = train_set.probe(path)
            except Exception:  # unreadable: the loader replaces it and says so
                continue
            counts.append(meta if isinstance(meta, int) else meta.num_frames)
        if counts and max(counts) < args.frames:
            run.log(f"WARNING: every training video probed ({len(counts)} of {len(train_set)}) has fewer frames than "
                    f"T = {args.frames} (at most {max(counts)}): frames repeat in every clip; a smaller --frames "
                    f"may suit this dataset")


def warn_short_warmup(run):
    """The warm-up of --warmup-epochs is longer than the run: say where the learning rate peaks."""
    args = run.args
    if args.epochs and args.warmup_epochs >= args.epochs:
        lrs = [lr_at(s, args, run.steps_per_epoch) for s in range(run.total_steps)]
        top = max(range(len(lrs)), key=lrs.__getitem__)
        run.log(f"WARNING: --warmup-epochs {args.warmup_epochs:g} is not shorter than --epochs {args.epochs}: the "
                f"learning rate warms up for the whole run and peaks at {lrs[top]:.3g} (--lr {args.lr:g}) at step "
                f"{top + 1} of {run.total_steps}; pass --warmup-epochs below --epochs for the papers' schedule")


# --- resume: the run's own arguments, where it goes on, the state it restores

# Flags a resumed run may change (they change neither the model nor the data); every other setting comes from
# the run's own checkpoint, and another value given for one is refused by name.
# --epochs continues the cosine as if the run had been launched with the new length (lr_at depends only on the
# step and these arguments); --batch-size only where the epoch's sampler position maps (see resolve_run_args).
RESUME_MAY_CHANGE = ("epochs", "lr", "min_lr", "warmup_epochs", "weight_decay", "betas", "grad_clip", "precision",
                     "batch_size", "micro_batch", "workers", "threads", "print_every", "save_every", "eval_every",
                     "eval_batch_size", "dry_run", "debug", "grad_checkpointing",
                     # where the same data and weights are found now (the fingerprint check guards the weights)
                     "root", "pretrained", "pretrained_chinese")


def explicit_flags(argv):
    """{dest: value} of the flags given on the command line (the parser's defaults left out)."""
    p = build_parser()
    for action in p._actions:
        action.default = argparse.SUPPRESS
    return vars(p.parse_args(argv))


# Flags added after checkpoint format 1 (their code reads them with the old behaviour as the default); every
# other flag must be in a run's saved arguments.
LATER_FLAGS = ("label_smoothing", "test_resize", "fusion", "threads", "contrastive_batch") + PIPELINE_ROWS + ("preset",)
# Flags whose None default is filled in by resolve_args: a saved run always holds a value for them.
RESOLVED = ("arch", "frames", "batch_size", "micro_batch", "epochs", "lr", "warmup_epochs", "weight_decay",
            "eval_batch_size", "prefix", "pretrained_chinese", "randaugment", "random_erasing")


def check_saved_args(saved, source):
    """The arguments saved with a run (a checkpoint's, or a hand-edited args.json) before any is used: every
    flag of this train.py present with a value its flag accepts; one line naming each problem otherwise."""
    if not isinstance(saved, dict):
        raise UsageError(f"{source}: the saved arguments are a {type(saved).__name__}, not a dict of flags")
    problems = []
    for action in build_parser()._actions:
        key = action.dest
        if key == "help":
            continue
        if key not in saved:
            if key not in LATER_FLAGS:
                problems.append(f"{key} missing")
            continue
        value = saved[key]
        if value is None and (action.default is None and key not in RESOLVED):
            continue
        if not _fits(action, value):
            want = action.choices or getattr(action.type, "__name__", None) or (
                "true/false" if action.nargs == 0 else "a string")
            problems.append(f"{key} = {value!r} (expected {want}{f' x {action.nargs}' if action.nargs else ''})")
    if problems:
        raise UsageError(f"{source}: its saved arguments do not fit this train.py: {'; '.join(problems[:6])}"
                         f"{' ...' if len(problems) > 6 else ''}; restore the file, or start a new run")


def _fits(action, value):
    if isinstance(action.nargs, int) and action.nargs > 0 or action.nargs == "+":
        return (isinstance(value, (list, tuple)) and (action.nargs == "+" or len(value) == action.nargs)
                and all(_fits_one(action, v) for v in value))
    if action.nargs == 0:  # store_true
        return isinstance(value, bool)
    return _fits_one(action, value)


def _fits_one(action, value):
    if action.type is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif action.type is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    else:
        ok = isinstance(value, str)
    return ok and (action.choices is None or value in action.choices)


def resume_args(cli, argv, saved, source):
    """The arguments of a resumed run: the saved ones, with the flags of RESUME_MAY_CHANGE given now; any other
    flag given with a different value is refused, each named with both values."""
    check_saved_args(saved, source)
    args = argparse.Namespace(**saved)
    for key in TRAINING_ROWS + PIPELINE_ROWS:  # runs saved before these rows existed trained with the paper column
        if not hasattr(args, key):
            setattr(args, key, prompts.BIEFFICIENT_DEFAULTS[key][0])
    given = explicit_flags(argv)
    given.pop("resume", None)
    given.pop("output", None)  # where the run goes on: resolve_run_args
    changed = []
    for key, value in given.items():
        value = list(value) if isinstance(value, tuple) else value  # saved arguments hold lists (_plain)
        old = saved.get(key, getattr(cli, key))
        if key in RESUME_MAY_CHANGE:
            setattr(args, key, value)
        elif key != "method" and value != old:  # --method: load_checkpoint refuses the other method's run
            changed.append(f"--{key.replace('_', '-')} {old} -> {value}")
    if changed:
        raise UsageError(f"--resume {cli.resume}: these flags change the model or the data, so the run cannot "
                         f"continue with them: {'; '.join(changed)} (the run's value -> yours); start a new run "
                         f"with --output instead")
    for key in ("dry_run", "debug"):
        setattr(args, key, getattr(cli, key))
    args.resume, args.output = cli.resume, cli.resume
    return args, given


def resolve_run_args(cli, argv, world):
    """The run's arguments: the checkpoint's when resuming (a few flags may change), else the command line's
    with the papers' defaults filled in; then the per-rank and micro-batch sizes."""
    ckpt = None
    if cli.resume:
        if not os.path.isdir(cli.resume) and not os.path.isfile(cli.resume):
            raise UsageError(f"--resume {cli.resume}: no such run folder")
        folder = cli.resume if os.path.isdir(cli.resume) else os.path.dirname(cli.resume)
        if os.path.isdir(cli.resume) and not os.path.exists(os.path.join(folder, "last.pt")) and \
                os.path.isfile(os.path.join(folder, "args.json")):
            # Killed before its first checkpoint: nothing to continue, so it starts again from its args.json.
            path = os.path.join(folder, "args.json")
            try:
                with open(path) as f:
                    saved = json.load(f)
            except (OSError, ValueError) as e:
                raise UsageError(f"{path} is not readable JSON ({e}); restore it, or start a new run") from None
            args, _ = resume_args(cli, argv, saved, path)
            args.restart = True
        else:
            ckpt, path = load_checkpoint(cli.resume, cli.method if "method" in explicit_flags(argv) else None)
            args, given = resume_args(cli, argv, ckpt["args"], path)
            args.resume_given, args.resume_from = given, path
            old_b, consumed = ckpt["args"]["batch_size"], ckpt["epoch_step"] * ckpt["args"]["batch_size"]
            if args.batch_size != old_b and consumed % args.batch_size:
                raise UsageError(f"--batch-size {args.batch_size}: the run stopped {consumed} videos into epoch "
                                 f"{ckpt['epoch'] + 1} (step {ckpt['epoch_step']} of batch {old_b}), not a whole "
                                 f"number of batches of {args.batch_size}; resume with --batch-size {old_b}, or "
                                 f"with a batch size that divides {consumed}, or change it at an epoch's start")
        if os.path.isfile(cli.resume):
            args.resume = args.output = folder
        where_to_continue(cli, args, ckpt, folder)
        validate_args(args)
    else:
        args = resolve_args(cli, world)
    if args.batch_size % world:
        raise UsageError(f"--batch-size {args.batch_size} (global) is not divisible by the {world} ranks")
    per_rank = args.batch_size // world
    if args.micro_batch is None or args.micro_batch > per_rank:
        args.micro_batch = per_rank
    if per_rank % args.micro_batch:
        raise UsageError(f"--micro-batch {args.micro_batch} does not divide the per-rank batch {per_rank} "
                         f"(= --batch-size {args.batch_size} / {world} ranks)")
    return args, ckpt


def where_to_continue(cli, args, ckpt, folder):
    """A resumed run goes on in its folder; --output NEW branches a checkpoint file (e.g. best.pt) into a new
    folder. A checkpoint older than its folder's last.pt is refused in the folder: the run went on after it,
    and continuing it there would overwrite the later last.pt and log those epochs twice."""
    if cli.output is None or os.path.abspath(cli.output) == os.path.abspath(folder):
        last = os.path.join(folder, "last.pt")
        if ckpt is None or not os.path.isfile(last) or os.path.samefile(args.resume_from, last):
            return
        try:
            later = load_checkpoint(last)[0]["step"]
        except UsageError:  # an unreadable last.pt: the older checkpoint is what is left of the run
            return
        if later > ckpt["step"]:
            raise UsageError(f"--resume {cli.resume}: the run went on after it (step {ckpt['step']}; {last}: step "
                             f"{later}); continuing it in {folder} would overwrite that last.pt. Pass --output NEW "
                             f"to branch from it into a new folder, or --resume {folder} to continue the run")
        return
    if os.path.isdir(cli.resume) or ckpt is None:
        raise UsageError(f"--resume {cli.resume} continues the run in that folder; --output cannot move it (to "
                         f"branch from one of its checkpoints into a new folder: --resume {folder}/last.pt "
                         f"--output NEW)")
    held = _run_signature(cli.output) if os.path.isdir(cli.output) else []
    if held:
        raise UsageError(f"--output {cli.output} holds another run ({', '.join(held)}); to branch from "
                         f"{cli.resume}, pass a new folder")
    args.output, args.branch = cli.output, True


def choose_output(args, rank):
    """A new run's folder (the same name on every rank); refuses one that holds another run."""
    out = args.output or os.path.join("runs", f"{args.method}-{args.dataset}-{time.strftime('%Y%m%d-%H%M%S')}")
    out = broadcast_object(out)
    held = broadcast_object(_run_signature(out) if rank == 0 and os.path.isdir(out) else [])
    if held and not {"last.pt", "best.pt"} & set(held):
        args.fresh_start = True  # a run killed before its first checkpoint: nothing to lose, start it again
    elif held:
        raise UsageError(f"output folder {out} holds another run ({', '.join(held)}); pass --resume {out} "
                         f"to continue it, or choose another --output")
    return out


def _run_signature(folder):
    return [f for f in ("last.pt", "best.pt", "metrics.jsonl", "args.json") if os.path.exists(os.path.join(folder, f))]


# --- one run per folder

LOCK = "run.lock"  # in the run folder while a run writes there: {"host", "pid", "since"}


def lock_folder(run, stack):
    """One run per folder: rank 0 creates run.lock in the run folder (refusing a folder whose lock belongs to
    a live run, taking over one whose process is gone from this host); `stack` removes it at the end."""
    error = None
    if run.rank == 0:
        error = _take_lock(run.out, run.log)
        if error is None and stack is not None:
            stack.callback(_release_lock, run.out)
    error = broadcast_object(error)
    if error:
        raise UsageError(error)


def _take_lock(out, log):
    path = os.path.join(out, LOCK)
    me = dict(host=socket.gethostname(), pid=os.getpid(), since=time.strftime("%Y-%m-%d %H:%M:%S"))
    tmp = f"{path}.{me['pid']}"
    try:
        os.makedirs(out, exist_ok=True)
        with open(tmp, "w") as f:
            json.dump(me, f)
    except OSError as e:  # e.g. a read-only file system: said now, before anything is built
        return f"--output {out}: cannot write there ({e.strerror or e}); choose a folder you can write to"
    try:
        for _ in range(3):
            try:
                os.link(tmp, path)  # atomic, and the lock is complete the moment it exists
                return None
            except FileExistsError:
                pass
            try:
                with open(path) as f:
                    owner = json.load(f)
            except (OSError, ValueError):
                owner = {}
            if owner.get("host") != me["host"] or _alive(owner.get("pid")):
                return (f"--output {out} is in use by another run (pid {owner.get('pid')} on host "
                        f"{owner.get('host')}, since {owner.get('since')}): one run per folder; wait for it to end "
                        f"or choose another --output (if that run is gone, delete {path})")
            log(f"{path}: its run (pid {owner.get('pid')} on this host) is gone; taking the folder over")
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
        return f"--output {out}: could not take {path} (another run keeps taking it)"
    finally:
        with contextlib.suppress(OSError):
            os.remove(tmp)


def _alive(pid):
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _release_lock(out):
    path = os.path.join(out, LOCK)
    with contextlib.suppress(OSError, ValueError):
        with open(path) as f:
            owner = json.load(f)
        if owner.get("pid") == os.getpid() and owner.get("host") == socket.gethostname():
            os.remove(path)
    with contextlib.suppress(OSError):
        os.rmdir(out)  # a start that failed before writing anything leaves no folder


def take_restart(run):
    """A run folder stopped before its first checkpoint restarts from step 0 (its partial log removed); the
    resume bookkeeping flags move from the arguments to the run. Returns whether it restarts."""
    restart = getattr(run.args, "restart", False) or getattr(run.args, "fresh_start", False)
    run.branch, run.resume_from = False, None
    for key in ("restart", "fresh_start", "resume_given", "branch", "resume_from"):
        if hasattr(run.args, key):
            setattr(run, key, getattr(run.args, key))
            delattr(run.args, key)
    if restart and run.rank == 0:
        run.log(f"{run.out} holds a run stopped before its first checkpoint: starting it again from step 0")
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(run.out, "metrics.jsonl"))  # its partial log would interleave with the new one
    return restart


def resume(run, ckpt):
    """Restore the trainable weights, optimiser, scaler, schedule position and random states of a checkpoint."""
    where = run.args.resume
    if ckpt["frozen_fingerprint"] != run.fingerprint:
        raise UsageError(f"{where}: the frozen towers differ from the ones this run was trained with "
                         f"(fingerprint {run.fingerprint} vs {ckpt['frozen_fingerprint']}); pass the same weights")
    load_trainable_state(run.model, ckpt["trainable"], where)
    run.optimizer.load_state_dict(ckpt["optimizer"])
    args, saved = run.args, ckpt["args"]
    for group in run.optimizer.param_groups:  # the saved groups carry the old hyper-parameters
        group["betas"] = tuple(args.betas)
        if group["weight_decay"] > 0:
            group["weight_decay"] = args.weight_decay
    if ckpt["scaler"] or not run.scaler.is_enabled():  # an fp32 / bf16 run saved no scaler state
        run.scaler.load_state_dict(ckpt["scaler"])
    run.epoch, run.epoch_step, run.step, run.best = ckpt["epoch"], ckpt["epoch_step"], ckpt["step"], ckpt["best_top1"]
    if args.batch_size != saved["batch_size"]:  # the same videos of this epoch's order are left (see resolve_run_args)
        run.epoch_step = run.epoch_step * saved["batch_size"] // args.batch_size
        run.step = run.epoch * run.steps_per_epoch + run.epoch_step
        run.log(f"batch size {saved['batch_size']} -> {args.batch_size}: continuing at step {run.epoch_step} of "
                f"epoch {run.epoch + 1}, global step {run.step} of the new schedule")
    if args.epochs < run.epoch + (run.epoch_step > 0):
        raise UsageError(f"--epochs {args.epochs}: the run is already {run.epoch} epochs and {run.epoch_step} steps "
                         f"in; pass --epochs {run.epoch + (run.epoch_step > 0)} or more")
    if args.epochs != saved["epochs"]:
        run.log(f"epochs {saved['epochs']} -> {args.epochs}: the warm-up and cosine run over {run.total_steps} "
                f"steps from now on, as if the run had been launched with --epochs {args.epochs}")
    changed = [k for k in sorted(getattr(run, "resume_given", {})) if k not in ("epochs", "batch_size")
               and saved.get(k) != getattr(args, k)]
    if changed:
        run.log("resumed with " + ", ".join(f"--{k.replace('_', '-')} {saved.get(k)} -> {getattr(args, k)}"
                                           for k in changed))
    if len(ckpt["rng"]) == run.world:
        set_rng_state(ckpt["rng"][run.rank])
    else:
        run.log(f"WARNING: the run had {len(ckpt['rng'])} ranks, now {run.world}: random states re-seeded "
                f"(data order and augmentation stay exact: they depend on the seed, epoch and index only)")
    run.log(f"resumed {where} at epoch {run.epoch + 1}, step {run.epoch_step}/{run.steps_per_epoch} "
            f"(global step {run.step})")
    if run.rank == 0:
        repair_best(run, ckpt)
        if not run.branch:
            warn_edited_args_json(run, ckpt)


def frozen_fingerprint(model):
    """A short hash of the frozen towers' weights: a checkpoint only makes sense on the towers it was trained
    with (they are not stored in it)."""
    h = hashlib.sha256()
    for name in frozen_modules(model):
        for p in model.get_submodule(name).parameters():
            flat = p.detach().float().flatten().cpu()
            # 64 evenly spaced values, bit-exact (a sum would depend on the reduction order, i.e. the threads)
            h.update(str(tuple(p.shape)).encode() + flat[:: max(1, flat.numel() // 64)].numpy().tobytes())
    return h.hexdigest()[:16]


def non_finite_loss(run, loss):
    """The error that stops a run whose loss is NaN or infinite, with what to do next."""
    args, last = run.args, os.path.join(run.out, "last.pt")
    if os.path.isfile(last):
        saved = torch.load(last, map_location="cpu", weights_only=True)
        advice = (f"the last good checkpoint {last} (epoch {saved['epoch'] + 1}, step {saved['epoch_step']}) is "
                  f"intact: continue it with --resume {run.out} --lr {args.lr / 10:g} (or --precision fp32)")
    else:
        advice = (f"no checkpoint was saved yet; start again with a lower --lr (e.g. {args.lr / 10:g}) or "
                  f"--precision fp32")
    return UsageError(f"non-finite loss ({loss.item()}) at epoch {run.epoch + 1}, step {run.epoch_step + 1}: "
                      f"stopping; {advice}")


def repair_metrics(run):
    """A run killed while appending to metrics.jsonl leaves a torn last line; the resumed run would append onto
    it. The torn line goes (its step is redone and logged again)."""
    path = os.path.join(run.out, "metrics.jsonl")
    if not os.path.isfile(path):
        return
    with open(path, "rb") as f:
        text = f.read()
    if not text:
        return
    keep = text.rfind(b"\n", 0, len(text) - 1) + 1  # where the last line starts
    last = text[keep:]
    try:
        json.loads(last)
    except ValueError:
        with open(path, "r+b") as f:
            f.truncate(keep)
        run.log(f"repaired {path}: removed a torn last line ({len(last)} bytes) left by a run that was killed")
        return
    if not last.endswith(b"\n"):  # whole, only its newline missing
        with open(path, "ab") as f:
            f.write(b"\n")


def repair_best(run, ckpt):
    """best.pt must hold the model of the best evaluation that last.pt claims (best_top1); a run killed by an
    older version between its two writes may have left it behind, or missing."""
    if ckpt["best_top1"] < 0:
        return  # nothing evaluated yet
    path = os.path.join(run.out, "best.pt")
    held = None
    if os.path.isfile(path):
        try:
            best = torch.load(path, map_location="cpu", weights_only=True)
            held = (best.get("last_eval") or {}).get("top1", best.get("best_top1"))
        except Exception:  # unreadable: as good as missing
            held = None
    if held is not None and held >= ckpt["best_top1"]:
        return
    if (ckpt.get("last_eval") or {}).get("top1") == ckpt["best_top1"]:
        shutil.copyfile(run.resume_from, path + ".tmp")
        os.replace(path + ".tmp", path)
        run.log(f"repaired {path}: it held top1 {held}, the evaluation of {run.resume_from} (top1 "
                f"{ckpt['best_top1']:.2f}%) is the run's best, copied there")
    else:
        run.log(f"WARNING: {path} holds top1 {held} but the run's best was {ckpt['best_top1']:.2f}%, whose weights "
                f"are no longer saved; best.pt is left as it is and the next better evaluation replaces it")


def warn_edited_args_json(run, ckpt):
    """args.json is only read to restart a run stopped before its first checkpoint; a resumed run takes the
    checkpoint's arguments. Hand edits are named (not silently ignored), and args.json is rewritten with the
    arguments the run goes on with."""
    path = os.path.join(run.out, "args.json")
    try:
        with open(path) as f:
            written = json.load(f)
    except (OSError, ValueError):
        written = {}
    skip = ("resume", "output", "debug", "dry_run")
    edited = sorted(k for k, v in written.items() if k in ckpt["args"] and k not in skip and v != ckpt["args"][k])
    if edited:
        saved = ckpt["args"]
        changes = ", ".join(f"{k} {saved[k]!r} -> {written[k]!r}" for k in edited)
        run.log(f"WARNING: {path} was edited ({changes}): "
                f"a resumed run takes the arguments saved in its checkpoint, so these edits are ignored; pass a "
                f"flag that may change ({', '.join('--' + k.replace('_', '-') for k in RESUME_MAY_CHANGE[:6])}, ...) "
                f"with --resume instead")
    with open(path, "w") as f:
        json.dump(vars(run.args), f, indent=1)


# --- signals: stop after the step, save, exit 75

def catch_stop_signals(run):
    """SIGTERM (what SLURM and Kubernetes send before preemption) and SIGINT (Ctrl-C) only ask the training
    loop to stop after the step in progress; returns the previous handlers."""
    run.stop_signal = None

    def handler(signum, frame):
        if run.stop_signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without saving
        run.stop_signal = signal.Signals(signum).name
    return {s: signal.signal(s, handler) for s in STOP_SIGNALS}


def restore_signals(previous):
    for sig, handler in previous.items():
        signal.signal(sig, handler)


def preempted(run, where):
    """The one line of a run stopped by a signal, after last.pt was saved."""
    return Preempted(f"{run.stop_signal} {where}; saved {os.path.join(run.out, 'last.pt')}; continue with --resume "
                     f"{run.out} (exit code {REQUEUE_EXIT}: requeue)")


def stop_requested(run):
    """Whether any rank was asked to stop (all ranks agree, so they save and stop at the same step)."""
    flag = run.stop_signal is not None
    if dist.is_initialized():
        t = torch.tensor([float(flag)], device=run.device if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(t)
        flag = bool(t.item())
        run.stop_signal = (run.stop_signal or "a signal on another rank") if flag else None
    return flag


def _hms(seconds):
    """'H:MM:SS' of the progress lines ('1 day, H:MM:SS' beyond a day)."""
    return str(datetime.timedelta(seconds=int(seconds)))


# ==========================================================================================================
# Memory planning (--grad-checkpointing auto): a training step's peak tensor memory and FLOPs on fake tensors
# ==========================================================================================================

CHECKPOINTING = ("auto", "off", "full", "selective")
# Choice: the estimate counts tensors only; the caching allocator's fragmentation, cuBLAS/cuDNN workspaces and
# the loader's pinned batches come on top, so auto plans a step to fit 85% of the memory left for tensors.
AUTO_MEMORY_FRACTION = 0.85


def set_grad_checkpointing(model, mode):
    """--grad-checkpointing on every CLIP transformer in `model`: "off", "full", "selective" (clip.checkpoint_options);
    "auto" starts off (plan_checkpointing decides before training); True / False: runs saved before the modes."""
    value = {"off": False, "auto": False, "full": True, "selective": "selective", True: True, False: False}[mode]
    for m in model.modules():
        if isinstance(m, clip.Transformer):
            m.grad_checkpointing = value


class StepCost(TorchDispatchMode):
    """Peak tensor memory and FLOPs of the ops run under it.

    peak: the most bytes of tensor storage alive at once: the storages of `tensors` and of every op's outputs,
    each counted from when it is first seen until it is freed (a weak reference to the storage; a view shares its
    base's storage and adds nothing). flops: torch.utils.flop_counter's formulas (matmuls, convolutions,
    attention), forward, backward and recomputation alike. Works on fake tensors, whose storages have sizes.
    Choice: not FlopCounterMode itself, whose module hooks keep checkpointed blocks' activations alive."""

    def __init__(self, tensors=()):
        super().__init__()
        self.live = self.peak = self.flops = 0
        self.formulas = dict(flop_counter.flop_registry)
        aten = torch.ops.aten
        if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):  # the CPU's attention counts as the GPU's
            self.formulas[aten._scaled_dot_product_flash_attention_for_cpu] = flop_counter.shape_wrapper(
                lambda q, k, v, *a, out_shape=None, **kw: flop_counter.sdpa_flop_count(q, k, v))
            self.formulas[aten._scaled_dot_product_flash_attention_for_cpu_backward] = flop_counter.shape_wrapper(
                lambda g, q, k, v, *a, out_shape=None, **kw: flop_counter.sdpa_backward_flop_count(g, q, k, v))
        self._refs = {}  # storage id -> weak reference whose callback subtracts its bytes
        self._unread = {}  # storage id -> bytes, of the given tensors that no op has read yet
        for t in tensors:
            if isinstance(t, torch.Tensor):
                self.track(t)
                self._unread[t.untyped_storage()._cdata] = t.untyped_storage().nbytes()
        self.start = self.live  # bytes of the given tensors

    @property
    def unread(self):
        """Bytes of the given tensors that no op read (e.g. text towers a training step never runs)."""
        return sum(self._unread.values())

    def track(self, t):
        storage = t.untyped_storage()
        key = storage._cdata
        if key not in self._refs:
            n = storage.nbytes()
            self._refs[key] = weakref.ref(storage, lambda _, key=key, n=n: self._free(key, n))
            self.live += n
            self.peak = max(self.peak, self.live)

    def _free(self, key, n):
        del self._refs[key]
        self.live -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        for t in tree_leaves((args, kwargs)):
            if isinstance(t, torch.Tensor) and self._unread:
                self._unread.pop(t.untyped_storage()._cdata, None)
        out = func(*args, **(kwargs or {}))
        if func._overloadpacket in self.formulas:
            self.flops += self.formulas[func._overloadpacket](*args, **(kwargs or {}), out_val=out)
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.track(t)
        return out


class RealMasks(TorchDispatchMode):
    """Fake tensors indexed by a real boolean mask (e.g. the loss's columns with a positive): the mask holds data,
    so its positions are taken here (nonzero), where the fake tensor alone could not know the output's shape."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.index.Tensor and isinstance(args[0], FakeTensor):
            indices = []
            for i in args[1]:
                real_mask = isinstance(i, torch.Tensor) and i.dtype == torch.bool and not isinstance(i, FakeTensor)
                indices.extend(i.nonzero(as_tuple=True) if real_mask else [i])
            args = (args[0], indices)
        return func(*args, **(kwargs or {}))


def estimate_step(model, args, device, amp_dtype, batch):
    """The StepCost (.peak bytes, .flops, .unread bytes) of one training step of `model` on one rank's `batch`
    videos: train_step (forward, loss, backward) then the AdamW step, on fake tensors (torch._subclasses.fake_tensor:
    shapes and dtypes, no data, no arithmetic; seconds on a CPU for ViT-B/16). The model's parameters are swapped
    for fake ones and put back after. The peak counts every tensor: frozen and trainable weights, buffers, the
    batch, activations, gradients and the optimizer state (created beforehand, as a step after the first one
    finds it); not the CUDA context nor the allocator's caching. The step is this rank's own (nothing gathered).
    Choice: labels of distinct classes (where batch <= classes): the most candidate texts a step can meet."""
    fake = FakeTensorMode(allow_non_fake_inputs=True)  # class features, labels and class ids stay real
    swapped, fakes = [], {}
    for m in model.modules():
        for name, p in m._parameters.items():
            if p is not None:
                if id(p) not in fakes:
                    fakes[id(p)] = fake.from_tensor(p)
                swapped.append((m, name, p))
                m._parameters[name] = fakes[id(p)]
    try:
        R = next(m for m in model.modules() if isinstance(m, clip.VisionTransformer)).input_resolution
        classes = len(model.class_names) if hasattr(model, "class_names") else model.text_en.shape[0]
        with fake:
            video = torch.empty(batch, args.frames, 3, R, R, device=device)  # (B, T, 3, H, W) as the loader's
        labels = torch.arange(batch, device=device) % classes  # (B,)
        step_args = argparse.Namespace(**vars(args))
        step_args.micro_batch = min(args.micro_batch or batch, batch)
        step_args.contrastive_batch = "local"  # one rank's own step: nothing gathered from the others
        opt = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr, betas=tuple(args.betas))
        trainable = [p for p in model.parameters() if p.requires_grad]
        for p in trainable:
            p.grad = torch.zeros_like(p)
        opt.step()  # the optimizer state (fake)
        opt.zero_grad(set_to_none=True)
        # Choice: no GradScaler: fp16's scaling works in place (no memory) and its inf check reads values.
        scaler = torch.amp.GradScaler(device.type, enabled=False)
        tensors = [video, labels, *opt.state_dict()["state"].values()] + [
            t for m in model.modules() for t in (*m._parameters.values(), *m._buffers.values()) if t is not None]
        with StepCost(tree_leaves(tensors)) as cost, RealMasks():
            train_step(model, model, video, labels, step_args, 1, amp_dtype, scaler, device)  # world 1: no collective
            scaler.step(opt)
            opt.zero_grad(set_to_none=True)
        return cost
    finally:
        for m, name, p in swapped:
            m._parameters[name] = p


def plan_checkpointing(model, args, device, amp_dtype, batch, available, estimate=estimate_step):
    """--grad-checkpointing auto: the first of off, selective, full whose estimated peak (estimate_step) fits
    AUTO_MEMORY_FRACTION of `available` bytes (full if none does), set on the model. Returns (mode, peak bytes)."""
    for mode in ("off", "selective", "full"):
        set_grad_checkpointing(model, mode)
        peak = estimate(model, args, device, amp_dtype, batch).peak
        if peak <= AUTO_MEMORY_FRACTION * available:
            break
    return mode, peak


def auto_checkpointing(run):
    """Before training: --grad-checkpointing auto on a GPU plans against the memory this process can still use
    (free, plus what its tensors hold already: the estimate counts the weights) and says so in one line."""
    if run.args.grad_checkpointing != "auto" or run.device.type != "cuda":
        return
    free, _ = torch.cuda.mem_get_info(run.device)
    available = free + torch.cuda.memory_allocated(run.device)
    try:
        mode, peak = plan_checkpointing(run.model, run.args, run.device, run.amp_dtype,
                                        run.args.batch_size // run.world, available)
    except Exception as e:  # Choice: a failed estimate must not stop training; full checkpointing is the safe side
        set_grad_checkpointing(run.model, "full")
        run.log(f"--grad-checkpointing auto: full (the memory estimate failed: {type(e).__name__}: {e}; pass "
                f"--grad-checkpointing off|selective|full to choose)")
        return
    run.log(f"--grad-checkpointing auto: {mode} (estimated step peak {peak / 1e9:.1f} GB; planned to fit "
            f"{AUTO_MEMORY_FRACTION:.0%} of the {available / 1e9:.1f} GB available)")


if __name__ == "__main__":
    sys.exit(cli_main(main))
