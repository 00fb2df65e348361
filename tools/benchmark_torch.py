"""The PyTorch side of `make bench`: the reference GRUDecoder train step (SPEC §3.3, §4) timed like benchmark.py.

  python tools/benchmark_torch.py --batch=8 --time_bins=500 --steps=10

Written from the SPEC (not copied from the reference): day layers gathered per trial and applied with bmm,
softsign, dropout, patching by `unfold`, `torch.nn.GRU` (5 x 768, dropout 0.4, learned h0), Linear(41),
`F.ctc_loss` summed per trial then averaged over the batch, AdamW (eps 0.1, decay on non-day weights only),
clipping at global norm 10, and the same train-time augmentation (white noise, constant offset, 9-tap Gaussian
smoothing). Prints one JSON line with the fields of benchmark.py that apply (the load average and the peak
probes before and after the timed steps, and other processes' share of the cores, too). torch is an optional extra.
"""

import argparse
import json
import os
import resource
import time

import benchlib  # tools/ is the script's own folder
import numpy as np


def _import_torch():
  try:
    import torch
  except ImportError as e:
    raise SystemExit("tools/benchmark_torch.py needs PyTorch: pip install -e '.[test]' (or `pip install torch`)") from e
  return torch


def build(torch, args):
  """The model, optimizer and step function of the reference recipe at the sizes in `args`."""
  nn, F = torch.nn, torch.nn.functional

  class GRUDecoder(nn.Module):
    def __init__(self):
      super().__init__()
      f, h = args.n_features, args.hidden
      self.day_weights = nn.Parameter(torch.eye(f).repeat(args.n_days, 1, 1))
      self.day_biases = nn.Parameter(torch.zeros(args.n_days, 1, f))
      self.gru = nn.GRU(f * args.patch_size, h, args.n_layers, dropout=args.rnn_dropout, batch_first=True)
      self.h0 = nn.Parameter(nn.init.xavier_uniform_(torch.zeros(1, 1, h)))
      self.out = nn.Linear(h, args.n_classes)
      self.drop = nn.Dropout(args.input_dropout)

    def forward(self, x, day):
      x = F.softsign(torch.bmm(x, self.day_weights[day]) + self.day_biases[day])
      x = self.drop(x)
      # (B, T, F) -> (B, P, F, K) -> (B, P, K * F): flat index k * F + d, as SPEC §3.1.
      x = x.unfold(1, args.patch_size, args.patch_stride).permute(0, 1, 3, 2).flatten(2)
      h0 = self.h0.expand(args.n_layers, x.shape[0], -1).contiguous()
      y, _ = self.gru(x, h0)
      return self.out(y)

  model = GRUDecoder()
  day_params = [model.day_weights, model.day_biases]
  decay = [p for n, p in model.named_parameters() if n.startswith(("gru.weight", "out.weight", "h0"))]
  no_decay = [p for n, p in model.named_parameters() if not n.startswith(("gru.weight", "out.weight", "h0", "day_"))]
  opt = torch.optim.AdamW(
    [
      {"params": decay, "weight_decay": args.weight_decay},
      {"params": no_decay, "weight_decay": 0.0},
      {"params": day_params, "weight_decay": 0.0},
    ],
    lr=args.lr,
    betas=(0.9, 0.999),
    eps=args.eps,
  )
  x = np.arange(100) - 50  # centred on a sample, as augment.gaussian_kernel: 9 taps above 0.01
  taps = np.exp(-0.5 * (x / 2.0) ** 2)
  taps = taps / taps.sum()
  taps = taps[taps > 0.01]
  taps = torch.tensor(taps / taps.sum(), dtype=torch.float32)
  kernel = taps.view(1, 1, -1).repeat(args.n_features, 1, 1)

  def step(features, day, labels, input_lens, label_lens):
    model.train()
    b = features.shape[0]
    x = features + args.white_noise_std * torch.randn_like(features)
    x = x + args.offset_std * torch.randn(b, 1, features.shape[2])
    x = F.conv1d(x.transpose(1, 2), kernel, padding="same", groups=args.n_features).transpose(1, 2)
    logits = model(x, day)
    log_probs = logits.log_softmax(-1).transpose(0, 1)
    loss = F.ctc_loss(log_probs, labels, input_lens, label_lens, blank=0, reduction="none").mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
    opt.step()
    return loss

  return model, step


def measure_matmul_peak(torch, n: int, repeats: int = 5) -> float:
  a = torch.randn(n, n)
  torch.mm(a, a)
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    torch.mm(a, a)
    times.append(time.perf_counter() - t0)
  return 2 * n**3 / min(times)


