#!/usr/bin/env python3
"""The same U-Net as fluoropose's default model, in PyTorch, timed the same way as
`fluoropose bench model` (median forward ms at batch 1 in eval mode with batch norm folded away
by PyTorch's own inference path, and one BCE training step at batch 4 with AdamW).

Usage (a Python with torch; the project's tests never need it):
    python3 benches/pytorch_unet.py --size 256 --base 8 --depth 5 --threads 2 [--json] [--device cuda]
Run it right after `fluoropose bench model` on the same machine so the ratio is side by side.
"""
import argparse, json, statistics, time

import torch
import torch.nn as nn
import torch.nn.functional as F


def block(cin, cout):
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
    )


class UNet(nn.Module):
    def __init__(self, depth=5, base=8, n=8):
        super().__init__()
        ch = [base << i for i in range(depth)]
        self.enc = nn.ModuleList([block(1 if i == 0 else ch[i - 1], ch[i]) for i in range(depth)])
        self.dec = nn.ModuleList([block(ch[j + 1] + ch[j], ch[j]) for j in range(depth - 1)])
        self.head = nn.Conv2d(ch[0], n, 1)

    def forward(self, x):
        skips = []
        for i, e in enumerate(self.enc):
            if i > 0:
                x = F.max_pool2d(x, 2)
            x = e(x)
            skips.append(x)
        for j in reversed(range(len(self.dec))):
            s = skips[j]
            x = F.interpolate(x, size=s.shape[-2:], mode="nearest")
            x = self.dec[j](torch.cat([x, s], 1))
        return self.head(x)


def ops(dev, a):
    """Median ms of a batch-1 3x3 convolution (forward, input and weight gradient)."""
    for cin, cout, hw in [(16, 16, 256), (48, 16, 256), (128, 256, 32)]:
        x = torch.randn(1, cin, hw, hw, device=dev, requires_grad=True)
        w = torch.randn(cout, cin, 3, 3, device=dev, requires_grad=True)
        g = torch.randn(1, cout, hw, hw, device=dev)

        def timed(f, n=max(a.reps, 11)):
            f()
            ts = []
            for _ in range(n):
                t = time.perf_counter()
                f()
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                ts.append((time.perf_counter() - t) * 1e3)
            return statistics.median(ts)

        with torch.no_grad():
            fwd = timed(lambda: torch.nn.functional.conv2d(x, w, padding=1))
        y = torch.nn.functional.conv2d(x, w, padding=1)
        gx = timed(lambda: torch.autograd.grad(y, x, g, retain_graph=True))
        gw = timed(lambda: torch.autograd.grad(y, w, g, retain_graph=True))
        out = {"kernels": "pytorch " + torch.__version__, "cin": cin, "cout": cout, "size": hw,
               "forward_ms": fwd, "input_grad_ms": gx, "weight_grad_ms": gw,
               "threads": torch.get_num_threads()}
        print(json.dumps(out) if a.json else
              f"| {cin} -> {cout}, {hw}x{hw} | {fwd:.2f} | {gx:.2f} | {gw:.2f} |")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--base", type=int, default=8)
    ap.add_argument("--depth", type=int, default=5)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--ops", action="store_true",
                    help="time single 3x3 convolutions (benches/kernels.rs's shapes) instead")
    a = ap.parse_args()
    dev = torch.device(a.device)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.ops:
        return ops(dev, a)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(42)
    net = UNet(a.depth, a.base).to(dev)
    x1 = torch.randn(1, 1, a.size, a.size, device=dev)
    xb = torch.randn(a.batch, 1, a.size, a.size, device=dev)
    tgt = torch.zeros(a.batch, 8, a.size, a.size, device=dev)
    net.eval()
    with torch.inference_mode():
        net(x1)
        fwd = []
        for _ in range(a.reps):
            sync()
            t = time.perf_counter()
            net(x1)
            sync()
            fwd.append((time.perf_counter() - t) * 1e3)
    net.train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    loss_fn = nn.BCEWithLogitsLoss(pos_weight=torch.tensor(100.0, device=dev))

    def step():
        sync()
        t = time.perf_counter()
        opt.zero_grad()
        loss_fn(net(xb), tgt).backward()
        opt.step()
        sync()
        return (time.perf_counter() - t) * 1e3

    step()
    train = [step() for _ in range(max(1, min(a.reps, 3)))]
    out = {"kernels": "pytorch " + torch.__version__, "size": a.size, "base_channels": a.base,
           "depth": a.depth, "forward_ms": statistics.median(fwd),
           "train_step_ms": statistics.median(train), "batch": a.batch,
           "threads": torch.get_num_threads(), "device": str(dev)}
    if a.json:
        print(json.dumps(out))
    else:
        print(f"| pytorch | {a.size} | {out['forward_ms']:.1f} | {out['train_step_ms']:.1f} |")


if __name__ == "__main__":
    main()
