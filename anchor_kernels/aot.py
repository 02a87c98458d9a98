"""Ahead-of-time compile check of the Triton kernel for real GPUs, without a GPU.

    python -m anchor_kernels.aot [--full] [--jobs N] [--json out.json]

Compiles ``_steer_hidden_kernel`` (and the split-d plan's two kernels, the logit form's
``_solve_logits_kernel`` and ``_apply_logits_kernel``, and the rank-one mean kernels, every
BLOCK_K, all flags on) for sm_80 and sm_90a (triton.compile down to the cubin, no device needed)
for every configuration ``triton_steer.launch_config`` can pick, with the launcher's
specialisation (16-byte aligned pointers, i32 integers, the launchers' NUM_STAGES), and, for
decode calls, each launch captured from the launchers and compiled exactly as Triton would
specialise it (``launched_jobs``); fails when a kernel's shared
memory exceeds SHARED_LIMIT (the 99 KiB opt-in limit of sm_86/sm_89, the smallest of the GPUs
we target, so one kernel launches on A100, A10/L4/L40S/RTX and H100 alike) or the cubin Triton
built uses more local memory per thread (register spills) than ``local_budget`` allows (none up
to K = 128 but the hidden kernel's fp32 K = 128 on sm_90a; the chunked K = 256 path up to 2 KiB).
The CPU interpreter sees none of these limits.

Default (CI, ~3 minutes on 2 cores): every (BLOCK_K, BLOCK_D, dtype) tile the launcher can pick,
for both targets, with every flag on (the heaviest variant), and each flag off once per BLOCK_K
(bf16, sm_90a). ``--full``: the whole cross product of flags for every tile.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

SHARED_LIMIT = 101_376       # bytes: sm_86/sm_89 opt-in maximum (sm_80: 166,912; sm_90: 232,448)
# Bytes of local memory per thread a cubin may use (register spills), 0 where not listed. The
# chunked K = 256 path spills (at most 1632 B measured). The tiled hidden kernel at fp32 K = 128
# is at 255 registers on sm_90a (3xTF32 operand splits beside a held 128 x 128 Gram) and parks
# 16-40 B; 16 warps (72-96 B), the chunked Gram (16-48 B) and 16-wide tiles (8-16 B, twice the
# d-loop trips) were measured and are no better. Every other kernel and K: none.
CHUNKED_LOCAL_BUDGET = 2048
HIDDEN_FP32_K128_SM90_BUDGET = 64


def local_budget(report) -> int:
    if report["BLOCK_K"] == 256:
        return CHUNKED_LOCAL_BUDGET
    hidden = report["kernel"] in ("hidden", "_steer_hidden_kernel")
    if hidden and report["BLOCK_K"] == 128 and report["dtype"] == "fp32" and report["arch"] == "sm_90a":
        return HIDDEN_FP32_K128_SM90_BUDGET
    return 0


TARGETS = ((80, "sm_80"), (90, "sm_90a"))
DTYPES = ("fp32", "fp16", "bf16")
SET_SIZES = (16, 32, 64, 128, 256)   # one per BLOCK_K the launcher can pick
FLAGS = ("LSE", "TRUST", "HAS_BIAS", "RELATIVE")


def configurations(full: bool = False):
    """(dtype, set_size, dim, flags, targets) covering every launcher choice (see module doc)."""
    from .triton_steer import launch_config

    all_on = dict.fromkeys(FLAGS, True)
    all_targets = tuple(TARGETS)
    seen = set()

    def once(dtype, K, dim, flags, targets):
        cfg = launch_config(K, dim, dtype == "fp32")
        key = (dtype, cfg["BLOCK_K"], cfg["BLOCK_D"], tuple(flags.values()), targets)
        if key not in seen:
            seen.add(key)
            yield dtype, K, dim, flags, targets

    for dtype, K in itertools.product(DTYPES, SET_SIZES):
        combos = itertools.product((False, True), repeat=len(FLAGS)) if full else [tuple(all_on.values())]
        for combo in combos:
            yield from once(dtype, K, 4096, dict(zip(FLAGS, combo)), all_targets)
        for dim in (16, 32, 64):  # the narrower tiles picked for small d
            yield from once(dtype, K, dim, all_on, all_targets)
    if not full:
        for K, flag in itertools.product(SET_SIZES, FLAGS):
            yield from once("bf16", K, 4096, {**all_on, flag: False}, (TARGETS[1],))


def extra_jobs():
    """The logit-form kernels (solve per BLOCK_K; apply per logits dtype x BLOCK_K) and the
    rank-one mean kernels (per dtype x BLOCK_K), every flag on, both targets."""
    for K, (cap, arch) in itertools.product(SET_SIZES, TARGETS):
        yield ("_solve_logits_kernel", "fp32", K, cap, arch)
        for dtype in DTYPES:
            yield ("_apply_logits_kernel", dtype, K, cap, arch)
            yield ("_mean_direction_kernel", dtype, K, cap, arch)
            yield ("_steer_mean_kernel", dtype, K, cap, arch)
    for K, dtype, (cap, arch) in itertools.product(SET_SIZES, DTYPES, TARGETS):
        yield ("_split_partial_kernel", dtype, K, cap, arch)
        yield ("_split_finish_kernel", dtype, K, cap, arch)


def _cuobjdump() -> str:
    import shutil

    import triton

    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    found = str(bundled) if bundled.exists() else shutil.which("cuobjdump")
    if not found:
        raise RuntimeError("cuobjdump not found (neither Triton's bundled one nor on PATH)")
    return found


def _compile(kernel, pointers, cfg, flags, num_warps, capability, arch):
    """triton.compile of one specialisation: (shared bytes, registers, local bytes, s)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    floats = ("reg", "tau", "margin", "max_norm")
    pointers = {n: t for n, t in pointers.items() if n in kernel.arg_names}
    signature, constexprs = {}, {}
    for name in kernel.arg_names:
        if name in pointers:
            signature[name] = pointers[name]
        elif name in floats:
            signature[name] = "fp32"
        elif name in cfg or name in flags or name in ("NATIVE_DOT16", "HAS_NORM", "GROUPED"):
            signature[name] = "constexpr"
            constexprs[name] = cfg.get(name, flags.get(name, True))
        else:
            signature[name] = "i32"
    attrs = {(kernel.arg_names.index(n),): [["tt.divisibility", 16]] for n in pointers}
    src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    target = GPUTarget("cuda", capability, 32)
    start = time.perf_counter()
    from . import triton_steer

    compiled = triton.compile(src, target=target, options={"num_warps": num_warps,
                                                           "num_stages": triton_steer.NUM_STAGES})
    seconds = time.perf_counter() - start
    return _resources(compiled, arch, seconds)


