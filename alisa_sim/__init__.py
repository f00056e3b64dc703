"""alisa-sim: a SimPy performance simulator and planner for LLM inference on one GPU with CPU overflow."""

__version__ = "0.1.0"
