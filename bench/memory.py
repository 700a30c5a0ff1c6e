"""Peak GPU memory and FLOPs of one training step, measured on a CPU without a GPU (issue 23).

    python bench/memory.py --method tpr --frames 16 --batch-size 32
    python bench/memory.py --method biefficient --biefficient-code-compat --frames 8 --batch-size 32

Builds the engine's model (train.build_model, random weights of the paper's shapes, frozen towers in fp32 as
the engine keeps them) and measures train.estimate_step for each row: forward, loss, backward and the AdamW
step on fake tensors (shapes and dtypes, no data, no arithmetic), the batch of one GPU. Rows: fp32; the GPU's
automatic precision (bf16 autocast; fp16 with --biefficient-code-compat) with checkpointing off, selective
(clip.checkpoint_options) and full; what `--grad-checkpointing auto` (the default) picks on a device of
--device-gib; a selective policy that keeps less (attention and QKV: the MLP recomputed; not a flag); with
--biefficient-code-compat, the authors' way (bench/biefficient_step.authors_logits: their loop, their checkpointing) through
the same step; and full checkpointing without the frozen weights the step never reads (TPR's text towers: the
class features are cached). Peak = the most bytes of
tensors alive at once (GB = 1e9 bytes); the CUDA context and the allocator's caching come on top on a GPU.
FLOPs: torch.utils.flop_counter's formulas (matmuls, convolutions, attention), recomputation included.
Other train.py flags (e.g. --no-chinese, --S 4, --micro-batch 8) pass through.
"""
import argparse
import os
import sys
import time
from unittest import mock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils.checkpoint import CheckpointPolicy  # noqa: E402

import clip  # noqa: E402
import data  # noqa: E402
import train  # noqa: E402

# TPR Table 6 (ViT-B/16, batch 32, RTX 4090): training memory (MB) per T
TABLE6_MB = {8: 6601, 16: 10759}
# Choice: what the CUDA context holds outside the tensors on a 24 GiB card (RTX 4090, CUDA 12: about 0.5 GiB)
CUDA_CONTEXT_BYTES = 0.5 * 2 ** 30
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def keep_attention_and_qkv(ctx, op, *args, **kwargs):
    """A selective policy that keeps less than clip._selective_policy: attention outputs and the matmuls that
    triple the width (the QKV projection); the MLP is recomputed too."""
    i = clip.MATMUL_OPS.get(op)
    qkv = i is not None and args[i + 1].shape[-1] == 3 * args[i].shape[-1]
    return CheckpointPolicy.MUST_SAVE if op in clip.ATTENTION_OPS or qkv else CheckpointPolicy.PREFER_RECOMPUTE


class AuthorsWay(torch.nn.Module):
    """A BiEfficient model whose forward is the authors' computation re-stated on its modules and weights (their
    loop over the videos, every text at 77 positions, text blocks checkpointed as in their code), so that
    train.estimate_step measures their way with the same step, loss and optimizer as ours."""

    def __init__(self, model, logits):
        super().__init__()
        self.model, self.logits = model, logits
        self.loss_keys, self.class_names = model.loss_keys, model.class_names

    def forward(self, video, labels=None, candidates=None):
        texts = [self.class_names[i] for i in candidates.tolist()]  # candidates are real (train.estimate_step)
        return {"logits": {"en": self.logits(self.model, video, texts)}}

    def optimizer_groups(self):
        return self.model.optimizer_groups()