def _resources(compiled, arch, seconds):
    """(shared bytes, registers, local bytes, compile seconds) of the cubin Triton built, from
    ``cuobjdump -res-usage``. The local bytes per thread (register spills and any stack frame) are
    read from that binary rather than from a ptxas run of our own: Triton passes ptxas flags of
    its own (``--regAllocOptLevel=2`` in 3.9), and a plain ``ptxas -v`` of the same PTX spilled
    4 B where Triton's build spills none, and could as well miss a spill Triton's build has."""
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        run = subprocess.run([_cuobjdump(), "-res-usage", str(cubin)], capture_output=True, text=True)
    if run.returncode:
        raise RuntimeError(f"cuobjdump -res-usage of the {arch} cubin failed:\n{run.stderr}")
    # Every function of the cubin (a helper ptxas did not inline would be its own entry).
    found = re.findall(r"Function (\S+):\s*REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", run.stdout)
    if not any(name == compiled.metadata.name for name, *_ in found):
        raise RuntimeError(f"cuobjdump -res-usage of the {arch} cubin did not report "
                           f"{compiled.metadata.name}:\n{run.stdout}")
    regs = max(int(r) for _, r, _, _ in found)
    local = sum(int(stack) + int(loc) for _, _, stack, loc in found)
    return compiled.metadata.shared, regs, local, round(seconds, 2)


def _prepare_env():
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton's default, stated: no warning


def compile_one(job):
    """Compile one configuration for one target; returns its resource report."""
    _prepare_env()
    from . import triton_steer

    if isinstance(job[0], str) and job[0].startswith("_"):
        return compile_extra_one(job)
    dtype, K, dim, flags, capability, arch = job
    cfg = triton_steer.launch_config(K, dim, dtype == "fp32")
    num_warps = cfg.pop("num_warps")
    pointers = {"hidden_ptr": f"*{dtype}", "weight_ptr": f"*{dtype}", "bias_ptr": f"*{dtype}",
                "ids_ptr": "*i64", "aw_ptr": "*fp32", "gram_ptr": "*fp32", "row_sets_ptr": "*i64",
                "eta_ptr": "*fp32", "out_ptr": f"*{dtype}", "scratch_ptr": "*fp32", "order_ptr": "*i64"}
    shared, regs, local, seconds = _compile(triton_steer._steer_hidden_kernel, pointers, cfg, flags,
                                             num_warps, capability, arch)
    return dict(kernel="hidden", arch=arch, dtype=dtype, K=K, dim=dim, **flags, BLOCK_K=cfg["BLOCK_K"],
                BLOCK_D=cfg["BLOCK_D"], num_warps=num_warps, shared=shared,
                registers=regs, local_bytes=local, compile_s=seconds)


