"""Runs the CUDA kernels on the CPU: csrc/kernels/steer_cuda.cu, unmodified, built by g++ against
the cuda-emu headers (csrc/tests/cuda_emu), driven by csrc/tests/steer_test.cpp against the C++
CPU kernels. Stages, each a separate binary:

  asan   AddressSanitizer + UBSan, every case of steer_test (every plan, dtype, odd d, ...)
  tsan   ThreadSanitizer, a smaller set (AK_TEST_QUICK): a missing barrier is a data race
  negative controls: mutants of the kernel file that must be caught (a removed barrier -> a
         race; NaN written for h' -> a failed comparison; a 16-byte access assumed aligned on a
         misaligned row -> reported; two of issue 19's fixes undone -> their tests fail; issue 22's
         rank-one bias term dropped, a prepared direction ignored and split-d's second anchor in
         flight misread -> failed comparisons; split-d reading bias[id] past V -> an overflow)

The resources the launch rules need (static shared memory and registers per kernel) come from
ptxas for sm_90a, as the real build compiles it. Exit status 0 only if every stage behaves.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KERNEL = ROOT / "csrc/kernels/steer_cuda.cu"
EMU = ROOT / "csrc/tests/cuda_emu"
BUILD = ROOT / "build/cuda-emu"
CXX = os.environ.get("CXX", "g++")
# -O2 without -fno-strict-aliasing: aliasing UB in the kernels shows up as wrong answers.
BASE_FLAGS = ["-std=c++17", "-O2", "-g", "-pthread", "-fno-omit-frame-pointer", "-Wall", "-Wno-unused-function", "-Wno-unknown-pragmas",
              f"-I{EMU}", f"-I{ROOT / 'csrc/include'}", f"-I{ROOT / 'csrc/kernels'}"]
SANITIZERS = {
    "asan": ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined"],
    "tsan": ["-fsanitize=thread"],
}
SAN_ENV = {
    "ASAN_OPTIONS": "abort_on_error=1:detect_leaks=1:detect_stack_use_after_return=0",
    "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1",
    "TSAN_OPTIONS": "halt_on_error=1:second_deadlock_stack=1:report_signal_unsafe=0",
}


def kernel_table(source: Path, out: Path) -> int:
    """Writes the registration of every kernel with ptxas' static shared memory and registers."""
    cmd = ["nvcc", "-std=c++17", "-Xptxas", "-v", "-gencode=arch=compute_90a,code=sm_90a",
           f"-I{ROOT / 'csrc/include'}", f"-I{ROOT / 'csrc/kernels'}", "-c", str(source), "-o", os.devnull]
    log = subprocess.run(cmd, capture_output=True, text=True)
    if log.returncode != 0:
        sys.exit(f"nvcc failed on {source}:\n{log.stderr}")
    entries, name = [], None
    for line in log.stderr.splitlines():
        m = re.search(r"Compiling entry function '(\w+)'", line)
        if m:
            name = m.group(1)
            continue
        m = re.search(r"Used (\d+) registers.*?(?:, (\d+) bytes smem)?$", line)
        if m and name:
            entries.append((name, int(m.group(1)), int(m.group(2) or 0)))
            name = None
    demangled = subprocess.run(["c++filt"], input="\n".join(e[0] for e in entries), capture_output=True,
                               text=True, check=True).stdout.splitlines()
    lines = []
    for (_, regs, smem), full in zip(entries, demangled):
        # "(anonymous namespace)::steer_kernel<float>(ak_steer_params, ...)" -> steer_kernel<float>
        short = full.split("(anonymous namespace)::", 1)[1]
        short = short[: short.index("(")]
        lines.append(f'    ak_emu::register_kernel(reinterpret_cast<const void*>(&{short}), "{short}", {smem}, {regs});')
    if not lines:
        sys.exit(f"ptxas reported no kernels for {source}")
    out.write_text("namespace {\nstruct KernelTable {\n  KernelTable() {\n" + "\n".join(lines) +
                   "\n  }\n} kernel_table;\n}  // namespace\n")
    return len(lines)


