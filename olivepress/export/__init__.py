"""From the int4 checkpoint and its LoRA adapter to an ONNX Runtime GenAI folder: the optimize step's work.

* :mod:`~olivepress.export.folder`: ``export_onnx``, one target's folder with its adapter;
* :mod:`~olivepress.export.builder`: ONNX Runtime GenAI's model builder, and the base model evaluate compares
  against;
* :mod:`~olivepress.export.cuda_graph`: the built graph made capturable in CUDA graphs;
* :mod:`~olivepress.export.lora`: the adapter read, its branches grafted onto the graph, its files;
* :mod:`~olivepress.export.merged_bits`: the cpu target's merged graph with its branches in 8 bits;
* :mod:`~olivepress.export.kernel` and ``kernels/``: olivepress's CUDA operators for those branches;
* :mod:`~olivepress.export.int4`: the int4 checkpoint layout quantize writes and the builder reads.

This file imports none of them: importing one (quantize needs only ``int4``) runs no other, so a step's
code version (:mod:`olivepress.store.cache_keys`) covers only what it uses, and the GPU image builds the
kernel with ``kernel.py`` alone.
"""
