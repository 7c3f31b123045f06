"""bench.py — speed and memory of common.py, side by side with a plain reference.

For the default model size of each experiment it prints
  * training: tokens/s and ms/step of common.train() — ours (SDPA attention, the last block only at
    the answer positions when the loss reads only those, 1 thread on CPU) vs the plain reference (the
    manual attention path over every position, PyTorch's default thread count), and the ratio;
  * evaluation at T = 1k, 4k, 16k: tokens/s and peak memory of one forward — ours (the probe on the
    fast path, what evaluate_with_probes runs) vs the reference (manual path, which builds T x T maps);
  * --jobs scaling: the training throughput of K processes at once on the device (each trains the
    vanishing_variance-size model; a barrier starts their timed windows together), K = 1, 2 on CPU
    and 1, 2, 4, 8, 16 on a GPU, as aggregate steps/s and the speed-up over one process;
  * on a GPU, from those: the estimated training time of each script's --preset paper (its cells x
    steps at the measured ms/step, divided by the best --jobs speed-up; evaluation not included).
fp32 unless --dtype bf16 (CUDA). On CUDA, memory is torch.cuda.max_memory_allocated.

    python bench.py                 # everything, ~5 minutes on 2 CPU cores
    python bench.py --quick         # fewer steps, evaluation at T = 1024 only
    python bench.py --device cuda   # add --dtype bf16 to measure bf16 autocast

CPU memory: each evaluation figure comes from a fresh subprocess: its peak resident set (ru_maxrss)
after the forwards minus its resident set just before them (an upper bound on what the forward adds).
"""
import argparse
import json
import multiprocessing as mp
import os
import resource
import subprocess
import sys
import time
from dataclasses import replace
from queue import Empty

import torch

import common as C
import cli
import harness as H

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "tests"))
from reference import Reference, reference_forward  # noqa: E402  the explicit T x T path, for comparison

# Default sizes: vanishing_variance.py's default model (its item embedding stood in for by a token
# table; T = 16 items + the query); parity_random_access.py's default model on its longest training
# example (mnemonic, n = 20: T = 83, the loss on the 21 produced tokens); sparse_planted.py's sparse
# parity model (NoPE, vocabulary 6) on its longest training example (l = 20 bits + '^' and '=': T = 22,
# the loss on the last token).
MODELS = {
    "vanishing_variance": dict(cfg=dict(vocab_size=9, n_layer=2, n_head=4, n_embd=64), T=17, batch=64, loss="last"),
    "parity_random_access": dict(cfg=dict(vocab_size=142, n_layer=3, n_head=4, n_embd=64, pos="rope"), T=83, batch=64,
                                 loss=list(range(42, 81, 2)) + [81]),
    "sparse_planted": dict(cfg=dict(vocab_size=6, n_layer=2, n_head=4, n_embd=64), T=22, batch=64, loss="last"),
}


def sampler(spec):
    V, T = spec["cfg"]["vocab_size"], spec["T"]

    def sample(rng, b):
        idx = torch.from_numpy(rng.integers(0, V, size=(b, T)))
        if spec["loss"] == "last":
            return {"idx": idx, "at": torch.full((b, 1), T - 1), "targets": idx[:, :1].clone()}
        if isinstance(spec["loss"], list):  # the loss at these positions only
            at = torch.tensor(spec["loss"]).expand(b, -1)
            return {"idx": idx, "at": at, "targets": idx.gather(1, at)}
        return {"idx": idx, "targets": idx.roll(1, dims=1)}
    return sample


def bench_train(spec, device, manual, threads, steps, dtype):
    if device.type == "cpu":
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = C.GPT(C.GPTConfig(block_size=spec["T"], **spec["cfg"]))
    model = Reference(model) if manual else model
    cfg = C.TrainConfig(steps=steps, batch_size=spec["batch"], dtype=dtype)
    C.train(model, sampler(spec), replace(cfg, steps=5), device, 0, progress=False)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    C.train(model, sampler(spec), cfg, device, 1, progress=False)
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    return {"tok_s": steps * spec["batch"] * spec["T"] / dt, "ms_step": 1000 * dt / steps}


