"""Datasets, frame sampling, augmentation and fast video decoding for both papers.

Implements the data side of TPR (Electronics 2024, Sec. 4 and Table 2: TSN sparse sampling of T frames,
RandomSizedCrop 224, flip 0.5, grayscale 0.2; RandAugment and random erasing on SSv1, Sec. 4.4; K-shot
training, Sec. 4.3; 1 and 4x3 test views) and BiEfficient (ACCV 2024, Sec. 4: Kinetics-400 closed set,
zero-shot transfer to HMDB-51 / UCF-101 over their three splits). Sampling mirrors TSN / mmaction2
`SampleFrames`; the training crop mirrors mmaction2 `MultiScaleCrop` as used by X-CLIP and ActionCLIP.

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
  synthetic  generated on the fly, no files: a shape over a textured background; classes are time-reversed
             twins ('moving left'/'moving right', ...), so a frame-averaging model cannot tell twins apart

Interface used by the training engine:
  build_dataset(name, root, split, mode, frames, input_size, views, sampling, shots, seed, flip, randaugment,
                random_erasing, list_file, class_file, filename_tmpl, ...) -> torch Dataset with
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
            "replaced"}
  A sample whose file is corrupt, truncated, empty or undecodable is replaced by the next readable sample of
  the same class (fixed order, so deterministic), the path is logged once with its reason (once over all worker
  processes), and "replaced" is 1: the engine's epoch summary sums batch["replaced"] or asks bad_count().
  chinese_labels(dataset, class_names, path=None), class_text(name), few_shot(...), zero_shot_protocol(...).

Decoding: PyAV with codec threading. Each video is demuxed once per process (packets only, no decoding, a few
ms; cached) to count its frames and find its keyframes; the container's header count is only trusted as far as
the packets back it (a file holding fewer packets than its header claims is truncated). Then for each needed
frame the decoder seeks to the keyframe before it, unless it is already past that keyframe, and decodes forward
to the frame; only needed frames are converted to RGB. The gain depends on the keyframe interval: large for
mpeg4 / short GOPs (HMDB51, UCF101), small for files with one keyframe every 250 frames.

CLI: `python data.py --dataset NAME --root DIR [--split K] --check` decodes every video once and lists the bad
ones (exit 1 if any); `python data.py --bench` compares this loader with a decode-everything loader.
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
import sys
import tempfile
import time
import weakref

import av
import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageOps

log = logging.getLogger("data")

DATASETS = ("hmdb51", "ucf101", "ssv1", "k400", "list", "synthetic")
MODES = ("train", "test")
SAMPLINGS = ("sparse", "dense")
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
FRAME_COUNT_SLACK = 2  # frames a container header may over-count before we call the file truncated
# Choice: non-reference frames are skipped while the decoder is more than SKIP_MARGIN frames before a needed
# frame; the margin exceeds B-frame reordering plus frame-thread delay, so no needed frame is ever skipped.
SKIP_MARGIN = 64
SYNTHETIC_CLASSES = ("moving left", "moving right", "moving up", "moving down",
                     "growing", "shrinking", "getting brighter", "getting darker")
SYNTHETIC_STEPS = 4096  # time grid of a synthetic video
SYNTHETIC_CHINESE = {"moving left": "向左移动", "moving right": "向右移动", "moving up": "向上移动",
                     "moving down": "向下移动", "growing": "变大", "shrinking": "变小",
                     "getting brighter": "变亮", "getting darker": "变暗"}


class BadVideo(Exception):
    """A video (or frame folder) that cannot be read; the message is the reason."""


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
        with open(path, encoding="utf-8") as f:
            text = f.read()
        try:
            table = json.loads(text)
        except json.JSONDecodeError:
            table = {}
            for n, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                if "\t" not in line:
                    raise ValueError(f"{path}:{n}: expected 'english<TAB>chinese', got {line!r}")
                en, zh = line.split("\t", 1)
                table[en.strip()] = zh.strip()
        if not isinstance(table, dict):
            raise ValueError(f"{path}: expected a JSON object {{english: chinese}}, got {type(table).__name__}")
    missing = [c for c in class_names if c not in table]
    if missing:
        raise KeyError(f"{path or 'synthetic'}: no Chinese label for {len(missing)} classes: {missing}")
    return [table[c] for c in class_names]


# ------------------------------------------------------------------------------------------------- sampling
def sample_indices(num_frames, T, mode="train", rng=None, clips=1, clip=0, sampling="sparse", interval=None):
    """Frame indices of one clip of T frames from a video of `num_frames` frames.

    sparse (TSN): the video is cut into T equal segments; training takes a random frame of each segment,
    testing the centre of each segment, shifted to (clip + 0.5) / clips of it for multi-clip testing.
    dense: T frames `interval` apart; random start in training, `clips` starts spread evenly in testing."""
    n = num_frames
    assert n > 0 and T > 0, f"need frames, got num_frames={n}, T={T}"
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


# ------------------------------------------------------------------------------------------------- decoding
class VideoMeta:
    """What one demux pass tells about a video: frame count, fps, timestamps and keyframe positions."""

    __slots__ = ("num_frames", "start", "step", "key_idx", "key_pts")

    def __init__(self, num_frames, start, step, key_idx, key_pts):
        self.num_frames, self.start, self.step = num_frames, start, step
        self.key_idx, self.key_pts = key_idx, key_pts

    def index(self, pts):
        # Choice: frame index from the timestamp at the average frame rate (constant frame rate, as in all
        # the datasets here); a variable-rate file gets the frame nearest in time.
        return int(round((pts - self.start) / self.step))


def _open(path):
    if not os.path.exists(path):
        raise BadVideo("file not found")
    if os.path.getsize(path) == 0:
        raise BadVideo("zero-byte file")
    try:
        container = av.open(path)
    except (av.FFmpegError, OSError, ValueError) as e:
        raise BadVideo(f"cannot open: {e}") from None
    if not container.streams.video:
        container.close()
        raise BadVideo("no video stream")
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"  # codec threading (frame and slice)
    return container, stream


def probe_video(path):
    """Demux every packet once (no decoding) to count frames and find keyframes; BadVideo if unreadable."""
    container, stream = _open(path)
    try:
        rate = stream.average_rate or stream.guessed_rate
        if not rate or stream.time_base is None:
            raise BadVideo("no frame rate in the container")
        step = float(1 / (rate * stream.time_base))  # timestamp ticks per frame
        pts, keys = [], []
        for packet in container.demux(stream):
            if packet.pts is None:
                continue  # the flush packet at the end
            pts.append(packet.pts)
            keys.append(packet.is_keyframe)
    except av.FFmpegError as e:
        raise BadVideo(f"cannot demux: {e}") from None
    finally:
        container.close()
    if not pts:
        raise BadVideo("no video frames")
    header = stream.frames
    # The header count (AVI `strh`, MP4 `stts`) is what the file claims; a file cut short holds fewer packets.
    if header > 0 and len(pts) + FRAME_COUNT_SLACK < header:
        raise BadVideo(f"truncated: container says {header} frames, file holds {len(pts)}")
    start = min(pts)
    order = sorted(range(len(pts)), key=pts.__getitem__)
    key_pts = [pts[i] for i in order if keys[i]] or [start]
    meta = VideoMeta(len(pts), start, step, None, np.asarray(key_pts, dtype=np.int64))
    meta.key_idx = np.asarray([meta.index(p) for p in key_pts], dtype=np.int64)
    return meta


def decode_frames(path, indices, meta):
    """RGB frames (len(indices), H, W, 3) uint8 at `indices`, decoding only from the keyframe before each."""
    wanted = sorted(set(indices))
    got = {}
    container, stream = _open(path)
    try:
        frames_iter, pos, last = None, -1, None
        pending = list(wanted)  # still to fill, ascending
        while pending:
            target = pending[0]
            k = bisect.bisect_right(meta.key_idx, target) - 1
            key = int(meta.key_idx[max(k, 0)])
            if frames_iter is None or key > pos:  # seeking helps only if the keyframe lies ahead of the decoder
                container.seek(int(meta.key_pts[max(k, 0)]), stream=stream, backward=True)
                frames_iter = container.decode(stream)
                pos = key
            # Far from the target (long GOPs), frames no other frame refers to need not be decoded at all.
            stream.codec_context.skip_frame = "NONREF" if target - pos > SKIP_MARGIN else "DEFAULT"
            for frame in frames_iter:
                if frame.pts is None:
                    continue
                pos = meta.index(frame.pts)
                if pos < target:
                    if target - pos <= SKIP_MARGIN:
                        stream.codec_context.skip_frame = "DEFAULT"
                    continue
                last = frame.to_ndarray(format="rgb24")
                while pending and pending[0] <= pos:  # a dropped frame takes the next one shown
                    got[pending.pop(0)] = last
                break
            else:  # end of stream before `target`
                if last is None or len(pending) > FRAME_COUNT_SLACK:
                    raise BadVideo(f"truncated: frame {target} of {meta.num_frames} not decodable")
                for i in pending:
                    got[i] = last
                pending = []
    except av.FFmpegError as e:
        raise BadVideo(f"decode error: {e}") from None
    finally:
        container.close()
    return np.stack([got[i] for i in indices])


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


# ------------------------------------------------------------------------------------------------ transforms
def _normalise(x):
    """(..., 3, H, W) float in [0, 255] -> CLIP-normalised."""
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1) * 255
    std = torch.tensor(CLIP_STD).view(3, 1, 1) * 255
    return (x - mean).div_(std)


def _crop_resize(frames, box, size):
    """Crop box (y0, x0, h, w) of uint8 frames (T, H, W, 3) and resize it to (T, 3, size, size) float."""
    y0, x0, h, w = box
    # PIL's resize with a box crops and resamples in one uint8 pass (antialiased when shrinking), several
    # times faster than a float interpolate of the whole clip.
    out = np.stack([np.asarray(Image.fromarray(f).resize((size, size), Image.BILINEAR, box=(x0, y0, x0 + w, y0 + h)))
                    for f in frames])  # (T, size, size, 3)
    return torch.from_numpy(out).permute(0, 3, 1, 2).float()  # (T, 3, size, size)


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


def train_transform(frames, rng, size=224, flip=True, randaugment=False, random_erasing=False):
    """uint8 (T, H, W, 3) -> (T, 3, size, size) normalised; one augmentation draw shared by all frames."""
    H, W = frames.shape[1:3]
    x = _crop_resize(frames, _multiscale_box(H, W, size, rng), size)  # (T, 3, S, S)
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
    centre size/R of the short side; done as one crop-and-resize of the matching box of the original frame."""
    if crops not in (1, 3):
        raise ValueError(f"spatial crops {crops} not in (1, 3)")
    resize = size if resize is None else resize
    if resize < size:
        raise ValueError(f"test resize {resize} is smaller than the crop size {size}")
    H, W = frames.shape[1:3]
    c = min(H, W) * size / resize  # the crop's side in original pixels
    short_offset = (min(H, W) - c) / 2
    long_side = max(H, W)
    offsets = [(long_side - c) / 2] if crops == 1 else [0, (long_side - c) / 2, long_side - c]
    if resize == size:  # whole pixels, as before
        c, short_offset, offsets = int(c), 0, [int(o) for o in offsets]
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

    def _marker(self, path):
        return os.path.join(self._bad_dir, hashlib.sha1(path.encode()).hexdigest())

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
        log.warning("bad video %s (%s): replaced by another video of its class", path, reason)

    def bad_files(self):
        """{path: reason} for every unreadable video met so far in this process or its workers."""
        out = {}
        for name in os.listdir(self._bad_dir):
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
        raise RuntimeError(f"every video of class {self.classes[label]!r} is unreadable: "
                           f"{[self.samples[j][0] for j in members]}")

    def _clip_indices(self, n, rng):
        if self.mode == "train":
            return [sample_indices(n, self.T, "train", rng, sampling=self.sampling, interval=self.interval)]
        return [sample_indices(n, self.T, "test", clips=self.clips, clip=c, sampling=self.sampling,
                               interval=self.interval) for c in range(self.clips)]

    def _views(self, frames_per_clip, rng):
        """frames_per_clip: list of uint8 (T, H, W, 3) -> train (T, 3, S, S) or test (V, T, 3, S, S)."""
        if self.mode == "train":
            return train_transform(frames_per_clip[0], rng, self.input_size, self.flip, self.randaugment,
                                   self.random_erasing)
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

    def probe(self, path):
        """Frame count (and keyframes, for videos) of one sample; counted once per process and cached."""
        if self.frame_dirs:
            if path not in self._num_frames:
                self._num_frames[path] = count_frame_dir(path, self.filename_tmpl, self.start_index)
            return self._num_frames[path]
        if path not in self._meta:
            self._meta[path] = probe_video(path)
        return self._meta[path]

    def _load(self, j, rng):
        path = self.samples[j][0]
        info = self.probe(path)
        n = info if self.frame_dirs else info.num_frames
        clips = self._clip_indices(n, rng)
        flat = sorted({i for c in clips for i in c})
        if self.frame_dirs:
            arr = read_frame_dir(path, flat, self.filename_tmpl, self.start_index)
        else:
            arr = decode_frames(path, flat, info)
        pos = {i: k for k, i in enumerate(flat)}
        return self._views([arr[[pos[i] for i in c]] for c in clips], rng)


