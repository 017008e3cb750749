"""One client's DP-SGD budget on pooled IID data: a quick screen of DP recipes.

Not a federated run: ``--n`` examples drawn from the pooled training data (682 = a demo
silo's average), ``--steps`` DP-SGD steps at batch ``--B`` with z calibrated by the
accountant for exactly those steps at ``--eps`` (0 = no DP), held-out accuracy on the first
400 test examples at four points. Logit adjustment off (the data is IID).

    .venv/bin/python bench/dp_probe.py --B 64 --steps 120 --lr 1e-2 --eps 8 \
        --sets model.pooling=mean,adapter.method=prompt,adapter.num_virtual_tokens=4
    .venv/bin/python bench/dp_probe.py ... --freeze lora_    # train only the head
"""

import argparse
import random
import sys
import time
from functools import partial
from pathlib import Path

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fedtune import adapters, config, workspace  # noqa: E402
from fedtune.data import collate  # noqa: E402
from fedtune.privacy import PrivacyConfig, make_private  # noqa: E402
from fedtune.train import evaluate, make_optimizer, train_local  # noqa: E402

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--B", type=int, default=64)
p.add_argument("--steps", type=int, default=120)
p.add_argument("--lr", type=float, default=1e-3)
p.add_argument("--clip", type=float, default=1.0)
p.add_argument("--eps", type=float, default=8.0, help="target epsilon (delta 1e-5); 0: no DP")
p.add_argument("--z", type=float, default=-1, help="a fixed noise multiplier instead of --eps")
p.add_argument("--n", type=int, default=682)
p.add_argument("--sets", default="", help="config overrides, comma-separated key=value")
p.add_argument("--freeze", default="", help="freeze trainable parameters whose name contains this")
a = p.parse_args()
torch.set_num_threads(2)
sets = [s for s in a.sets.split(",") if s] + [f"train.lr={a.lr}", f"train.batch_size={a.B}", "train.logit_adjustment=0"]
root = Path(__file__).resolve().parents[1]
cfg = config.load(root / "simulations/configs/default.toml", config.parse_overrides(sets))
ws = workspace.get(cfg)
adapters.set_state_(ws.model, ws.initial_state())
if a.freeze:
    for n, p_ in ws.model.named_parameters():
        if a.freeze in n:
            p_.requires_grad_(False)
print("trainable =", sum(p_.numel() for p_ in ws.model.parameters() if p_.requires_grad))
pooled = [ex for pid in range(cfg.federation.num_clients) for ex in ws.client_data(pid)]
random.Random(0).shuffle(pooled)
data, test = pooled[: a.n], ws.test_data()[:400]
loader = DataLoader(data, batch_size=a.B, collate_fn=partial(collate, pad_id=ws.pad_id, task=ws.task))
gen = torch.Generator().manual_seed(0)
model, opt, batches, pt = ws.model, make_optimizer(ws.model, cfg.train), None, None
if a.eps > 0:
    if a.z >= 0:
        pc = PrivacyConfig(mode="sample", noise_multiplier=a.z, max_grad_norm=a.clip, delta=1e-5)
    else:
        pc = PrivacyConfig(mode="sample", target_epsilon=a.eps, max_grad_norm=a.clip, delta=1e-5)
    pt = make_private(ws.model, opt, loader, pc, generator=gen, total_steps=a.steps if a.z < 0 else None)
    model, opt = pt.model, pt.optimizer
    batches = (b for _ in iter(int, 1) for b in pt.data_loader)
    print(f"z {pt.noise_multiplier:.3f} q {pt.sample_rate:.3f}")
t = time.time()
for i in range(4):
    m = train_local(
        model,
        data,
        cfg.train,
        task=ws.task,
        pad_id=ws.pad_id,
        device=ws.device,
        generator=gen,
        steps=a.steps // 4,
        optimizer=opt,
        batches=batches,
        clip=pt is None,
    )
    ev = evaluate(ws.model, test, task=ws.task, pad_id=ws.pad_id, device=ws.device, batch_size=128)
    print(
        f"step {(i + 1) * (a.steps // 4)} loss {m['train_loss']:.3f} acc {ev['accuracy']:.4f} {time.time() - t:.0f}s",
        flush=True,
    )
if pt is not None:
    print(f"epsilon {pt.accountant.epsilon(1e-5):.3f}")
