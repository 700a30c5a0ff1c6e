"""Evaluation of a trained TPR or BiEfficient checkpoint: every protocol of both papers, exact under DDP.

- Closed set (TPR Sec. 4.1.1 and Table 8; BiEfficient Table 1): single view (1 clip x 1 centre crop) and
  multi-view (4 clips x 3 crops; the BiEfficient authors' 3 clips x 1 crop for a run with --test-protocol
  authors) top-1 / top-5, each view's softmax probabilities averaged over the views of a video (train.view_scores;
  TPR: the TPR Eq. (18) fusion S = lambda S_VT + (1 - lambda) S_VC, lambda overridable with --lam). The short
  side before the crops: 256 for TPR (Sec. 4.1.1) and for the BiEfficient authors' protocol, --test-resize
  otherwise (train.eval_short_side); every metrics line says it.
- Zero-shot (BiEfficient Table 2): a checkpoint trained on one dataset scored on another's classes: the three
  official test splits with mean and standard deviation, or BIKE's half-classes x 10.
- Few-shot (TPR Sec. 4.3, Table 7): K-shot runs are trained by train.py --shots K --seed s; pass all their
  checkpoints here and get the mean (and std) over runs.
- A user's own video: the top-5 labels with probabilities (of the dataset's classes or of --labels; a TPR
  model with a Chinese branch takes their Chinese labels from a dictionary here, or scores with its English
  branch alone and says so); --visualize draws a titled PNG of the frames as the model saw them (its centre
  crop) with their word-guided weights (TPR Eq. 6-7, BiEfficient Eq. 8) and the top-k bars, k = min(5, labels);
  --attention draws TPR's Fig. 7, the last frozen layer's class-token attention over each frame's patches, one
  row per checkpoint.
- Progress: a line every --print-every batches (videos done / total, ETA).
- top-1 under both readings of TPR Eq. (18) (softmax probabilities and the paper's cosines) in metrics.json
  (`top1_by_fusion`); `top1` is the model's own (`protocol.fusion`).

Counting follows pytorch/examples `imagenet/main.py`: each rank scores videos rank, rank + W, ... without
padding, and the correct counts (not accuracies) are all-reduced, so every video counts exactly once. Only
real videos are scored: an unreadable test video is skipped (never replaced by another), and every line and
record gives the videos scored and skipped; --stop-on-bad-video stops at the first one instead.

Exit codes: 0 done; 2 a user-facing failure, one line; 143 (SIGTERM) or 130 (Ctrl-C), 128 + the signal's
number: stopped at the next batch with one line, every rank, nothing written (metrics.json is written at the end:
run it again).

    python evaluate.py --checkpoint runs/x/best.pt                              # 1x1 and 4x3 on its test split
    torchrun --nproc_per_node=4 evaluate.py --checkpoint runs/k400/best.pt --dataset hmdb51 --root DIR --zero-shot splits
    python evaluate.py --checkpoint runs/x/best.pt --video clip.mp4 --labels 'run,jump,swim' --visualize out.png
    python evaluate.py --checkpoint runs/baseline/best.pt runs/full/best.pt --video clip.mp4 --attention fig7.png
"""
import argparse
import contextlib
import json
import os
import signal
import statistics
import sys
import time
import types

import numpy as np
import torch

import clip
import data
import prompts
import train

ZERO_SHOT = ("splits", "half")
# Settings of the training run that evaluation may change; the model itself always comes from the checkpoint.
OVERRIDABLE = ("root", "pretrained", "pretrained_chinese", "lam", "test_words", "chinese_labels", "list_file",
               "class_file", "filename_tmpl", "test_resize", "fusion")


