import torch, clip, data, sys, time, reparam, prompts, text_branches as tb
from text_branches import multi_positive_contrastive_loss as L
torch.manual_seed(0)
method = sys.argv[1]; lr = float(sys.argv[2]); steps = int(sys.argv[3]); T = 8
def load(mode, n):
    ds = data.build_dataset("synthetic", mode=mode, frames=T, input_size=32, videos_per_class=n, seed=0)
    it = [ds[i] for i in range(len(ds))]
    v = torch.stack([x["video"] if x["video"].dim()==4 else x["video"][0] for x in it]); y = torch.tensor([x["label"] for x in it])
    return v, y
Vtr, Ytr = load("train", int(sys.argv[5]) if len(sys.argv)>5 else 32); Vte, Yte = load("test", 16)
cm = clip.build_random("tiny")
if method == "tpr":
    m = prompts.TPR(cm, T=T, S=8, reparam=reparam.ReparamEncoder(beta="r2plus1d", D=128, T=T, P=1+8+T), prefix=sys.argv[4] if len(sys.argv)>4 else "This is a video about {}.")
elif method == "tprmean":
    m = prompts.TPR(cm, T=T, S=8, pooling="mean", temporal_prompts=False, temporal_embedding=True)
else:
    m = prompts.BiEfficient(cm, T=T)
m.set_classes([n for n in data.SYNTHETIC_CLASSES])
params = [p for p in m.parameters() if p.requires_grad]
opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
t0 = time.time(); B = 16
for s in range(steps):
    idx = torch.randint(0, len(Ytr), (B,))
    out = m(Vtr[idx], Ytr[idx], Ytr[idx])
    loss = sum(L(out["logits"][k], Ytr[idx], Ytr[idx]) for k in m.loss_keys)
    opt.zero_grad(); loss.backward(); opt.step()
    if (s+1) % 100 == 0:
        m.eval()
        with torch.no_grad():
            sc = torch.cat([m.scores(m(Vte[i:i+32], None, torch.arange(8))) for i in range(0, len(Yte), 32)])
        m.train()
        print(f"step {s+1} loss {loss.item():.3f} test acc {(sc.argmax(-1)==Yte).float().mean().item():.3f} {time.time()-t0:.0f}s", flush=True)
