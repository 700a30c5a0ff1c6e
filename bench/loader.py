"""Video loader benchmark: data.py's decoder against a decode-everything loader, decord and torchcodec.

    python bench/loader.py                       # every kind, T = 8 and 16, 3 videos of 10 s, 5 rounds
    python bench/loader.py --seconds 4 --rounds 3 --videos 2 --no-threads --no-items   # a short run

Each kind of file (codec, container, size, GOP) is generated with PyAV; every loader first returns the frames of
one test clip and the last frame, checked against a plain full decode, then the rows are timed **interleaved**:
round r runs every row once (A B C A B C ..., the order rotated each round) and each figure is the median over
the rounds, so a machine whose load drifts shifts every row alike. Every row prints wall seconds and CPU seconds
(all threads of the process) per clip; the ratios compare CPU seconds per clip, the figure that holds when
DataLoader workers keep every core busy, and wall clock in one process. The load average is printed at the start
and the end: figures taken on a loaded machine say so.

Rows: "this loader" (decode_frames as one process calls it: probed per call, its thread choice), "this loader,
worker" (as inside a DataLoader worker after the first epoch: probe cached, one decoder thread), the
decode-everything loader (what most peer loaders do), decord and torchcodec (when installed; benchmark-only
references, never imported by data.py). Then the codec threading (one process and DataLoader workers) and the
dataset items (decode + transform), both interleaved as well.
"""
import argparse
import os
import random
import resource
import shutil
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import av  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

import data  # noqa: E402


def write_video(path, frames, fps=30, codec="mpeg4", gop=12, tag=None, bframes=0):
    """Encode uint8 frames (T, H, W, 3) with PyAV (used by the tests and the benchmark), the container chosen by
    the file name; libx264 uses `gop` with its other defaults (3 B-frames), mpeg4 and mpeg2video `gop` and
    `bframes`, `tag` a FourCC such as 'XVID'; mjpeg (every frame a keyframe) and libvpx-vp9 (`gop`) too."""
    with av.open(path, "w") as c:
        s = c.add_stream(codec, rate=fps)
        s.height, s.width = frames.shape[1:3]
        s.pix_fmt = "yuvj420p" if codec == "mjpeg" else "yuv420p"
        if tag:
            s.codec_tag = tag
        if codec in ("mpeg4", "mpeg2video", "mjpeg"):
            s.gop_size = gop
            s.codec_context.max_b_frames = bframes
            # high quality, keyframes every `gop` frames only (no extra ones at scene cuts): known GOPs for tests
            s.options = {"qscale": "2", "sc_threshold": "1000000000"}
        elif codec == "libx264":
            s.options = {"x264-params": f"keyint={gop}:min-keyint={gop}:scenecut=0", "preset": "veryfast"}
        elif codec == "libvpx-vp9":
            s.options = {"g": str(gop), "deadline": "realtime", "cpu-used": "8"}
        for f in frames:
            for p in s.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def _decode_everything(path):
    with av.open(path) as c:
        s = c.streams.video[0]
        s.thread_type = "AUTO"
        return [f.to_ndarray(format="rgb24") for f in c.decode(s)]


def naive_frames(path, indices):
    """What most peer loaders do: decode every frame to RGB, then pick the ones asked for."""
    frames = _decode_everything(path)
    return np.stack([frames[i] for i in indices])


def naive_clip(path, T, rng, size=224):
    """The decode-everything loader with the training transform."""
    frames = _decode_everything(path)
    idx = data.sample_indices(len(frames), T, "train", rng)
    return data.train_transform(np.stack([frames[i] for i in idx]), rng, size)


