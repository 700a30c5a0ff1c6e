"""Datasets, frame sampling, augmentation and fast video decoding for both papers.

Implements the data side of TPR (Electronics 2024, Sec. 4 and Table 2: TSN sparse sampling of T frames,
RandomSizedCrop 224, flip 0.5, grayscale 0.2; RandAugment and random erasing on SSv1, Sec. 4.4; K-shot
training, Sec. 4.3; 1 and 4x3 test views) and BiEfficient (ACCV 2024, Sec. 4: Kinetics-400 closed set,
zero-shot transfer to HMDB-51 / UCF-101 over their three splits). Sampling mirrors TSN / mmaction2
`SampleFrames`; the training crop mirrors mmaction2 `MultiScaleCrop` as used by X-CLIP and ActionCLIP. The
BiEfficient authors' own pipeline (their crop, frame sampling, validation clip and test clips) is re-stated
behind keywords of build_dataset (train_crop, frame_sampling, test_sampling, test_resize).

Datasets, each read in the layout its authors distribute (no frame pre-extraction, no list files to write):
  hmdb51     <root>/<class>/*.avi + <root>/testTrainMulti_7030_splits/<class>_test_split{1,2,3}.txt
             (`<video> <id>`, id 1 train, 2 test, 0 unused)
  ucf101     <root>/UCF-101/<Class>/*.avi + <root>/ucfTrainTestlist/{classInd,trainlist0K,testlist0K}.txt
  ssv1       <root>/20bn-something-something-v1/<id>/00001.jpg ... + <root>/something-something-v1-
             {labels,train,validation}.csv (`<id>;<label>`); horizontal flip is always off (labels say left/right)
  k400       <root>/{train,val}/<class>/<youtube_id>_<start:06d>_<end:06d>.mp4, or flat <root>/{train,val}/*.mp4
             with <root>/annotations/{train,val}.csv (`label,youtube_id,time_start,time_end,split`)
  list       mmaction2 list files: `path label` (videos) or `dir num_frames label` (frame folders, file names from
             `filename_tmpl`, numbered from 1), plus a class file (one name per line, or `id,name` CSV)
  synthetic  generated on the fly, no files: a bright disc on a flat background; classes are time-reversed
             twins ('moving left'/'moving right', ...), so a frame-averaging model cannot tell twins apart

Interface used by the training engine:
  build_dataset(name, root, split, mode, frames, input_size, views, sampling, shots, seed, flip, randaugment,
                random_erasing, list_file, class_file, filename_tmpl, ..., train_crop, frame_sampling,
                test_sampling, test_resize) -> torch Dataset with
    .classes      official class names, index = label
    .class_texts  readable English names ('brush_hair' -> 'brush hair', 'ApplyEyeMakeup' -> 'apply eye makeup')
    .samples      list of (path, label)
    .bad_files()  {path: reason} of every unreadable video met so far, in any worker process
    .bad_count()  len(bad_files())
    .set_epoch(e) reseeds the training augmentation: call it before each epoch's DataLoader iterator is made
                  (like DistributedSampler.set_epoch; persistent_workers would keep the old epoch). Sampling and
                  augmentation are drawn from (seed, epoch, index), so they do not depend on the worker count.
  items (dicts that torch's default collate batches):
    train  {"video": (T, 3, H, W) float, CLIP mean/std, "label": int, "index": int, "replaced": 0/1}
    test   {"video": (V, T, 3, H, W), V = clips x crops views of one video (clip-major), "label", "index",
            "replaced" (always 0), "skipped"}
  A training sample whose file is corrupt, truncated, empty or undecodable is replaced by the next readable
  sample of the same class (fixed order, so deterministic), the path is logged once with its reason (once over
  all worker processes), and "replaced" is 1: the engine's epoch summary sums batch["replaced"] or asks
  bad_count(); a class with no readable training video raises UnreadableClass. A test sample is never
  replaced (an evaluation must not score a substitute): its item is a zero placeholder with "skipped" 1, which
  the engine drops and counts.
Split, list and class files: LF or CRLF, blank lines and `#` comments skipped, file names may hold spaces (the
label or id is the last token), every error names file:line, a missing video is named with the line listing it.
  chinese_labels(dataset, class_names, path=None), class_text(name), few_shot(...), zero_shot_protocol(...).

Decoding: PyAV. A frame index is the position of a frame in the sequence a plain full decode yields (see the
decoding section), the same in the probe, the decoder, --check and sampling. Each video is demuxed once per
process (packets only, no decoding, a few ms; cached): the shown frames' timestamps, in presentation order, less
an edit list's pre-roll and the undecodable packets before the first keyframe; a file whose packets cannot tell
(cut short, damaged, no timestamps, a decoder that shows what the packets do not promise) is decoded in full
once instead. For each needed frame the decoder seeks to the keyframe before it, unless it is already past that
keyframe (a seek that lands late, at the end or without timestamps, as on MPEG-TS and MPEG-PS, steps back a
keyframe; a file whose seeks keep missing is decoded forward from its start), decodes forward skipping the
non-reference frames not asked for, and maps frames to indices by their timestamps; only needed frames are
converted to RGB, into a clip allocated once, and the transforms crop and resize the whole clip at once in
torch. The stream read is FFmpeg's best video stream, never cover art nor a one-frame still while a real video
exists; frames are turned as the display matrix says (phones' portrait video), and a stream whose frame size
changes comes out at its first frame's size. A truncated file is used (and logged) when at least T frames
decode, refused otherwise; --check applies the same rule.

CLI: `python data.py --dataset NAME --root DIR [--split K] [--frames T] --check` reads every video as training
does (one plain decode of every frame, then a seek to every keyframe and the last frame) and lists the bad ones
(exit 1 if any), the damaged ones used, the ones the loader adapts (a frame size change, a rotation) and the
videos of hmdb51 / ucf101 class folders that no split file names (video files: those named in VIDEO_EXTS).
The loader benchmark (against a decode-everything loader, decord and torchcodec) is `python bench/loader.py`.

Files it needs beside it (copy them with data.py): assets/classes/{hmdb51,ucf101,kinetics400,ssv1}.txt (the
official class lists, `official_classes`) and assets/chinese_labels/<dataset>.json (TPR's Chinese labels,
`chinese_labels`); the synthetic set needs neither.

Order of this file: TSN sampling, transforms (augmentation and test views), datasets, class names and layouts,
few- and zero-shot, then the decoder internals (probe, seek, decode), then --check and the command line.
"""
import argparse
import bisect
import csv
import hashlib
import json
import logging
import math
import os
import random
import shutil
import statistics
import sys
import tempfile
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor

import av
import numpy as np
from av.video.reformatter import VideoReformatter
import torch
from PIL import Image, ImageEnhance, ImageOps

log = logging.getLogger("data")

DATASETS = ("hmdb51", "ucf101", "ssv1", "k400", "list", "synthetic")
MODES = ("train", "test")
SAMPLINGS = ("sparse", "dense")
FRAME_SAMPLINGS = ("tsn", "authors")  # sparse sampling: TSN's, or the BiEfficient authors' (authors_indices)
TRAIN_CROPS = ("multiscale", "inception")  # MultiScaleCrop (TSN / X-CLIP), or the BiEfficient authors' crop
VIEWS = ("1x1", "4x3")
SHOTS = (2, 4, 8, 16)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP preprocessing
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
ASSET_NAMES = {"hmdb51": "hmdb51", "ucf101": "ucf101", "k400": "kinetics400", "ssv1": "ssv1"}
SCALE_SIZE = 256  # training short side for a 224 crop (TSN / X-CLIP); scaled with input_size
CROP_SCALES = (1.0, 0.875, 0.75, 0.66)  # mmaction2 MultiScaleCrop scales, max aspect distortion 1
GRAYSCALE_P = 0.2  # TPR Table 2
FLIP_P = 0.5  # TPR Table 2
LONG_GOP = 60  # frames per keyframe from which one process decodes with frame threads (see _thread_type)
CHEAP_CODECS = ("mpeg4", "msmpeg4v2", "msmpeg4v3", "h263", "flv1", "mpeg1video", "mpeg2video", "mjpeg")  # _parallel
SEEK_TRIES = 4  # seeks in a row that miss their keyframe before a file is decoded from its start (see _decode)
SYNTHETIC_CLASSES = ("moving left", "moving right", "moving up", "moving down",
                     "growing", "shrinking", "getting brighter", "getting darker")
SYNTHETIC_STEPS = 4096  # time grid of a synthetic video
SYNTHETIC_CHINESE = {"moving left": "向左移动", "moving right": "向右移动", "moving up": "向上移动",
                     "moving down": "向下移动", "growing": "变大", "shrinking": "变小",
                     "getting brighter": "变亮", "getting darker": "变暗"}


class BadVideo(Exception):
    """A video (or frame folder) that cannot be read; the message is the reason."""


class UnreadableClass(Exception):
    """Every training video of a class is unreadable, so none can stand in for another (a user-facing error)."""

    def __init__(self, message):
        # Raised in a DataLoader worker, it comes back as "Caught UnreadableClass in DataLoader worker ...
        # Original Traceback ... data.UnreadableClass: <message>": keep the one line meant for the user.
        if "Original Traceback" in message:
            message = message.rstrip().splitlines()[-1].partition("UnreadableClass: ")[2] or message
        super().__init__(message)


