"""Tests of data.py: each dataset layout built in a temporary folder with real encoded videos (PyAV), frame
numbers written into the pixels and read back, views, flips, bad files, protocols, labels."""
import json
import logging
import os
import random

import numpy as np
import pytest
import torch

import data

N_FRAMES = 20  # frames of each test video
H, W = 48, 64


def level(i):
    return 12 * i + 12  # grey level that encodes frame number i (mpeg4 errs by < 5 on flat frames)


def gray_video(n=N_FRAMES):
    return np.stack([np.full((H, W, 3), level(i), np.uint8) for i in range(n)])


def read_index(frames):
    """Frame numbers back from normalised (..., 3, H, W) clips of grey frames."""
    mean = torch.tensor(data.CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(data.CLIP_STD).view(3, 1, 1)
    v = ((frames * std + mean) * 255).mean(dim=(-1, -2, -3))
    return ((v - 12) / 12).round().long().tolist()


def tsn_test(n, T, clips=1, clip=0):
    return [int((t + (clip + 0.5) / clips) * n / T) for t in range(T)]  # independent float form of TSN centres


def save_jpegs(folder, frames, tmpl):
    from PIL import Image
    os.makedirs(folder, exist_ok=True)
    for i, f in enumerate(frames):
        Image.fromarray(f).save(os.path.join(folder, tmpl.format(i + 1)), quality=95)


@pytest.fixture(scope="session")
def layouts(tmp_path_factory):
    """Every layout once per session: hmdb51, ucf101, k400 (folders and CSV), ssv1, list files, bad files."""
    root = tmp_path_factory.mktemp("layouts")
    video = gray_video()
    out = {}
    # HMDB51: 3 classes x 3 videos, ids per split (1 train, 2 test, 0 unused)
    hm = root / "hmdb51"
    split_ids = {1: ["1", "2", "0"], 2: ["2", "1", "1"], 3: ["0", "1", "2"]}
    (hm / "testTrainMulti_7030_splits").mkdir(parents=True)
    for cls in ("brush_hair", "cartwheel", "catch"):
        (hm / cls).mkdir()
        for v in range(3):
            data.write_video(str(hm / cls / f"{cls}_v{v}.avi"), video)
        for k, ids in split_ids.items():
            (hm / "testTrainMulti_7030_splits" / f"{cls}_test_split{k}.txt").write_text(
                "".join(f"{cls}_v{v}.avi {ids[v]} \n" for v in range(3)))
    out["hmdb51"] = str(hm)
    # UCF101: 2 classes x 2 videos
    uc = root / "ucf101"
    (uc / "ucfTrainTestlist").mkdir(parents=True)
    classes = ["ApplyEyeMakeup", "YoYo"]
    (uc / "ucfTrainTestlist" / "classInd.txt").write_text("1 ApplyEyeMakeup\r\n2 YoYo\r\n")
    train, test = [], []
    for c, cls in enumerate(classes):
        (uc / "UCF-101" / cls).mkdir(parents=True)
        for g in (1, 2):
            name = f"{cls}/v_{cls}_g0{g}_c01.avi"
            data.write_video(str(uc / "UCF-101" / name), video)
            (train if g == 1 else test).append((name, c + 1))
    for k in (1, 2, 3):
        (uc / "ucfTrainTestlist" / f"trainlist0{k}.txt").write_text("".join(f"{n} {l}\r\n" for n, l in train))
        (uc / "ucfTrainTestlist" / f"testlist0{k}.txt").write_text("".join(f"{n}\r\n" for n, _ in test))
    out["ucf101"] = str(uc)
    # K400 in class folders (mp4)
    k4 = root / "k400"
    rows = []
    for sub in ("train", "val"):
        for cls in ("abseiling", "air drumming"):
            (k4 / sub / cls).mkdir(parents=True)
            yid = f"{sub}{cls[:3]}xxxx"
            data.write_video(str(k4 / sub / cls / f"{yid}_000010_000020.mp4"), video)
            rows.append((cls, yid, sub))
    out["k400"] = str(k4)
    # K400 flat with annotation CSVs
    k4c = root / "k400csv"
    (k4c / "annotations").mkdir(parents=True)
    for sub in ("train", "val"):
        (k4c / sub).mkdir()
        lines = ["label,youtube_id,time_start,time_end,split"]
        for cls, yid, s in rows:
            if s == sub:
                data.write_video(str(k4c / sub / f"{yid}_000010_000020.mp4"), video)
                lines.append(f"{cls},{yid},10,20,{sub}")
        (k4c / "annotations" / f"{sub}.csv").write_text("\n".join(lines) + "\n")
    out["k400csv"] = str(k4c)
    # SSv1: frame folders 00001.jpg with a left-to-right ramp (to see flips) on top of the frame's grey level
    ss = root / "ssv1"
    ss.mkdir()
    labels = ["Pushing something from left to right", "Pushing something from right to left"]
    (ss / "something-something-v1-labels.csv").write_text("\n".join(labels) + "\n")
    ramp = np.arange(W, dtype=np.uint8)[None, :, None]
    ramp_video = np.stack([np.broadcast_to(3 * i + ramp, (H, W, 3)) for i in range(40)]).astype(np.uint8)
    for vid in range(1, 5):
        save_jpegs(str(ss / "20bn-something-something-v1" / str(vid)), ramp_video, "{:05d}.jpg")
    (ss / "something-something-v1-train.csv").write_text(f"1;{labels[0]}\n2;{labels[1]}\n")
    (ss / "something-something-v1-validation.csv").write_text(f"3;{labels[0]}\n4;{labels[1]}\n")
    out["ssv1"] = str(ss)
    # mmaction list files: videos (`path label`) and frame folders (`dir num_frames label`)
    ls = root / "lists"
    ls.mkdir()
    (ls / "classes.txt").write_text("jump\nrun\n")
    (ls / "classes.csv").write_text("id,name\n1,run\n0,jump\n")
    for c in range(2):
        data.write_video(str(ls / f"vid{c}.mp4"), video)
        save_jpegs(str(ls / f"dir{c}"), video, "img_{:05d}.jpg")
    (ls / "videos.txt").write_text("vid0.mp4 0\nvid1.mp4 1\n")
    (ls / "frames.txt").write_text(f"dir0 {N_FRAMES} 0\ndir1 {N_FRAMES} 1\n")
    out["lists"] = str(ls)
    # HMDB51 layout with bad files: zero-byte, truncated, garbage; one good video left per class
    bad = root / "hmdb_bad"
    (bad / "testTrainMulti_7030_splits").mkdir(parents=True)
    for cls in ("brush_hair", "catch"):
        (bad / cls).mkdir()
        for v in range(2):
            data.write_video(str(bad / cls / f"{cls}_v{v}.avi"), video)
        (bad / "testTrainMulti_7030_splits" / f"{cls}_test_split1.txt").write_text(
            "".join(f"{cls}_v{v}.avi {2 if v == 0 else 1}\n" for v in range(4)))  # v0 test, v1..v3 train
    (bad / "brush_hair" / "brush_hair_v2.avi").write_bytes(b"")
    good = (bad / "brush_hair" / "brush_hair_v0.avi").read_bytes()
    (bad / "brush_hair" / "brush_hair_v3.avi").write_bytes(good[: len(good) * 85 // 100])
    (bad / "catch" / "catch_v2.avi").write_bytes(np.random.default_rng(0).bytes(5000))
    (bad / "catch" / "catch_v3.avi").write_bytes(good)
    out["hmdb_bad"] = str(bad)
    return out


# -------------------------------------------------------------------------------------------------- layouts
def names(ds):
    return sorted(os.path.basename(p) for p, _ in ds.samples)


def test_data_hmdb51_splits_and_labels(layouts):
    expected = {1: ([0], [1]), 2: ([1, 2], [0]), 3: ([1], [2])}  # video numbers with id 1 / id 2 (0 unused)
    for k, (tr, te) in expected.items():
        for mode, vids in (("train", tr), ("test", te)):
            ds = data.build_dataset("hmdb51", layouts["hmdb51"], split=k, mode=mode, frames=4, input_size=32)
            assert names(ds) == sorted(f"{c}_v{v}.avi" for c in ("brush_hair", "cartwheel", "catch") for v in vids)
            assert ds.classes == ["brush_hair", "cartwheel", "catch"]
            assert ds.class_texts == ["brush hair", "cartwheel", "catch"]
            for path, label in ds.samples:
                assert os.path.basename(os.path.dirname(path)) == ds.classes[label]


def test_data_ucf101_k400_ssv1_lists(layouts):
    ds = data.build_dataset("ucf101", layouts["ucf101"], split=2, mode="train")
    assert names(ds) == ["v_ApplyEyeMakeup_g01_c01.avi", "v_YoYo_g01_c01.avi"]
    assert [l for _, l in ds.samples] == [0, 1] and ds.class_texts == ["apply eye makeup", "yo yo"]
    ds = data.build_dataset("ucf101", layouts["ucf101"], split=2, mode="test")
    assert names(ds) == ["v_ApplyEyeMakeup_g02_c01.avi", "v_YoYo_g02_c01.avi"]
    assert [l for _, l in ds.samples] == [0, 1]
    for key in ("k400", "k400csv"):
        for mode, sub in (("train", "train"), ("test", "val")):
            ds = data.build_dataset("k400", layouts[key], mode=mode)
            assert ds.classes == ["abseiling", "air drumming"]
            assert names(ds) == [f"{sub}absxxxx_000010_000020.mp4", f"{sub}airxxxx_000010_000020.mp4"]
            assert [l for _, l in sorted(ds.samples)] == [0, 1]
    ds = data.build_dataset("ssv1", layouts["ssv1"], mode="test")
    assert names(ds) == ["3", "4"] and [l for _, l in ds.samples] == [0, 1]
    for cls_file in ("classes.txt", "classes.csv"):
        for lst in ("videos.txt", "frames.txt"):
            ds = data.build_dataset("list", layouts["lists"], list_file=os.path.join(layouts["lists"], lst),
                                    class_file=os.path.join(layouts["lists"], cls_file))
            assert ds.classes == ["jump", "run"] and [l for _, l in ds.samples] == [0, 1]


# ------------------------------------------------------------------------------------- sampling and views
def test_data_tsn_indices_hand_computed():
    assert data.sample_indices(50, 8, "test") == [3, 9, 15, 21, 28, 34, 40, 46]  # floor((t + 0.5) * 50 / 8)
    assert data.sample_indices(5, 8, "test") == [0, 0, 1, 2, 2, 3, 4, 4]  # fewer frames than T: repeats
    rng = random.Random(0)
    for _ in range(50):
        idx = data.sample_indices(50, 8, "train", rng)
        assert all(t * 50 // 8 <= i < (t + 1) * 50 / 8 for t, i in enumerate(idx)), idx
    dense = data.sample_indices(100, 4, "test", sampling="dense", interval=8)
    assert dense == [37, 45, 53, 61]  # span 25, start 75 // 2


@pytest.mark.parametrize("key,name", [("hmdb51", "hmdb51"), ("ucf101", "ucf101"), ("k400", "k400"),
                                      ("k400csv", "k400"), ("ssv1", "ssv1"), ("lists", "list")])
def test_data_frames_read_back_are_tsn_indices(layouts, key, name):
    kw = {}
    n = N_FRAMES
    if name == "list":
        kw = dict(list_file=os.path.join(layouts["lists"], "frames.txt"),
                  class_file=os.path.join(layouts["lists"], "classes.txt"))
    if name == "ssv1":
        n = 40
    ds = data.build_dataset(name, layouts[key], mode="test", frames=8, input_size=32, views="4x3", **kw)
    item = ds[0]
    assert item["video"].shape == (12, 8, 3, 32, 32) and item["replaced"] == 0
    for c in range(4):
        for s in range(3):
            got = item["video"][c * 3 + s]
            if name == "ssv1":  # frames hold 3 * i + column: undo the ramp's mean over the crop
                mean = torch.tensor(data.CLIP_MEAN).view(3, 1, 1)
                std = torch.tensor(data.CLIP_STD).view(3, 1, 1)
                v = ((got * std + mean) * 255).mean(dim=(-1, -2, -3))
                ramp_mean = 8 * s + 23.5  # crop of 48 columns starting at 0, 8, 16
                got_idx = ((v - ramp_mean) / 3).round().long().tolist()
            else:
                got_idx = read_index(got)
            assert got_idx == tsn_test(n, 8, 4, c), (c, s)
    one = data.build_dataset(name, layouts[key], mode="test", frames=8, input_size=32, **kw)[0]
    assert one["video"].shape == (1, 8, 3, 32, 32)
    if name != "ssv1":
        assert read_index(one["video"][0]) == tsn_test(n, 8)
    train = data.build_dataset(name, layouts[key], mode="train", frames=8, input_size=32, **kw)
    if name != "ssv1":
        for e in range(3):
            train.set_epoch(e)
            item = train[0]
            assert item["video"].shape == (8, 3, 32, 32)
            idx = read_index(item["video"])
            assert all(t * n // 8 <= i < (t + 1) * n / 8 for t, i in enumerate(idx)), idx


def test_data_three_crops_cover_the_long_side():
    frames = np.zeros((2, 40, 100, 3), np.uint8)
    frames[:, :, :30] = 255  # white left part
    frames[:, :, 70:] = 128  # grey right part
    views = data.test_crops(frames, size=40, crops=3)  # (3, T, 3, 40, 40)
    raw = views * torch.tensor(data.CLIP_STD).view(3, 1, 1) + torch.tensor(data.CLIP_MEAN).view(3, 1, 1)
    left, centre, right = (raw[:, 0, 0] * 255).round()  # channel 0 of frame 0 of each crop
    assert left[:, :30].eq(255).all() and left[:, 31:].eq(0).all()  # columns 0..39
    assert centre.eq(0).all()  # columns 30..69
    assert right[:, :9].eq(0).all() and right[:, 10:].eq(128).all()  # columns 60..99
    one = data.test_crops(frames, size=40, crops=1)
    assert torch.equal(one[0], views[1])


def test_data_ssv1_never_flips(layouts, caplog):
    with caplog.at_level(logging.INFO, logger="data"):
        ds = data.build_dataset("ssv1", layouts["ssv1"], mode="train", frames=4, input_size=32, flip=True)
    assert not ds.flip and "flip is off" in caplog.text
    flipped_somewhere = data.build_dataset("hmdb51", layouts["hmdb51"], frames=2, input_size=32).flip
    assert flipped_somewhere
    for e in range(12):  # p(no flip in 12 draws) = 2**-12 if flips were on
        ds.set_epoch(e)
        v = ds[0]["video"]  # ramp: left columns darker than right ones unless flipped
        assert (v[..., :16].mean() < v[..., 16:].mean()).item()


def test_data_flip_happens_on_other_datasets(layouts):
    ds = data.build_dataset("list", layouts["lists"], list_file=os.path.join(layouts["lists"], "videos.txt"),
                            class_file=os.path.join(layouts["lists"], "classes.txt"), input_size=32, frames=2)
    ramp = np.broadcast_to(np.arange(64, dtype=np.uint8)[None, None, :, None] * 3, (2, 48, 64, 3))
    flips = 0
    for e in range(40):
        v = data.train_transform(ramp, random.Random(e), 32)
        flips += int(v[..., :16].mean() > v[..., 16:].mean())
    assert 5 < flips < 35


def test_data_train_augmentation_is_shared_by_frames_and_seeded():
    rng_frames = np.random.default_rng(0).integers(0, 256, (1, 60, 80, 3), dtype=np.uint8).repeat(4, 0)
    for s in range(5):
        x = data.train_transform(rng_frames, random.Random(s), 32, randaugment=True, random_erasing=True)
        assert x.shape == (4, 3, 32, 32)
        assert torch.equal(x[0], x[3]), "one augmentation draw per clip"
        y = data.train_transform(rng_frames, random.Random(s), 32, randaugment=True, random_erasing=True)
        assert torch.equal(x, y)


# --------------------------------------------------------------------------------------- bad files, --check
def test_data_bad_files_replaced_logged_once_and_counted(layouts, caplog):
    ds = data.build_dataset("hmdb51", layouts["hmdb_bad"], mode="train", frames=4, input_size=32)
    order = [os.path.basename(p) for p, _ in ds.samples]
    bad_zero = order.index("brush_hair_v2.avi")
    with caplog.at_level(logging.WARNING, logger="data"):
        item = ds[bad_zero]
        again = ds[bad_zero]
    assert item["replaced"] == 1 and item["label"] == 0 and item["index"] == bad_zero
    assert torch.equal(item["video"], again["video"])
    assert caplog.text.count("brush_hair_v2.avi") == 1  # logged once
    # class order v1, v2, v3: v2 tries v3 (truncated) next, then wraps to v1
    assert sorted(os.path.basename(p) for p in ds.bad_files()) == ["brush_hair_v2.avi", "brush_hair_v3.avi"]
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2)
    replaced = sum(int(b["replaced"].sum()) for b in loader)
    assert replaced == 3
    bad = ds.bad_files()
    assert ds.bad_count() == 3
    reasons = {os.path.basename(p): r for p, r in bad.items()}
    assert reasons["brush_hair_v2.avi"] == "zero-byte file"
    assert reasons["brush_hair_v3.avi"].startswith("truncated")
    assert reasons["catch_v2.avi"].startswith("cannot open")


def test_data_check_reports_bad_files(layouts, capsys):
    assert data.main(["--dataset", "hmdb51", "--root", layouts["hmdb_bad"], "--check", "--workers", "2"]) == 1
    out = capsys.readouterr().out
    for name in ("brush_hair_v2.avi: zero-byte", "brush_hair_v3.avi: truncated", "catch_v2.avi: cannot open"):
        assert name in out, out
    assert "catch_v3.avi" not in out and "3 bad of 6" in out and "0 bad of 2" in out
    assert data.main(["--dataset", "hmdb51", "--root", layouts["hmdb51"], "--split", "2", "--check",
                      "--workers", "0"]) == 0
    out = capsys.readouterr().out
    assert "train: 6 videos, 3 classes" in out and "test: 3 videos" in out
    assert f"frames per video: min {N_FRAMES}, mean {N_FRAMES}.0, max {N_FRAMES}" in out
    assert data.main(["--dataset", "ssv1", "--root", layouts["ssv1"], "--check", "--workers", "0"]) == 0
    assert "ssv1 split 1 test: 2 videos, 2 classes" in capsys.readouterr().out
    lists = layouts["lists"]
    assert data.main(["--dataset", "list", "--list-file", os.path.join(lists, "frames.txt"), "--class-file",
                      os.path.join(lists, "classes.txt"), "--root", lists, "--check", "--workers", "0"]) == 0
    assert "0 bad of 2" in capsys.readouterr().out
    assert data.main(["--dataset", "k400", "--root", os.path.join(lists, "nowhere"), "--check"]) == 2
    assert "nowhere" in capsys.readouterr().err


def test_data_decodes_only_needed_gops(layouts, monkeypatch):
    path = os.path.join(layouts["hmdb51"], "catch", "catch_v0.avi")
    meta = data.probe_video(path)
    assert meta.num_frames == N_FRAMES and list(meta.key_idx) == [0, 12]  # mpeg4 GOP 12
    decoded = []
    real_open = data.av.open

    class Counting:  # the container, with decode() recording each decoded frame's number
        def __init__(self, c):
            self.c = c

        def __getattr__(self, name):
            return getattr(self.c, name)

        def decode(self, *a, **k):
            for f in self.c.decode(*a, **k):
                decoded.append(meta.index(f.pts))
                yield f

    def counting_open(*a, **k):
        return Counting(real_open(*a, **k))
    monkeypatch.setattr(data.av, "open", counting_open)
    frames = data.decode_frames(path, [5, 14, 16], meta)
    assert read_index(data._normalise(torch.from_numpy(frames).permute(0, 3, 1, 2).float())) == [5, 14, 16]
    assert decoded == [0, 1, 2, 3, 4, 5, 12, 13, 14, 15, 16]  # 6..11 skipped by seeking to keyframe 12
    decoded.clear()
    data.decode_frames(path, [13, 16], meta)
    assert decoded == [12, 13, 14, 15, 16]  # one seek, then forward only


# ----------------------------------------------------------------------------------------------------- errors
def test_data_errors_name_the_problem(layouts, tmp_path):
    with pytest.raises(ValueError, match="unknown dataset 'hmdb'.*hmdb51"):
        data.build_dataset("hmdb", layouts["hmdb51"])
    with pytest.raises(FileNotFoundError, match="nowhere.*testTrainMulti"):
        data.build_dataset("hmdb51", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="testTrainMulti_7030_splits"):
        data.build_dataset("hmdb51", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="trainlist0"):
        (tmp_path / "ucfTrainTestlist").mkdir()
        (tmp_path / "ucfTrainTestlist" / "classInd.txt").write_text("1 A\n")
        data.build_dataset("ucf101", str(tmp_path))
    with pytest.raises(ValueError, match="split 4"):
        data.build_dataset("hmdb51", layouts["hmdb51"], split=4)
    lst = tmp_path / "l.txt"
    lst.write_text("missing.mp4 0\n")
    (tmp_path / "c.txt").write_text("a\nb\n")
    with pytest.raises(FileNotFoundError, match="missing.mp4"):
        data.build_dataset("list", str(tmp_path), list_file=str(lst), class_file=str(tmp_path / "c.txt"))
    lst.write_text(f"{os.path.join(layouts['lists'], 'vid0.mp4')} 0\n")
    with pytest.raises(ValueError, match=r"no videos: \['b'\]"):
        data.build_dataset("list", None, list_file=str(lst), class_file=str(tmp_path / "c.txt"))
    with pytest.raises(ValueError, match="views '2x2'"):
        data.build_dataset("synthetic", mode="test", views="2x2")


# -------------------------------------------------------------------------------------- few- and zero-shot
def test_data_few_shot_reproducible_and_written(layouts, tmp_path):
    a = data.build_dataset("hmdb51", layouts["hmdb51"], split=2, shots=2, seed=3, shots_dir=str(tmp_path))
    b = data.build_dataset("hmdb51", layouts["hmdb51"], split=2, shots=2, seed=3)
    assert a.samples == b.samples and len(a) == 6
    assert sorted(l for _, l in a.samples) == [0, 0, 1, 1, 2, 2]
    draws = {tuple(data.build_dataset("hmdb51", layouts["hmdb51"], split=2, shots=1, seed=s).samples)
             for s in range(8)}
    assert len(draws) > 1
    lines = open(a.list_path).read().split("\n")[:-1]
    assert lines == [f"{p} {l}" for p, l in a.samples]
    (tmp_path / "classes.txt").write_text("brush_hair\ncartwheel\ncatch\n")
    again = data.build_dataset("list", None, list_file=a.list_path, class_file=str(tmp_path / "classes.txt"))
    assert [p for p, _ in again.samples] == [p for p, _ in a.samples]
    assert a[0]["label"] == a.samples[0][1]
    with pytest.raises(ValueError, match="fewer than shots=4"):
        data.build_dataset("hmdb51", layouts["hmdb51"], split=2, shots=4)


def test_data_zero_shot_protocols(layouts):
    evals = data.zero_shot_protocol("hmdb51", layouts["hmdb51"], "splits", frames=2, input_size=32)
    assert [names(e["dataset"]) for e in evals] == [
        names(data.build_dataset("hmdb51", layouts["hmdb51"], split=k, mode="test")) for k in (1, 2, 3)]
    halves = data.zero_shot_protocol("hmdb51", layouts["hmdb51"], "half", halves=10, seed=0, frames=2,
                                     input_size=32)
    assert len(halves) == 10
    again = data.zero_shot_protocol("hmdb51", layouts["hmdb51"], "half", halves=10, seed=0)
    assert [h["class_ids"] for h in halves] == [h["class_ids"] for h in again]
    assert len({tuple(h["class_ids"]) for h in halves}) > 1
    full = ["brush_hair", "cartwheel", "catch"]
    for h in halves:
        ds = h["dataset"]
        assert len(h["class_ids"]) == 1 and ds.classes == [full[c] for c in h["class_ids"]]
        assert len(ds) == 3 and all(l == 0 for _, l in ds.samples)  # every video of the class, all ids
        assert all(os.path.basename(os.path.dirname(p)) == ds.classes[0] for p, _ in ds.samples)
        assert ds[0]["video"].shape == (1, 2, 3, 32, 32)


# ----------------------------------------------------------------------------------------------- synthetic
def test_data_synthetic_deterministic_twins_and_sizes():
    a = data.build_dataset("synthetic", mode="train", frames=8, input_size=32, seed=1, videos_per_class=4)
    b = data.build_dataset("synthetic", mode="train", frames=8, input_size=32, seed=1, videos_per_class=4)
    t = data.build_dataset("synthetic", mode="test", frames=8, input_size=32, seed=1, videos_per_class=4)
    assert len(a) == 32 and a.classes == list(data.SYNTHETIC_CLASSES) and not a.flip
    assert torch.equal(a[5]["video"], b[5]["video"]) and a[5]["video"].shape == (8, 3, 32, 32)
    assert not torch.equal(a[5]["video"], t[5]["video"][0])
    assert t[0]["video"].shape == (1, 8, 3, 32, 32)
    big = data.build_dataset("synthetic", mode="test", frames=4, input_size=224, views="4x3", videos_per_class=1)
    assert big[3]["video"].shape == (12, 4, 3, 224, 224)
    batch = next(iter(torch.utils.data.DataLoader(a, batch_size=16)))
    assert batch["video"].shape == (16, 8, 3, 32, 32)
    assert batch["label"].tolist() == [0] * 4 + [1] * 4 + [2] * 4 + [3] * 4
    # twins: class 2k+1 is class 2k played backwards, so their frame sets have the same distribution
    p = data.g_state(np.random.default_rng(7))
    times = [0.0, 0.2, 0.5, 0.9, 1.0]
    for pair in range(4):
        fwd = data.render_synthetic(2 * pair, times, p, 32, 32)
        bwd = data.render_synthetic(2 * pair + 1, [1 - s for s in times], p, 32, 32)
        assert np.array_equal(fwd, bwd)
        assert not np.array_equal(fwd[0], fwd[-1])  # and the clip does change over time
    times = [i / data.SYNTHETIC_STEPS for i in data.sample_indices(data.SYNTHETIC_STEPS, 8, "test")]
    assert times == [(2 * t + 1) / 16 for t in range(8)]  # mirror-symmetric test times: twins share frames
    f0, f1 = data.render_synthetic(0, times, p, 32, 32), data.render_synthetic(1, times, p, 32, 32)
    assert np.array_equal(f0, f1[::-1]) and np.array_equal(f0.mean(0), f1.mean(0))  # equal under mean pooling
    assert data.chinese_labels("synthetic", a.classes)[:2] == ["向左移动", "向右移动"]
    sub = data.zero_shot_protocol("synthetic", None, "half", halves=1, frames=8, input_size=32, seed=1,
                                  videos_per_class=4)[0]
    k = sub["class_ids"][1]
    item = sub["dataset"][4]  # first video of the half's second class: same clip as in the full test set
    assert item["label"] == 1 and torch.equal(item["video"], t[4 * k]["video"])


def test_data_synthetic_class_directions():
    p = data.g_state(np.random.default_rng(0))

    def centre(label, time, axis):  # where the shape is: pixels that change with the shape's colour
        a = data.render_synthetic(label, [time], dict(p, color=np.zeros(3)), 32, 32)[0].astype(int)
        b = data.render_synthetic(label, [time], dict(p, color=np.full(3, 255)), 32, 32)[0].astype(int)
        return np.nonzero(np.abs(a - b).sum(-1) > 30)[axis].mean()
    assert centre(0, 0.0, 1) > centre(0, 1.0, 1)  # moving left: x decreases
    assert centre(1, 0.0, 1) < centre(1, 1.0, 1)  # moving right
    assert centre(2, 0.0, 0) > centre(2, 1.0, 0)  # moving up: row decreases
    assert centre(3, 0.0, 0) < centre(3, 1.0, 0)  # moving down


# ------------------------------------------------------------------------------------------------- labels
def test_data_class_text():
    cases = {"brush_hair": "brush hair", "ApplyEyeMakeup": "apply eye makeup", "YoYo": "yo yo",
             "PlayingDaf": "playing daf", "abseiling": "abseiling", "fall_floor": "fall floor",
             "Approaching something with your camera": "Approaching something with your camera",
             "passing American football (in game)": "passing American football (in game)"}
    for name, text in cases.items():
        assert data.class_text(name) == text


@pytest.mark.parametrize("dataset,count", [("hmdb51", 51), ("ucf101", 101), ("ssv1", 174), ("k400", 400)])
def test_data_chinese_labels_complete(dataset, count):
    name = data.ASSET_NAMES[dataset]
    cls = os.path.join(data.ASSETS, "classes", name + ".txt")
    zh = os.path.join(data.ASSETS, "chinese_labels", name + ".json")
    if not (os.path.exists(cls) and os.path.exists(zh)):
        pytest.skip(f"asset {cls} or {zh} not written yet")
    classes = data.official_classes(dataset)
    assert len(classes) == count == len(set(classes))
    labels = data.chinese_labels(dataset, classes)
    assert len(labels) == count and all(labels)


def test_data_chinese_labels_user_file_and_missing(tmp_path):
    f = tmp_path / "zh.tsv"
    f.write_text("jump\t跳\nrun\t跑\n", encoding="utf-8")
    assert data.chinese_labels("list", ["run", "jump"], str(f)) == ["跑", "跳"]
    j = tmp_path / "zh.json"
    j.write_text(json.dumps({"jump": "跳"}, ensure_ascii=False), encoding="utf-8")
    with pytest.raises(KeyError, match=r"2 classes: \['run', 'swim'\]"):
        data.chinese_labels("list", ["jump", "run", "swim"], str(j))
    with pytest.raises(ValueError, match="--chinese-labels"):
        data.chinese_labels("list", ["jump"])


def test_data_long_gop_frames_exact(tmp_path):
    """One keyframe in 120 frames with non-reference B-frames (x264): the frames asked for come back exactly,
    although the decoder skips non-reference frames on its way."""
    n = 120
    bits = np.array([[(i >> b) & 1 for b in range(7)] for i in range(n)], np.uint8) * 255  # (n, 7)
    frames = np.repeat(np.repeat(bits[:, :, None, None], 8, 1), 64, 2).repeat(3, 3)  # (n, 56, 64, 3) stripes
    path = str(tmp_path / "long.mp4")
    import av
    with av.open(path, "w") as c:
        s = c.add_stream("libx264", rate=30)
        s.height, s.width, s.pix_fmt = 56, 64, "yuv420p"
        # B-frames forced (b-adapt=0), none referenced (b-pyramid=none): frames 4k+1..4k+3 are skippable
        s.options = {"x264-params": f"crf=12:bframes=3:b-adapt=0:b-pyramid=none:keyint={n}:min-keyint={n}:scenecut=0"}
        for f in frames:
            for p in s.encode(data.av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    meta = data.probe_video(path)
    assert meta.num_frames == n and list(meta.key_idx) == [0]
    want = [3, 70, 71, 100, 119]  # 70, 71: B-frames
    got = data.decode_frames(path, want, meta)
    code = (got[:, 4::8, 32, 0] > 128).astype(int)  # (len(want), 7): centre row of each stripe
    assert [int((c << np.arange(7)).sum()) for c in code] == want