def compile_extra_one(job):
    """The logit-form and mean kernels with their launchers' configurations."""
    from . import triton_steer

    name, dtype, K, capability, arch = job
    cfg = triton_steer.launch_config(K, 1, True)
    flags = dict(LSE=True, TRUST=True, HAS_BIAS=name == "_steer_mean_kernel", RELATIVE=True)
    if name == "_mean_direction_kernel":
        cfg = dict(triton_steer.mean_launch_config(K)["direction"])
        num_warps, width = cfg.pop("num_warps"), cfg["BLOCK_D"]
        pointers = {"weight_ptr": f"*{dtype}", "ids_ptr": "*i64", "aw_ptr": "*fp32", "u_ptr": "*fp32"}
    elif name == "_steer_mean_kernel":
        cfg = dict(triton_steer.mean_launch_config(K)["rows"])
        num_warps, width = cfg.pop("num_warps"), cfg["BLOCK_D"]
        pointers = {"hidden_ptr": f"*{dtype}", "u_ptr": "*fp32", "bias_ptr": f"*{dtype}", "ids_ptr": "*i64",
                    "aw_ptr": "*fp32", "beta_ptr": "*fp32", "row_sets_ptr": "*i64", "eta_ptr": "*fp32",
                    "out_ptr": f"*{dtype}"}
    elif name in ("_split_partial_kernel", "_split_finish_kernel"):
        cfg = triton_steer.split_launch_config(K, 4096, dtype == "fp32")
        num_warps, width = cfg.pop("num_warps"), cfg["BLOCK_D"]
        flags["HAS_BIAS"] = True
        pointers = {"hidden_ptr": f"*{dtype}", "weight_ptr": f"*{dtype}", "bias_ptr": f"*{dtype}", "ids_ptr": "*i64",
                    "aw_ptr": "*fp32", "gram_ptr": "*fp32", "row_sets_ptr": "*i64", "eta_ptr": "*fp32",
                    "out_ptr": f"*{dtype}", "scratch_ptr": "*fp32", "zp_ptr": "*fp32", "hsq_ptr": "*fp32"}
    elif name == "_solve_logits_kernel":
        num_warps = cfg.pop("num_warps")
        pointers = {"logits_ptr": f"*{dtype}", "ids_ptr": "*i64", "aw_ptr": "*fp32", "gram_ptr": "*fp32",
                    "row_sets_ptr": "*i64", "eta_ptr": "*fp32", "norm_ptr": "*fp32", "c_ptr": "*fp32",
                    "scratch_ptr": "*fp32"}
        width = 0
    else:
        num_warps = triton_steer.APPLY_WARPS
        width = triton_steer.apply_block_v(cfg["BLOCK_K"])
        cfg = dict(BLOCK_B=triton_steer.BLOCK_ROWS, BLOCK_K=cfg["BLOCK_K"], BLOCK_V=width)
        flags["GROUPED"] = True
        # M in the logits' dtype: what LogitSteerer keeps for a 16-bit head
        pointers = {"logits_ptr": f"*{dtype}", "mixing_ptr": f"*{dtype}", "c_ptr": "*fp32", "row_sets_ptr": "*i64",
                    "order_ptr": "*i64"}
    shared, regs, local, seconds = _compile(getattr(triton_steer, name), pointers, cfg, flags, num_warps,
                                             capability, arch)
    return dict(kernel=name, arch=arch, dtype=dtype, K=K, dim=0, **flags, BLOCK_K=cfg["BLOCK_K"],
                BLOCK_D=width, num_warps=num_warps, shared=shared, registers=regs, local_bytes=local,
                compile_s=seconds)


# Decode calls whose launches are captured from the launchers themselves and compiled exactly as
# launched (Triton's own binder: integers equal to 1 become constants, integers and pointers
# divisible by 16 get that attribute; the launch's options): (form, dtype, K, objective, plan, B).
LAUNCHED_SHAPE = dict(dim=4096, vocab=2048, steps=10)