# ------------------------------------------------------------------------------------------------- sampling
def sample_indices(num_frames, T, mode="train", rng=None, clips=1, clip=0, sampling="sparse", interval=None,
                   frame_sampling="tsn"):
    """Frame indices of one clip of T frames from a video of `num_frames` frames.

    sparse (TSN): the video is cut into T equal segments; training takes a random frame of each segment,
    testing the centre of each segment, shifted to (clip + 0.5) / clips of it for multi-clip testing.
    frame_sampling "authors" (sparse only): the BiEfficient authors' sparse sampling instead (authors_indices).
    dense: T frames `interval` apart; random start in training, `clips` starts spread evenly in testing."""
    n = num_frames
    assert n > 0 and T > 0, f"need frames, got num_frames={n}, T={T}"
    if frame_sampling not in FRAME_SAMPLINGS:
        raise ValueError(f"frame_sampling {frame_sampling!r}; valid: {', '.join(map(repr, FRAME_SAMPLINGS))}")
    if frame_sampling == "authors":
        if sampling != "sparse":
            raise ValueError(f"frame_sampling 'authors' is the authors' sparse sampling; sampling {sampling!r} has "
                             f"its own: use frame_sampling 'tsn' with it")
        return authors_indices(n, T, mode, rng, clips, clip)
    if sampling == "sparse":
        if mode == "train":
            idx = [int((t + rng.random()) * n / T) for t in range(T)]
        else:
            # Choice: clip c of C takes offset (c + 0.5) / C inside each segment, so C = 1 is the TSN centre.
            idx = [(2 * t * clips + 2 * clip + 1) * n // (2 * T * clips) for t in range(T)]  # (t + (c+.5)/C) n/T
    elif sampling == "dense":
        # Choice: default interval spans 64 frames (8x8, 16x4 as in mmaction2's dense configs).
        interval = interval or max(1, 64 // T)
        span = (T - 1) * interval + 1
        room = max(0, n - span)
        start = rng.randint(0, room) if mode == "train" else (2 * clip + 1) * room // (2 * clips)
        idx = [start + t * interval for t in range(T)]
    else:
        raise ValueError(f"sampling {sampling!r} not in {SAMPLINGS}")
    return [min(i, n - 1) for i in idx]


def authors_indices(n, T, mode="train", rng=None, clips=1, clip=0):
    """The BiEfficient authors' sparse sampling (datasets/video.py:97-104, 115-119, 135-145 of their code), 0-based
    frame positions (their index_bias 1 is undone by their video_list[p - 1]).

    train: seg = (n - 1) / T; frame t is drawn uniformly from round(seg * t) .. round(seg * (t + 1)), both ends
    included (Python's round and NumPy's both round halves to even), so neighbouring segments share an end.
    test: tick = n / T; clip c of C starts at int(c * (tick - 1) / (C - 1)) (NumPy's linspace(0, tick - 1, C)
    cast to int, truncated toward zero as NumPy 1.x did; the last start is tick - 1 itself), frame t is
    int(start + tick * t) mod n. With C = 1 this is
    their validation clip: the first frame of each segment, int(tick * t)."""
    if mode == "train":
        seg = (n - 1) / T
        return [rng.randint(round(seg * t), round(seg * (t + 1))) for t in range(T)]
    tick = n / T
    if clips == 1:
        start = 0
    elif clip == clips - 1:
        start = int(tick - 1)  # linspace's endpoint is `stop` itself, not start + (C - 1) * step
    else:
        start = int(clip * ((tick - 1) / (clips - 1)))  # linspace's index * step, truncated toward zero
    return [int(start + tick * t) % n for t in range(T)]


# ------------------------------------------------------------------------------------------------ transforms
def _normalise(x):
    """(..., 3, H, W) float in [0, 255] -> CLIP-normalised."""
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1) * 255
    std = torch.tensor(CLIP_STD).view(3, 1, 1) * 255
    return (x - mean).div_(std)


def _crop_resize(frames, box, size):
    """Crop box (y0, x0, h, w) of uint8 frames (T, H, W, 3) and resize it to (T, 3, size, size) float."""
    y0, x0, h, w = box
    crop = frames[:, y0:y0 + h, x0:x0 + w]
    crop = crop if crop.flags.writeable else crop.copy()  # torch wants writable memory (a broadcast view is not)
    x = torch.from_numpy(crop).permute(0, 3, 1, 2)  # (T, 3, h, w) uint8, channels-last memory
    if (h, w) != (size, size):
        # Choice: bilinear with antialiasing on uint8 (torch's path built to match PIL's BILINEAR resize; equal to
        # PIL's box resize but at the box edges, which PIL samples from outside the box), for the whole clip at
        # once: several times faster than a per-frame PIL round trip or a float interpolate.
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True)
    return x.float()  # (T, 3, size, size)


def _multiscale_box(H, W, size, rng):
    # Choice: the short side is first scaled to 256/224 of the crop (TSN GroupScale) and a MultiScaleCrop box
    # (scales 1 .. 0.66, aspect distortion <= 1 step, random position) is drawn in that geometry; we crop the
    # original frame at the matching box and resize once, which equals resize-then-crop up to interpolation.
    s = min(H, W) / (SCALE_SIZE * size / 224)  # original pixels per scaled pixel
    base = SCALE_SIZE * size / 224
    sizes = [int(base * c) for c in CROP_SCALES]
    pairs = [(a, b) for i, a in enumerate(sizes) for j, b in enumerate(sizes) if abs(i - j) <= 1]
    ch, cw = rng.choice(pairs)
    ch, cw = min(H, max(1, round(ch * s))), min(W, max(1, round(cw * s)))
    return rng.randint(0, H - ch), rng.randint(0, W - cw), ch, cw


def _scaled_size(H, W, short):
    """(h, w) of an H x W frame whose short side is scaled to `short`, as torchvision's Resize(short) computes
    it (the long side truncated to an int)."""
    return (short, int(short * W / H)) if H <= W else (int(short * H / W), short)


def _inception_box(H, W, size, rng):
    """The BiEfficient authors' training crop as a box (y0, x0, h, w) of the original H x W frame: GroupScale to
    short side 256 (the input size itself for other sizes; utils/Augmentation.py:29-33 of their code), then
    GroupRandomSizedCrop (datasets/transforms.py:343-390), resized to size x size by _crop_resize.

    The random sized crop, in the scaled frame (h_s, w_s): up to 10 tries of an area of U(0.08, 1) of the frame
    and an aspect ratio w/h of U(3/4, 4/3), w = round(sqrt(area * ratio)), h = round(sqrt(area / ratio)), w and
    h swapped with probability 1/2; the first that fits is placed at x0 = randint(0, w_s - w), then
    y0 = randint(0, h_s - h). If none fits: scale the short side to `size` and take a random size x size crop
    (x0 first, then y0). Draws come from `rng` in their order (random.uniform, uniform, random, randint, randint)."""
    short = SCALE_SIZE if size == 224 else size
    hs, ws = _scaled_size(H, W, short)
    for _ in range(10):
        area = rng.uniform(0.08, 1.0) * hs * ws
        ratio = rng.uniform(3 / 4, 4 / 3)
        w, h = int(round(math.sqrt(area * ratio))), int(round(math.sqrt(area / ratio)))
        if rng.random() < 0.5:
            w, h = h, w
        if w <= ws and h <= hs:
            x0 = rng.randint(0, ws - w)
            y0 = rng.randint(0, hs - h)
            break
    else:  # their fallback: GroupScale(size) of the scaled frame, then GroupRandomCrop(size)
        hs, ws = _scaled_size(hs, ws, size)
        h = w = size
        x0 = rng.randint(0, ws - w)
        y0 = rng.randint(0, hs - h)
    # Choice: as _multiscale_box, the box is mapped back to the original frame (scale min(H, W) / short side) and
    # cropped there, then resized once: equal to scale-then-crop up to interpolation and whole-pixel rounding.
    f = min(H, W) / min(hs, ws)
    y0, x0 = min(H - 1, round(y0 * f)), min(W - 1, round(x0 * f))
    return y0, x0, max(1, min(H - y0, round(h * f))), max(1, min(W - x0, round(w * f)))


def _randaugment(x, rng, n=2, m=9):
    """RandAugment (Cubuk et al. 2020) with one draw of ops and signs per clip, applied to every frame.
    x: (T, 3, H, W) float in [0, 255]."""
    # Choice: N=2, M=9 of 10 (timm 'rand-m9-n2'), the usual setting for SSv1 in the CLIP video papers.
    mag = m / 10
    ops = ["identity", "autocontrast", "equalize", "rotate", "solarize", "color", "posterize", "contrast",
           "brightness", "sharpness", "shear_x", "shear_y", "translate_x", "translate_y"]
    chosen = [(rng.choice(ops), rng.choice((-1, 1))) for _ in range(n)]
    H, W = x.shape[-2:]
    imgs = [Image.fromarray(f.permute(1, 2, 0).round().clamp(0, 255).byte().numpy()) for f in x]
    for op, sign in chosen:
        out = []
        for im in imgs:
            if op == "autocontrast":
                im = ImageOps.autocontrast(im)
            elif op == "equalize":
                im = ImageOps.equalize(im)
            elif op == "rotate":
                im = im.rotate(sign * 30 * mag, resample=Image.BILINEAR)
            elif op == "solarize":
                im = ImageOps.solarize(im, 256 - int(256 * mag))
            elif op == "posterize":
                im = ImageOps.posterize(im, 8 - int(4 * mag))
            elif op in ("color", "contrast", "brightness", "sharpness"):
                enh = {"color": ImageEnhance.Color, "contrast": ImageEnhance.Contrast,
                       "brightness": ImageEnhance.Brightness, "sharpness": ImageEnhance.Sharpness}[op]
                im = enh(im).enhance(1 + sign * 0.9 * mag)
            elif op in ("shear_x", "shear_y"):
                a = sign * 0.3 * mag
                coef = (1, a, 0, 0, 1, 0) if op == "shear_x" else (1, 0, 0, a, 1, 0)
                im = im.transform(im.size, Image.AFFINE, coef, resample=Image.BILINEAR)
            elif op in ("translate_x", "translate_y"):
                d = sign * 0.45 * mag * (W if op == "translate_x" else H)
                coef = (1, 0, d, 0, 1, 0) if op == "translate_x" else (1, 0, 0, 0, 1, d)
                im = im.transform(im.size, Image.AFFINE, coef, resample=Image.BILINEAR)
            out.append(im)
        imgs = out
    return torch.from_numpy(np.stack([np.asarray(im) for im in imgs])).permute(0, 3, 1, 2).float()


def _random_erase(x, rng, p=0.25, area=(0.02, 1 / 3), log_ratio=(math.log(0.3), math.log(1 / 0.3))):
    """Random erasing (Zhong et al. 2020) of one box shared by all frames, filled with N(0, 1) noise in the
    normalised space. x: (T, 3, H, W)."""
    # Choice: timm's defaults (p 0.25, 'pixel' mode); the box is drawn once per clip so it moves with nothing.
    if rng.random() >= p:
        return x
    H, W = x.shape[-2:]
    for _ in range(10):
        a = rng.uniform(*area) * H * W
        r = math.exp(rng.uniform(*log_ratio))
        h, w = int(round(math.sqrt(a * r))), int(round(math.sqrt(a / r)))
        if h < H and w < W:
            y0, x0 = rng.randint(0, H - h), rng.randint(0, W - w)
            g = torch.Generator().manual_seed(rng.getrandbits(63))
            x = x.clone()
            x[:, :, y0:y0 + h, x0:x0 + w] = torch.randn(3, h, w, generator=g)
            return x
    return x


def train_transform(frames, rng, size=224, flip=True, randaugment=False, random_erasing=False, crop="multiscale"):
    """uint8 (T, H, W, 3) -> (T, 3, size, size) normalised; one augmentation draw shared by all frames.
    crop: "multiscale" (TSN's MultiScaleCrop, TPR Table 2's RandomSizedCrop as X-CLIP does it) or "inception"
    (the BiEfficient authors' crop, _inception_box)."""
    H, W = frames.shape[1:3]
    if crop not in TRAIN_CROPS:
        raise ValueError(f"train_crop {crop!r}; valid: {', '.join(map(repr, TRAIN_CROPS))}")
    box = _multiscale_box(H, W, size, rng) if crop == "multiscale" else _inception_box(H, W, size, rng)
    x = _crop_resize(frames, box, size)  # (T, 3, S, S)
    if flip and rng.random() < FLIP_P:
        x = x.flip(-1)
    if randaugment:
        x = _randaugment(x, rng)
    if rng.random() < GRAYSCALE_P:
        gray = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)  # (T, 1, S, S), ITU-R 601
        x = gray.expand_as(x)
    x = _normalise(x)
    if random_erasing:
        x = _random_erase(x, rng)
    return x.contiguous()


