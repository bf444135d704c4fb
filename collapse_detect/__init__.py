"""collapse-detect: find, explain and gate majority-class collapse in fine-tuned transformers classifiers."""

__version__ = "0.1.0"

from .checks import REGISTRY, Finding, Severity  # noqa: E402
from .diagnosis import Diagnosis  # noqa: E402

__all__ = ["Diagnosis", "Finding", "Severity", "REGISTRY", "__version__"]
