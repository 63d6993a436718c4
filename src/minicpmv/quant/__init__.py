"""Weight-only quantization and prepacked weights: the layer kinds (``linear.py``), how a load
installs them (``load_plan.py``), and the ``minicpmv quantize`` writer (``writer.py``).

Sits beside ``loading``: ``loading/checkpoint.py`` uses the load plan, the writer reads float
checkpoints through ``loading``. Nothing here runs a model's forward pass.
"""
