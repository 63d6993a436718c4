"""Readers and writers of the other distributions of MiniCPM-V checkpoints.

* ``detect.py``: what a path holds (bf16 safetensors, ``minicpmv quantize`` output, bitsandbytes
  4-bit, AWQ, a GGUF language model and its ``mmproj``), from recorded metadata only.
* ``bnb.py``: bitsandbytes 4-bit (nf4 / fp4, double quantization) dequantized on the CPU.
* ``awq.py``: AutoAWQ GEMM int4 unpacked into this package's int4 storage (exact).
* ``gguf_names.py`` / ``gguf_quants.py`` / ``gguf_read.py`` / ``gguf_write.py``: llama.cpp's GGUF
  pair (language model + vision ``mmproj``): names, block types, reading, export.
* ``load.py``: ``open_checkpoint`` builds a ``MiniCPMV`` from any of them.
* ``quantized.py``: ``minicpmv quantize`` writes this package's own int8 / int4 checkpoint.

Sits at the rank of ``loading`` and ``quant`` and uses both; nothing in ``loading`` or ``quant``
imports this package. It does not run models or tokenize (beyond rebuilding a tokenizer file).
"""
