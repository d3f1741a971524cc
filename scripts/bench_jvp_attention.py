"""Benchmark the fused attention + JVP kernel (kernels/jvp_attention.py).

On a GPU (default): for sequence lengths 1k..32k and head dims 64 and 128 in bf16, time and peak memory of
  kernel      O, tO and LSE in one Triton pass (`attention_jvp`, no autograd)
  kernel+jvp  the same through `torch.func.jvp` of the drop-in `scaled_dot_product_attention`
  math-jvp    `torch.func.jvp` of PyTorch's SDPA on the MATH backend (the only PyTorch path with forward AD)
  peer        the `jvp-flash-attention` PyPI package through `torch.func.jvp`, if installed (comparison only)
  flash-fwd   PyTorch's flash attention forward alone (no tangent)
TFLOP/s counts a JVP as 3x the forward's 4*B*H*Lq*Lk*D flops; flash-fwd counts 1x. Accuracy: relative error of
tO against the float64 reference of kernels/jvp_attention_reference.py on the first (batch, head) slice, for
sequence lengths up to --accuracy-max-seq. Writes a markdown table (default docs/jvp_attention_benchmark.md).

    python scripts/bench_jvp_attention.py                      # GPU, full sweep
    TRITON_INTERPRET=1 python scripts/bench_jvp_attention.py --cpu-smoke   # CPU: tiny sizes, ratios only
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from distill.kernels import jvp_attention as J
from distill.kernels.jvp_attention_reference import jvp_reference, math_path_jvp

try:  # peer implementation, never a dependency
    from jvp_flash_attention.jvp_attention import attention as peer_attention
except Exception:  # noqa: BLE001 - any import failure just drops the column
    peer_attention = None


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seqs", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768])
    p.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--tokens", type=int, default=16384, help="batch = max(1, tokens // seq)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--accuracy-max-seq", type=int, default=4096)
    p.add_argument("--math-max-seq", type=int, default=16384, help="skip the O(L^2) math path above this")
    p.add_argument("--out", default=None, help="markdown file (default docs/jvp_attention_benchmark.md on GPU)")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny CPU run (interpreter or torch path)")
    p.add_argument("--accuracy", action="store_true",
                   help="only print relative errors vs float64 per dtype, kernel and PyTorch's math-path JVP")
    return p.parse_args(argv)


ACCURACY_CASES = [  # (B, H, Lq, Lk, D, mask)
    (2, 4, 256, 256, 64, None),
    (1, 4, 200, 333, 80, "key_padding"),
    (2, 2, 128, 128, 128, "causal"),
    (1, 8, 77, 1024, 40, None),
]


def accuracy_table(device: torch.device, backend: str | None) -> str:
    """Relative errors (norm-wise) of O and tO vs the float64 reference: this kernel and PyTorch's math path."""
    lines = ["| dtype | B,H,Lq,Lk,D | mask | kernel O | kernel tO | math-path O | math-path tO | tO ratio |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for b, h, lq, lk, d, kind in ACCURACY_CASES:
            g = torch.Generator(device=device).manual_seed(0)
            q = torch.randn(b, h, lq, d, device=device, generator=g).to(dtype)
            k, v = (torch.randn(b, h, lk, d, device=device, generator=g).to(dtype) for _ in range(2))
            tq, tk, tv = (torch.randn(x.shape, device=device, generator=g).to(dtype) for x in (q, k, v))
            kwargs = {}
            if kind == "key_padding":
                kwargs["attn_mask"] = (torch.arange(lk, device=device) < lk - 57).view(1, 1, 1, lk)
            elif kind == "causal":
                kwargs["is_causal"] = True
            ro, rto = jvp_reference(q, k, v, tq, tk, tv, **kwargs)
            o, to, _ = J.attention_jvp(q, k, v, tq, tk, tv, backend=backend, **kwargs)
            mo, mto = math_path_jvp(q, k, v, tq, tk, tv, **kwargs)
            errs = [rel_err(o, ro), rel_err(to, rto), rel_err(mo, ro), rel_err(mto, rto)]
            lines.append(f"| {str(dtype).replace('torch.', '')} | {b},{h},{lq},{lk},{d} | {kind or '-'} | "
                         + " | ".join(f"{e:.2e}" for e in errs) + f" | {errs[1] / errs[3]:.2f} |")
    return "\n".join(lines) + "\n"


def timed(fn, repeats: int, device: torch.device) -> float:
    """Median milliseconds of fn() after two warm-up calls (the first one also autotunes)."""
    fn()
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def peak_mib(fn, device: torch.device) -> float | None:
    """Peak memory allocated by fn() beyond what was allocated before, in MiB (CUDA only)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref).norm() / ref.norm()).item()


def run(args) -> list[dict]:
    device = torch.device("cuda" if not args.cpu_smoke else "cpu")
    dtype = getattr(torch, args.dtype)
    backend = "triton" if device.type == "cuda" else J.select_backend("cpu", dtype)
    rows = []
    for d in args.head_dims:
        for seq in args.seqs:
            b, h = max(1, args.tokens // seq), args.heads
            g = torch.Generator(device=device).manual_seed(0)
            q, k, v, tq, tk, tv = (torch.randn(b, h, seq, d, device=device, dtype=dtype, generator=g)
                                   for _ in range(6))
            fwd_flops = 4.0 * b * h * seq * seq * d

            def dropin(a, b_, c):
                return J.scaled_dot_product_attention(a, b_, c, backend=backend)

            methods = {
                "kernel": lambda: J.attention_jvp(q, k, v, tq, tk, tv, backend=backend),
                "kernel+jvp": lambda: torch.func.jvp(dropin, (q, k, v), (tq, tk, tv)),
            }
            if seq <= args.math_max_seq:
                methods["math-jvp"] = lambda: math_path_jvp(q, k, v, tq, tk, tv)
            if peer_attention is not None and device.type == "cuda":
                methods["peer"] = lambda: torch.func.jvp(peer_attention, (q, k, v), (tq, tk, tv))
            if device.type == "cuda":
                def flash():
                    with sdpa_kernel(SDPBackend.FLASH_ATTENTION), torch.no_grad():
                        return F.scaled_dot_product_attention(q, k, v)
            else:
                def flash():
                    with torch.no_grad():
                        return F.scaled_dot_product_attention(q, k, v)
            methods["flash-fwd" if device.type == "cuda" else "sdpa-fwd"] = flash

            results = {}
            for name, fn in methods.items():
                try:
                    ms = timed(fn, args.repeats, device)
                    mem = peak_mib(fn, device)
                    results[name] = (ms, mem)
                except torch.OutOfMemoryError:
                    results[name] = (None, "OOM")
                    torch.cuda.empty_cache()
                except Exception as e:  # noqa: BLE001 - report, keep benchmarking the rest
                    results[name] = (None, f"error: {type(e).__name__}")

            acc = {}
            if seq <= args.accuracy_max_seq:
                sl = (slice(0, 1), slice(0, 1))
                qs, ks, vs, tqs, tks, tvs = (x[sl] for x in (q, k, v, tq, tk, tv))
                _, rto = jvp_reference(qs, ks, vs, tqs, tks, tvs)
                acc["kernel"] = rel_err(J.attention_jvp(qs, ks, vs, tqs, tks, tvs, backend=backend)[1], rto)
                acc["math-jvp"] = rel_err(math_path_jvp(qs, ks, vs, tqs, tks, tvs)[1], rto)
                if peer_attention is not None and device.type == "cuda":
                    try:
                        acc["peer"] = rel_err(torch.func.jvp(peer_attention, (qs, ks, vs), (tqs, tks, tvs))[1], rto)
                    except Exception:  # noqa: BLE001
                        pass

            base = results.get("flash-fwd", results.get("sdpa-fwd"))[0]
            for name, (ms, mem) in results.items():
                flops = fwd_flops * (1 if name.endswith("-fwd") else 3)
                rows.append({
                    "D": d, "seq": seq, "BxH": f"{b}x{h}", "method": name,
                    "ms": ms, "tflops": None if ms is None else flops / (ms * 1e-3) / 1e12,
                    "ratio": None if (ms is None or not base) else ms / base,
                    "mem": mem, "err": acc.get(name),
                })
            print(f"D={d} seq={seq} done", file=sys.stderr)
    return rows


def fmt(x, spec):
    if x is None:
        return "-"
    return x if isinstance(x, str) else format(x, spec)


def markdown(rows: list[dict], args, device_name: str) -> str:
    cmd = "python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:])
    if os.environ.get("TRITON_INTERPRET"):
        cmd = f"TRITON_INTERPRET={os.environ['TRITON_INTERPRET']} " + cmd
    smoke = args.cpu_smoke
    lines = [
        "# JVP attention benchmark",
        "",
        f"- device: {device_name}",
        f"- command: `{cmd}`",
        f"- date: {datetime.date.today().isoformat()}; torch {torch.__version__}; "
        f"triton {getattr(J.triton, '__version__', 'n/a')}; dtype {args.dtype}; python {platform.python_version()}",
        "- TFLOP/s: JVP rows count 3 x 4*B*H*L*L*D flops, forward rows 1 x. "
        "`x fwd`: time relative to PyTorch's forward alone (flash on GPU).",
        "- rel err: ||tO - tO_ref|| / ||tO_ref|| against the float64 reference, first (batch, head) slice.",
    ]
    if smoke:
        lines.append("- CPU smoke run: proves the script works; absolute times and TFLOP/s mean nothing here.")
    lines += ["", "| head dim | seq | BxH | method | ms | TFLOP/s | x fwd | peak MiB | rel err tO |",
              "|---:|---:|---:|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        ms = "-" if smoke else fmt(r["ms"], ".3f")
        tf = "-" if smoke else fmt(r["tflops"], ".1f")
        mem = r["mem"] if isinstance(r["mem"], str) else fmt(r["mem"], ".0f")
        lines.append(f"| {r['D']} | {r['seq']} | {r['BxH']} | {r['method']} | {ms} | {tf} | "
                     f"{fmt(r['ratio'], '.2f')} | {mem} | {fmt(r['err'], '.2e')} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.accuracy:
        device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu_smoke else "cpu")
        backend = "triton" if device.type == "cuda" else None
        print(f"backend: {J.select_backend(device, torch.float32, backend)}\n")
        print(accuracy_table(device, backend))
        return
    if args.cpu_smoke:
        args.seqs = [s for s in args.seqs if s <= 128] or [64, 127]
        args.head_dims = [d for d in args.head_dims if d <= 64] or [40, 64]
        args.heads, args.tokens, args.repeats = 2, 128, 3
        args.dtype = "float32" if args.dtype == "bfloat16" else args.dtype
        device_name = f"CPU ({platform.processor() or platform.machine()}), backend {J.select_backend('cpu')}"
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: run on a GPU, or pass --cpu-smoke")
        device_name = torch.cuda.get_device_name()
    rows = run(args)
    text = markdown(rows, args, device_name)
    print(text)
    out = args.out or (None if args.cpu_smoke else "docs/jvp_attention_benchmark.md")
    if out:
        with open(out, "w") as f:
            f.write(text)
        print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
