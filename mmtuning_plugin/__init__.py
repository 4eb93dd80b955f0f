"""mmtuning: modality-aware parameter-efficient fine-tuning for vision-language models."""

from .hookspecs import hookimpl

__version__ = "0.1.0"

__all__ = ["hookimpl", "__version__"]