def launched_jobs():
    """B = 8 for every K and dtype; B = 1 (the commonest decode batch: Triton makes rows a
    constant there) for bf16 at K = 64."""
    for dtype, K in itertools.product(("bf16", "fp32"), (16, 64, 256)):
        for rows in (8, 1) if (dtype, K) == ("bf16", 64) else (8,):
            for objective, plan in (("lse", "tiled"), ("lse", "split_d"), ("mean", "tiled")):
                yield ("hidden", dtype, K, objective, plan, rows)
            yield ("logits", dtype, K, "lse", "tiled", rows)


def capture_launches(job):
    """Runs the launcher of ``job`` on CPU tensors with every Triton launch captured, not run:
    [(kernel, args, kwargs)]."""
    import torch

    from . import prepare_anchors, AnchorSet, triton_steer

    form, dtype, K, objective, plan, B = job
    tdtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    d, V, T = (LAUNCHED_SHAPE[k] for k in ("dim", "vocab", "steps"))
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(V, d, generator=gen).to(tdtype)
    prepared = prepare_anchors(weight, AnchorSet(list(range(K // 2)), list(range(K // 2, K))))
    rows, eta = torch.zeros(B, dtype=torch.long), torch.full((B,), 0.003)
    captured = []

    class Capture:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda *args, **kwargs: captured.append((self.kernel, args, kwargs))

    real, saved = torch.library.wrap_triton, dict(os.environ)
    torch.library.wrap_triton = Capture
    os.environ.pop("TRITON_INTERPRET", None)  # the arguments a GPU launch gets
    os.environ[triton_steer.PLAN_ENV] = plan
    try:
        scalars = (T, objective, 0.0, 1.0, float("inf"), 0.5, True)
        if form == "hidden":
            hidden = torch.randn(B, d, generator=gen).to(tdtype)
            triton_steer.steer_hidden_triton(hidden, weight, None, *prepared.tensors, rows, eta, *scalars)
        else:
            logits = torch.randn(B, V, generator=gen).to(tdtype)
            mixing = torch.randn(1, K, V, generator=gen)
            triton_steer.steer_logits_triton_(logits, mixing, *prepared.tensors, rows, eta, torch.ones(B), *scalars)
    finally:
        torch.library.wrap_triton = real
        os.environ.clear()
        os.environ.update(saved)
    return captured


def compile_launched(job, capability=90, arch="sm_90a"):
    """Compiles every launch of ``job`` with the specialisation Triton's launcher would give it."""
    _prepare_env()
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", capability, 32)
    backend = make_backend(target)
    reports = []
    for kernel, args, kwargs in capture_launches(job):
        binder = create_function_from_signature(kernel.signature, kernel.params, backend)
        bound, specialization, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
        start = time.perf_counter()
        compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target,
                                  options=options.__dict__)
        shared, regs, local, seconds = _resources(compiled, arch, time.perf_counter() - start)
        block_k = kwargs.get("BLOCK_K", 0)
        reports.append(dict(kernel=kernel.fn.__name__, arch=arch, dtype=job[1], K=job[2], objective=job[3],
                            plan=job[4], rows=job[5], as_launched=True,
                            **{f: bool(kwargs.get(f, False)) for f in FLAGS}, BLOCK_K=block_k, BLOCK_D=kwargs.get("BLOCK_D", kwargs.get("BLOCK_V", 0)),
                            num_warps=options.num_warps, num_stages=options.num_stages, shared=shared,
                            registers=regs, local_bytes=local, compile_s=seconds))
    return reports


CUDA_ARCHS = ("sm_80", "sm_90a")


def cuda_report(source: Path, include: Path) -> list[dict]:
    """``nvcc -Xptxas -v`` of the CUDA kernel for each arch: registers, spills, static smem."""
    reports = []
    for arch in CUDA_ARCHS:
        with tempfile.TemporaryDirectory() as tmp:
            log = subprocess.run(
                ["nvcc", "-O3", f"-gencode=arch=compute_{arch[3:]},code={arch}", "-Xptxas", "-v",
                 f"-I{include}", "-c", str(source), "-o", str(Path(tmp) / "k.o")],
                capture_output=True, text=True)
        if log.returncode:
            raise RuntimeError(f"nvcc failed for {arch}:\n{log.stderr}")
        for name, body in re.findall(r"Compiling entry function '(\S+)' for '\w+'(.*?)(?=Compiling entry|\Z)",
                                     log.stderr, re.S):
            reports.append(dict(arch=arch, kernel=name,
                                registers=int(re.search(r"Used (\d+) registers", body).group(1)),
                                spill_bytes=int(re.search(r"(\d+) bytes spill stores", body).group(1)),
                                stack_bytes=int(re.search(r"(\d+) bytes stack frame", body).group(1)),
                                static_smem=int((re.search(r"(\d+) bytes smem", body) or [0, 0])[1])))
    return reports


def check_cuda(reports) -> list[str]:
    failures = [f"{r['arch']} {r['kernel']}: {r['spill_bytes']} B of register spills"
                for r in reports if r["spill_bytes"] > 0]
    if not reports:
        failures.append("nvcc reported no kernel")
    return failures


def check(reports) -> list[str]:
    failures = []
    for r in reports:
        what = (f"{r['kernel']} {r['arch']} {r['dtype']} K<={r['BLOCK_K']} BLOCK_D/V={r['BLOCK_D']} "
                f"LSE={r['LSE']} TRUST={r['TRUST']} HAS_BIAS={r['HAS_BIAS']} RELATIVE={r['RELATIVE']}")
        if r["shared"] > SHARED_LIMIT:
            failures.append(f"{what}: {r['shared']} B shared memory > {SHARED_LIMIT}")
        budget = local_budget(r)
        if r["local_bytes"] > budget:
            failures.append(f"{what}: {r['local_bytes']} B of local memory (spills) > {budget}")
    return failures


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", action="store_true", help="every flag combination of every tile")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--json", type=Path, help="write every report here")
    parser.add_argument("--cuda-source", type=Path, help="also check this CUDA kernel with nvcc -Xptxas -v")
    parser.add_argument("--cuda-include", type=Path, default=Path("csrc/include"))
    parser.add_argument("--cuda-only", action="store_true", help="skip the Triton compiles")
    args = parser.parse_args(argv)
    failures = []
    if args.cuda_source:
        cuda = cuda_report(args.cuda_source, args.cuda_include)
        for r in cuda:
            print(f"cuda {r['arch']:>7} {r['kernel'][-60:]:>60} regs {r['registers']:>3} "
                  f"spill {r['spill_bytes']} B stack {r['stack_bytes']} B smem {r['static_smem']} B")
        failures += check_cuda(cuda)
        if args.cuda_only:
            for f in failures:
                print("FAIL", f, file=sys.stderr)
            print("CUDA resource check:", "FAILED" if failures else "passed")
            return 1 if failures else 0
    jobs = [(dtype, K, dim, flags, cap, arch) for dtype, K, dim, flags, targets in configurations(args.full)
            for cap, arch in targets]
    jobs.sort(key=lambda j: -j[1])  # the slow K = 256 compiles first keep both workers busy
    jobs += list(extra_jobs())
    start = time.perf_counter()
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        reports = list(pool.map(compile_one, jobs))
        launched = [r for rs in pool.map(compile_launched, list(launched_jobs())) for r in rs]
    print(f"as launched (decode shape {LAUNCHED_SHAPE}, sm_90a):")
    for r in launched:
        print(f"  {r['kernel']:>22} {r['dtype']:>5} B={r['rows']} K={r['K']:<3} {r['objective']:>4} {r['plan']:>7} "
              f"warps {r['num_warps']} stages {r['num_stages']} shared {r['shared']:>6} B regs {r['registers']:>3} "
              f"local {r['local_bytes']} B")
    reports += launched
    print(f"{len(reports)} compiles in {time.perf_counter() - start:.0f} s")
    print(f"{'kernel':>20} {'arch':>7} {'dtype':>5} {'BLOCK_K':>7} {'BLOCK_D':>7} {'warps':>5} {'shared B':>9} {'regs':>5} {'local B':>7}")
    widest = {}
    for r in reports:  # the heaviest variant of each tile
        key = (r["kernel"], r["arch"], r["dtype"], r["BLOCK_K"], r["BLOCK_D"])
        if key not in widest or (r["shared"], r["registers"]) > (widest[key]["shared"], widest[key]["registers"]):
            widest[key] = r
    for r in widest.values():
        print(f"{r['kernel']:>20} {r['arch']:>7} {r['dtype']:>5} {r['BLOCK_K']:>7} {r['BLOCK_D']:>7} {r['num_warps']:>5} "
              f"{r['shared']:>9} {r['registers']:>5} {r['local_bytes']:>7}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(reports, indent=1))
    failures += check(reports)
    for f in failures:
        print("FAIL", f, file=sys.stderr)
    print("AOT check:", "FAILED" if failures else "passed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
