"""What a loaded model needs at run time: the dtype and device a user named, where its inputs go, and
dropping the GGUF quantizer marker before a save."""

from __future__ import annotations

import torch

from ..errors import ConfigError

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}


def resolve_dtype(dtype: "str | torch.dtype") -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).lower()
    if key not in DTYPES:
        raise ConfigError(f"dtype {dtype!r} is not one of: float32, bfloat16, float16 (or fp32/bf16/fp16)")
    return DTYPES[key]


def resolve_device(device: "str | torch.device | None") -> torch.device:
    """``None``/``"auto"`` picks cuda, then mps, then cpu."""
    if device is None or str(device) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"device {device!r} is not a torch device such as cpu, cuda, cuda:1, mps, auto") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} asked for, but this torch has no CUDA device; use --device cpu")
    return dev


def cpu_has_bf16() -> bool:
    """True where the CPU has bfloat16 matmul instructions (AVX-512 BF16 or AMX). Without them torch's
    bf16 matmuls (autograd's transposed ones above all) fall back to slow generic loops."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def fast_amp(device: torch.device) -> str:
    """The mixed precision that is fast on ``device``: ``bf16`` on a CUDA device that supports it (else
    ``fp16``) and on a CPU with bf16 instructions; ``none`` (float32) on any other device."""
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if device.type == "cpu" and cpu_has_bf16() else "none"


def model_device(model: torch.nn.Module) -> torch.device:
    """Where the model's inputs must go: its parameters' device (a streamed model's compute device)."""
    lazy = getattr(model, "prunekit_lazy", None)
    return lazy.device if lazy is not None else next(model.parameters()).device


def clear_quantizer(model) -> None:
    """Drop the GGUF quantizer marker so that save_pretrained accepts the (dequantized) model."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        try:
            delattr(model.config, "quantization_config")
        except AttributeError:
            model.config.quantization_config = None
    for attr in ("is_quantized", "quantization_method"):
        if getattr(model, attr, None):
            try:
                setattr(model, attr, None if attr == "quantization_method" else False)
            except AttributeError:
                pass