def build_parser():
    p = train.Parser(description="Evaluate a TPR or BiEfficient checkpoint (one process or torchrun).",
                     formatter_class=train.HelpFormatter)
    p.add_argument("--checkpoint", nargs="+", required=True,
                   help="checkpoint file(s) or run folder(s) (their last.pt); several: mean +- std over them "
                        "(e.g. the runs of a few-shot experiment)")
    p.add_argument("--method", default=None, choices=train.METHODS, help="refuse checkpoints of the other method")
    p.add_argument("--dataset", default=None, choices=data.DATASETS,
                   help="dataset to score (default: the one it was trained on; another one = zero-shot transfer)")
    p.add_argument("--root", default=None, help="dataset folder (default: the training run's)")
    p.add_argument("--split", type=int, nargs="+", default=None, choices=(1, 2, 3),
                   help="split(s) (default: the training run's)")
    p.add_argument("--views", nargs="+", default=None, help="test views CLIPSxCROPS, e.g. 1x1 4x3 (default: 1x1 "
                   "and 4x3; 3x1 for a run with the BiEfficient authors' --test-protocol authors)")
    p.add_argument("--zero-shot", default=None, choices=ZERO_SHOT,
                   help="zero-shot protocol on --dataset: the three official splits (mean +- std) or BIKE's "
                        "half-classes x --halves")
    p.add_argument("--halves", type=int, default=10, help="rounds of the half-classes protocol")
    p.add_argument("--lam", type=float, default=None, help="lambda of TPR Eq. (18) (default: the training run's)")
    p.add_argument("--test-words", default=None, choices=prompts.TPR_TEST_WORDS,
                   help="TPR: whose words weight the frames (default: the training run's)")
    p.add_argument("--chinese-labels", default=None, help="TPR: Chinese label file for a custom class list or "
                   "for --labels (JSON {english: chinese} or english<TAB>chinese lines)")
    p.add_argument("--pretrained", default=None, help="CLIP weights, if not where the training run found them")
    p.add_argument("--pretrained-chinese", default=None, help="Chinese-CLIP weights, likewise")
    p.add_argument("--batch-size", type=int, default=4, help="videos per rank per forward (all their views)")
    p.add_argument("--print-every", type=int, default=10, help="progress line every N batches (0: none)")
    p.add_argument("--workers", type=int, default=train.default_workers(), help="data loader processes per rank "
                   "(default: 4, or fewer if this process may use fewer cores per rank)")
    p.add_argument("--output", default=None, help="folder for metrics.json (default: the first checkpoint's)")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"), help="autocast")
    p.add_argument("--video", default=None, help="score one video file and print its top-5 labels")
    p.add_argument("--labels", default=None, help="with --video: comma-separated class names to choose from "
                   "(default: the classes of --dataset)")
    p.add_argument("--visualize", default=None, metavar="PNG", help="with --video: draw the frames the model "
                   "saw, their word-guided weights and the top-k")
    p.add_argument("--attention", default=None, metavar="PNG",
                   help="with --video: TPR Fig. 7, each checkpoint's last-layer class-token attention over the "
                        "patches of every sampled frame, one row per checkpoint (e.g. the baseline and the full model)")
    p.add_argument("--test-resize", type=int, default=None, metavar="PIXELS",
                   help="short side before the test crops (default: the training run's --test-resize, else 256 "
                        "for TPR, Sec. 4.1.1, and for the BiEfficient authors' protocol, else the crop size)")
    p.add_argument("--fusion", default=None, choices=("prob", "cosine"),
                   help="which reading of TPR Eq. (18) gives `top1` (both are reported; default: the training run's)")
    p.add_argument("--stop-on-bad-video", action="store_true",
                   help="stop at the first unreadable test video instead of skipping it (skipped videos are "
                        "counted in every metrics line and never replaced by another)")
    p.add_argument("--debug", action="store_true", help=f"show the traceback of an error (also: {train.DEBUG_ENV}=1)")
    return p


def validate(cli):
    """Flag values checked before any model is loaded: one line naming the value and what is valid."""
    for v in cli.views or ():
        try:
            data._parse_views(v)
        except ValueError as e:
            raise train.UsageError(f"--views: {e}") from None
    for key, low in (("batch_size", 1), ("workers", 0), ("halves", 1)):
        if getattr(cli, key) < low:
            raise train.UsageError(f"--{key.replace('_', '-')} {getattr(cli, key)}: must be >= {low}")
    if cli.lam is not None and not 0 <= cli.lam <= 1:
        raise train.UsageError(f"--lam {cli.lam}: lambda of TPR Eq. (18) must be in [0, 1]")
    if cli.root is not None and not os.path.isdir(cli.root):
        raise train.UsageError(f"--root {cli.root} is not a folder; pass the dataset folder in its authors' layout")
    if cli.output is not None and os.path.exists(cli.output) and not os.path.isdir(cli.output):
        raise train.UsageError(f"--output {cli.output} is an existing file; pass a folder for metrics.json")
    for path in cli.checkpoint:
        if not os.path.exists(path):
            raise train.UsageError(f"--checkpoint {path} does not exist (give a checkpoint file or a run folder)")
    if cli.video is not None and not os.path.isfile(cli.video):
        raise train.UsageError(f"--video {cli.video} is not a file")
    if cli.attention is not None and cli.video is None:
        raise train.UsageError(f"--attention {cli.attention} draws the attention maps of one video: give --video FILE")
    if cli.test_resize is not None and cli.test_resize < 1:
        raise train.UsageError(f"--test-resize {cli.test_resize}: must be >= the model's crop size (224 for ViT-B)")
    for flag in ("visualize", "attention"):
        path = getattr(cli, flag)
        folder = os.path.dirname(os.path.abspath(path)) if path else None
        if folder and not os.path.isdir(folder):
            raise train.UsageError(f"--{flag} {path}: the folder {folder} does not exist; create it or name a PNG "
                                   f"in an existing folder")
    if cli.video is None:
        writable_or_refuse(output_folder(cli))