class FirstIndex(TorchDispatchMode):
    """An index read out of a fake tensor (their `w_b[top1]`: which video's top-1 text) reads 0: it picks a row,
    not a shape, so the memory and the FLOPs are those of any other row."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default and isinstance(args[0], train.FakeTensor) \
                and not args[0].is_floating_point():
            return 0
        return func(*args, **(kwargs or {}))


def build(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--method", default="tpr", choices=train.METHODS, help="which paper's model")
    p.add_argument("--arch", default="ViT-B/16", help="CLIP ViT (train.py --arch)")
    p.add_argument("--frames", type=int, default=None, help="T (default: the paper's)")
    p.add_argument("--batch-size", type=int, default=32, help="videos per GPU (TPR Sec. 4.4 and the BiEfficient "
                   "authors' code: 32)")
    p.add_argument("--dataset", default="hmdb51", choices=("hmdb51", "ucf101", "k400", "ssv1"),
                   help="whose class names (their number and token lengths)")
    p.add_argument("--precision", default=None, choices=tuple(PRECISIONS),
                   help="autocast of the checkpointing rows (default: the GPU's: bf16, fp16 with code-compat)")
    p.add_argument("--biefficient-code-compat", action="store_true", help="BiEfficient as the authors' code")
    p.add_argument("--device-gib", type=float, default=24, help="GPU memory for the auto row (RTX 4090: 24)")
    args, rest = p.parse_known_args(argv)
    argv_train = ["--method", args.method, "--random-init", "--arch", args.arch, "--batch-size",
                  str(args.batch_size), "--dataset", args.dataset, "--root", ROOT, *rest]
    if args.frames:
        argv_train += ["--frames", str(args.frames)]
    if args.biefficient_code_compat:
        argv_train.append("--biefficient-code-compat")
    targs = train.resolve_args(train.build_parser().parse_args(argv_train))
    targs.micro_batch = targs.micro_batch or targs.batch_size
    classes = data.official_classes(args.dataset)
    texts = [data.class_text(c) for c in classes]
    zh = data.chinese_labels(args.dataset, classes) if train.uses_chinese(targs) else None
    model = train.build_model(targs, texts, zh)
    model.train()
    if args.precision is None:
        args.precision = "fp16" if getattr(targs, "amp", "bf16") == "fp16" else "bf16"
    return args, targs, model


def main(argv=None):
    t0 = time.time()
    cpu0 = time.process_time()
    args, targs, model = build(argv)
    device = torch.device("cpu")
    cache = {}

    def estimate(model, targs, device, amp_dtype, batch):  # each (checkpointing, precision) measured once
        key = (next(m.grad_checkpointing for m in model.modules() if isinstance(m, clip.Transformer)), amp_dtype)
        if key not in cache:
            cache[key] = train.estimate_step(model, targs, device, amp_dtype, batch)
        return cache[key]

    amp = PRECISIONS[args.precision]
    rows = []
    for name, mode, dtype in (("fp32", "off", None), (f"{args.precision} autocast", "off", amp),
                              (f"{args.precision} + selective checkpointing", "selective", amp),
                              (f"{args.precision} + full checkpointing", "full", amp)):
        train.set_grad_checkpointing(model, mode)
        rows.append((name, estimate(model, targs, device, dtype, args.batch_size)))
    # Not a flag: selective checkpointing that recomputes the MLP too (what keeping less costs in FLOPs)
    train.set_grad_checkpointing(model, "selective")
    with mock.patch.object(clip, "_selective_policy", keep_attention_and_qkv):
        rows.append((f"{args.precision} + selective keeping attention and QKV only (MLP recomputed; not a flag)",
                     train.estimate_step(model, targs, device, amp, args.batch_size)))
    if args.method == "biefficient" and args.biefficient_code_compat:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from biefficient_step import authors_logits as authors  # the re-statement of their code (bench/)
        train.set_grad_checkpointing(model, "off")
        with FirstIndex():
            rows.append((f"the authors' way, {args.precision} (their loop; their text checkpointing)",
                         train.estimate_step(AuthorsWay(model, authors), targs, device, amp, args.batch_size)))
    available = args.device_gib * 2 ** 30 - CUDA_CONTEXT_BYTES
    mode, _ = train.plan_checkpointing(model, targs, device, amp, args.batch_size, available, estimate)
    rows.insert(4, (f"auto on a {args.device_gib:g} GiB device: {mode}", cache[(
        {"off": False, "full": True, "selective": "selective"}[mode], amp)]))
    full = rows[3][1]
    off_flops = rows[1][1].flops
    T = targs.frames
    ref = TABLE6_MB.get(T) if args.method == "tpr" and args.arch == "ViT-B/16" and args.batch_size == 32 else None
    what = (f"{args.method}{' code-compat' if args.biefficient_code_compat else ''} {args.arch}, T = {T}, batch "
            f"{args.batch_size} per GPU, {args.dataset} classes")
    print(f"One training step of {what} (fake tensors; GB = 1e9 bytes)\n")
    print("| row | peak GB | of which weights, batch, AdamW state | TFLOPs | FLOPs vs no checkpointing |"
          + (" vs TPR Table 6 |" if ref else ""))
    print("|---|---|---|---|---|" + ("---|" if ref else ""))
    table = [(n, c.peak, c.start, c.flops) for n, c in rows]
    table.append((f"{args.precision} + full, without the {full.unread / 1e9:.2f} GB of weights the step never "
                  "reads", full.peak - full.unread, full.start - full.unread, full.flops))
    for name, peak, start, flops in table:
        line = f"| {name} | {peak / 1e9:.2f} | {start / 1e9:.2f} | {flops / 1e12:.2f} | {flops / off_flops:.2f}x |"
        print(line + (f" {peak / 1e6 / ref:.2f}x of {ref:,} MB |" if ref else ""))
    print(f"\nauto plans a step to fit {train.AUTO_MEMORY_FRACTION:.0%} of {available / 1e9:.1f} GB "
          f"({args.device_gib:g} GiB less {CUDA_CONTEXT_BYTES / 2 ** 30:g} GiB of CUDA context); "
          f"{time.time() - t0:.1f} s wall, {time.process_time() - cpu0:.1f} s CPU")
    return [(name, peak, flops) for name, peak, _, flops in table]


if __name__ == "__main__":
    sys.exit(train.cli_main(main))