def build(name: str, sanitizer: str, source: Path = KERNEL) -> Path:
    """steer_test with the emulated CUDA kernels of `source`, under `sanitizer`."""
    out_dir = BUILD / name
    out_dir.mkdir(parents=True, exist_ok=True)
    kernel_table(source, out_dir / "kernel_table.inc")
    tu = out_dir / "steer_cuda_emu.cpp"
    tu.write_text(f'#include "{source}"\n#include "kernel_table.inc"\n')
    san = SANITIZERS[sanitizer]
    flags = BASE_FLAGS + [f"-I{out_dir}"]
    objects = []
    jobs = [(tu, san), (ROOT / "csrc/kernels/steer_cpu.cpp", san), (ROOT / "csrc/tests/steer_test.cpp", san),
            # the emulator's own bookkeeping is not the kernels' memory: no TSan there
            (EMU / "emu.cpp", [s for s in san if "thread" not in s] + (["-DAK_EMU_TSAN"] if sanitizer == "tsan" else []))]
    procs = []
    for src, extra in jobs:
        obj = out_dir / (src.stem + ".o")
        objects.append(obj)
        procs.append((src, subprocess.Popen([CXX, *flags, *extra, "-DAK_TEST_CUDA", "-c", str(src), "-o", str(obj)],
                                            stderr=subprocess.PIPE, text=True)))
        if len(procs) == 2 or src == jobs[-1][0]:
            for s, p in procs:
                if p.wait() != 0:
                    sys.exit(f"{CXX} failed on {s}:\n{p.stderr.read()}")
            procs = []
    exe = out_dir / "steer_test"
    subprocess.run([CXX, *san, "-pthread", *map(str, objects), "-o", str(exe)], check=True)
    return exe


def run(exe: Path, env_extra: dict | None = None, timeout: int = 1200) -> subprocess.CompletedProcess:
    env = dict(os.environ, **SAN_ENV, **(env_extra or {}))
    return subprocess.run([str(exe)], capture_output=True, text=True, env=env, timeout=timeout)


def mutant(name: str, pattern: str, replacement: str) -> Path:
    """A copy of the kernel file with one edit (which must apply exactly once)."""
    text = KERNEL.read_text()
    count = text.count(pattern)
    if count != 1:
        sys.exit(f"negative control {name}: the pattern occurs {count} times in {KERNEL.name}, not once")
    out = BUILD / f"mutant-{name}.cu"
    out.parent.mkdir(parents=True, exist_ok=True)
    # #line keeps the reported line numbers and relative includes those of the real file
    out.write_text(f'#line 1 "{KERNEL}"\n' + text.replace(pattern, replacement))
    return out