class SyntheticVideos(_Base):
    """Clips of a shape over a textured background, generated from (seed, split, index); no files.

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
        return torch.cat([test_crops(o, S, self.crops) for o in out])


def g_state(g):
    """Per-video drawing parameters from the video's generator (same for every clip of the video)."""
    return {"texture": g.integers(0, 256, (6, 6, 3), dtype=np.uint8), "color": g.integers(0, 256, 3),
            "radius": g.uniform(0.12, 0.2), "a": g.uniform(0.15, 0.35), "b": g.uniform(0.65, 0.85),
            "c": g.uniform(0.3, 0.7), "noise": int(g.integers(0, 1 << 31))}


def render_synthetic(label, times, p, H, W):
    """Frames (len(times), H, W, 3) uint8 of class `label` at times in [0, 1], drawn with parameters p."""
    pair, backwards = divmod(label, 2)
    # Choice: a low-contrast texture around mid-grey (128 +- 32) so that the shape dominates the frame; the frozen
    # random towers of the demo see mostly the background otherwise (their frame features nearly collinear).
    bg = np.asarray(Image.fromarray(p["texture"]).resize((W, H), Image.BICUBIC), dtype=np.float32)
    bg = 122 + (bg - 128) * 0.25
    bg += np.random.default_rng(p["noise"]).normal(0, 3, (H, W, 3)).astype(np.float32)  # static sensor noise
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
        r = 0.08 + 0.3 * (travel - 0.15)  # class 4 grows
    else:
        bright = 0.25 + 1.5 * (travel - 0.15)  # class 6 gets brighter
    yy = (np.arange(H, dtype=np.float32) / H)[None, :, None]  # (1, H, 1)
    xx = (np.arange(W, dtype=np.float32) / W)[None, None, :]  # (1, 1, W)
    inside = (xx - cx[:, None, None]) ** 2 + (yy - cy[:, None, None]) ** 2 < (r * r)[:, None, None]  # (T, H, W)
    color = (140 + p["color"] * 0.25).astype(np.float32)  # (3,) brighter than any background pixel
    shape = color * bright[:, None, None, None]  # (T, 1, 1, 3)
    img = np.where(inside[..., None], shape, bg[None])  # (T, H, W, 3)
    return np.clip(img, 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------------- layouts
VIDEO_EXTS = (".avi", ".mp4", ".mkv", ".webm", ".mov", ".m4v")
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


def _read_lines(path):
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


def _check_on_disk(samples, name, is_dir=False):
    missing = [p for p, _ in samples if not (os.path.isdir(p) if is_dir else os.path.isfile(p))]
    if missing:
        raise FileNotFoundError(f"{len(missing)} {name} split entries are not on disk, e.g. {missing[:5]}; "
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
    samples = []
    for label, (cls, file) in enumerate(zip(classes, files)):
        for line in _read_lines(os.path.join(split_dir, file)):
            video, vid = line.split()[:2]
            if vid in ids:
                samples.append((os.path.join(root, cls, video), label))
    _check_on_disk(samples, "hmdb51")
    return classes, samples


def _ucf101(root, split, part):
    videos = os.path.join(root, "UCF-101")
    videos = videos if os.path.isdir(videos) else root
    lists = _need(os.path.join(root, "ucfTrainTestlist"), "split folder", "ucf101")
    index = [line.split() for line in _read_lines(_need(os.path.join(lists, "classInd.txt"), "file", "ucf101"))]
    classes = [name for _, name in sorted(index, key=lambda x: int(x[0]))]  # classInd ids are 1-based
    by_name = {c.lower(): i for i, c in enumerate(classes)}
    samples = []
    for kind in (("train", "test") if part == "all" else (part,)):
        file = _need(os.path.join(lists, f"{kind}list0{split}.txt"), "split file", "ucf101")
        for line in _read_lines(file):
            rel = line.split()[0]
            cls = rel.split("/")[0]
            if cls.lower() not in by_name:
                raise ValueError(f"{file}: class folder {cls!r} of {rel!r} is not in classInd.txt")
            samples.append((os.path.join(videos, rel), by_name[cls.lower()]))
    _check_on_disk(samples, "ucf101")
    return classes, samples


def _ssv1(root, part):
    frames = os.path.join(root, "20bn-something-something-v1")
    frames = frames if os.path.isdir(frames) else root
    classes = _read_lines(_need(os.path.join(root, "something-something-v1-labels.csv"), "label file", "ssv1"))
    by_name = {c: i for i, c in enumerate(classes)}
    samples = []
    for kind in (("train", "validation") if part == "all" else ("train" if part == "train" else "validation",)):
        file = _need(os.path.join(root, f"something-something-v1-{kind}.csv"), "split file", "ssv1")
        for line in _read_lines(file):
            vid, label = line.split(";", 1)
            if label not in by_name:
                raise ValueError(f"{file}: label {label!r} of video {vid} is not in something-something-v1-labels.csv")
            samples.append((os.path.join(frames, vid), by_name[label]))
    _check_on_disk(samples, "ssv1", is_dir=True)
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
    samples, classes = [], None
    if os.path.isdir(ann):
        def csv_for(kind):
            for n in (("train",) if kind == "train" else ("val", "validate", "validation")):
                if os.path.isfile(os.path.join(ann, n + ".csv")):
                    return os.path.join(ann, n + ".csv")
            raise FileNotFoundError(f"no train/val CSV in {ann}; k400 expects {LAYOUTS['k400']}")

        def rows(kind):
            with open(csv_for(kind), newline="", encoding="utf-8") as f:
                return list(csv.DictReader(f))
        classes = sorted({r["label"] for r in rows("train")})
        by_name = {c: i for i, c in enumerate(classes)}
        for kind in kinds:
            sub = _k400_split_dir(root, kind)
            for r in rows(kind):
                file = f"{r['youtube_id']}_{int(float(r['time_start'])):06d}_{int(float(r['time_end'])):06d}.mp4"
                nested = os.path.join(root, sub, r["label"], file)
                path = nested if os.path.exists(nested) else os.path.join(root, sub, file)
                if r["label"] not in by_name:
                    raise ValueError(f"{csv_for(kind)}: label {r['label']!r} is not a training class")
                samples.append((path, by_name[r["label"]]))
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
    _check_on_disk(samples, "k400")
    return classes, samples


def read_class_file(path):
    """Class names from a file of one name per line, or an `id,name` CSV (header optional)."""
    lines = _read_lines(_need(path, "class file", "list"))
    if lines and all("," in l for l in lines):
        rows = [l.split(",", 1) for l in lines]
        if not rows[0][0].strip().isdigit():
            rows = rows[1:]  # header such as id,name
        return [name.strip() for _, name in sorted(rows, key=lambda r: int(r[0]))]
    return lines


def _list(root, list_file, class_file):
    if list_file is None or class_file is None:
        raise ValueError("dataset 'list' needs list_file (--list-file) and class_file (--class-file)")
    classes = read_class_file(class_file)
    samples, counts, kinds = [], {}, set()
    for n, line in enumerate(_read_lines(_need(list_file, "list file", "list")), 1):
        parts = line.split()
        if len(parts) >= 3 and parts[-2].isdigit() and parts[-1].lstrip("-").isdigit():
            path, count, label = " ".join(parts[:-2]), int(parts[-2]), int(parts[-1])
            kinds.add("frames")
        elif len(parts) >= 2 and parts[-1].lstrip("-").isdigit():
            path, count, label = " ".join(parts[:-1]), None, int(parts[-1])
            kinds.add("video")
        else:
            raise ValueError(f"{list_file}:{n}: expected `path label` or `dir num_frames label`, got {line!r}")
        if not 0 <= label < len(classes):
            raise ValueError(f"{list_file}:{n}: label {label} outside 0..{len(classes) - 1} of {class_file}")
        path = os.path.join(root, path) if root else path
        samples.append((path, label))
        if count is not None:
            counts[path] = count
    if len(kinds) > 1:
        raise ValueError(f"{list_file}: mixes video lines and frame-folder lines; use one kind per list")
    frame_dirs = kinds == {"frames"}
    _check_on_disk(samples, "list", is_dir=frame_dirs)
    return classes, samples, frame_dirs, counts


def build_dataset(name, root=None, split=1, mode="train", frames=8, input_size=224, views="1x1", sampling="sparse",
                  shots=None, seed=0, flip=True, randaugment=False, random_erasing=False, list_file=None,
                  class_file=None, filename_tmpl="img_{:05d}.jpg", interval=None, videos_per_class=16,
                  shots_dir=None):
    """One split of a dataset as a torch Dataset (see the module docstring for the items).

    name: one of DATASETS; root: the dataset folder in its authors' layout (LAYOUTS); split: 1..3 for hmdb51 and
    ucf101; mode: 'train' (random TSN offsets, augmentation) or 'test' (segment centres, `views` clips x crops);
    mode 'all' (zero-shot) reads every labelled video of split 1 with test sampling; frames: T; shots: K videos
    per class drawn with `seed` (list written to `shots_dir`); interval: dense sampling stride."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid: {DATASETS}")
    if mode not in MODES + ("all",):
        raise ValueError(f"mode {mode!r} not in {MODES + ('all',)}")
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
        if name != "list" or mode == "train":
            _check_classes(samples, classes, name, mode)
        if name == "ssv1" and flip:
            # Paper: TPR Sec. 4.4 lists no flip for SSv1; its labels name left and right, a flip changes the class.
            log.warning("ssv1: horizontal flip is off (its labels name left and right); flip=True ignored")
            flip = False
        ds = VideoDataset(name, classes, samples, flip=flip, randaugment=randaugment, random_erasing=random_erasing,
                          interval=interval, frame_dirs=frame_dirs, num_frames=counts, filename_tmpl=tmpl, **opts)
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


# ------------------------------------------------------------------------------------------------------ check
class _CheckAll(torch.utils.data.Dataset):
    """Decodes every frame of every sample once: (index, frames, reason or '')."""

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
                return i, n, ""
            meta = probe_video(path)
            container, stream = _open(path)
            try:
                decoded = sum(1 for _ in container.decode(stream))
            except av.FFmpegError as e:
                raise BadVideo(f"decode error: {e}") from None
            finally:
                container.close()
            if decoded + FRAME_COUNT_SLACK < meta.num_frames:
                raise BadVideo(f"truncated: {meta.num_frames} frames in the container, {decoded} decodable")
            return i, meta.num_frames, ""
        except BadVideo as e:
            return i, 0, str(e)


def check(name, root, split=1, workers=None, list_file=None, class_file=None, filename_tmpl="img_{:05d}.jpg",
          out=None):
    """Print each split's size and frame counts, decode every video once; return the number of bad files."""
    out = out or sys.stdout
    workers = os.cpu_count() if workers is None else workers
    parts = [("train", list_file), ("test", None)] if name != "list" else [("train", list_file)]
    bad = 0
    for mode, lf in parts:
        ds = build_dataset(name, root, split=split, mode=mode, list_file=lf, class_file=class_file,
                           filename_tmpl=filename_tmpl)
        print(f"{name} split {split} {mode}: {len(ds)} videos, {len(ds.classes)} classes", file=out)
        if name == "synthetic":
            continue
        loader = torch.utils.data.DataLoader(_CheckAll(ds), batch_size=None, num_workers=workers)
        counts, bad_here = [], []
        for i, n, reason in loader:
            if reason:
                bad_here.append((ds.samples[i][0], reason))
            else:
                counts.append(n)
        if counts:
            print(f"  frames per video: min {min(counts)}, mean {sum(counts) / len(counts):.1f}, "
                  f"max {max(counts)}", file=out)
        for path, reason in bad_here:
            print(f"  BAD {path}: {reason}", file=out)
        print(f"  {len(bad_here)} bad of {len(ds)}", file=out)
        bad += len(bad_here)
    return bad


# ------------------------------------------------------------------------------------------------------ bench
def write_video(path, frames, fps=30, codec="mpeg4"):
    """Encode uint8 frames (T, H, W, 3) with PyAV (used by the tests and the benchmark)."""
    with av.open(path, "w") as c:
        s = c.add_stream(codec, rate=fps)
        s.height, s.width = frames.shape[1:3]
        s.pix_fmt = "yuv420p"
        if codec == "mpeg4":
            s.gop_size = 12
            # high quality, keyframes every 12 frames only (no extra ones at scene cuts): known GOPs for tests
            s.options = {"qscale": "2", "sc_threshold": "1000000000"}
        for f in frames:
            for p in s.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def naive_clip(path, T, rng, size=224):
    """What most peer loaders do: decode every frame to RGB, then sample T of them."""
    with av.open(path) as c:
        s = c.streams.video[0]
        s.thread_type = "AUTO"
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(s)]
    idx = sample_indices(len(frames), T, "train", rng)
    return train_transform(np.stack([frames[i] for i in idx]), rng, size)


def bench(videos=12, T=8, size=224, seconds=10, fps=30, width=320, height=240, repeats=3, out=None):
    """Clips per second of this loader and of the decode-everything loader on the same freshly made videos."""
    out = out or sys.stdout
    tmp = tempfile.mkdtemp(prefix="data_bench_")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a DataLoader worker, where torch runs one thread
    try:
        g = np.random.default_rng(0)
        n = seconds * fps
        for codec, ext, note in (("mpeg4", "avi", "HMDB/UCF style, GOP 12"),
                                 ("libx264", "mp4", "K400 style, x264 default GOP 250")):
            paths = []
            for v in range(videos):
                base = g.integers(0, 256, (height // 8, width // 8, 3), dtype=np.uint8).repeat(8, 0).repeat(8, 1)
                frames = np.stack([np.roll(base, 3 * i, axis=1) for i in range(n)])
                paths.append(os.path.join(tmp, f"{codec}_{v}.{ext}"))
                write_video(paths[-1], frames, fps, codec)
            best = {"naive": 1e9, "cold": 1e9, "warm": 1e9}
            for rep in range(repeats):  # best of `repeats`: the figures of a loaded machine are noisy
                rng = random.Random(rep)
                t0 = time.perf_counter()
                for p in paths:
                    naive_clip(p, T, rng, size)
                best["naive"] = min(best["naive"], time.perf_counter() - t0)
                ds = VideoDataset("bench", ["x"], [(p, 0) for p in paths], mode="train", frames=T, input_size=size,
                                  seed=rep)
                for key in ("cold", "warm"):  # cold: first epoch, includes the one demux pass per video
                    t0 = time.perf_counter()
                    for i in range(len(ds)):
                        ds[i]
                    best[key] = min(best[key], time.perf_counter() - t0)
                    ds.set_epoch(1)
            print(f"{codec} .{ext} ({note}), {videos} videos of {seconds} s, {fps} fps, {width}x{height}, "
                  f"T={T}, crop {size}, 1 process, best of {repeats}:", file=out)
            print(f"  naive decode-all loader : {videos / best['naive']:7.1f} clips/s", file=out)
            for key, what in (("cold", "first epoch"), ("warm", "later epoch")):
                print(f"  this loader, {what}: {videos / best[key]:7.1f} clips/s  "
                      f"({best['naive'] / best[key]:.1f}x)", file=out)
    finally:
        torch.set_num_threads(threads)
        shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------------------------------------------- main
def main(argv=None):
    p = argparse.ArgumentParser(description="Check a dataset (--check) or benchmark decoding (--bench).")
    p.add_argument("--dataset", choices=DATASETS, help="dataset name")
    p.add_argument("--root", help="dataset folder in its authors' layout")
    p.add_argument("--split", type=int, default=1, choices=(1, 2, 3), help="official split (hmdb51, ucf101)")
    p.add_argument("--list-file", help="list file for --dataset list")
    p.add_argument("--class-file", help="class-name file for --dataset list")
    p.add_argument("--filename-tmpl", default="img_{:05d}.jpg", help="frame file names for frame-folder lists")
    p.add_argument("--workers", type=int, default=os.cpu_count(), help="decoding processes for --check")
    p.add_argument("--check", action="store_true", help="decode every video once, list bad files, exit 1 if any")
    p.add_argument("--bench", action="store_true", help="clips/s of this loader vs a decode-everything loader")
    p.add_argument("--bench-videos", type=int, default=12, help="videos per codec in --bench")
    args = p.parse_args(argv)
    if args.bench:
        bench(videos=args.bench_videos)
        return 0
    if not args.check or args.dataset is None:
        p.error("give --bench, or --dataset NAME --root DIR --check")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        bad = check(args.dataset, args.root, args.split, args.workers, args.list_file, args.class_file,
                    args.filename_tmpl)
    except (OSError, ValueError, KeyError) as e:  # layout errors: one clear line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
