"""The embedded demo pair: θ_sft is SmolLM2-135M-Instruct (from PyPI), θ_aligned a short DPO run made
locally from it on preference pairs shipped in data/. Both are cached under $EXPO_HOME/demo."""
from expo_serve.demo.pair import DEMO_PROMPTS, DemoPair, prepare_demo_pair

__all__ = ["DEMO_PROMPTS", "DemoPair", "prepare_demo_pair"]