def test_crops(frames, size=224, crops=1, resize=None):
    """uint8 (T, H, W, 3) -> (crops, T, 3, size, size) normalised.

    Choice: by default (resize None) the short side is resized to `size` (mmaction2 Resize(-1, size), as X-CLIP
    tests) and 1 centre crop or 3 crops (start, centre, end of the long side) are taken. resize=R >= size
    resizes the short side to R first (TPR Sec. 4.1.1: "scale the short side ... to 256"), so the crops see the
    centre size/R of the short side; done as one crop-and-resize of the matching box of the original frame
    (rounded to whole pixels)."""
    if crops not in (1, 3):
        raise ValueError(f"spatial crops {crops} not in (1, 3)")
    resize = size if resize is None else resize
    if resize < size:
        raise ValueError(f"test resize {resize} is smaller than the crop size {size}")
    H, W = frames.shape[1:3]
    c = round(min(H, W) * size / resize)  # the crop's side in original pixels
    short_offset = (min(H, W) - c) // 2
    long_side = max(H, W)
    offsets = [(long_side - c) // 2] if crops == 1 else [0, (long_side - c) // 2, long_side - c]
    boxes = [(o, short_offset, c, c) if H > W else (short_offset, o, c, c) for o in offsets]
    return torch.stack([_normalise(_crop_resize(frames, b, size)) for b in boxes])  # (crops, T, 3, size, size)


# --------------------------------------------------------------------------------------------------- datasets
def _parse_views(views):
    try:
        clips, crops = (int(v) for v in views.split("x"))
    except (ValueError, AttributeError):
        raise ValueError(f"views {views!r} should read CLIPSxCROPS, e.g. {VIEWS}") from None
    if clips < 1 or crops not in (1, 3):
        raise ValueError(f"views {views!r}: clips must be >= 1 and crops 1 or 3; usual values {VIEWS}")
    return clips, crops


def _remove_dir(path, owner_pid):
    if os.getpid() == owner_pid:  # forked workers inherit the finaliser; only the creator cleans up
        shutil.rmtree(path, ignore_errors=True)


class _Base(torch.utils.data.Dataset):
    """Shared parts: options, epoch seeding, views, bad-file bookkeeping across worker processes."""

    test_resize = None  # short side before the test crops (test_crops' resize); None = the crop size
    train_crop = "multiscale"  # TRAIN_CROPS: the training crop (train_transform)
    frame_sampling = "tsn"  # FRAME_SAMPLINGS: the training frames (sample_indices)
    test_sampling = "tsn"  # FRAME_SAMPLINGS: the test frames, TSN's segment centres or the authors' clip starts

    def _setup(self, name, classes, samples, mode, frames, input_size, views, sampling, seed, flip, randaugment,
               random_erasing, interval):
        if mode not in MODES:
            raise ValueError(f"mode {mode!r} not in {MODES}")
        if sampling not in SAMPLINGS:
            raise ValueError(f"sampling {sampling!r} not in {SAMPLINGS}")
        self.name, self.classes, self.samples, self.mode = name, list(classes), list(samples), mode
        self.class_texts = [class_text(c) for c in self.classes]
        self.T, self.input_size, self.sampling, self.seed, self.interval = frames, input_size, sampling, seed, interval
        self.clips, self.crops = _parse_views(views) if mode == "test" else (1, 1)
        self.flip, self.randaugment, self.random_erasing = flip, randaugment, random_erasing
        self.epoch = 0
        # Marker files record bad paths so every worker process logs a path once and the main process can count.
        self._bad_dir = tempfile.mkdtemp(prefix="data_bad_")
        weakref.finalize(self, _remove_dir, self._bad_dir, os.getpid())
        self._bad_local = set()
        by_class = {}
        for i, (_, label) in enumerate(self.samples):
            by_class.setdefault(label, []).append(i)
        self._by_class = by_class

    def __len__(self):
        return len(self.samples)

    def set_epoch(self, epoch):
        self.epoch = epoch

    def _rng(self, index):
        return random.Random(f"{self.seed}:{self.epoch}:{index}")

    def _marker(self, path, kind=""):
        return os.path.join(self._bad_dir, kind + hashlib.sha1(path.encode()).hexdigest())

    def _is_bad(self, path):
        return path in self._bad_local or os.path.exists(self._marker(path))

    def _mark_bad(self, path, reason):
        self._bad_local.add(path)
        try:
            fd = os.open(self._marker(path), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return  # another worker logged it
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(f"{path}\t{reason}")
        what = "replaced by another video of its class" if self.mode == "train" else "skipped: not scored"
        log.warning("bad video %s (%s): %s", path, reason, what)

    def bad_files(self):
        """{path: reason} for every unreadable video met so far in this process or its workers."""
        return self._read_markers("")

    def _read_markers(self, kind):
        out = {}
        for name in os.listdir(self._bad_dir):
            if kind != name[:-40]:  # "" (bad) or "damaged-" before the 40-digit hash
                continue
            with open(os.path.join(self._bad_dir, name), encoding="utf-8") as f:
                text = f.read()
            if "\t" in text:  # a marker still being written by a worker is counted next time
                path, reason = text.split("\t", 1)
                out[path] = reason
        return out

    def bad_count(self):
        return len(self.bad_files())

    def subset(self, indices, classes=None):
        """A copy holding samples[indices]; with `classes` (original ids) labels are renumbered to their order."""
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        remap = {c: i for i, c in enumerate(classes)} if classes is not None else None
        samples = [self.samples[i] for i in indices]
        if remap is not None:
            samples = [(p, remap[l]) for p, l in samples]
            new.classes = [self.classes[c] for c in classes]
            new.class_texts = [self.class_texts[c] for c in classes]
        new._subset_source = [self._source_index(i) for i in indices]
        new._parent = self  # keeps the bad-file folder, which the parent owns, alive
        new.samples = samples
        by_class = {}
        for i, (_, label) in enumerate(samples):
            by_class.setdefault(label, []).append(i)
        new._by_class = by_class
        return new

    def _source_index(self, i):
        src = getattr(self, "_subset_source", None)
        return src[i] if src is not None else i

    def __getitem__(self, index):
        path, label = self.samples[index]
        rng = self._rng(index)
        if self.mode == "test":
            # An evaluation scores only real videos: an unreadable one is never replaced; its item holds a zero
            # placeholder marked "skipped", which the engine drops before the forward pass and counts.
            video = None
            if not self._is_bad(path):
                try:
                    video = self._load(index, rng)
                except BadVideo as e:
                    self._mark_bad(path, str(e))
            skipped = video is None
            if skipped:
                S = self.input_size
                video = torch.zeros(self.clips * self.crops, self.T, 3, S, S)  # (V, T, 3, S, S)
            return {"video": video, "label": label, "index": index, "replaced": 0, "skipped": int(skipped)}
        members = self._by_class[label]
        start = bisect.bisect_left(members, index)  # members are ascending sample indices
        for j in members[start:] + members[:start]:  # itself first, then its class in a fixed order
            cand = self.samples[j][0]
            if self._is_bad(cand):
                continue
            try:
                video = self._load(j, rng)
            except BadVideo as e:
                self._mark_bad(cand, str(e))
                continue
            return {"video": video, "label": label, "index": index, "replaced": int(j != index)}
        bad = self.bad_files()
        raise UnreadableClass(
            f"every training video of class {self.classes[label]!r} is unreadable ({len(members)} videos, e.g. "
            f"{path}: {bad.get(path, 'unreadable')}); list the bad files with `python data.py --dataset "
            f"{self.name} --root DIR --check`, then repair them or drop them from the split")

    def _clip_indices(self, n, rng):
        if self.mode == "train":
            return [sample_indices(n, self.T, "train", rng, sampling=self.sampling, interval=self.interval,
                                   frame_sampling=self.frame_sampling)]
        return [sample_indices(n, self.T, "test", clips=self.clips, clip=c, sampling=self.sampling,
                               interval=self.interval, frame_sampling=self.test_sampling) for c in range(self.clips)]

    def _views(self, frames_per_clip, rng):
        """frames_per_clip: list of uint8 (T, H, W, 3) -> train (T, 3, S, S) or test (V, T, 3, S, S)."""
        if self.mode == "train":
            return train_transform(frames_per_clip[0], rng, self.input_size, self.flip, self.randaugment,
                                   self.random_erasing, self.train_crop)
        views = [test_crops(f, self.input_size, self.crops, self.test_resize)
                 for f in frames_per_clip]  # C x (crops, T, 3, S, S)
        return torch.cat(views)  # (V, T, 3, S, S), V = clips * crops, clip-major


class VideoDataset(_Base):
    """Videos (files decoded with PyAV) or frame folders, with labels."""

    def __init__(self, name, classes, samples, mode="train", frames=8, input_size=224, views="1x1",
                 sampling="sparse", seed=0, flip=True, randaugment=False, random_erasing=False, interval=None,
                 frame_dirs=False, num_frames=None, filename_tmpl="img_{:05d}.jpg", start_index=1):
        self._setup(name, classes, samples, mode, frames, input_size, views, sampling, seed, flip, randaugment,
                    random_erasing, interval)
        self.frame_dirs, self.filename_tmpl, self.start_index = frame_dirs, filename_tmpl, start_index
        self._num_frames = dict(num_frames or {})  # path -> count given by a list file
        self._meta = {}  # path -> VideoMeta, filled on first read (per process)
        self._damaged_local = set()

    def probe(self, path, exact=False):
        """Frame count (and timestamps, keyframes, for videos) of one sample; counted once per process and
        cached (exact: from a full decode, see probe_video)."""
        if self.frame_dirs:
            if path not in self._num_frames:
                self._num_frames[path] = count_frame_dir(path, self.filename_tmpl, self.start_index)
            return self._num_frames[path]
        if path not in self._meta or (exact and not self._meta[path].exact):
            self._meta[path] = probe_video(path, exact)
        return self._meta[path]

    def _load(self, j, rng):
        path = self.samples[j][0]
        if self.frame_dirs:
            clips = self._clip_indices(self.probe(path), rng)
            flat = sorted({i for c in clips for i in c})
            arr = read_frame_dir(path, flat, self.filename_tmpl, self.start_index)
            pos = {i: k for k, i in enumerate(flat)}
            return self._views([arr[[pos[i] for i in c]] for c in clips], rng)
        state = rng.getstate()
        try:
            return self._load_video(path, self.probe(path), rng)
        except MetaMismatch:  # the decoder disagrees with the packets: one full decode settles it for good
            rng.setstate(state)
            return self._load_video(path, self.probe(path, exact=True), rng)

    def _load_video(self, path, meta, rng):
        damage = video_verdict(meta, self.T)  # BadVideo if too little of it decodes, as --check says
        if damage:
            self._note_damaged(path, damage)
        clips = self._clip_indices(meta.num_frames, rng)
        flat = sorted({i for c in clips for i in c})
        arr = decode_frames(path, flat, meta)
        pos = {i: k for k, i in enumerate(flat)}
        return self._views([arr[[pos[i] for i in c]] for c in clips], rng)

    def _note_damaged(self, path, damage):
        """Log once (over all worker processes) that a damaged video is used, and remember it."""
        if path in self._damaged_local:
            return
        self._damaged_local.add(path)
        try:
            fd = os.open(self._marker(path, "damaged-"), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(f"{path}\t{damage}")
        log.warning("damaged video %s (%s): using the frames that decode", path, damage)

    def damaged_files(self):
        """{path: damage} of every damaged video used so far (in this process or its workers)."""
        return self._read_markers("damaged-")


class SyntheticVideos(_Base):
    """Clips of a bright disc on a flat background, generated from (seed, split, index); no files.

    The classes come in time-reversed twins: each clip of the second class of a pair is a clip drawn from the
    same distribution as the first class, played backwards, so the set of frames of both classes has the same
    distribution and a model that averages frame features cannot tell them apart; the order of frames can."""

    def __init__(self, mode="train", frames=8, input_size=224, views="1x1", sampling="sparse", seed=0,
                 videos_per_class=16, **unused):
        classes = SYNTHETIC_CLASSES
        samples = [(f"synthetic/{mode}/{c}/{v}", c) for c in range(len(classes)) for v in range(videos_per_class)]
        if sampling != "sparse":
            raise ValueError(f"synthetic supports sampling 'sparse' only, got {sampling!r}")
        # Choice: flip is always off: a mirrored 'moving left' clip is a 'moving right' clip.
        self._setup("synthetic", classes, samples, mode, frames, input_size, views, sampling, seed, False,
                    False, False, None)
        self.split_seed = seed if mode == "train" else seed + 1_000_003  # test videos differ from training ones

    def _load(self, j, rng):
        label = int(self.samples[j][0].split("/")[2])  # the generated class, whatever a subset renumbered it to
        g = np.random.default_rng([self.split_seed, self._source_index(j)])
        S = self.input_size
        width = S if self.crops == 1 else S * 8 // 7  # room for 3 different crops along the width
        # Choice: the video is continuous in time; TSN picks times on a fine grid of SYNTHETIC_STEPS, so test
        # times (t + (c + 0.5) / C) / T are exactly mirror images of each other and twins stay indistinguishable
        # frame by frame.
        clips = self._clip_indices(SYNTHETIC_STEPS, rng)
        state = g_state(g)
        out = [render_synthetic(label, [i / SYNTHETIC_STEPS for i in c], state, S, width) for c in clips]
        if self.mode == "train":
            return _normalise(torch.from_numpy(out[0]).permute(0, 3, 1, 2).float())  # (T, 3, S, S)
        return torch.cat([test_crops(o, S, self.crops, self.test_resize) for o in out])


def g_state(g):
    """Per-video drawing parameters from the video's generator (same for every clip of the video)."""
    return {"background": g.uniform(40, 90), "color": g.integers(0, 256, 3), "radius": g.uniform(0.14, 0.2),
            "a": g.uniform(0.15, 0.3), "b": g.uniform(0.7, 0.85), "c": g.uniform(0.3, 0.7)}


def render_synthetic(label, times, p, H, W):
    """Frames (len(times), H, W, 3) uint8 of class `label` at times in [0, 1], drawn with parameters p."""
    pair, backwards = divmod(label, 2)
    # Choice: clean frames, a bright disc on a flat dark background (no texture, no noise): the disc is all a
    # frame shows, so the frozen random towers of the demo see the one thing that moves, and the only cue that
    # separates twins is the order of the frames.
    s = np.asarray(times, dtype=np.float32)
    s = 1 - s if backwards else s  # the twin plays the same motion in reverse
    travel = p["a"] + (p["b"] - p["a"]) * s  # (T,) from a to b
    half = np.full_like(s, 0.5)
    cx, cy, r, bright = half, half, np.full_like(s, p["radius"]), np.ones_like(s)
    if pair == 0:
        cx, cy = 1 - travel, np.full_like(s, p["c"])  # class 0 moves left (x decreasing)
    elif pair == 1:
        cx, cy = np.full_like(s, p["c"]), 1 - travel  # class 2 moves up (row decreasing)
    elif pair == 2:
        r = 0.06 + 0.36 * (travel - 0.15)  # class 4 grows
    else:
        bright = 0.4 + 0.9 * (travel - 0.15)  # class 6 gets brighter
    yy = (np.arange(H, dtype=np.float32) / H)[None, :, None]  # (1, H, 1)
    xx = (np.arange(W, dtype=np.float32) / W)[None, None, :]  # (1, 1, W)
    inside = (xx - cx[:, None, None]) ** 2 + (yy - cy[:, None, None]) ** 2 < (r * r)[:, None, None]  # (T, H, W)
    color = (150 + p["color"] * 0.4).astype(np.float32)  # (3,) brighter than the background
    shape = color * bright[:, None, None, None]  # (T, 1, 1, 3)
    img = np.where(inside[..., None], shape, np.float32(p["background"]))  # (T, H, W, 3)
    return np.clip(img, 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------------- class names
def class_text(name):
    """Readable words for a class folder name: 'brush_hair' -> 'brush hair', 'ApplyEyeMakeup' -> 'apply eye
    makeup', 'YoYo' -> 'yo yo'; names that already hold spaces (K400, SSv1 templates) are kept as they are."""
    if " " in name:
        return name
    words, word = [], ""
    for i, ch in enumerate(name.replace("_", " ")):
        nxt = name[i + 1] if i + 1 < len(name) else ""
        # a capital starts a word after a lower-case letter, or before one inside a run of capitals ('TVShow')
        if ch.isupper() and word and (word[-1].islower() or (nxt.islower() and word[-1].isupper())):
            words.append(word)
            word = ""
        if ch == " ":
            words.append(word)
            word = ""
        else:
            word += ch
    words.append(word)
    return " ".join(w.lower() for w in words if w)


def official_classes(dataset):
    """The official class list of a dataset from assets/classes/<name>.txt (index = label)."""
    if dataset not in ASSET_NAMES:
        raise ValueError(f"no official class list for dataset {dataset!r}; lists exist for {sorted(ASSET_NAMES)}")
    path = os.path.join(ASSETS, "classes", ASSET_NAMES[dataset] + ".txt")
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


def chinese_labels(dataset, class_names, path=None):
    """Chinese label of every class, in the order of `class_names` (TPR Sec. 3.4's predefined dictionary).

    Reads assets/chinese_labels/<dataset>.json, or the user's file `path`: a JSON object {english: chinese} or
    `english<TAB>chinese` lines. Raises KeyError listing every class without an entry."""
    if path is None and dataset == "synthetic":
        table = SYNTHETIC_CHINESE
    else:
        if path is None:
            if dataset not in ASSET_NAMES:
                raise ValueError(f"dataset {dataset!r} has no built-in Chinese labels (built in: "
                                 f"{sorted(ASSET_NAMES) + ['synthetic']}); pass --chinese-labels FILE")
            path = os.path.join(ASSETS, "chinese_labels", ASSET_NAMES[dataset] + ".json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"Chinese label file {path} not found; expected a JSON object "
                                    "{english: chinese} or english<TAB>chinese lines")
        with open(path, encoding="utf-8-sig") as f:  # a BOM (Windows editors) is not part of the first label
            text = f.read()
        def unique(pairs):  # json.loads alone keeps the last of a repeated key without a word
            table = {}
            for en, zh in pairs:
                if en in table:
                    raise ValueError(f"{path}: key {en!r} appears twice ({table[en]!r} and {zh!r}); keep one")
                table[en] = zh
            return table
        try:
            table = json.loads(text, object_pairs_hook=unique)
        except json.JSONDecodeError as e:
            if text.lstrip("\ufeff \t\r\n")[:1] in ("{", "["):  # meant as JSON: its error, not the tab format's
                raise ValueError(f"{path}:{e.lineno}:{e.colno}: malformed JSON: {e.msg}") from None
            table = {}
            for n, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                if "\t" not in line:
                    raise ValueError(f"{path}:{n}: expected 'english<TAB>chinese', got {line!r}")
                en, zh = line.split("\t", 1)
                if en.strip() in table:
                    raise ValueError(f"{path}:{n}: {en.strip()!r} appears twice ({table[en.strip()]!r} and "
                                     f"{zh.strip()!r}); keep one")
                table[en.strip()] = zh.strip()
        if not isinstance(table, dict):
            raise ValueError(f"{path}: expected a JSON object {{english: chinese}}, got {type(table).__name__}")
    missing = [c for c in class_names if c not in table]
    if missing:
        raise KeyError(f"{path or 'synthetic'}: no Chinese label for {len(missing)} classes: {missing}")
    return [table[c] for c in class_names]


# ---------------------------------------------------------------------------------------------------- layouts
# The file names every layout and --check take for videos: what FFmpeg users have (PyAV opens each by its content).
VIDEO_EXTS = (".avi", ".mp4", ".m4v", ".mkv", ".webm", ".mov", ".qt", ".ts", ".mts", ".m2ts", ".mpg", ".mpeg",
              ".m2v", ".vob", ".flv", ".f4v", ".3gp", ".3g2", ".wmv", ".asf", ".ogv", ".mxf", ".divx", ".h264",
              ".264", ".h265", ".265", ".hevc", ".y4m")
LAYOUTS = {
    "hmdb51": "<root>/<class>/<video>.avi and <root>/testTrainMulti_7030_splits/<class>_test_split{1,2,3}.txt",
    "ucf101": "<root>/UCF-101/<Class>/<video>.avi and <root>/ucfTrainTestlist/{classInd,trainlist0K,testlist0K}.txt",
    "ssv1": "<root>/20bn-something-something-v1/<id>/00001.jpg and <root>/something-something-v1-"
            "{labels,train,validation}.csv",
    "k400": "<root>/{train,val}/<class>/<youtube_id>_<start:06d>_<end:06d>.mp4, or <root>/{train,val}/*.mp4 with "
            "<root>/annotations/{train,val}.csv",
    "list": "a list file of `path label` or `dir num_frames label` lines and a class file",
}


def _need(path, what, name):
    if not os.path.exists(path):
        raise FileNotFoundError(f"{what} {path} not found; {name} expects {LAYOUTS[name]}")
    return path


def _numbered_lines(path):
    """(line number, text) of every line of a split, list or class file that holds something: LF or CRLF
    endings, surrounding whitespace stripped, blank lines and `#` comment lines skipped; the numbers count
    every line of the file, so errors can say file:line."""
    try:
        with open(path, encoding="utf-8-sig") as f:  # -sig: a byte-order mark is not part of the first name
            lines = f.read().splitlines()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    return [(n, t.strip()) for n, t in enumerate(lines, 1) if t.strip() and not t.lstrip().startswith("#")]


def _read_lines(path):
    return [text for _, text in _numbered_lines(path)]


def _check_on_disk(samples, name, is_dir=False, where=None):
    """Every sample is on disk; else the first missing one named with the file:line that lists it."""
    missing = [p for p, _ in samples if not (os.path.isdir(p) if is_dir else os.path.isfile(p))]
    if missing:
        first = missing[0]
        origin = f"{where[first]}: " if where and first in where else ""
        more = f" (and {len(missing) - 1} more of {len(samples)} entries, e.g. {missing[1:4]})" if len(missing) > 1 else ""
        raise FileNotFoundError(f"{origin}{'frame folder' if is_dir else 'video'} {first} is not on disk{more}; "
                                f"{name} expects {LAYOUTS[name]}")


def _check_classes(samples, classes, name, part):
    seen = {label for _, label in samples}
    empty = [c for i, c in enumerate(classes) if i not in seen]
    if empty:
        raise ValueError(f"{name} {part}: {len(empty)} classes have no videos: {empty[:10]}; "
                         f"expected layout {LAYOUTS[name]}")


def _hmdb51(root, split, part):
    split_dir = _need(os.path.join(root, "testTrainMulti_7030_splits"), "split folder", "hmdb51")
    suffix = f"_test_split{split}.txt"
    files = sorted(f for f in os.listdir(split_dir) if f.endswith(suffix))
    if not files:
        raise FileNotFoundError(f"no *{suffix} in {split_dir}; hmdb51 expects {LAYOUTS['hmdb51']}")
    classes = [f[:-len(suffix)] for f in files]
    ids = {"train": {"1"}, "test": {"2"}, "all": {"0", "1", "2"}}[part]  # 1 train, 2 test, 0 unused
    samples, where = [], {}
    for label, (cls, file) in enumerate(zip(classes, files)):
        path = os.path.join(split_dir, file)
        for n, line in _numbered_lines(path):
            parts = line.rsplit(None, 1)  # the id is the last token; a file name may hold spaces
            if len(parts) != 2 or parts[1] not in ("0", "1", "2"):
                raise ValueError(f"{path}:{n}: expected `<video> <id>` with id 0 (unused), 1 (train) or 2 (test), "
                                 f"got {line!r}")
            if parts[1] in ids:
                samples.append((os.path.join(root, cls, parts[0]), label))
                where[samples[-1][0]] = f"{path}:{n}"
    _check_on_disk(samples, "hmdb51", where=where)
    return classes, samples


def _ucf101(root, split, part):
    videos = os.path.join(root, "UCF-101")
    videos = videos if os.path.isdir(videos) else root
    lists = _need(os.path.join(root, "ucfTrainTestlist"), "split folder", "ucf101")
    class_file = _need(os.path.join(lists, "classInd.txt"), "file", "ucf101")
    index = []
    for n, line in _numbered_lines(class_file):
        parts = line.split(None, 1)
        if len(parts) != 2 or not parts[0].isdigit():
            raise ValueError(f"{class_file}:{n}: expected `<id> <ClassName>`, got {line!r}")
        index.append((int(parts[0]), parts[1]))
    classes = [name for _, name in sorted(index)]  # classInd ids are 1-based
    by_name = {c.lower(): i for i, c in enumerate(classes)}
    samples, where = [], {}
    for kind in (("train", "test") if part == "all" else (part,)):
        file = _need(os.path.join(lists, f"{kind}list0{split}.txt"), "split file", "ucf101")
        for n, line in _numbered_lines(file):
            parts = line.rsplit(None, 1)  # trainlist: `<Class>/<video> <id>`, testlist: `<Class>/<video>`
            labelled = len(parts) == 2 and parts[1].isdigit()
            rel = parts[0] if labelled else line
            cls = rel.split("/")[0]
            if "/" not in rel or cls.lower() not in by_name:
                raise ValueError(f"{file}:{n}: class folder {cls!r} of {rel!r} is not in classInd.txt (expected "
                                 f"`<Class>/<video>` lines)")
            label = by_name[cls.lower()]
            if labelled and int(parts[1]) != label + 1:
                raise ValueError(f"{file}:{n}: id {parts[1]} of {rel!r}, but classInd.txt gives {cls} id {label + 1}")
            samples.append((os.path.join(videos, rel), label))
            where[samples[-1][0]] = f"{file}:{n}"
    _check_on_disk(samples, "ucf101", where=where)
    return classes, samples


def _ssv1(root, part):
    frames = os.path.join(root, "20bn-something-something-v1")
    frames = frames if os.path.isdir(frames) else root
    classes = _read_lines(_need(os.path.join(root, "something-something-v1-labels.csv"), "label file", "ssv1"))
    by_name = {c: i for i, c in enumerate(classes)}
    samples, where = [], {}
    for kind in (("train", "validation") if part == "all" else ("train" if part == "train" else "validation",)):
        file = _need(os.path.join(root, f"something-something-v1-{kind}.csv"), "split file", "ssv1")
        for n, line in _numbered_lines(file):
            if ";" not in line:
                raise ValueError(f"{file}:{n}: expected `<id>;<label>`, got {line!r}")
            vid, label = line.split(";", 1)
            if label not in by_name:
                raise ValueError(f"{file}:{n}: label {label!r} of video {vid} is not in "
                                 f"something-something-v1-labels.csv")
            samples.append((os.path.join(frames, vid), by_name[label]))
            where[samples[-1][0]] = f"{file}:{n}"
    _check_on_disk(samples, "ssv1", is_dir=True, where=where)
    return classes, samples


def _k400_split_dir(root, kind):
    names = ("train",) if kind == "train" else ("val", "validate", "validation")
    for n in names:
        if os.path.isdir(os.path.join(root, n)):
            return n
    raise FileNotFoundError(f"no {' or '.join(os.path.join(root, n) for n in names)}; k400 expects {LAYOUTS['k400']}")


def _k400(root, part):
    kinds = ("train", "test") if part == "all" else (part,)
    ann = os.path.join(root, "annotations")
    samples, classes, where = [], None, {}
    if os.path.isdir(ann):
        def csv_for(kind):
            for n in (("train",) if kind == "train" else ("val", "validate", "validation")):
                if os.path.isfile(os.path.join(ann, n + ".csv")):
                    return os.path.join(ann, n + ".csv")
            raise FileNotFoundError(f"no train/val CSV in {ann}; k400 expects {LAYOUTS['k400']}")

        def rows(kind):
            """(file:line, label, file name) of each row of the split's CSV."""
            path = csv_for(kind)
            with open(path, newline="", encoding="utf-8-sig") as f:
                reader = csv.DictReader(f)
                need = ("label", "youtube_id", "time_start", "time_end")
                if reader.fieldnames is None or not set(need) <= set(reader.fieldnames):
                    raise ValueError(f"{path}:1: header {reader.fieldnames} lacks columns of {','.join(need)}")
                out = []
                for r in reader:
                    try:
                        file = f"{r['youtube_id']}_{int(float(r['time_start'])):06d}_{int(float(r['time_end'])):06d}.mp4"
                    except (TypeError, ValueError):
                        raise ValueError(f"{path}:{reader.line_num}: expected label,youtube_id,time_start,time_end,"
                                         f"... with numeric times, got {r}") from None
                    out.append((f"{path}:{reader.line_num}", r["label"], file))
                return out
        classes = sorted({label for _, label, _ in rows("train")})
        by_name = {c: i for i, c in enumerate(classes)}
        for kind in kinds:
            sub = _k400_split_dir(root, kind)
            for origin, label, file in rows(kind):
                nested = os.path.join(root, sub, label, file)
                path = nested if os.path.exists(nested) else os.path.join(root, sub, file)
                if label not in by_name:
                    raise ValueError(f"{origin}: label {label!r} is not a training class")
                samples.append((path, by_name[label]))
                where[path] = origin
    else:
        train_dir = os.path.join(root, _k400_split_dir(root, "train"))
        classes = sorted(d for d in os.listdir(train_dir) if os.path.isdir(os.path.join(train_dir, d)))
        by_name = {c: i for i, c in enumerate(classes)}
        for kind in kinds:
            sub = os.path.join(root, _k400_split_dir(root, kind))
            for cls in sorted(os.listdir(sub)):
                if not os.path.isdir(os.path.join(sub, cls)):
                    continue
                if cls not in by_name:
                    raise ValueError(f"class folder {os.path.join(sub, cls)} is not a class of {train_dir}")
                files = sorted(os.listdir(os.path.join(sub, cls)))
                samples += [(os.path.join(sub, cls, f), by_name[cls]) for f in files if f.lower().endswith(VIDEO_EXTS)]
    try:  # keep the official label order when the folders hold exactly the official classes
        official = official_classes("k400")
    except OSError:
        official = None
    if official is not None and sorted(official) == classes:
        remap = {i: official.index(c) for i, c in enumerate(classes)}
        classes, samples = official, [(p, remap[l]) for p, l in samples]
    _check_on_disk(samples, "k400", where=where)
    return classes, samples


def read_class_file(path):
    """Class names from a file of one name per line, or an `id,name` CSV (header optional)."""
    lines = _numbered_lines(_need(path, "class file", "list"))
    if lines and all("," in l for _, l in lines):
        rows = [(n, *l.split(",", 1)) for n, l in lines]
        if not rows[0][1].strip().isdigit():
            rows = rows[1:]  # header such as id,name
        for n, i, _ in rows:
            if not i.strip().isdigit():
                raise ValueError(f"{path}:{n}: expected `<id>,<name>` with an integer id, got {i.strip()!r}")
        return [name.strip() for _, _, name in sorted(rows, key=lambda r: int(r[1]))]
    return [l for _, l in lines]


def _list(root, list_file, class_file):
    if list_file is None or class_file is None:
        raise ValueError("dataset 'list' needs list_file (--list-file) and class_file (--class-file)")
    classes = read_class_file(class_file)
    samples, counts, kinds, where = [], {}, set(), {}
    for n, line in _numbered_lines(_need(list_file, "list file", "list")):
        parts = line.rsplit(None, 2)  # the numbers are the last tokens; a path may hold spaces
        if len(parts) == 3 and parts[1].isdigit() and parts[2].lstrip("-").isdigit():
            path, count, label = parts[0], int(parts[1]), int(parts[2])
            kinds.add("frames")
        elif len(parts) >= 2 and parts[-1].lstrip("-").isdigit():
            path, count, label = line.rsplit(None, 1)[0], None, int(parts[-1])
            kinds.add("video")
        else:
            raise ValueError(f"{list_file}:{n}: expected `path label` or `dir num_frames label`, got {line!r}")
        if not 0 <= label < len(classes):
            raise ValueError(f"{list_file}:{n}: label {label} outside 0..{len(classes) - 1} of {class_file}")
        path = os.path.join(root, path) if root else path
        samples.append((path, label))
        where[path] = f"{list_file}:{n}"
        if count is not None:
            counts[path] = count
    if len(kinds) > 1:
        raise ValueError(f"{list_file}: mixes video lines and frame-folder lines; use one kind per list")
    frame_dirs = kinds == {"frames"}
    _check_on_disk(samples, "list", is_dir=frame_dirs, where=where)
    return classes, samples, frame_dirs, counts


def build_dataset(name, root=None, split=1, mode="train", frames=8, input_size=224, views="1x1", sampling="sparse",
                  shots=None, seed=0, flip=True, randaugment=False, random_erasing=False, list_file=None,
                  class_file=None, filename_tmpl="img_{:05d}.jpg", interval=None, videos_per_class=16,
                  shots_dir=None, train_crop="multiscale", frame_sampling="tsn", test_sampling="tsn", test_resize=None):
    """One split of a dataset as a torch Dataset (see the module docstring for the items).

    name: one of DATASETS; root: the dataset folder in its authors' layout (LAYOUTS); split: 1..3 for hmdb51 and
    ucf101; mode: 'train' (random TSN offsets, augmentation) or 'test' (segment centres, `views` clips x crops);
    mode 'all' (zero-shot) reads every labelled video of split 1 with test sampling; frames: T; shots: K videos
    per class drawn with `seed` (list written to `shots_dir`); interval: dense sampling stride.
    The BiEfficient authors' pipeline, one keyword each: train_crop "inception" (their crop, _inception_box);
    frame_sampling "authors" (their training frames) and test_sampling "authors" (their clip starts; one clip:
    their validation clip), see authors_indices; test_resize: the short side before the test crops (None: the
    crop size; their test and validation: 256 for 224 crops)."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid: {DATASETS}")
    if mode not in MODES + ("all",):
        raise ValueError(f"mode {mode!r} not in {MODES + ('all',)}")
    for key, value, valid in (("train_crop", train_crop, TRAIN_CROPS), ("frame_sampling", frame_sampling,
                              FRAME_SAMPLINGS), ("test_sampling", test_sampling, FRAME_SAMPLINGS)):
        if value not in valid:
            raise ValueError(f"{key} {value!r}; valid: {', '.join(map(repr, valid))}")
        if value == "authors" and sampling != "sparse":
            raise ValueError(f"{key} 'authors' is the authors' sparse sampling; sampling {sampling!r} has its own: "
                             f"use {key} 'tsn' with it")
    if test_resize is not None and test_resize < input_size:
        raise ValueError(f"test resize {test_resize} is smaller than the crop size {input_size}")
    opts = dict(mode="test" if mode == "all" else mode, frames=frames, input_size=input_size, views=views,
                sampling=sampling, seed=seed)
    if name == "synthetic":
        ds = SyntheticVideos(videos_per_class=videos_per_class, **opts)
    else:
        if name in ("hmdb51", "ucf101"):
            if split not in (1, 2, 3):
                raise ValueError(f"{name} split {split!r} not in (1, 2, 3)")
        elif split != 1:
            raise ValueError(f"{name} has one official split; got split {split!r}")
        if name != "list" and (root is None or not os.path.isdir(root)):
            raise FileNotFoundError(f"dataset root {root!r} not found; {name} expects {LAYOUTS[name]}")
        frame_dirs, counts, tmpl = name == "ssv1", None, filename_tmpl
        if name == "hmdb51":
            classes, samples = _hmdb51(root, split, mode)
        elif name == "ucf101":
            classes, samples = _ucf101(root, split, mode)
        elif name == "ssv1":
            classes, samples = _ssv1(root, mode)
            tmpl = "{:05d}.jpg"
        elif name == "k400":
            classes, samples = _k400(root, mode)
        else:
            classes, samples, frame_dirs, counts = _list(root, list_file, class_file)
        if not samples:
            raise ValueError(f"{name} split {split} {mode}: the split files list no videos for this part; "
                             f"{name} expects {LAYOUTS[name]}")
        if name != "list" or mode == "train":
            _check_classes(samples, classes, name, mode)
        if name == "ssv1" and flip:
            # Paper: TPR Sec. 4.4 lists no flip for SSv1; its labels name left and right, a flip changes the class.
            log.warning("ssv1: horizontal flip is off (its labels name left and right); flip=True ignored")
            flip = False
        ds = VideoDataset(name, classes, samples, flip=flip, randaugment=randaugment, random_erasing=random_erasing,
                          interval=interval, frame_dirs=frame_dirs, num_frames=counts, filename_tmpl=tmpl, **opts)
    # Choice: the synthetic set renders its frames at the crop size, so train_crop does not apply to it.
    ds.train_crop, ds.frame_sampling, ds.test_sampling, ds.test_resize = train_crop, frame_sampling, test_sampling, \
        test_resize
    if shots is not None:
        ds = few_shot(ds, shots, seed, shots_dir, tag=f"{name}_split{split}")
    return ds


# ------------------------------------------------------------------------------------------ few- and zero-shot
def few_shot(dataset, shots, seed=0, out_dir=None, tag="dataset"):
    """K videos per class drawn with `seed` (TPR Sec. 4.3, X-CLIP's K-shot protocol); the chosen `path label`
    list is written to out_dir/fewshot_<tag>_<K>shot_seed<seed>.txt, itself a valid list file."""
    if not isinstance(shots, int) or shots < 1:
        raise ValueError(f"shots {shots!r} must be a positive int, papers use {SHOTS}")
    if shots not in SHOTS:
        log.warning("few-shot K=%s is not one of the papers' values %s", shots, SHOTS)
    rng = random.Random(f"fewshot:{seed}")
    chosen = []
    for label in range(len(dataset.classes)):
        members = sorted(dataset._by_class.get(label, []), key=lambda i: dataset.samples[i][0])
        if len(members) < shots:
            raise ValueError(f"class {dataset.classes[label]!r} has {len(members)} videos, fewer than shots={shots}")
        chosen += sorted(rng.sample(members, shots), key=lambda i: dataset.samples[i][0])
    sub = dataset.subset(chosen)
    if out_dir is not None:
        os.makedirs(out_dir, exist_ok=True)
        path = os.path.join(out_dir, f"fewshot_{tag}_{shots}shot_seed{seed}.txt")
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(f"{p} {l}\n" for p, l in sub.samples)
        sub.list_path = path
    return sub


def zero_shot_protocol(name, root, protocol="splits", halves=10, seed=0, **kw):
    """Evaluations of zero-shot transfer to `name` (BiEfficient Sec. 4, Table 2).

    protocol 'splits': the test list of each of the three official splits, all classes (mean +- std reported).
    protocol 'half': BIKE's (after E2E, Brattoli et al. 2020) half-classes x `halves`: every labelled video of
    the classes in a random half of the class set, drawn `halves` times with `seed`; labels are renumbered
    within the half. Returns [{"name", "dataset", "class_ids"}], class_ids the original class indices."""
    if protocol == "splits":
        if name not in ("hmdb51", "ucf101"):
            raise ValueError(f"protocol 'splits' needs a dataset with three splits (hmdb51, ucf101), got {name!r}")
        out = []
        for k in (1, 2, 3):
            ds = build_dataset(name, root, split=k, mode="test", seed=seed, **kw)
            out.append({"name": f"{name} split {k}", "dataset": ds, "class_ids": list(range(len(ds.classes)))})
        return out
    if protocol != "half":
        raise ValueError(f"zero-shot protocol {protocol!r} not in ('splits', 'half')")
    full = build_dataset(name, root, split=1, mode="all", seed=seed, **kw)
    K = len(full.classes)
    out = []
    for r in range(halves):
        # Choice: half = floor(K / 2) classes (50 of UCF101, 25 of HMDB51), drawn independently each round.
        ids = sorted(random.Random(f"half:{seed}:{r}").sample(range(K), K // 2))
        keep = set(ids)
        sub = full.subset([i for i, (_, l) in enumerate(full.samples) if l in keep], classes=ids)
        out.append({"name": f"{name} half {r}", "dataset": sub, "class_ids": ids})
    return out


# ------------------------------------------------------------------------------------------------- decoding
# A frame index, everywhere in this file (probe, decode, --check, sampling), is the position of a frame in the
# sequence a plain full decode yields: presentation order, after the container's edit list, after FFmpeg drops
# what it cannot decode (a packet the decoder rejects is skipped, as ffmpeg's command line skips it). Decoded
# frames are mapped to indices by their timestamps, never by dividing by an average frame rate, so variable
# frame rate, B-frames and odd or negative start timestamps need no special case.
class MetaMismatch(BadVideo):
    """The decoder did not show the frames the packets promised; probe_video(path, exact=True) will know."""


class VideoMeta:
    """What the probe tells about a video.

    pts         (num_frames,) int64 ascending, the timestamp of the frame at each index (stream time base);
                None when the decoded frames carry no usable timestamps (frames are then counted from the start)
    key_pts     ascending timestamps of the keyframes; key_idx the index of the first frame shown at or after
                each; key_dts their decode timestamps (the seek targets once by_dts: see _decode)
    header      the frame count the container claims (0 when it claims none)
    damage      '' for a sound file, else why fewer frames decode than the file should hold (truncated, ...)
    exact       pts come from a full decode (True) or from the packets (False)
    width, height  the frame size the container gives, that of the stream's first frame: every frame comes out
                at this size (see _Clip), turned by `rotation`
    rotation    degrees counter-clockwise the display matrix turns the frames (0, 90, 180, -90), as players
                show them; None until a frame has been decoded (the matrix travels with the decoded frames)
    stream      index of the video stream read (see _video_streams); codec its decoder's name
    seeks       False once SEEK_TRIES seeks in a row missed (landed after their target or lost the frames'
                timestamps): the decoder then runs forward from the start, the one position known good
    by_dts      True once a seek to a keyframe's timestamp landed after it: later seeks aim at its decode
                timestamp (MPEG-TS and -PS seek by decode timestamps)
    """

    __slots__ = ("pts", "num_frames", "key_pts", "key_idx", "key_dts", "header", "damage", "exact", "width",
                 "height", "rotation", "stream", "codec", "seeks", "by_dts", "_lookup")

    def __init__(self, pts, num_frames, key_pts, header, damage, exact, width, height, rotation=None, stream=None,
                 codec="", key_dts=None):
        self.pts, self.num_frames, self.header, self.damage, self.exact = pts, num_frames, header, damage, exact
        self.width, self.height, self.rotation, self.stream, self.seeks = width, height, rotation, stream, True
        self.codec, self.by_dts = codec, False
        self.key_pts = np.asarray(key_pts if pts is not None else [], dtype=np.int64)
        self.key_dts = self.key_pts if key_dts is None or pts is None else np.asarray(key_dts, dtype=np.int64)
        self.key_idx = np.searchsorted(pts, self.key_pts) if pts is not None else self.key_pts
        self._lookup = None

    def lookup(self):
        """{pts: index} of every frame, built once."""
        if self._lookup is None:
            self._lookup = {int(p): i for i, p in enumerate(self.pts)} if self.pts is not None else {}
        return self._lookup

    def index(self, pts):
        """Index of the frame shown at timestamp `pts`, or -1 if no frame of the video has it."""
        return self.lookup().get(pts, -1)


def _video_streams(container):
    """The video streams that can hold a video, FFmpeg's best first (av_find_best_stream: the default
    disposition, then the most frames seen while probing, the highest bit rate); attached pictures (cover
    art) are not videos."""
    videos = [s for s in container.streams.video if not s.disposition & av.stream.Disposition.attached_pic]
    best = container.streams.best("video") if videos else None
    return sorted(videos, key=lambda s: s is not best)


def _open(path, threads=None, index=None):
    """The file opened, and its video stream: number `index`, or FFmpeg's best (_probe may choose another)."""
    if not os.path.exists(path):
        raise BadVideo("file not found")
    if os.path.getsize(path) == 0:
        raise BadVideo("zero-byte file")
    try:
        container = av.open(path)
    except (av.FFmpegError, OSError, ValueError) as e:
        raise BadVideo(f"cannot open: {e}") from None
    videos = _video_streams(container)
    if not videos:
        container.close()
        raise BadVideo("no video stream" + (" (only a cover picture)" if container.streams.video else ""))
    stream = container.streams[index] if index is not None else videos[0]
    stream.thread_type = threads or _thread_type()  # the decoder opens at the first packet: callers may change it
    return container, stream


def _thread_type(meta=None):
    # Choice: measured with `python bench/loader.py` (README): frame threads ("AUTO") refill their pipeline after
    # every seek and cost up to 25% more CPU time per clip; in DataLoader workers, which keep every core busy,
    # the decoder runs one thread ("NONE"; CPU ms per T = 16 clip in 2 workers, NONE | SLICE | AUTO: mpeg4 .avi
    # 21 | 20 | 26, x264 640x360 GOP 250 67 | 69 | 73, MPEG-2 39 | 39 | 38, MJPEG 15 | 15 | 15). In one process
    # (evaluate.py --video, num_workers 0) frame threads are used on files with long GOPs (LONG_GOP frames or
    # more per keyframe), where decoding runs long stretches without a seek (x264 GOP 250, wall ms: AUTO 65,
    # NONE 110); on short GOPs one single-threaded decoder, or one per core (see _parallel). Slice threads add
    # nothing to single-slice H.264 and to mpeg4.
    if torch.utils.data.get_worker_info() is not None or meta is None or meta.pts is None:
        return "NONE"
    return "AUTO" if meta.num_frames >= LONG_GOP * max(len(meta.key_pts), 1) else "NONE"


def _parallel(meta):
    """Whether decode_frames in one process splits a clip's stretches between seeks over the cores."""
    # Choice: measured with bench/loader.py's threading rows (T = 16 test clips, 2 cores, wall ms per clip in
    # one process, stretches split over the cores | one decoder thread): codecs that decode a frame in well under
    # a millisecond at these sizes lose to one thread, which opens the file once: mpeg4 .avi 14 | 13, MPEG-2
    # .mpg 63 | 34, MJPEG 9 | 10 (issue 21: 0.42-0.92x on .avi, MJPEG and MPEG-2). H.264, HEVC and VP9 keep it
    # (x264 640x360 GOP 12 in one process: 1.42x / 1.66x torchcodec with it, README, quiet machine).
    return _thread_type(meta) == "NONE" and meta.seeks and meta.codec not in CHEAP_CODECS


def _frames(container, stream, needed=None):
    """Decoded frames in presentation order; a packet the decoder rejects is skipped and a container that
    breaks off ends the video, as in a plain `ffmpeg -i` decode. With `needed` (a set of timestamps), frames no
    other frame refers to are not decoded at all unless their packet's timestamp is needed."""
    ctx, skipping = stream.codec_context, False
    packets = container.demux(stream)
    while True:
        try:
            packet = next(packets)
        except (StopIteration, av.FFmpegError):  # the end, or a container that breaks off (a cut file)
            break
        if packet.size == 0:  # the demuxer's end marker, or an AVI's empty 'dropped frame' chunk
            continue
        if needed is not None and skipping != (packet.pts not in needed):
            skipping = not skipping
            ctx.skip_frame = "NONREF" if skipping else "DEFAULT"
        try:
            frames = packet.decode()
        except av.FFmpegError:
            continue
        yield from frames
    ctx.skip_frame = "DEFAULT"
    try:
        yield from ctx.decode(None)  # what the decoder still holds (B-frames, threads)
    except av.FFmpegError:
        return


class _Decoded:
    """What a plain full decode of a stream yields: each frame's timestamp (pts None if any frame lacks one or
    they do not ascend), the count, where the frame size changes [(index, width, height)], the rotation."""

    def __init__(self, path, index=None):
        # One pass over everything: frame threads are fastest, but not inside a worker, where the cores are taken.
        container, stream = _open(path, "AUTO" if torch.utils.data.get_worker_info() is None else "NONE", index)
        pts, self.changes, self.rotation, size = [], [], None, None
        try:
            for f in _frames(container, stream):
                if (f.width, f.height) != size:
                    size = f.width, f.height
                    self.changes.append((len(pts), *size))
                self.rotation = f.rotation if self.rotation is None else self.rotation
                pts.append(f.pts)
        finally:
            container.close()
        self.n = len(pts)
        usable = all(p is not None for p in pts) and all(a < b for a, b in zip(pts, pts[1:]))
        self.pts = np.asarray(pts, dtype=np.int64) if usable else None


def probe_video(path, exact=False):
    """Frame timestamps and keyframes of a video, from one demux pass (no decoding) where the packets tell it
    exactly, else (or with exact=True) from one full decode; BadVideo if nothing decodes.

    The packets tell it where they hold timestamps, the container holds as many as its header claims, and the
    first frame the decoder shows is the first the packets promise; the frames shown are then the packets' in
    timestamp order, less those marked discard (an edit list's pre-roll) and those before the first keyframe in
    decode order (undecodable). Anything else (a cut or damaged file, missing timestamps, a decoder that shows
    frames before the first keyframe) costs one full decode, once: callers cache the result."""
    container, stream = _open(path)
    try:
        return _probe(path, container, stream, exact)
    finally:
        container.close()


def _probe(path, container, stream, exact=False):
    """probe_video on an open container (left at its end)."""
    videos = _video_streams(container)
    found = {s.index: [] for s in videos}  # stream -> [(pts, keyframe, discard, dts)] in decode order
    broken, corrupt, empty = False, False, 0
    try:
        for packet in container.demux(*videos):
            if packet.size:  # not the end marker nor an AVI's empty 'dropped frame' chunk
                found[packet.stream.index].append((packet.pts, packet.is_keyframe, packet.is_discard, packet.dts))
                corrupt |= packet.is_corrupt and packet.stream is stream
            elif packet.pts is not None and packet.stream is stream:
                empty += 1
    except av.FFmpegError:
        broken = True  # the container breaks off: a cut file
    if len(found[stream.index]) <= 1 and stream is videos[0]:
        # Choice: a one-frame still (a cover image stored as a plain track) is never the video while another
        # stream holds more frames, whatever FFmpeg's choice (its disposition ranks first).
        most = max(videos, key=lambda s: len(found[s.index]))
        if len(found[most.index]) > 1:
            stream, corrupt, empty = most, False, 0  # (what corrupt and empty were counting was the still's)
    packets = found[stream.index]
    header = max(stream.frames, 0)
    width, height = stream.codec_context.width, stream.codec_context.height
    first_key = next((i for i, p in enumerate(packets) if p[1]), None)
    shown = sorted(p[0] for p in packets[first_key or 0:] if not p[2] and p[0] is not None)
    keys = sorted((p[0], p[0] if p[3] is None else p[3]) for p in packets if p[1] and p[0] is not None)
    key_pts, key_dts = [k[0] for k in keys], [k[1] for k in keys]
    cut = broken or corrupt or len(packets) + empty < header
    exact = (exact or cut or first_key is None or not shown or any(p[0] is None for p in packets)
             or len(set(shown)) < len(shown) or not width or not height)
    if not exact and (first_key > 0 or any(p[2] for p in packets) or shown[0] < packets[first_key][0]):
        # The head is unusual (an edit list, a cut before a keyframe): does the decoder agree?
        head, head_stream = _open(path, index=stream.index)
        try:
            first = next(_frames(head, head_stream), None)
        finally:
            head.close()
        exact = first is None or first.pts != shown[0]
    if not exact:
        return VideoMeta(np.asarray(shown, dtype=np.int64), len(shown), key_pts, header, "", False, width, height,
                         stream=stream.index, codec=stream.codec_context.name, key_dts=key_dts)
    plain = _Decoded(path, stream.index)
    n = plain.n
    if n == 0:
        raise BadVideo("no decodable frames" + (f" ({len(packets)} packets)" if packets else ""))
    damage = ""
    if cut:
        damage = (f"truncated: container says {header} frames, {n} decode" if header > n
                  else f"truncated: {len(packets)} packets, {n} frames decode")
    elif n < len(shown):
        damage = f"damaged: {len(shown)} frames in the packets, {n} decode"
    width, height = plain.changes[0][1:]  # the first frame's size
    return VideoMeta(plain.pts, n, key_pts, header, damage, True, width, height, plain.rotation, stream.index,
                     stream.codec_context.name, key_dts)


def video_verdict(meta, T):
    """The one rule training and --check share: a damaged video is used if at least T frames of it decode,
    with its damage reported; else BadVideo. A sound video is always used (a short one repeats frames)."""
    if meta.damage and meta.num_frames < T:
        raise BadVideo(f"{meta.damage}, fewer than T={T}")
    return meta.damage


class _Clip:
    """The frames asked for, (len(indices), H, W, 3) uint8, allocated when the first frame is converted and
    filled in place: one copy of the clip, whichever threads decode it. positions: {index: [places in the clip]}."""

    def __init__(self, indices):
        self.n, self.array, self.lock, self.positions = len(indices), None, threading.Lock(), {}
        for k, i in enumerate(indices):
            self.positions.setdefault(i, []).append(k)

    def put(self, i, frame, rgb, meta):
        """Convert `frame` (index i) to RGB into its places: at the stream's first frame's size, turned as its
        display matrix says."""
        if (frame.width, frame.height) == (meta.width, meta.height):
            img = rgb.reformat(frame, format="rgb24").to_ndarray()  # (H, W, 3), exactly a plain decode's frame
        else:
            # Choice: a stream whose frame size changes (a re-encode spliced in, adaptive streaming) comes out
            # at the size of its first frame: other frames are scaled in the colour conversion, with bicubic
            # interpolation (the default of FFmpeg's scale filter, which `ffmpeg -i` inserts for such streams).
            img = rgb.reformat(frame, width=meta.width, height=meta.height, format="rgb24",
                               interpolation="BICUBIC").to_ndarray()
        if meta.rotation is None:
            meta.rotation = frame.rotation  # the display matrix is the stream's: every frame carries the same
        turns = round(meta.rotation / 90) % 4  # the matrix turns counter-clockwise, as np.rot90 does
        if turns:
            img = np.rot90(img, turns)  # a view: the one copy is made into the clip below
        if self.array is None:
            with self.lock:
                if self.array is None:
                    self.array = np.empty((self.n,) + img.shape, dtype=np.uint8)
        self.array[self.positions[i]] = img


def decode_frames(path, indices, meta=None, threads=None, skip=True):
    """uint8 RGB frames (len(indices), H, W, 3), exactly `frame.to_ndarray(format="rgb24")` of the frame at
    each index (in any order, repeats allowed), decoding only from the keyframe before each needed frame;
    turned as the display matrix says (H and W swapped for a quarter turn), frames of a size other than the
    first frame's scaled to it (see _Clip).

    meta: probe_video(path), probed here (on the same open file) when None. threads: the codec's thread_type
    ("NONE", "SLICE", "FRAME", "AUTO"), by default chosen for the context. skip: leave undecoded the frames no
    other frame refers to (B-frames, mostly) that are not asked for. MetaMismatch when the decoder does not show
    a frame the (packet-based) meta promised."""
    indices = [int(i) for i in indices]
    if not indices:
        raise ValueError(f"no frame indices to decode from {path}")
    clip = _Clip(indices)
    cores = os.cpu_count() or 1
    if threads is None and cores > 1 and torch.utils.data.get_worker_info() is None:
        meta = meta or probe_video(path)
        _check_range(path, meta, indices)
        runs = _runs(meta, clip.positions) if _parallel(meta) else []
        if len(runs) > 1:  # one process, short GOPs: the runs between seeks decode in parallel, one per core
            chunks = [sum(runs[c::cores], []) for c in range(min(cores, len(runs)))]
            with ThreadPoolExecutor(len(chunks)) as pool:  # PyAV releases the GIL while it decodes
                list(pool.map(lambda c: _decode_all(path, c, clip, meta, "NONE", skip), chunks))
            return clip.array
    _decode_all(path, sorted(clip.positions), clip, meta, threads, skip)
    return clip.array


def _missed(meta, back):
    """After a seek that missed: aim at decode timestamps from now on, else one keyframe earlier; after
    SEEK_TRIES misses in a row no seek in this file is trusted, it is decoded forward from its start."""
    if not meta.by_dts and (meta.key_dts != meta.key_pts).any():
        meta.by_dts = True
        return back
    meta.seeks = back + 1 < SEEK_TRIES
    return back + 1


def _check_range(path, meta, indices):
    outside = [i for i in indices if not 0 <= i < meta.num_frames]
    if outside:
        raise IndexError(f"frame indices {outside[:8]} outside 0..{meta.num_frames - 1} of {path}")


def _decode_all(path, pending, clip, meta, threads, skip):
    try:
        _decode(path, pending, clip, meta, threads, skip)
    except MetaMismatch:
        if not skip:
            raise
        # Choice: a frame skipped as non-reference that the meta promised (a codec that packs two frames into
        # one packet, as some AVI muxers do): decode every frame before giving up.
        _decode(path, pending, clip, meta, threads, False)


def _runs(meta, indices):
    """The distinct indices grouped by the keyframe a decoder starts from: [[i, ...], ...], ascending."""
    if meta.pts is None:
        return [sorted(set(indices))]
    runs, last = [], None
    for i in sorted(set(indices)):
        k = int(np.searchsorted(meta.key_pts, meta.pts[i], "right"))  # keyframes at or before frame i
        if k != last:
            runs.append([])
            last = k
        runs[-1].append(i)
    return runs


def _decode(path, pending, clip, meta, threads, skip):
    """Fill `clip` with the frames at the ascending indices `pending`."""
    pending = list(pending)
    container, stream = _open(path, threads, meta.stream if meta else None)
    try:
        opened = meta is None  # the probe has read the file to its end: the first frame needs a seek
        if meta is None:
            meta = _probe(path, container, stream)
            stream = container.streams[meta.stream]
        _check_range(path, meta, pending)
        n, rgb = meta.num_frames, VideoReformatter()  # one colour converter for all frames
        stream.thread_type = threads or _thread_type(meta)
        if meta.pts is None:  # no timestamps: count frames from the start
            if opened:
                container.close()
                container, stream = _open(path, stream.thread_type, meta.stream)
            for i, frame in enumerate(_frames(container, stream)):
                if i == pending[0]:
                    clip.put(pending.pop(0), frame, rgb, meta)
                    if not pending:
                        break
            if pending:
                raise MetaMismatch(f"frame {pending[0]} of {n} not decodable")
            return
        frames, pos, back = None, -1, 0  # pos: index of the frame the decoder showed last
        where, keys = meta.lookup(), set(meta.key_pts.tolist())
        needed = {int(meta.pts[i]) for i in pending} if skip else None
        while pending:
            target = pending[0]
            k = int(np.searchsorted(meta.key_pts, meta.pts[target], "right")) - 1 - back  # keyframe before it
            k = k if meta.seeks else -1
            key = int(meta.key_idx[k]) if k >= 0 else 0
            if frames is None or key > pos + 1:  # seeking helps only if the keyframe lies ahead of the decoder
                if k >= 0 and (key > 0 or opened):
                    at = meta.key_dts[k] if meta.by_dts else meta.key_pts[k]
                    container.seek(int(at), stream=stream, backward=True)
                elif opened:  # from the very start: reopen (a seek may land on a later keyframe)
                    container.close()
                    container, stream = _open(path, stream.thread_type, meta.stream)
                frames, opened, pos, fresh = _frames(container, stream, needed), True, key - 1, k >= 0
            for frame in frames:
                i = where.get(frame.pts, -1)
                if fresh and (not frame.key_frame or frame.pts not in keys or i > target):
                    # The seek missed: it landed after the target (MPEG-TS and -PS seek by decode timestamps and
                    # land a keyframe late when aimed at a presentation timestamp), or it lost the timestamps
                    # (MPEG-PS resumes inside a packet and guesses them, whole frames off at times: the first
                    # frame after a seek must be a keyframe shown at a keyframe's timestamp).
                    back, frames = _missed(meta, back), None
                    break
                if i < 0:
                    raise MetaMismatch(f"the decoder shows a frame at pts {frame.pts}, which the packets lack")
                if i > target:
                    raise MetaMismatch(f"frame {target} of {n} (pts {meta.pts[target]}) is never shown")
                pos, fresh, back = i, False, 0
                if i == target:
                    clip.put(pending.pop(0), frame, rgb, meta)
                    break
            else:  # the end of the stream before `target`
                if not fresh:
                    raise MetaMismatch(f"frame {target} of {n} not decodable")
                back, frames = _missed(meta, back), None  # the seek landed at the end (MPEG-TS, last keyframe)
    except av.FFmpegError as e:
        raise BadVideo(f"decode error: {e}") from None
    finally:
        container.close()


def read_frame_dir(path, indices, tmpl, start_index=1):
    """RGB frames from a folder of images named tmpl.format(index + start_index)."""
    out = []
    for i in indices:
        file = os.path.join(path, tmpl.format(i + start_index))
        try:
            with Image.open(file) as im:
                out.append(np.asarray(im.convert("RGB")))
        except (OSError, ValueError) as e:
            raise BadVideo(f"frame {file}: {e}") from None
    if len({a.shape for a in out}) > 1:
        raise BadVideo(f"frames of different sizes: {sorted({a.shape for a in out})}")
    return np.stack(out)


def count_frame_dir(path, tmpl, start_index=1):
    if not os.path.isdir(path):
        raise BadVideo("frame folder not found")
    names = set(os.listdir(path))
    n = 0
    while tmpl.format(n + start_index) in names:
        n += 1
    if n == 0:
        raise BadVideo(f"no frames named like {tmpl.format(start_index)!r}")
    return n


# ------------------------------------------------------------------------------------------------------ check
class _CheckAll(torch.utils.data.Dataset):
    """Reads every sample as training would, and more: (index, frame count, damage note, reason it is refused
    or '', notes on what the loader adapts: frame size changes, rotation)."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        path = self.ds.samples[i][0]
        try:
            if self.ds.frame_dirs:
                n = self.ds.probe(path)
                read_frame_dir(path, range(n), self.ds.filename_tmpl, self.ds.start_index)
                return i, n, "", "", []
            n, damage, notes = check_video(path, self.ds.T)
            return i, n, damage, "", notes
        except BadVideo as e:
            return i, 0, "", str(e), []


def check_video(path, T):
    """(frame count, damage note, [notes]) of one video file read as training reads it, or BadVideo: the
    probe, one plain decode of every frame (is the probe's count what a decode yields? where does the frame
    size change?), then the decoder as it serves clips: a seek to every keyframe and the last frame."""
    meta = probe_video(path)
    plain = _Decoded(path, meta.stream)
    if not meta.exact and (plain.pts is None or not np.array_equal(plain.pts, meta.pts)):
        meta = probe_video(path, exact=True)  # what training switches to when it meets the difference
    damage = video_verdict(meta, T)  # the rule training applies
    if meta.pts is None:
        wanted = [0, meta.num_frames - 1]
    else:
        wanted = sorted({int(i) for i in meta.key_idx if i < meta.num_frames} | {meta.num_frames - 1})
    try:
        decode_frames(path, wanted, meta)
    except MetaMismatch:  # as training: one exact probe, then the same decode; a second mismatch is a bad file
        meta = probe_video(path, exact=True)
        damage = video_verdict(meta, T)
        decode_frames(path, wanted, meta)
    notes = []
    if len(plain.changes) > 1:
        sizes = ", ".join(f"{w}x{h} from frame {i}" for i, w, h in plain.changes)
        notes.append(f"frame size changes ({sizes}): frames scaled to the first frame's "
                     f"{meta.width}x{meta.height}")
    if meta.rotation:
        notes.append(f"display matrix turns it {meta.rotation} degrees: frames turned as players show them")
    return meta.num_frames, damage, notes


def unlisted_videos(name, root):
    """Videos inside the class folders of an hmdb51 or ucf101 root that no split file of any split names (a
    class folder without a split file included): the loaders never read them, so --check reports them."""
    listed, folders = set(), []
    if name == "hmdb51":
        split_dir = os.path.join(root, "testTrainMulti_7030_splits")
        for file in sorted(os.listdir(split_dir)):
            cls, sep, _ = file.partition("_test_split")
            if sep:
                listed |= {os.path.join(root, cls, line.rsplit(None, 1)[0])
                           for line in _read_lines(os.path.join(split_dir, file))}
        folders = [os.path.join(root, d) for d in sorted(os.listdir(root)) if d != "testTrainMulti_7030_splits"]
    elif name == "ucf101":
        videos = os.path.join(root, "UCF-101")
        videos = videos if os.path.isdir(videos) else root
        lists = os.path.join(root, "ucfTrainTestlist")
        for file in sorted(os.listdir(lists)):
            if file.startswith(("trainlist", "testlist")):
                for line in _read_lines(os.path.join(lists, file)):
                    parts = line.rsplit(None, 1)
                    listed.add(os.path.join(videos, parts[0] if len(parts) == 2 and parts[1].isdigit() else line))
        folders = [os.path.join(videos, d) for d in sorted(os.listdir(videos)) if d != "ucfTrainTestlist"]
    out = []
    for folder in folders:
        if os.path.isdir(folder):
            out += [os.path.join(folder, f) for f in sorted(os.listdir(folder))
                    if f.lower().endswith(VIDEO_EXTS) and os.path.join(folder, f) not in listed]
    return out


def check(name, root, split=1, workers=None, list_file=None, class_file=None, filename_tmpl="img_{:05d}.jpg",
          out=None, frames=8):
    """Print each split's size and frame counts, read every video as training does (check_video); return the
    number of bad files. A damaged video is listed as used or bad by the rule training applies with T =
    `frames`; a video the loader adapts (frame size change, rotation) is listed as used, with what it does."""
    out = out or sys.stdout
    workers = os.cpu_count() if workers is None else workers
    # list_file: (TRAIN, TEST) list files of dataset 'list', as train.py --list-file
    parts = list(zip(("train", "test"), (list_file or (None, None)) if name == "list" else (None, None)))
    bad = 0
    for mode, lf in parts:
        ds = build_dataset(name, root, split=split, mode=mode, list_file=lf, class_file=class_file,
                           filename_tmpl=filename_tmpl, frames=frames)
        print(f"{name} split {split} {mode}: {len(ds)} videos, {len(ds.classes)} classes", file=out)
        if name == "synthetic":
            continue
        loader = torch.utils.data.DataLoader(_CheckAll(ds), batch_size=None, num_workers=workers)
        counts, bad_here, damaged, adapted = [], [], [], []
        for i, n, damage, reason, notes in loader:
            if reason:
                bad_here.append((ds.samples[i][0], reason))
            else:
                counts.append(n)
            if damage:
                damaged.append((ds.samples[i][0], damage))
            adapted += [(ds.samples[i][0], note) for note in notes]
        if counts:
            print(f"  frames per video: min {min(counts)}, mean {statistics.fmean(counts):.1f}, "
                  f"max {max(counts)}", file=out)
            short = sum(n < frames for n in counts)  # sampled anyway: their clips repeat frames
            if short == len(counts):
                print(f"  every video is shorter than T={frames} frames (the longest has {max(counts)}): each "
                      f"clip repeats frames; train with a smaller --frames", file=out)
            elif short:
                print(f"  {short} of {len(counts)} videos are shorter than T={frames} frames: their clips repeat "
                      f"frames", file=out)
        for path, damage in damaged:
            print(f"  DAMAGED {path}: {damage}; used (at least T={frames} frames decode)", file=out)
        for path, note in adapted:
            print(f"  ADAPTED {path}: {note}; used", file=out)
        for path, reason in bad_here:
            print(f"  BAD {path}: {reason}", file=out)
        print(f"  {len(bad_here)} bad of {len(ds)}" + (f", {len(damaged)} damaged but used" if damaged else ""),
              file=out)
        bad += len(bad_here)
    unlisted = unlisted_videos(name, root) if name in ("hmdb51", "ucf101") else []
    if unlisted:
        print(f"{name}: {len(unlisted)} videos in class folders are in no split file (never read):", file=out)
        for path in unlisted:
            print(f"  UNLISTED {path}", file=out)
    return bad


# ------------------------------------------------------------------------------------------------------- main
def main(argv=None):
    class Parser(argparse.ArgumentParser):
        def error(self, message):  # one line, not the usage block
            self.exit(2, f"{self.prog}: error: {message} (see --help)\n")

    p = Parser(description="Check a dataset: decode every video as training does, list the bad ones (the loader "
               "benchmark is bench/loader.py).")
    p.add_argument("--dataset", choices=DATASETS, help="dataset name")
    p.add_argument("--root", help="dataset folder in its authors' layout")
    p.add_argument("--split", type=int, default=1, choices=(1, 2, 3), help="official split (hmdb51, ucf101)")
    p.add_argument("--list-file", nargs=2, metavar=("TRAIN", "TEST"),
                   help="dataset 'list': mmaction2 list files for training and testing (as train.py's)")
    p.add_argument("--class-file", help="dataset 'list': class names, one per line or id,name CSV")
    p.add_argument("--filename-tmpl", default="img_{:05d}.jpg", help="frame file names for frame-folder lists")
    p.add_argument("--workers", type=int, default=os.cpu_count(), help="decoding processes for --check")
    p.add_argument("--frames", type=int, default=8,
                   help="T you train with (TPR 16, BiEfficient 8): a damaged video is used if T frames decode")
    p.add_argument("--check", action="store_true",
                   help="read every video as training does, list bad files, exit 1 if any")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error (also: DEBUG=1)")
    args = p.parse_args(argv)
    if not args.check or args.dataset is None:
        p.error("give --dataset NAME --root DIR --check")
    if args.frames < 1:
        p.error(f"--frames {args.frames}: T must be a positive number of frames (TPR 16, BiEfficient 8)")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        bad = check(args.dataset, args.root, args.split, args.workers, args.list_file, args.class_file,
                    args.filename_tmpl, frames=args.frames)
    except (OSError, ValueError, KeyError) as e:  # layout errors: one clear line, no traceback
        if args.debug or os.environ.get("DEBUG") == "1":
            raise
        print(f"error: {e.args[0] if isinstance(e, KeyError) else e}", file=sys.stderr)
        return 2
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
