"""Running built models: chat and benchmarks over an engine (compiled library or reference)."""

from mlcc.runtime_check.chat_module import ChatModule
from mlcc.runtime_check.generation import GenerationConfig

__all__ = ["ChatModule", "GenerationConfig"]
