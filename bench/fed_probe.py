"""An in-process federated run (no Ray): `LocalGrid` + `ServerLoop`, clients one after another.

For quick looks at a recipe's learning curve; same client and server code as
`fedtune simulate`, progress printed per round. Usage:

    .venv/bin/python bench/fed_probe.py OUT_DIR [--config PATH] key=value [key=value ...]

(``--config`` defaults to simulations/configs/default.toml)

e.g. the DP recipe of BENCHMARKS.md at clip 5 on an IID split:
    .venv/bin/python bench/fed_probe.py bench/results/fed-probe/dp-iid data.partition=iid model.pooling=mean \
        federation.fraction_train=1.0 federation.min_train_clients=10 federation.rounds=6 \
        train.batch_size=64 train.local_steps=5 adapter.method=prompt adapter.num_virtual_tokens=4 \
        train.lr=1e-2 privacy.mode=sample privacy.target_epsilon=8 privacy.max_grad_norm=1.0 federation.eval_every=2
"""

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fedtune import config  # noqa: E402
from fedtune.flower.client import handle_train  # noqa: E402
from fedtune.flower.local import LocalGrid  # noqa: E402
from fedtune.flower.server import ServerLoop  # noqa: E402

if len(sys.argv) < 2:
    sys.exit(__doc__)
out, args = sys.argv[1], sys.argv[2:]
root = Path(__file__).resolve().parents[1]
path = root / "simulations/configs/default.toml"
if args[:1] == ["--config"]:
    path, args = Path(args[1]), args[2:]
overrides = config.parse_overrides(args + ["simulation.threads_per_client=2"])
cfg = config.load(path, overrides)
torch.set_num_threads(2)
grid = LocalGrid(cfg.federation.num_clients, lambda m, c: handle_train(m, c, cfg))
t0 = time.time()
summary = ServerLoop(cfg, out, progress=lambda s: print(f"[{time.time() - t0:.0f}s] {s}", flush=True)).main(grid)
print("final", summary["final"].get("accuracy"), "epsilon", summary["privacy"].get("epsilon"))