# (name, sanitizer, edit, environment, what the report must say, all of it)
NEGATIVE_CONTROLS = [
    # The barrier between writing c and reading it in gram_apply (every thread reads all of c).
    ("no-barrier", "tsan",
     ("    for (int64_t i = tid; i < K; i += blockDim.x) c[i] += eta * (s[i] - p.reg * c[i]);\n    __syncthreads();\n",
      "    for (int64_t i = tid; i < K; i += blockDim.x) c[i] += eta * (s[i] - p.reg * c[i]);\n"),
     {"AK_TEST_QUICK": "1"}, ("ThreadSanitizer: data race", "gram_apply")),
    # The tiled kernel writes NaN instead of h' (scalar tail): the comparisons must fail on NaN.
    ("nan-output", "asan",
     ("    store_float(h_out + j, h[j] + acc);\n", "    store_float(h_out + j, NAN + acc);\n"),
     {"AK_TEST_QUICK": "1"}, ("FAIL cuda tiled", "cases: FAILED")),
    # Two fixes of issue 19 undone, each caught by the steer_test case written for it:
    # the rank-one plan chosen before the split-d one (a MEAN call overran a split workspace),
    ("rank-one-first", "asan",
     ("  const bool split = p.split_slices > 1,\n"
      "             rank_one = !split && p.objective == AK_OBJECTIVE_MEAN && (p.direction || p.workspace);",
      "  const bool rank_one = p.objective == AK_OBJECTIVE_MEAN && (p.direction || p.workspace),\n"
      "             split = !rank_one && p.split_slices > 1;"),
     {"AK_TEST_QUICK": "1"}, ("heap-buffer-overflow", "mean_direction_kernel")),
    # Issue 22: the rank-one row kernel without its w.b_A term (the bias summed in its reduction),
    ("no-bias-term", "asan",
     ("    else if (p.bias) z_part += w[k] * load_float(static_cast<const T*>(p.bias) + id);\n", ""),
     {"AK_TEST_QUICK": "1"}, ("FAIL cuda rank-one", "cases: FAILED")),
    # the launcher ignoring a prepared direction (the rank-one plan only with a workspace),
    ("direction-ignored", "asan",
     ("rank_one = !split && p.objective == AK_OBJECTIVE_MEAN && (p.direction || p.workspace);",
      "rank_one = !split && p.objective == AK_OBJECTIVE_MEAN && p.workspace;"),
     {"AK_TEST_QUICK": "1"}, ("FAIL cuda rank-one prepared x2", "cases: FAILED")),
    # the split-d finish kernel reading bias[id] for an id past V (a reviewer's find),
    ("split-bias-past-v", "asan",
     ("    if (live && ok && p.bias) z += load_float(static_cast<const T*>(p.bias) + ids[i]);\n",
      "    if (live && p.bias) z += load_float(static_cast<const T*>(p.bias) + id);\n"),
     {"AK_TEST_QUICK": "1"}, ("heap-buffer-overflow", "split_finish_kernel")),
    # and the split-d partial kernel's second anchor in flight dotted with the first one's row.
    ("split-second-anchor", "asan",
     ("          a1 += y[e] * h[e];\n", "          a1 += x[e] * h[e];\n"),
     {"AK_TEST_QUICK": "1"}, ("FAIL cuda split", "cases: FAILED")),
    # and the 48 KiB default limit taken as the dynamic size's alone.
    ("48k-edge", "asan",
     ("  if (smem + st.static_smem[dtype_index] > 48 * 1024 && !st.raised[dtype_index]) {",
      "  if (smem > 48 * 1024 && !st.raised[dtype_index]) {"),
     {"AK_TEST_QUICK": "1"}, ("FAIL cuda launch", "cases: FAILED")),
    # Vector paths taken without the alignment test: the misaligned-rows case must be caught.
    ("misaligned", "asan",
     ("bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }",
      "bool aligned16(const void*) { return true; }"),
     {"AK_TEST_QUICK": "1"}, ("misaligned 16-byte access",)),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stages", default="asan,tsan,negative", help="comma-separated: asan, tsan, negative")
    args = parser.parse_args()
    for tool in ("nvcc", "c++filt", CXX):
        if shutil.which(tool) is None:
            sys.exit(f"cuda-emu needs {tool} on PATH")
    stages = args.stages.split(",")
    failed = False

    def report(stage, ok, started, detail=""):
        nonlocal failed
        failed |= not ok
        print(f"[cuda-emu] {stage}: {'ok' if ok else 'FAILED'} ({time.time() - started:.0f} s){detail}", flush=True)

    if "asan" in stages:
        t = time.time()
        res = run(build("asan", "asan"))
        report("asan+ubsan, full steer_test", res.returncode == 0, t, "\n" + (res.stdout + res.stderr)[-3000:])
    if "tsan" in stages:
        t = time.time()
        res = run(build("tsan", "tsan"), {"AK_TEST_QUICK": "1"})
        report("tsan, quick steer_test", res.returncode == 0, t, "\n" + (res.stdout + res.stderr)[-3000:])
    if "negative" in stages:
        for name, sanitizer, (pattern, replacement), env, expect in NEGATIVE_CONTROLS:
            t = time.time()
            res = run(build(f"neg-{name}", sanitizer, mutant(name, pattern, replacement)), env)
            out = res.stdout + res.stderr
            ok = res.returncode != 0 and all(e in out for e in expect)
            report(f"negative control {name} (expects {' + '.join(expect)})", ok, t,
                   "" if ok else "\n" + out[-3000:])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
