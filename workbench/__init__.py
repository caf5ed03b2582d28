"""Clockwork Workbench: predictable multi-tenant DNN inference serving, notebook-first.

Layers (docs/architecture.md): models -> worker -> controller -> workload/telemetry -> ui, with env beside them.
Importing the package is cheap: nothing heavy (TVM, CUDA) is imported until it is used.
"""
__version__ = "0.1.0"