# (what, codec, extension, width, height, GOP, FourCC, B-frames): the forms users' files come in
KINDS = (("mpeg4 .avi 320x240 GOP 12 (HMDB51/UCF101)", "mpeg4", "avi", 320, 240, 12, None, 0),
         ("xvid .avi 320x240 GOP 12, B-frames", "mpeg4", "avi", 320, 240, 12, "XVID", 2),
         ("x264 .mp4 340x256 GOP 12", "libx264", "mp4", 340, 256, 12, None, 0),
         ("x264 .mp4 340x256 GOP 250", "libx264", "mp4", 340, 256, 250, None, 0),
         ("x264 .mp4 640x360 GOP 12", "libx264", "mp4", 640, 360, 12, None, 0),
         ("x264 .mp4 640x360 GOP 250 (K400)", "libx264", "mp4", 640, 360, 250, None, 0),
         ("x264 .ts 640x360 GOP 30, B-frames (broadcast)", "libx264", "ts", 640, 360, 30, None, 0),
         ("mpeg2 .mpg 640x360 GOP 15, B-frames (camera, DVD)", "mpeg2video", "mpg", 640, 360, 15, None, 2),
         ("mjpeg .avi 320x240 (every frame a keyframe)", "mjpeg", "avi", 320, 240, 1, None, 0),
         ("vp9 .webm 640x360 GOP 60", "libvpx-vp9", "webm", 640, 360, 60, None, 0))


