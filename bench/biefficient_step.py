"""BiEfficient's training step under --biefficient-code-compat: ours against the authors' computation.

    python bench/biefficient_step.py                      # cuda if available: the authors' K400 shapes per GPU
    python bench/biefficient_step.py --device cpu --arch tiny --batch-size 3 --frames 2 --candidates 4

First it checks, in fp32 on the same weights and batch (one class repeated in it), that `authors_logits`, a
re-statement of the authors' forward pass (WbLiuBJTULab/BiEfficient, modules/biefficient.py) on our modules and
weights, gives our logits, loss and gradients: the timing then compares two ways of computing one function.
Then it times training steps (forward, the authors' multi-hot loss, backward, AdamW, as train.py with
--biefficient-code-compat) of three rows: ours, ours with gradient checkpointing, the authors' way. Each row
lives in its own worker process, so its peak memory is its own (CUDA max_memory_allocated, or the process's max
RSS on a CPU); the rows are timed interleaved, one step of each in turn per round (A B C A B C ...), and the
table gives the medians over the rounds of wall and CPU seconds per step, so a change of machine load shifts
every row alike. Random CLIP weights: time and memory do not depend on their values.
"""
import argparse
import contextlib
import io
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.checkpoint import checkpoint  # noqa: E402

import clip  # noqa: E402
import prompts  # noqa: E402
from text_branches import multi_hot_contrastive_loss  # noqa: E402  (the authors' loss: gen_label + CE)

ROWS = ("ours", "ours+ckpt", "authors")
NAMES = {"ours": "ours", "ours+ckpt": "ours + --grad-checkpointing", "authors": "authors' way"}


def authors_logits(model, video, texts):
    """The authors' forward pass re-stated on our model's modules and weights: the same function as `model(...)`
    in code_compat mode, computed the way their code computes it. video (B, T, 3, H, W); texts: A class names.
    Returns logits (B, A).

    As their code: the frozen visual tower gets no graph; the patch memory is projected per frame, then
    averaged; the prompts are tokenised in every forward from placeholder text "X ... X name"; a Python loop
    over the B videos runs the text tower on all 77 positions of the A texts, block by block under gradient
    checkpointing; LayerNorm and the WGVP of BiEfficient Eq. (8)-(9) in a second loop over the videos; no
    de-duplication of repeated class names."""
    cm, P = model.clip_model, model.n_prompt
    B, T = video.shape[:2]
    with torch.no_grad():  # their visual tower: frozen, outside the graph
        cls, patches = cm.visual(video.flatten(0, 1), return_tokens=True)  # (B T, E), (B T, N, D)
    frames = model.head(cls.view(B, T, -1))  # VideoHead: (B, T, E)
    mem = model.patch_ln(patches) @ model.patch_proj  # (B T, N, E): projected per frame ...
    mem = mem.view(B, T, *mem.shape[1:]).mean(dim=1)  # ... then averaged: (B, N, E)
    prompt_tokens = model.pre(mem, None)  # Meta-Net: (B, P, W) = [context, meta token]
    ids = clip.tokenize([" ".join(["X"] * P) + " " + name for name in texts]).to(video.device)  # (A, 77)
    with torch.no_grad():
        emb = cm.token_embedding(ids)  # (A, 77, W)
    eot = ids.argmax(dim=-1)  # (A,)
    cls_embs, word_embs = [], []
    for p in prompt_tokens:  # one video at a time: (P, W)
        x = torch.cat([emb[:, :1], p[None].expand(len(texts), -1, -1), emb[:, 1 + P:]], dim=1)  # (A, 77, W)
        x = x + cm.positional_embedding
        for block in cm.transformer.resblocks:
            x = checkpoint(block, x, use_reentrant=False)  # (A, 77, W)
        x = cm.ln_final(x)
        word_embs.append(x @ cm.text_projection)  # (A, 77, E)
        cls_embs.append(x[torch.arange(len(texts)), eot] @ cm.text_projection)  # (A, E)
    c = model.post(torch.stack(cls_embs), mem)  # Post-Prompt: (B, A, E)
    words = torch.stack(word_embs)  # (B, A, 77, E)
    wgvp, pooled = model.wgvp, []
    for c_b, w_b, v_b in zip(c, words, frames):  # get_logits_vcs: one video at a time
        w_b = F.normalize(wgvp.ln_word(w_b), dim=-1)  # (A, 77, E)
        v_b = F.normalize(v_b, dim=-1)  # (T, E)
        v_mean = v_b.mean(dim=0)  # (E,)
        top1 = (F.normalize(wgvp.ln_class(c_b), dim=-1) @ v_mean).argmax()
        weights = torch.softmax(w_b[top1] @ v_b.T / wgvp.tau, dim=-1).mean(dim=0)  # (T,)
        pooled.append(v_mean + wgvp.beta * (weights @ v_b))  # (E,)
    return model.logit_scale.exp() * torch.einsum("be,bae->ba", torch.stack(pooled), F.normalize(c, dim=-1))


