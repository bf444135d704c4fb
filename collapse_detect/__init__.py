"""collapse-detect: find, explain and gate majority-class collapse in fine-tuned transformers classifiers."""

__version__ = "0.1.0"

from .checks import REGISTRY, Finding, Severity  # noqa: E402
from .diagnosis import Diagnosis  # noqa: E402
from .api import diagnose  # noqa: E402

__all__ = ["diagnose", "Diagnosis", "Finding", "Severity", "REGISTRY", "__version__"]
