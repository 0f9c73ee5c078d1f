"""litft: hackable, fast fine-tuning of open LLMs on Lightning Fabric."""

__version__ = "0.1.0"