def setup(arch, B, T, A, device, grad_checkpointing=False):
    """The benchmark's model (code_compat, every trainable parameter moved off its init), batch and labels.
    Deterministic: every process that calls it gets the same weights and data. One class repeats in the batch
    (when B >= 3), as in most Kinetics-400 batches of 32; A - B further candidate classes have no video."""
    torch.manual_seed(0)
    with contextlib.redirect_stderr(io.StringIO()):  # the random-init warning: timing needs no real weights
        clip_model = clip.build_random(arch)
    model = prompts.BiEfficient(clip_model, T=T, code_compat=True, grad_checkpointing=grad_checkpointing)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.02 * torch.randn_like(p))
    model = model.to(device).train()
    labels = torch.arange(B)
    if B >= 3:
        labels[-1] = 0
    candidates = torch.cat([labels, torch.arange(B, A)])  # (A,) the batch's labels first
    model.set_classes([f"action {i}" for i in range(B + A)])
    R = clip_model.visual.input_resolution
    video = torch.randn(B, T, 3, R, R)
    return model, video.to(device), labels.to(device), candidates.to(device)


def forward_loss(row, model, video, labels, candidates):
    """One row's logits (B, A) and the authors' loss on them."""
    if row == "authors":
        logits = authors_logits(model, video, [model.class_names[i] for i in candidates.tolist()])
    else:
        logits = model(video, labels, candidates)["logits"]["en"]
    return logits, multi_hot_contrastive_loss(logits.float(), labels, candidates)


def check(arch, B, T, A, device):
    """Before timing: the re-statement must compute our model's numbers (logits, loss, gradients) in fp32.
    Returns the largest relative differences and the loss; raises AssertionError if they are not rounding."""
    model, video, labels, candidates = setup(arch, B, T, A, torch.device(device))
    params = [p for p in model.parameters() if p.requires_grad]
    results = []
    for row in ("ours", "authors"):
        logits, loss = forward_loss(row, model, video, labels, candidates)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        results.append((logits.detach(), loss.detach(), [torch.zeros_like(p) if g is None else g
                                                         for p, g in zip(params, grads)]))
    (l1, s1, g1), (l2, s2, g2) = results
    d_logits = float((l1 - l2).abs().max() / l2.abs().max().clamp_min(1e-12))
    d_loss = abs(float(s1 - s2)) / max(abs(float(s2)), 1e-12)
    # Per parameter, relative to its own scale, floored at 1e-3 of the largest gradient: the key biases of the
    # attentions have a true gradient of 0 (a shift shared by all keys leaves the softmax unchanged), so theirs
    # is float noise in both.
    g_max = max(float(b.abs().max()) for b in g2)
    d_grad = max(float((a - b).abs().max()) / max(float(b.abs().max()), 1e-3 * g_max, 1e-30) for a, b in zip(g1, g2))
    assert max(d_logits, d_loss, d_grad) < 1e-3, (
        f"the authors' re-statement does not compute our numbers (relative differences: logits {d_logits:.2e}, "
        f"loss {d_loss:.2e}, gradients {d_grad:.2e}); the timing would compare different functions")
    return d_logits, d_loss, d_grad, float(s1)