def output_folder(cli):
    """Where metrics.json goes: --output, else the first checkpoint's run folder."""
    first = cli.checkpoint[0]
    return cli.output or (first if os.path.isdir(first) else os.path.dirname(os.path.abspath(first)))


def writable_or_refuse(folder):
    """metrics.json is written after the whole evaluation: a folder it cannot go to is said before."""
    probe = os.path.join(folder, f".metrics.json.{os.getpid()}.probe")
    try:
        os.makedirs(folder, exist_ok=True)
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        raise train.UsageError(f"--output {folder}: metrics.json cannot be written there ({e.strerror or e}); "
                               f"pass --output FOLDER you can write to") from None


def load_run(path, cli):
    """(checkpoint dict, the training arguments with the evaluation overrides)."""
    ckpt, path = train.load_checkpoint(path, cli.method)
    train.check_saved_args(ckpt["args"], path)
    args = argparse.Namespace(**ckpt["args"])
    for key in OVERRIDABLE:
        value = getattr(cli, key, None)
        if value is not None:
            setattr(args, key, value)
    args.workers = cli.workers
    size = clip.ARCHS[args.arch]["image_resolution"]
    if getattr(args, "test_resize", None) is not None and args.test_resize < size:
        raise train.UsageError(f"--test-resize {args.test_resize}: smaller than the {size}-pixel crop of {path} "
                               f"({args.arch}); give a short side >= {size}")
    return ckpt, args, path


def restore(ckpt, args, class_texts, zh, device, source):
    """The method model of the checkpoint, its trainable state loaded, classes set to `class_texts`."""
    model = train.build_model(args, class_texts, zh)
    fingerprint = train.frozen_fingerprint(model)
    if fingerprint != ckpt["frozen_fingerprint"]:
        raise train.UsageError(f"{source} was trained on other frozen weights than the ones loaded now "
                               f"(fingerprint {ckpt['frozen_fingerprint']} vs {fingerprint}); pass the same "
                               f"--pretrained / --pretrained-chinese as the training run")
    train.load_trainable_state(model, ckpt["trainable"], source)
    return model.to(device).eval()


def set_classes(model, args, dataset, name):
    texts, zh = train.class_names(args, dataset, name)
    if train.uses_chinese(args):
        model.set_classes(texts, zh)
    else:
        model.set_classes(texts)


class Progress:
    """A progress line every `every` batches while one test set is scored: videos done / total, ETA.

    Called by train.evaluate with this rank's counts; the ranks score equal shares in step, so rank 0's
    fraction stands for all of them."""

    def __init__(self, what, total, every, log):
        self.what, self.total, self.every, self.log = what, total, every, log
        self.batches, self.t0 = 0, time.monotonic()

    def __call__(self, done, share):
        self.batches += 1
        if not self.every or (self.batches % self.every and done < share):
            return
        elapsed = time.monotonic() - self.t0
        videos = min(self.total, round(self.total * done / max(share, 1)))
        eta = elapsed * (share - done) / max(done, 1)
        self.log(f"  {self.what}: {videos}/{self.total} videos, {videos / max(elapsed, 1e-9):.1f} videos/s, "
                 f"ETA {train._hms(eta)}")


def score(model, ds, cli, device, amp_dtype, log, what, view_average="prob"):
    """train.evaluate with progress lines."""
    progress = Progress(what, len(ds), cli.print_every, log)
    return train.evaluate(model, ds, device, amp_dtype, cli.batch_size, cli.workers,
                          stop_on_bad=cli.stop_on_bad_video, progress=progress, stop=getattr(cli, "stop", None),
                          view_average=view_average)