def bench_video(path, kind, seed, n):
    """A video of `kind` with n frames: a texture drifting right and down, a bright square crossing it (real
    motion for the encoder)."""
    _, codec, _, W, H, gop, tag, bframes = kind
    g = np.random.default_rng(seed)
    base = g.integers(0, 256, (H // 8 + 16, W // 8 + n, 3), dtype=np.uint8).repeat(8, 0).repeat(8, 1)
    frames = np.stack([base[i % 64:i % 64 + H, 3 * i:3 * i + W] for i in range(n)])
    for i in range(n):
        y, x = (7 * i) % (H - 40), (11 * i) % (W - 40)
        frames[i, y:y + 40, x:x + 40] = 255
    write_video(path, frames, 30, codec, gop, tag, bframes)


def reference_loaders():
    """decord and torchcodec when importable (benchmark only, never a requirement), else why not."""
    loaders, missing = {}, []
    try:
        import decord
        loaders["decord"] = lambda p, idx: decord.VideoReader(p, ctx=decord.cpu(0)).get_batch(idx).asnumpy()
    except Exception as e:  # ImportError, or a build that cannot load its libraries
        missing.append(f"decord ({type(e).__name__}: {e})")
    try:
        from torchcodec.decoders import VideoDecoder

        def torchcodec_frames(p, idx):
            return VideoDecoder(p, seek_mode="exact").get_frames_at(list(idx)).data.permute(0, 2, 3, 1).numpy()
        loaders["torchcodec"] = torchcodec_frames
    except Exception as e:
        missing.append(f"torchcodec ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
    return loaders, missing


def compare(name, got, truth, idx, out):
    """Print where a loader's frames differ from the plain decode's frames at the same indices; True if it
    returned the right frames (colour conversion aside)."""
    if got.shape != (len(idx),) + truth.shape[1:]:
        print(f"    {name}: shape {got.shape}, expected {(len(idx),) + truth.shape[1:]}", file=out)
        return False
    small = truth[:, ::8, ::8].astype(np.int16)  # (n, H/8, W/8, 3) to find which frame a returned one is
    wrong, worst = [], 0
    for k, i in enumerate(idx):
        worst = max(worst, int(np.abs(got[k].astype(np.int16) - truth[i]).max()))
        seen = int(np.abs(small - got[k, ::8, ::8]).mean(axis=(1, 2, 3)).argmin())
        if seen != i:
            wrong.append((i, seen))
    if wrong:
        print(f"    {name}: WRONG FRAMES (index, frame returned): {wrong[:8]}", file=out)
    elif worst:
        print(f"    {name}: same frames, pixels differ by up to {worst} levels (colour conversion)", file=out)
    return not wrong


def timed(fn):
    """(wall seconds, CPU seconds of all this process's threads) of one call of fn()."""
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t0, time.process_time() - c0


def interleaved(rows, rounds):
    """{name: (median wall s, median CPU s)} of rows {name: fn}, run in `rounds` rounds, every row once per
    round (A B C A B C ...), the order rotated each round so no row always follows the same one."""
    times = {name: [] for name in rows}
    names = list(rows)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            times[name].append(rows[name]())
    return {name: (statistics.median(w for w, _ in t), statistics.median(c for _, c in t))
            for name, t in times.items()}


def load_average():
    try:
        return "load average {:.2f} {:.2f} {:.2f} (1, 5, 15 min)".format(*os.getloadavg())
    except OSError:
        return "load average unknown"


def bench(videos=3, Ts=(8, 16), seconds=10, rounds=5, workers=2, kinds=KINDS, threads=True, items=True,
          out=None):
    """Seconds per test clip (TSN centres) of T full-size RGB frames, the file opened each time, of this loader,
    the decode-everything loader, decord and torchcodec, interleaved, medians of `rounds`; after a check that
    all return the same frames. Then the codec threading and the dataset's items (decode + transform)."""
    out = out or sys.stdout
    tmp = tempfile.mkdtemp(prefix="loader_bench_")
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a DataLoader worker, where torch runs one thread
    n = seconds * 30
    refs, missing = reference_loaders()
    print(f"bench/loader.py: {videos} videos of {seconds} s at 30 fps per kind, medians of {rounds} interleaved "
          f"rounds, {os.cpu_count()} CPU cores, 1 torch thread, {load_average()}; one test clip (TSN centres) per "
          "video, full-size RGB, the file opened each time. Per clip: wall ms | CPU ms (all threads counted). "
          "Ratios: the others' time over ours (> 1: ours is faster); CPU: 'this loader, worker' (one decoder "
          "thread, what each DataLoader worker runs), wall: 'this loader' (one process)", file=out)
    for m in missing:
        print(f"  not measured: {m}", file=out)
    summary = []
    try:
        for k, kind in enumerate(kinds):
            paths = [os.path.join(tmp, f"{k}_{v}.{kind[2]}") for v in range(videos)]
            for v, p in enumerate(paths):
                bench_video(p, kind, v, n)
            metas = {p: data.probe_video(p) for p in paths}
            loaders = {"this loader": lambda p, idx: data.decode_frames(p, idx),
                       "this loader, worker": lambda p, idx: data.decode_frames(p, idx, metas[p], threads="NONE"),
                       "decode-everything": naive_frames, **refs}
            print(f"{kind[0]}:", file=out)
            truth = naive_frames(paths[0], range(metas[paths[0]].num_frames))
            check_idx = data.sample_indices(len(truth), 16, "test") + [len(truth) - 1, 5, 5, 0]
            wrong = set()  # loaders that return other frames: still timed, their ratios marked
            for name, load in list(loaders.items()):  # the same frames at the same indices, first
                try:
                    if not compare(name, load(paths[0], check_idx), truth, check_idx, out):
                        wrong.add(name)
                except Exception as e:  # a reference loader that fails on this kind is left out of its figures
                    print(f"    {name}: FAILS ({type(e).__name__}: {str(e).splitlines()[0][:100]}), not timed",
                          file=out)
                    del loaders[name]
            for T in Ts:
                idx = {p: data.sample_indices(metas[p].num_frames, T, "test") for p in paths}
                got = interleaved({name: (lambda load=load: timed(lambda: [load(p, idx[p]) for p in paths]))
                                   for name, load in loaders.items()}, rounds)
                per = {name: (1e3 * w / len(paths), 1e3 * c / len(paths)) for name, (w, c) in got.items()}
                print(f"  T={T:2d} " + "  ".join(f"{name} {w:.1f} | {c:.1f}" for name, (w, c) in per.items()),
                      file=out)
                others = [name for name in per if not name.startswith("this")]
                cpu = {o: per[o][1] / per["this loader, worker"][1] for o in others}
                wall = {o: per[o][0] / per["this loader"][0] for o in others}
                print("        CPU: " + ", ".join(f"{cpu[o]:.2f}x {o}" for o in others)
                      + "   wall, one process: " + ", ".join(f"{wall[o]:.2f}x {o}" for o in others), file=out)
                summary.append((kind[0], T, cpu, wrong))
        if threads:
            bench_threads(tmp, kinds, Ts[-1], rounds, workers, out)
        if items:
            bench_items(tmp, kinds, Ts, rounds, out)
        print("CPU-time ratios (the others' CPU seconds per clip over this loader's in a worker; > 1: ours "
              "cheaper):", file=out)
        for what, T, cpu, wrong in summary:
            print(f"  {what:50s} T={T:2d}  " + "  ".join(
                f"{o} {r:.2f}x" + (" (wrong frames)" if o in wrong else "") for o, r in cpu.items()), file=out)
        print(f"end: {load_average()}", file=out)
    finally:
        torch.set_num_threads(torch_threads)
        shutil.rmtree(tmp, ignore_errors=True)


class _ThreadProbe(torch.utils.data.Dataset):
    """One test clip per item, decoded with a given codec threading (the worker-side threading figure)."""

    def __init__(self, paths, T, threads):
        self.paths, self.T, self.threads = paths, T, threads

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        meta = data.probe_video(self.paths[i])
        idx = data.sample_indices(meta.num_frames, self.T, "test")
        return data.decode_frames(self.paths[i], idx, meta, threads=self.threads).shape[0]


def _in_workers(paths, T, thr, workers):
    """(wall, CPU seconds) of 4 passes over `paths` in a fresh pool of DataLoader workers: the workers' CPU
    time is read from the children's resource usage once the exhausted loader has joined them."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    probe = _ThreadProbe(paths * 4, T, thr)
    wall, _ = timed(lambda: list(torch.utils.data.DataLoader(probe, batch_size=None, num_workers=workers)))
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime


def bench_threads(tmp, kinds, T, rounds, workers, out):
    """Codec threading of this loader, in one process and inside `workers` DataLoader workers: wall and CPU
    time per clip (all threads), every setting interleaved with the others."""
    modes = ("NONE", "SLICE", "AUTO")
    print(f"codec threading, T={T} test clips, per clip wall ms | CPU ms: one process || {workers} DataLoader "
          "workers (4 passes over the files, worker start included):", file=out)
    for k, kind in enumerate(kinds):
        paths = sorted(os.path.join(tmp, f) for f in os.listdir(tmp) if f.startswith(f"{k}_"))
        if not paths:
            continue
        metas = {p: data.probe_video(p) for p in paths}
        idx = {p: data.sample_indices(metas[p].num_frames, T, "test") for p in paths}
        rows = {"1 default": lambda: timed(lambda: [data.decode_frames(p, idx[p], metas[p]) for p in paths])}
        for thr in modes:
            rows[f"1 {thr}"] = lambda thr=thr: timed(
                lambda: [data.decode_frames(p, idx[p], metas[p], threads=thr) for p in paths])
            rows[f"w {thr}"] = lambda thr=thr: _in_workers(paths, T, thr, workers)
        got = interleaved(rows, rounds)
        n = len(paths)
        one = "  ".join(f"{thr} {1e3 * got['1 ' + thr][0] / n:4.0f} | {1e3 * got['1 ' + thr][1] / n:4.0f}"
                        for thr in ("default",) + modes)
        many = "  ".join(f"{thr} {1e3 * got['w ' + thr][0] / (4 * n):4.0f} | "
                         f"{1e3 * got['w ' + thr][1] / (4 * n):4.0f}" for thr in modes)
        print(f"  {kind[0]:50s} {one}  ||  {many}", file=out)
    print(f"  (default: the loader's choice in one process, AUTO from {data.LONG_GOP} frames per keyframe, else one "
          "NONE decoder per core on the stretches between seeks; in workers it uses NONE)", file=out)


def _pil_crop_resize(frames, box, size):
    """The per-frame PIL round trip the transforms used before (the reference of the transform figures)."""
    y0, x0, h, w = box
    return torch.from_numpy(np.stack([np.asarray(Image.fromarray(f).resize(
        (size, size), Image.BILINEAR, box=(x0, y0, x0 + w, y0 + h))) for f in frames])).permute(0, 3, 1, 2).float()


def bench_items(tmp, kinds, Ts, rounds, out, size=224):
    """Dataset items (decode + transform, 1 process) against the decode-everything loader, and the transforms
    alone: the whole clip in torch against a per-frame PIL round trip; all rows interleaved."""
    print(f"dataset items (decode + transform to {size}), 1 process, per item wall ms | CPU ms; transform alone "
          "per clip:", file=out)
    for k in sorted({0, min(5, len(kinds) - 1)}):  # HMDB51-like and K400-like by default
        paths = sorted(os.path.join(tmp, f) for f in os.listdir(tmp) if f.startswith(f"{k}_"))
        if not paths:
            continue
        for mode, T in (("train", Ts[0]), ("test", Ts[-1])):
            ds = data.VideoDataset("bench", ["x"], [(p, 0) for p in paths], mode=mode, frames=T, input_size=size)
            for p in paths:
                ds.probe(p)
            rows = {"this loader": lambda: timed(lambda: [ds[i] for i in range(len(paths))])}
            if mode == "train":
                rows["decode-everything"] = lambda: timed(
                    lambda: [naive_clip(p, T, random.Random(0), size) for p in paths])
            clip = data.decode_frames(paths[0], data.sample_indices(ds.probe(paths[0]).num_frames, T, "test"))
            H, W = clip.shape[1:3]
            c = min(H, W)
            centre = (0, (W - c) // 2, c, c) if W >= H else ((H - c) // 2, 0, c, c)
            crop = data._multiscale_box(H, W, size, random.Random(0)) if mode == "train" else centre
            rows["torch crop+resize"] = lambda: timed(lambda: data._crop_resize(clip, crop, size))
            rows["PIL per frame"] = lambda: timed(lambda: _pil_crop_resize(clip, crop, size))
            got = interleaved(rows, rounds)
            n = {name: (len(paths) if name in ("this loader", "decode-everything") else 1) for name in rows}
            print(f"  {kinds[k][0]}, {mode} T={T}: " + "  ".join(
                f"{name} {1e3 * w / n[name]:.1f} | {1e3 * cpu / n[name]:.1f}" for name, (w, cpu) in got.items()),
                file=out)


def main(argv=None):
    p = argparse.ArgumentParser(description="Seconds per clip (wall and CPU) of data.py's video loader against a "
                                "decode-everything loader, decord and torchcodec, rows interleaved in rounds.")
    p.add_argument("--videos", type=int, default=3, help="videos per kind of file")
    p.add_argument("--seconds", type=int, default=10, help="length of each video in seconds (30 fps)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds; each figure is their median")
    p.add_argument("--frames", type=int, nargs="+", default=[8, 16], help="clip lengths T")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers of the threading rows")
    p.add_argument("--kinds", nargs="+", metavar="TEXT",
                   help="only the kinds whose name holds one of these texts (e.g. avi K400); kinds: "
                        + "; ".join(k[0] for k in KINDS))
    p.add_argument("--no-threads", action="store_true", help="leave out the codec threading rows")
    p.add_argument("--no-items", action="store_true", help="leave out the dataset item rows")
    args = p.parse_args(argv)
    kinds = KINDS if not args.kinds else tuple(k for k in KINDS if any(t in k[0] for t in args.kinds))
    if not kinds:
        p.error(f"--kinds {args.kinds}: no kind matches; kinds: {[k[0] for k in KINDS]}")
    for name in ("videos", "seconds", "rounds", "workers"):
        if getattr(args, name) < 1:
            p.error(f"--{name} {getattr(args, name)}: must be at least 1")
    bench(args.videos, tuple(args.frames), args.seconds, args.rounds, args.workers, kinds,
          threads=not args.no_threads, items=not args.no_items)
    return 0


if __name__ == "__main__":
    sys.exit(main())