def worker(row, arch, B, T, A, device, precision):
    """One row in its own process: builds it, runs a warm-up step, then one timed training step per "step" line
    on stdin, answering each with one JSON line (wall and CPU seconds); "peak" answers the peak memory."""
    device = torch.device(device)
    model, video, labels, candidates = setup(arch, B, T, A, device, grad_checkpointing=row == "ours+ckpt")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            _, loss = forward_loss(row.split("+")[0], model, video, labels, candidates)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        sync()

    step()  # warm-up (and the AdamW state)
    # What the process holds between steps (weights, AdamW state): CUDA memory_allocated, or the resident set
    # now (Linux /proc); the peaks count from the timed steps on (CUDA) or over the process (max RSS).
    if device.type == "cuda":
        held = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        with open("/proc/self/statm") as f:
            held = int(f.read().split()[1]) * resource.getpagesize()
    print(json.dumps(dict(ready=True, held=held)), flush=True)
    for line in sys.stdin:
        if line.strip() == "step":
            wall, cpu = time.perf_counter(), time.process_time()
            step()
            print(json.dumps(dict(wall=time.perf_counter() - wall, cpu=time.process_time() - cpu)), flush=True)
        elif line.strip() == "peak":
            peak = (torch.cuda.max_memory_allocated() if device.type == "cuda"
                    else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)  # ru_maxrss: KiB
            print(json.dumps(dict(peak=peak)), flush=True)
        else:
            return


class Row:
    """A worker process and its measurements."""

    def __init__(self, row, args):
        self.row, self.wall, self.cpu = row, [], []
        self.err = tempfile.TemporaryFile(mode="w+")  # a file, not a pipe: a chatty stderr cannot block
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", row, "--arch", args.arch,
               "--batch-size", str(args.batch_size), "--frames", str(args.frames), "--candidates",
               str(args.candidates), "--device", args.device, "--precision", args.precision]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.err, text=True)

    def ask(self, what=None):
        if what is not None:
            self.proc.stdin.write(what + "\n")
            self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            self.err.seek(0)
            raise RuntimeError(f"benchmark row {self.row} failed (exit code {self.proc.returncode}):\n"
                               f"{self.err.read()[-3000:]}")
        return json.loads(line)

    def close(self):
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait()


