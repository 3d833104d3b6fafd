"""olivepress: the Olive lab (AWQ, LoRA, ONNX Runtime GenAI) as one Prefect flow."""

__version__ = "0.1.0"