def analytic_flops(args) -> float:
  """Same convention as b2t_jax.summary.train_step_flops (3 x forward matmul FLOPs), written for these args."""
  f, h, k = args.n_features, args.hidden, args.patch_size
  patches = (args.time_bins - k) // args.patch_stride + 1
  gru = sum(2 * (f * k if i == 0 else h) * 3 * h + 2 * h * 3 * h for i in range(args.n_layers))
  fwd = 2 * f * f * args.time_bins + (gru + 2 * h * args.n_classes) * patches
  return 3 * args.batch * fwd


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--time_bins", type=int, default=500)
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--label_len", type=int, default=30)
  p.add_argument("--n_features", type=int, default=512)
  p.add_argument("--n_days", type=int, default=45)
  p.add_argument("--days_per_batch", type=int, default=4)
  p.add_argument("--hidden", type=int, default=768)
  p.add_argument("--n_layers", type=int, default=5)
  p.add_argument("--n_classes", type=int, default=41)
  p.add_argument("--patch_size", type=int, default=14)
  p.add_argument("--patch_stride", type=int, default=4)
  p.add_argument("--input_dropout", type=float, default=0.2)
  p.add_argument("--rnn_dropout", type=float, default=0.4)
  p.add_argument("--white_noise_std", type=float, default=1.0)
  p.add_argument("--offset_std", type=float, default=0.2)
  p.add_argument("--lr", type=float, default=0.005)
  p.add_argument("--eps", type=float, default=0.1)
  p.add_argument("--weight_decay", type=float, default=0.001)
  p.add_argument("--grad_clip", type=float, default=10.0)
  p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = all cores)")
  p.add_argument("--matmul_n", type=int, default=2048)
  p.add_argument("--tag", default="")
  p.add_argument(
    "--busy_load",
    type=float,
    default=benchlib.DEFAULT_BUSY_LOAD,
    help="without /proc/stat: warn (and set quiet=false) when the 1-minute load average exceeds this at start",
  )
  p.add_argument(
    "--busy_share",
    type=float,
    default=benchlib.DEFAULT_BUSY_SHARE,
    help="warn (and set quiet=false) when other processes and the hypervisor took more of the cores' time",
  )
  args = p.parse_args()
  load_before = benchlib.load_average()

  torch = _import_torch()
  torch.manual_seed(0)
  torch.set_num_threads(args.threads or os.cpu_count())
  model, step = build(torch, args)
  rng = np.random.default_rng(0)
  b, t = args.batch, args.time_bins
  features = torch.tensor(rng.standard_normal((b, t, args.n_features)), dtype=torch.float32)
  day = torch.tensor(np.arange(b) % args.days_per_batch)
  labels = torch.tensor(rng.integers(1, args.n_classes, (b, args.label_len)))
  input_lens = torch.full((b,), (t - args.patch_size) // args.patch_stride + 1, dtype=torch.long)
  label_lens = torch.full((b,), args.label_len, dtype=torch.long)

  cpu_before = benchlib.cpu_snapshot()  # others' share over the figures' window: probes and timed steps
  peak_before = measure_matmul_peak(torch, args.matmul_n)
  t0 = time.perf_counter()
  for _ in range(args.warmup):
    step(features, day, labels, input_lens, label_lens)
  warmup_s = time.perf_counter() - t0
  times = []
  for _ in range(args.steps):
    t0 = time.perf_counter()
    loss = step(features, day, labels, input_lens, label_lens)
    times.append(time.perf_counter() - t0)
  flops = analytic_flops(args)
  step_s, figures = benchlib.step_figures(times, b, flops)
  peak_after = measure_matmul_peak(torch, args.matmul_n)
  shares = benchlib.others_share(cpu_before, benchlib.cpu_snapshot())
  peak, peak_fields = benchlib.peak_report(peak_before, peak_after)
  load = benchlib.load_report(load_before, benchlib.load_average(), args.busy_load, shares, args.busy_share)
  print(
    json.dumps(
      {
        "tool": "torch",
        "tag": args.tag,
        "config": "gru_baseline (torch)",
        "model": "gru",
        "encoder": "gru",
        "n_params": sum(p.numel() for p in model.parameters()),
        "platform": "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "dtype": "float32",
        "global_batch": b,
        "time_bins": t,
        "warmup_s": round(warmup_s, 2),
        **figures,
        "peak_gflops_per_s": round(peak / 1e9, 2),
        "peak_source": f"measured fp32 {args.matmul_n}^3 torch.mm",
        **peak_fields,
        "mfu": round(flops / step_s / peak, 6),
        "peak_memory_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
        "memory_source": "process max RSS",
        "final_loss": round(float(loss), 4),
        "steps": args.steps,
        **load,
      }
    )
  )


if __name__ == "__main__":
  main()