def mean_std(values):
    """Mean and sample standard deviation (0 for one value) of accuracies over runs or zero-shot parts."""
    values = [float(v) for v in values]
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def evaluate_run(path, cli, device, amp_dtype, log):
    """Every protocol asked for, for one checkpoint: list of result records."""
    ckpt, args, path = load_run(path, cli)
    name = cli.dataset or args.dataset
    tag = " RANDOM-INIT" if args.random_init else ""
    records = []
    views = cli.views or train.test_views(args)
    average = train.row(args, "view_average")  # what is averaged over the views (train.view_scores)
    if cli.zero_shot:
        kw = dict(frames=args.frames, input_size=clip.ARCHS[args.arch]["image_resolution"], sampling=args.sampling,
                  **train.pipeline_kwargs(args, "test", name))
        model = None
        for view in views:
            try:
                evals = data.zero_shot_protocol(name, args.root, cli.zero_shot, halves=cli.halves, seed=args.seed,
                                                views=view, **kw)
            except (ValueError, OSError) as e:
                raise train.UsageError(f"zero-shot on {name}: {e}") from None
            for ev in evals:
                ds = ev["dataset"]
                if model is None:
                    texts, zh = train.class_names(args, ds, name)
                    model = restore(ckpt, args, texts, zh, device, path)
                set_classes(model, args, ds, name)
                r = score(model, ds, cli, device, amp_dtype, log, f"zero-shot {ev['name']} {view}", average)
                proto = dict(train.protocol(args, ds, view, dataset_name=name), zero_shot=cli.zero_shot,
                             part=ev["name"], trained_on=args.dataset)
                log(f"zero-shot {ev['name']} (trained on {args.dataset}): {train.describe(r, proto, args.random_init)}")
                records.append(dict(checkpoint=path, protocol=proto, top1=r["top1"], top5=r["top5"],
                                    scored=r["videos"], skipped=r["skipped"], skipped_files=r["skipped_files"],
                                    random_init=bool(args.random_init), **fusion_fields(r)))
            these = [r for r in records if r["protocol"]["views"] == view]
            m1, s1 = mean_std([r["top1"] for r in these])
            m5, s5 = mean_std([r["top5"] for r in these])
            log(f"zero-shot {name} ({cli.zero_shot}, {len(evals)} parts, {view} views): top1 {m1:.2f} +- {s1:.2f}%, "
                f"top5 {m5:.2f} +- {s5:.2f}%, {sum(r['scored'] for r in these)} videos scored, "
                f"{sum(r['skipped'] for r in these)} skipped{tag}")
        return records
    splits = cli.split or [args.split]
    model = None
    for split in splits:
        for view in views:
            try:
                ds = train.build_dataset(args, "test", views=view, split=split, dataset=name)
            except (ValueError, OSError) as e:
                raise train.UsageError(f"{name} split {split}: {e}") from None
            if model is None:
                texts, zh = train.class_names(args, ds, name)
                model = restore(ckpt, args, texts, zh, device, path)
            set_classes(model, args, ds, name)
            r = score(model, ds, cli, device, amp_dtype, log, f"{name} split {split} {view}", average)
            proto = train.protocol(args, ds, view, split=split, dataset_name=name)
            if name != args.dataset:
                proto.update(zero_shot="classes of another dataset", trained_on=args.dataset)
            log(f"{path}: {train.describe(r, proto, args.random_init)}")
            records.append(dict(checkpoint=path, protocol=proto, top1=r["top1"], top5=r["top5"],
                                scored=r["videos"], skipped=r["skipped"], skipped_files=r["skipped_files"],
                                random_init=bool(args.random_init), **fusion_fields(r)))
    return records


def fusion_fields(result):
    """TPR: the top-1 of both readings of TPR Eq. (18), {"top1_by_fusion": {"cosine": %, "prob": %}}; else {}."""
    return {"top1_by_fusion": result["top1_by_fusion"]} if "top1_by_fusion" in result else {}


def summarise(records, log):
    """Mean +- std over checkpoints (few-shot runs, seeds) and over zero-shot parts, per protocol."""
    groups = {}
    for r in records:
        p = r["protocol"]
        key = (p["dataset"], p.get("zero_shot") or p["split"], p["views"], p["frames"])
        groups.setdefault(key, []).append(r)
    out = []
    for (dataset, split, views, frames), rs in groups.items():
        if len(rs) < 2:
            continue
        m1, s1 = mean_std([r["top1"] for r in rs])
        m5, s5 = mean_std([r["top5"] for r in rs])
        out.append(dict(dataset=dataset, split=split, views=views, frames=frames, runs=len(rs), top1_mean=m1,
                        top1_std=s1, top5_mean=m5, top5_std=s5, scored=sum(r["scored"] for r in rs),
                        skipped=sum(r["skipped"] for r in rs), random_init=any(r["random_init"] for r in rs)))
        log(f"mean over {len(rs)}: {dataset} {split} {views} views {frames} frames: top1 {m1:.2f} +- {s1:.2f}% "
            f"top5 {m5:.2f} +- {s5:.2f}%, {out[-1]['scored']} videos scored, {out[-1]['skipped']} skipped"
            f"{' RANDOM-INIT' if out[-1]['random_init'] else ''}")
    return out


# ----------------------------------------------------------------------------------------------------------
# One video
# ----------------------------------------------------------------------------------------------------------

