"""mmtuning: modality-aware parameter-efficient fine-tuning for vision-language models."""

import logging

from .hookspecs import hookimpl

__version__ = "0.1.0"

__all__ = ["hookimpl", "__version__"]


def _drop_bitsandbytes_cpu_kernel_notice(record: logging.LogRecord) -> bool:
    """bitsandbytes warns on import, on CPUs with AVX512-BF16, that its hub kernel for the repacked CPU inference
    layout is not installed. mmtuning keeps 4-bit layers out of that layout (base_view.py), so the kernel is never
    used and the line is noise on every command; anything else bitsandbytes logs still shows."""
    return not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward")


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_drop_bitsandbytes_cpu_kernel_notice)