def benchmark(args):
    """Prints the check, then the interleaved timing table; returns {row: {wall, cpu, peak, held}}."""
    cuda = args.device == "cuda"
    print(f"BiEfficient benchmark (training step, --biefficient-code-compat, the authors' loss): arch={args.arch} "
          f"B={args.batch_size} T={args.frames} A={args.candidates} device={args.device} "
          f"precision={args.precision} rounds={args.steps} (+1 warm-up), rows interleaved", flush=True)
    d_logits, d_loss, d_grad, loss = check(args.arch, args.batch_size, args.frames, args.candidates, args.device)
    print(f"  check (fp32, same weights and batch): authors' re-statement vs ours, relative max differences: "
          f"logits {d_logits:.1e}, loss {d_loss:.1e} (loss {loss:.4f}), gradients {d_grad:.1e}", flush=True)
    rows = {}
    try:
        for row in ROWS:  # started one after another: on a GPU, two builds at once would share it
            rows[row] = Row(row, args)
            rows[row].held = rows[row].ask()["held"]
        for _ in range(args.steps):  # one round: one step of every row in turn
            for r in rows.values():
                answer = r.ask("step")
                r.wall.append(answer["wall"])
                r.cpu.append(answer["cpu"])
        for r in rows.values():
            r.peak = r.ask("peak")["peak"]
    finally:
        for r in rows.values():
            r.close()
    result = {row: dict(wall=statistics.median(r.wall), cpu=statistics.median(r.cpu), peak=r.peak, held=r.held)
              for row, r in rows.items()}
    what = "peak CUDA memory (max_memory_allocated)" if cuda else "peak process memory (max RSS)"
    print(f"  {'row':28s} {'wall/step':>10s} {'CPU/step':>10s}   {what}: total / above weights + AdamW state")
    mib = 2 ** 20
    for row, r in result.items():
        print(f"  {NAMES[row]:28s} {r['wall']:8.3f} s {r['cpu']:8.3f} s   {r['peak'] / mib:9.1f} MiB / "
              f"{(r['peak'] - r['held']) / mib:9.1f} MiB")
    ref = result["authors"]
    for row in ("ours", "ours+ckpt"):
        r = result[row]
        print(f"  {NAMES[row]} vs authors' way: {ref['wall'] / r['wall']:.2f}x faster (wall; CPU "
              f"{ref['cpu'] / r['cpu']:.2f}x), memory {r['peak'] / ref['peak']:.2f}x total, "
              f"{(r['peak'] - r['held']) / max(ref['peak'] - ref['held'], 1):.2f}x above weights + state "
              f"(goal on a GPU: >= 2x faster, <= 0.5x memory)")
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description="BiEfficient training step (code-compat, random CLIP weights): "
                                     "ours against the authors' computation, rows interleaved.")
    parser.add_argument("--arch", default="ViT-B/16", choices=list(clip.ARCHS), help="CLIP architecture shapes")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="videos per step, B (default: 32 on cuda, the authors' per-GPU batch; 2 on cpu)")
    parser.add_argument("--frames", type=int, default=8, help="frames per video, T (the authors' K400 config: 8)")
    parser.add_argument("--candidates", type=int, default=None,
                        help="candidate class texts, A >= B: the batch's labels, then others (default: A = B)")
    parser.add_argument("--steps", type=int, default=None,
                        help="timed rounds after one warm-up step, one step of every row each (cuda 5, cpu 2)")
    parser.add_argument("--device", default=None, choices=("cpu", "cuda"), help="default: cuda if available")
    parser.add_argument("--precision", default=None, choices=("fp32", "fp16", "bf16"),
                        help="autocast (default: fp16 + GradScaler on cuda, as the authors; fp32 on cpu)")
    parser.add_argument("--worker", default=None, choices=ROWS, help=argparse.SUPPRESS)  # internal: one row
    args = parser.parse_args(argv)
    for name in ("batch_size", "frames", "candidates", "steps"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} {value}: must be >= 1")
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU is available here; use --device cpu")
    if not cuda and args.precision == "fp16":
        parser.error("--precision fp16 needs --device cuda (fp16 autocast is a GPU mode); use fp32 or bf16 on cpu")
    # The authors' K400 config on a GPU (batch 32 per rank, the batch's 32 labels as the texts); on a CPU a
    # shape that fits in minutes: 2 videos, their 2 labels.
    args.batch_size = args.batch_size or (32 if cuda else 2)
    args.candidates = args.candidates or args.batch_size
    if args.candidates < args.batch_size:
        parser.error(f"--candidates {args.candidates} < --batch-size {args.batch_size}: the candidates are the "
                     f"batch's labels, then others")
    args.steps = args.steps or (5 if cuda else 2)
    args.precision = args.precision or ("fp16" if cuda else "fp32")
    if args.worker:
        return worker(args.worker, args.arch, args.batch_size, args.frames, args.candidates, args.device,
                      args.precision)
    try:
        return benchmark(args)
    except AssertionError as e:
        print(f"biefficient_step.py: error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