def eval_once(name, T, manual, threads, device_name, dtype="fp32"):
    """One evaluation forward at length T in this process: tokens/s and peak memory (MiB)."""
    spec, device = MODELS[name], torch.device(device_name)
    if device.type == "cpu":
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = C.GPT(C.GPTConfig(block_size=T, **spec["cfg"])).to(device).eval()
    B = max(1, 16384 // T)
    idx = torch.randint(0, spec["cfg"]["vocab_size"], (B, T), device=device)
    at = torch.full((B, 1), T - 1, device=device)
    base = int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20 \
        if device.type == "cpu" else 0.0  # resident MiB now; the peak below is an upper bound on the rise

    def fwd():
        with torch.no_grad(), C.autocast(device, dtype):
            return reference_forward(model, idx, at=at) if manual else model.probe(idx, at)
    fwd()  # warm-up (also sets the peak)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    reps, t0 = 0, time.perf_counter()
    while reps < 2 or time.perf_counter() - t0 < 1.0:
        fwd()
        reps += 1
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base
    return {"tok_s": reps * B * T / (time.perf_counter() - t0), "peak_mib": peak}


def bench_eval(name, T, manual, threads, device, dtype):
    if device.type == "cuda":
        return eval_once(name, T, manual, threads, "cuda", dtype)
    p = subprocess.run([sys.executable, __file__, "--_eval", json.dumps([name, T, manual, threads, "cpu", dtype])],
                       capture_output=True, text=True, timeout=900)
    if p.returncode != 0:
        return {"tok_s": float("nan"), "peak_mib": float("nan"), "error": p.stderr.strip().splitlines()[-1:]}
    return json.loads(p.stdout.strip().splitlines()[-1])


def scaling_worker(device_name, dtype, steps, barrier, queue):
    """One of K processes training the vanishing_variance-size model at once: its timed window."""
    torch.set_num_threads(1)
    device, spec = torch.device(device_name), MODELS["vanishing_variance"]
    torch.manual_seed(0)
    model = C.GPT(C.GPTConfig(block_size=spec["T"], **spec["cfg"]))
    C.train(model, sampler(spec), C.TrainConfig(steps=5, batch_size=spec["batch"], dtype=dtype), device, 0,
            progress=False)
    if device.type == "cuda":
        torch.cuda.synchronize()
    barrier.wait()  # every process starts its timed window together
    t0 = time.time()
    C.train(model, sampler(spec), C.TrainConfig(steps=steps, batch_size=spec["batch"], dtype=dtype), device, 1,
            progress=False)
    if device.type == "cuda":
        torch.cuda.synchronize()
    queue.put((t0, time.time()))


def bench_jobs(device, dtype, counts, steps, worker=scaling_worker):
    """{K: aggregate training steps/s of K processes at once on one device}."""
    ctx, out = mp.get_context("spawn"), {}
    for k in counts:
        barrier, queue = ctx.Barrier(k), ctx.Queue()
        procs = [ctx.Process(target=worker, args=(str(device), dtype, steps, barrier, queue)) for _ in range(k)]
        for p in procs:
            p.start()
        spans = gather(procs, queue)
        for p in procs:
            p.join()
        out[k] = k * steps / (max(end for _, end in spans) - min(start for start, _ in spans))
    return out


def gather(procs, queue):
    """Each process's timed span; if one dies first (killed, out of memory), the others are stopped and
    the benchmark ends with one line instead of waiting for it (they would wait at the barrier forever)."""
    spans = []
    while len(spans) < len(procs):
        try:
            spans.append(queue.get(timeout=1))
        except Empty:
            dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
            if dead:
                for p in procs:
                    p.kill()
                raise SystemExit(f"error: a --jobs scaling process died (exit status {dead[0]}; killed or out of "
                                 "memory?); the figures above are complete")
    return spans


def paper_steps():
    """Training steps summed over the cells of each script's --preset paper (pre-training included)."""
    import parity_random_access as PA
    import sparse_planted as SP
    import vanishing_variance as VV
    vv = replace(VV.Config(), **VV.PRESETS["paper"])
    pa = replace(PA.Config(), **PA.PRESETS["paper"])
    sp = replace(SP.Config(), **SP.PRESETS["paper"])
    sp_steps = {"sparsity": sp.steps, "fixed": sp.steps, "locality": sp.loc_steps, "ppc": sp.ppc_steps}
    sp_cells = H.make_cells(sp, SP.SCRIPT.axes, torch.device("cpu"), SP.groups(sp))
    return {"vanishing_variance": len(vv.tasks) * len(vv.variants) * vv.seeds * vv.steps,
            "parity_random_access": len(pa.formats) * len(pa.pos) * pa.seeds * (pa.steps + pa.pretrain_steps),
            "sparse_planted": sum(sp_steps[c["exp"]] for c in sp_cells)}


def print_estimates(results, thr):
    """The estimated training time of each --preset paper, from the measured ms/step of each model and
    the best --jobs speed-up in thr ({K: steps/s}); stores it in results[name]['paper_hours']."""
    best = max(thr, key=thr.get)
    print(f"\nestimated training time of each --preset paper at --jobs {best} ({thr[best] / thr[1]:.1f}x; "
          "the speed-up of the vanishing_variance model applied to all; evaluation not included):")
    for name, total in paper_steps().items():
        hours = total * results[name]["train"]["ours"]["ms_step"] / 1000 / (thr[best] / thr[1]) / 3600
        results[name]["paper_hours"] = hours
        print(f"  {name:<22} {total:>10,} steps  ~{hours:5.2f} h")


def main(argv=None):
    p = cli.OneLineParser(description=__doc__.splitlines()[0], allow_abbrev=False)  # a bad flag: one 'error:' line
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"], help="device to measure")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"), help="fp32, or bf16 autocast (CUDA only)")
    p.add_argument("--quick", action="store_true", help="fewer steps, evaluation at T = 1024 only: a short look")
    p.add_argument("--steps", type=int, default=0, help="training steps timed per figure (0: 200, quick 60)")
    p.add_argument("--_eval", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._eval:
        print(json.dumps(eval_once(*json.loads(args._eval))))
        return
    if args.steps < 0:  # before the device line: a bad value is the only thing printed
        p.exit(H.EXIT_USAGE, f"error: --steps must be >= 0 (0: the default), got {args.steps}\n")
    try:
        device = cli.pick_device(args.device, C.TrainConfig(dtype=args.dtype))
    except C.UsageError as e:  # e.g. --device cuda on a machine without CUDA: one line, exit 2
        p.exit(H.EXIT_USAGE, f"error: {e}\n")
    steps = args.steps or (60 if args.quick else 200)
    lengths = (1024,) if args.quick else (1024, 4096, 16384)
    # on CPU ours runs one thread, the reference PyTorch's default; on CUDA neither sets it (host threads)
    default_threads = os.cpu_count() if device.type == "cpu" else torch.get_num_threads()
    ours_threads = 1 if device.type == "cpu" else default_threads
    print(f"torch {torch.__version__}, {os.cpu_count()} CPU cores; ours: SDPA, {ours_threads} thread(s); "
          f"reference: manual attention, {default_threads} thread(s)"
          f"{' (PyTorch default)' if device.type == 'cpu' else ' (host threads; both run on the GPU)'}\n")
    results = {}
    print(f"{'model':<22} {'what':<14} {'ours':>22} {'reference':>22} {'ratio':>7}")
    for name, spec in MODELS.items():
        a = bench_train(spec, device, False, ours_threads, steps, args.dtype)
        b = bench_train(spec, device, True, default_threads, steps, args.dtype)
        results[name] = {"train": {"ours": a, "reference": b}}
        print(f"{name:<22} {'train tok/s':<14} {a['tok_s']:>12,.0f} ({a['ms_step']:5.1f} ms) "
              f"{b['tok_s']:>12,.0f} ({b['ms_step']:5.1f} ms) {a['tok_s'] / b['tok_s']:>6.2f}x")
        for T in lengths:
            a = bench_eval(name, T, False, ours_threads, device, args.dtype)
            b = bench_eval(name, T, True, default_threads, device, args.dtype)
            results[name][f"eval_{T}"] = {"ours": a, "reference": b}
            print(f"{'':<22} {f'eval T={T}':<14} {a['tok_s']:>10,.0f} (+{a['peak_mib']:5.0f} MiB)"
                  f" {b['tok_s']:>10,.0f} (+{b['peak_mib']:5.0f} MiB) {a['tok_s'] / b['tok_s']:>6.2f}x")
    counts = (1, 2, 4, 8, 16) if device.type == "cuda" else (1, 2)
    thr = bench_jobs(device, args.dtype, counts, steps * 5)
    results["jobs"] = thr
    print(f"\n--jobs scaling on one {device.type} device, vanishing_variance-size model, {steps * 5} steps a process:")
    for k, v in thr.items():
        print(f"  {k:>2} process(es): {v:8.1f} steps/s in all, speed-up {v / thr[1]:5.2f}x")
    if device.type == "cuda":
        print_estimates(results, thr)
    print("\n" + json.dumps({"device": str(device), "dtype": args.dtype, "torch": torch.__version__, **results},
                            default=float))


if __name__ == "__main__":
    main()
