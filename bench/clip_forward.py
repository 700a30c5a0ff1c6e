"""Benchmark: CLIP `encode_image` of clip.py against OpenAI's clip/model.py on the same random weights.

    python bench/clip_forward.py --arch ViT-B/16 --batch 8 --rounds 5 [--device cuda] [--precision bf16]

The two rows are timed interleaved (ours, OpenAI, ours, OpenAI, ... in rounds) so that a slow spell of the
machine hits both alike; each row reports the median over rounds of the wall seconds and the CPU seconds
(time.process_time, all threads of this process) of one forward, and images/s from the median wall time.
Needs the `openai-clip` package (pip install --no-deps openai-clip); run from the repository root.
"""
import argparse
import importlib.metadata
import importlib.util
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

import torch  # noqa: E402

import clip  # noqa: E402


def openai_model_module():
    """OpenAI's clip/model.py from the installed `openai-clip` package, loaded by path under another module
    name (clip.py shadows `clip`; the package's __init__ needs torchvision)."""
    try:
        path = importlib.metadata.distribution("openai-clip").locate_file("clip/model.py")
    except importlib.metadata.PackageNotFoundError:
        raise SystemExit("the benchmark compares against OpenAI's reference code, which is not installed: "
                         "pip install --no-deps openai-clip") from None
    spec = importlib.util.spec_from_file_location("openai_clip_model", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def bench(arch="ViT-B/16", batch=8, rounds=5, device=None, precision=None):
    """Time `encode_image` of both models, interleaved; print one row each. Returns {row: {"ips", "wall",
    "cpu"}} (images/s, median wall and CPU seconds per forward)."""
    reference = openai_model_module()
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(0)
    ours = clip.CLIP(**clip.ARCHS[arch]).eval()
    theirs = reference.CLIP(**clip.ARCHS[arch]).eval()  # fp32: OpenAI's build_model would convert it to fp16
    theirs.load_state_dict(ours.state_dict())
    ours, theirs = ours.to(device), theirs.to(device)
    res = clip.ARCHS[arch]["image_resolution"]
    images = torch.randn(batch, 3, res, res, device=device)
    # Choice: fp32 on CPU by default (bf16 matmuls are slow on most CPUs); bf16 autocast on CUDA, as training runs.
    precision = precision or ("bf16" if device.type == "cuda" else "fp32")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")

    def run(model):
        with torch.inference_mode(), autocast:
            out = model.encode_image(images)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return out

    a, b = run(ours).float(), run(theirs).float()  # warm-up, and a check that both compute the same
    rel = ((a - b).norm() / b.norm()).item()
    rows = {"clip.py": ours, "OpenAI": theirs}
    wall, cpu = {name: [] for name in rows}, {name: [] for name in rows}
    for _ in range(rounds):  # A B A B ...: interleaved
        for name, model in rows.items():
            w, c = time.perf_counter(), time.process_time()
            run(model)
            wall[name].append(time.perf_counter() - w)
            cpu[name].append(time.process_time() - c)
    label = "bf16 autocast" if precision == "bf16" else "fp32"
    print(f"encode_image {arch} on {device.type} ({label}), batch {batch}, median of {rounds} interleaved rounds, "
          f"{torch.get_num_threads()} threads; relative difference of the outputs {rel:.1e}")
    result = {}
    for name in rows:
        w, c = statistics.median(wall[name]), statistics.median(cpu[name])
        result[name] = {"ips": batch / w, "wall": w, "cpu": c}
        print(f"  {name:8s}: {batch / w:8.1f} images/s   wall {w:.4f} s   CPU {c:.4f} s per forward")
    print(f"  speed-up: {result['clip.py']['ips'] / result['OpenAI']['ips']:.2f}x (wall)")
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description="Time clip.py's encode_image against OpenAI's clip/model.py "
                                                 "(same random weights, rows interleaved, wall and CPU seconds).")
    parser.add_argument("--arch", default="ViT-B/16", choices=list(clip.ARCHS), help="architecture (random weights)")
    parser.add_argument("--batch", type=int, default=8, help="images per forward")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (one forward per row each)")
    parser.add_argument("--device", default=None, choices=["cpu", "cuda"],
                        help="one device (default: cpu, then cuda too if available)")
    parser.add_argument("--precision", default=None, choices=["fp32", "bf16"],
                        help="fp32, or bf16 autocast (default: fp32 on cpu, bf16 on cuda)")
    args = parser.parse_args(argv)
    if args.batch < 1 or args.rounds < 1:
        parser.error(f"--batch {args.batch} and --rounds {args.rounds} must be >= 1")
    devices = [args.device] if args.device else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return {device: bench(args.arch, args.batch, args.rounds, device, args.precision) for device in devices}


if __name__ == "__main__":
    main()