def load_video(path, T, size, resize=None):
    """One test clip of a video file: (1, T, 3, size, size) normalised (short side `resize` first, None = size),
    the uint8 frames (T, H, W, 3), and a note saying how its display matrix turned it ('' when it does not)."""
    try:
        meta = data.probe_video(path)
        if meta.num_frames == 1:
            print(f"WARNING: {path} has one frame: all {T} frames the model sees are that one, so the scores are "
                  f"those of a still image", file=sys.stderr)
        idx = data.sample_indices(meta.num_frames, T, "test")
        frames = data.decode_frames(path, idx, meta)
    except data.BadVideo as e:
        raise train.UsageError(f"cannot read {path}: {e}") from None
    turn = meta.rotation or 0  # degrees counter-clockwise (data.VideoMeta), known once a frame has decoded
    turned = (f"turned {abs(turn)} degrees {'counter-clockwise' if turn > 0 else 'clockwise'} as its display "
              f"matrix says (as players show it)") if turn else ""
    return data.test_crops(frames, size, 1, resize), frames, turned  # (1, T, 3, S, S)


def crop_pixels(video):
    """The model's input (T, 3, S, S), CLIP-normalised, back to uint8 pixels (T, S, S, 3) for drawing."""
    mean = torch.tensor(data.CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(data.CLIP_STD).view(3, 1, 1)
    x = (video.float().cpu() * std + mean).clamp(0, 1) * 255  # (T, 3, S, S)
    return x.round().to(torch.uint8).permute(0, 2, 3, 1).numpy()  # (T, S, S, 3)


def dictionary_chinese(ckpt, args, texts):
    """Chinese labels for the user's --labels from a dictionary the project already has, or (None, None).

    Looked up in the training run's dictionary (its dataset's, or its --chinese-labels file), then in the
    built-in ones (synthetic, assets/chinese_labels/). A label matches a class by its name ('brush_hair') or
    its words ('brush hair'); all labels must come from the same dictionary. Returns (labels, source)."""
    sources = [(args.dataset, args.chinese_labels, list(ckpt.get("classes") or []))]
    sources.append(("synthetic", None, list(data.SYNTHETIC_CLASSES)))
    sources += [(name, None, None) for name in data.ASSET_NAMES]
    for name, path, classes in sources:
        try:
            if classes is None or (not classes and name in data.ASSET_NAMES):
                classes = data.official_classes(name)
            by_text = {}
            for c in classes:
                by_text.setdefault(c, c)
                by_text.setdefault(data.class_text(c), c)
            if not classes or not all(t in by_text for t in texts):
                continue
            return data.chinese_labels(name, [by_text[t] for t in texts], path), path or f"the {name} dictionary"
        except (KeyError, ValueError, OSError):
            continue  # not this dictionary (or its file is gone): try the next one
    return None, None


def english_only(model):
    """Drop TPR's Chinese branch of a restored model: scores are then S_VT alone (TPR Eq. 18 with lambda = 1)."""
    # Choice: a Chinese-branch TPR asked to score labels that no dictionary here translates (the README's
    # 'run,jump,swim') uses its English branch alone and says so in one line, rather than refusing: the
    # English branch is complete on its own (Fig. 5a's "+beta" row is exactly this model without TPR Eq. 18's
    # Chinese term), and an invented translation would be worse than none. --chinese-labels FILE gives both.
    model.chinese_text = None
    model.loss_keys = ("en",)
    return model


@torch.no_grad()
def predict_video(cli, device, amp_dtype):
    ckpt, args, path = load_run(cli.checkpoint[0], cli)
    if not os.path.isfile(cli.video):
        raise train.UsageError(f"--video {cli.video} does not exist")
    note = None
    if cli.labels:
        texts = [t.strip() for t in cli.labels.split(",") if t.strip()]
        if not texts:
            raise train.UsageError(f"--labels {cli.labels!r} holds no class name; give e.g. 'run,jump,swim'")
        twice = sorted({t for t in texts if texts.count(t) > 1})
        if twice:
            raise train.UsageError(f"--labels {cli.labels!r}: {', '.join(twice)} given more than once (a repeated "
                                   f"label splits its probability); give each label once")
        zh = None
        if train.uses_chinese(args):
            if cli.chinese_labels is not None:
                try:
                    zh = data.chinese_labels("custom", texts, cli.chinese_labels)
                except (ValueError, KeyError, OSError) as e:
                    raise train.UsageError(f"--chinese-labels: {e.args[0] if isinstance(e, KeyError) else e}") from None
                note = f"Chinese labels from {cli.chinese_labels}"
            else:
                zh, source = dictionary_chinese(ckpt, args, texts)
                note = (f"Chinese labels from {source}" if zh is not None else
                        "no Chinese labels for these --labels: scoring with the English branch alone "
                        "(TPR Eq. 18 with lambda = 1); pass --chinese-labels FILE to use both branches")
        with labels_fit(texts):
            if train.uses_chinese(args) and zh is None:
                # The model is rebuilt with its training classes (they have Chinese labels), then drops the branch.
                classes = list(ckpt["classes"])
                ds = types.SimpleNamespace(classes=classes, class_texts=[data.class_text(c) for c in classes])
                model = english_only(restore(ckpt, args, *train.class_names(args, ds), device, path))
                model.set_classes(texts)
            else:
                model = restore(ckpt, args, texts, zh, device, path)
    else:
        name = cli.dataset or args.dataset
        if name in data.ASSET_NAMES or name == "synthetic":
            # Choice: one video needs only the class names: the official lists in assets/, no dataset on disk.
            classes = list(data.SYNTHETIC_CLASSES) if name == "synthetic" else data.official_classes(name)
            ds = types.SimpleNamespace(classes=classes, class_texts=[data.class_text(c) for c in classes])
        else:
            ds = train.build_dataset(args, "test", dataset=name)
        texts, zh = train.class_names(args, ds, name)
        model = restore(ckpt, args, texts, zh, device, path)
    if not os.path.isfile(cli.video):
        raise train.UsageError(f"--video {cli.video} does not exist")
    video, frames, turned = load_video(cli.video, args.frames, clip.ARCHS[args.arch]["image_resolution"],
                                       train.eval_short_side(args))  # (1, T, 3, S, S)
    K = len(texts)
    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        out = model(video.to(device), None, torch.arange(K, device=device))
    probs = train.view_scores(model, out, 1, 1)[0]  # (K,) the probabilities an evaluation averages over views
    top = probs.topk(min(5, K))
    tag = " (RANDOM-INIT model: meaningless)" if args.random_init else ""
    if note:
        print(f"note: {note}")
    if turned:
        print(f"note: {cli.video} {turned}")
    print(f"{cli.video}: top-{len(top.indices)} of {K} classes{tag}")
    ranked = [(texts[i], float(p)) for p, i in zip(top.values.tolist(), top.indices.tolist())]
    for label, p in ranked:
        print(f"  {p * 100:6.2f}%  {label}")
    weights = out.get("frame_weights")
    weights = None if weights is None else weights[0].float().cpu().tolist()
    if cli.visualize:
        # Whose words weighted the frames: BiEfficient's own top-1 (BiEfficient Eq. 8); TPR reports the weights
        # of the class with the best English score (prompts.TPR.head).
        guide = out["top1"][0] if "top1" in out else out["logits"]["en"][0].argmax()
        title = [f"video: {cli.video}", f"checkpoint: {path}",
                 f"method: {args.method}, {args.arch}, T = {args.frames}, {K} labels"]
        if args.random_init:
            title.append("RANDOM-INIT model: random frozen towers, predictions are meaningless")
        if note:
            title.append(note)
        if turned:
            title.append(f"video {turned}")
        draw(crop_pixels(video[0]), weights, ranked, cli.visualize, title,
             weights_caption(args, weights, texts[int(guide)]))
        print(f"wrote {cli.visualize}")
    return ranked, weights


@contextlib.contextmanager
def labels_fit(texts):
    """--labels that do not fit the text tower's 77 positions (with the model's prompt) are one line."""
    try:
        yield
    except (RuntimeError, ValueError) as e:
        if "too long" not in str(e):
            raise
        longest = max(texts, key=len)
        raise train.UsageError(f"--labels: {longest[:50]!r}{'...' if len(longest) > 50 else ''} ({len(longest)} "
                               f"characters) does not fit the text tower's 77 tokens together with the model's prompt; "
                               f"shorten it") from None


def weights_caption(args, weights, guide):
    """What the per-frame bars of the picture show, with the equation that computes them."""
    if weights is None:
        return "no frame weights: this model pools the frames without words"
    if args.method == "tpr":
        if args.pooling == "mean":
            return "mean pooling, TPR Eq. 4: every frame weighs 1/T"
        return f"word-guided frame weights, TPR Eq. 6 (words of '{guide}')"
    return f"word-guided frame weights, BiEfficient Eq. 8 (words of the top-1 class '{guide}')"


def draw(frames, weights, ranked, path, title, caption):
    """A PNG: the title lines, the frames the model saw (its centre crop) in a row, a bar per frame for its
    weight under `caption`, and the top-k bar chart. The title is also stored as the PNG's "Title" text."""
    from PIL import Image, ImageDraw
    from PIL.PngImagePlugin import PngInfo
    T = len(frames)
    thumb, pad, line = 128, 8, 14
    title_h = line * len(title) + pad
    bar_h, chart_h = 60, 22 * len(ranked) + 20
    width = max(T * (thumb + pad) + pad, 640)
    img = Image.new("RGB", (width, title_h + line + thumb + bar_h + chart_h + 4 * pad), "white")
    d = ImageDraw.Draw(img)
    for i, text in enumerate(title):
        d.text((pad, pad + line * i), text, fill=(200, 0, 0) if text.startswith("RANDOM-INIT") else "black")
    y_caption = title_h + pad
    d.text((pad, y_caption), caption, fill="black")
    y_frames = y_caption + line + pad // 2
    top = max(weights) if weights else 1.0
    for t, f in enumerate(frames):
        x = pad + t * (thumb + pad)
        img.paste(Image.fromarray(np.asarray(f)).resize((thumb, thumb), Image.BICUBIC), (x, y_frames))
        if weights:
            h = int((bar_h - 14) * weights[t] / max(top, 1e-9))
            y0 = y_frames + pad + thumb + bar_h - 14
            d.rectangle([x + thumb // 4, y0 - h, x + 3 * thumb // 4, y0], fill=(200, 60, 60))
            d.text((x + thumb // 4, y0 + 2), f"{weights[t]:.2f}", fill="black")
    y = y_frames + thumb + bar_h + 2 * pad
    d.text((pad, y), f"top-{len(ranked)}", fill="black")
    for k, (label, p) in enumerate(ranked):
        yy = y + 18 + 22 * k
        d.rectangle([pad + 160, yy, pad + 160 + int(250 * p), yy + 14], fill=(60, 110, 200))
        d.text((pad, yy), label[:24], fill="black")
        d.text((pad + 170 + int(250 * p), yy), f"{100 * p:.1f}%", fill="black")
    info = PngInfo()
    info.add_text("Title", " | ".join(title))
    info.add_text("Description", caption)
    img.save(path, pnginfo=info)


# ----------------------------------------------------------------------------------------------------------
# TPR Fig. 7: attention maps of the frozen backbone on one video
# ----------------------------------------------------------------------------------------------------------

def attention_maps(model, video):
    """The last frozen block's class-token attention over the patches, per frame: (B, T, h, w), each map summing
    to 1. video (B, T, 3, S, S). TPR: the full video encoder (its temporal prompts are keys of that attention);
    BiEfficient: its frozen CLIP visual tower (its prompts are on the text side).

    Choice: the last layer's class-token row averaged over the heads (what Fig. 7 calls the attention map; the
    paper does not say how it is drawn), not attention rollout: the prompt tokens are re-made in every layer, so
    the product of the layers' attentions has no path through them. The prompts' keys take part in the softmax;
    the map keeps the patch columns and renormalises them to sum 1.
    """
    visual = model.clip.visual if hasattr(model, "clip") else model.clip_model.visual
    attn = visual.transformer.resblocks[-1].attn
    B, T = video.shape[:2]
    attn.save_attention = True
    try:
        with torch.no_grad():
            if hasattr(model, "encode_frames"):
                model.encode_frames(video)  # TPR Eq. (1)-(3), (8)-(14)
            else:
                visual(video.flatten(0, 1))  # BiEfficient Eq. (1)
        weights = attn.attention  # (B * T, H, 1 + N, 1 + N + P)
    finally:
        attn.save_attention, attn.attention = False, None
    grid = visual.input_resolution // visual.conv1.kernel_size[0]  # patches per side
    n = grid * grid
    cls_row = weights[:, :, 0, 1:1 + n].mean(dim=1)  # heads averaged, patch columns only; (B * T, N)
    cls_row = cls_row / cls_row.sum(dim=-1, keepdim=True)
    return cls_row.view(B, T, grid, grid)  # (B, T, h, w)


def _heat_colours(m):
    """Map values in [0, 1] (h, w) to a blue-cyan-yellow-red colour scale, uint8 (h, w, 3)."""
    stops = np.array([[0, 0, 128], [0, 160, 255], [255, 230, 0], [220, 0, 0]], dtype=np.float64)
    x = np.clip(m, 0, 1) * (len(stops) - 1)
    i = np.minimum(x.astype(int), len(stops) - 2)
    f = (x - i)[..., None]
    return (stops[i] * (1 - f) + stops[i + 1] * f).astype(np.uint8)


def draw_attention(rows, path, cell=160):
    """rows: list of (title, crops uint8 (T, S, S, 3), maps (T, h, w)); one row of frames per entry, each frame
    overlaid with its heat map (scaled to the row's largest patch weight). Written as a PNG with pillow."""
    from PIL import Image, ImageDraw
    pad, head = 6, 18
    T = max(len(crops) for _, crops, _ in rows)
    img = Image.new("RGB", (pad + T * (cell + pad), 22 + len(rows) * (head + cell + pad)), "white")
    d = ImageDraw.Draw(img)
    d.text((pad, 4), "last-layer class-token attention over the patches, heads averaged (TPR Fig. 7)", fill="black")
    for r, (title, crops, maps) in enumerate(rows):
        y = 22 + r * (head + cell + pad)
        d.text((pad, y + 2), title, fill="black")
        top = float(maps.max()) or 1.0
        for t in range(len(crops)):
            frame = Image.fromarray(crops[t]).resize((cell, cell), Image.BILINEAR)
            heat = Image.fromarray(_heat_colours(maps[t] / top)).resize((cell, cell), Image.BILINEAR)
            img.paste(Image.blend(frame, heat, 0.45), (pad + t * (cell + pad), y + head))
    img.save(path)


def attention_figure(cli, device, amp_dtype):
    """--attention: the maps of every --checkpoint on --video, drawn row above row. Returns the maps."""
    if not cli.video:
        raise train.UsageError("--attention PNG draws the attention maps of one video: give --video FILE too")
    if not os.path.isfile(cli.video):
        raise train.UsageError(f"--video {cli.video} does not exist")
    rows, maps_out = [], []
    for source in cli.checkpoint:
        ckpt, args, path = load_run(source, cli)
        # The visual attention does not depend on the label set: the run's own classes build the model.
        classes = list(ckpt["classes"])
        ds = types.SimpleNamespace(classes=classes, class_texts=[data.class_text(c) for c in classes])
        texts, zh = train.class_names(args, ds, args.dataset)
        model = restore(ckpt, args, texts, zh, device, path)
        size = clip.ARCHS[args.arch]["image_resolution"]
        video, _, _ = load_video(cli.video, args.frames, size, train.eval_short_side(args))  # (1, T, 3, S, S)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            maps = attention_maps(model, video.to(device))[0].float().cpu()  # (T, h, w)
        mean = torch.tensor(data.CLIP_MEAN).view(3, 1, 1) * 255
        std = torch.tensor(data.CLIP_STD).view(3, 1, 1) * 255
        crops = (video[0] * std + mean).clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()  # what the model saw
        what = "TPR" if args.method == "tpr" else "BiEfficient"
        if args.method == "tpr":
            parts = [("no temporal prompts" if args.no_temporal_prompts else "temporal prompts"),
                     f"beta {args.beta}" if not args.no_temporal_prompts else None,
                     None if args.no_chinese else "Chinese branch"]
            what += " (" + ", ".join(p for p in parts if p) + ")"
        tag = " RANDOM-INIT" if args.random_init else ""
        rows.append((f"{what}, T={args.frames}: {path}{tag}", crops, maps.numpy()))
        maps_out.append(maps)
    draw_attention(rows, cli.attention)
    print(f"wrote {cli.attention} ({len(rows)} row(s): {', '.join(r[0] for r in rows)})")
    return maps_out


# ----------------------------------------------------------------------------------------------------------

def main(argv=None):
    cli = build_parser().parse_args(argv)
    validate(cli)  # clear errors for malformed values now, not after loading the model
    rank, world, device = train.setup_distributed()
    log = (lambda *a, **k: print(*a, **k, flush=True)) if rank == 0 else (lambda *a, **k: None)
    amp_dtype, _ = train.amp_settings(cli.precision, device)
    if device.type == "cpu":
        log(train.set_cpu_threads())  # train.py's default: torch's own collapses on a loaded machine
    if cli.attention:
        if cli.visualize:  # both pictures: the first checkpoint's scores and frames, then Fig. 7
            predict_video(cli, device, amp_dtype)
        return attention_figure(cli, device, amp_dtype)
    if cli.video:
        return predict_video(cli, device, amp_dtype)
    records = []
    stopping = types.SimpleNamespace(device=device)  # SIGTERM / Ctrl-C: stop at the next batch, all ranks
    previous = train.catch_stop_signals(stopping)
    cli.stop = lambda: train.stop_requested(stopping)
    try:
        for path in cli.checkpoint:
            records += evaluate_run(path, cli, device, amp_dtype, log)
    except train.EvaluationStopped:
        number = getattr(signal, stopping.stop_signal, signal.SIGTERM)  # "a signal on another rank": SIGTERM's
        raise train.Preempted(f"{stopping.stop_signal} during the evaluation: nothing written (metrics.json comes "
                              f"at the end); run it again", code=128 + number) from None
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    summary = summarise(records, log)
    out = output_folder(cli)
    if rank == 0:
        os.makedirs(out, exist_ok=True)
        result = dict(results=records, summary=summary)
        tmp = os.path.join(out, "metrics.json.tmp")
        try:
            with open(tmp, "w") as f:
                json.dump(result, f, indent=1)
            os.replace(tmp, os.path.join(out, "metrics.json"))
        except OSError as e:  # e.g. a full disk: the .tmp goes, the results were printed above
            if os.path.exists(tmp):
                os.remove(tmp)
            raise train.UsageError(f"cannot write {os.path.join(out, 'metrics.json')}: {e.strerror or e}") from None
        log(f"wrote {os.path.join(out, 'metrics.json')}")
    return dict(results=records, summary=summary)


if __name__ == "__main__":
    sys.exit(train.cli_main(main))
