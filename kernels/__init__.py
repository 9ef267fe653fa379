"""Triton kernels, one op per file, each beside its plain-torch reference.

Empty until the kernels issue: the CPU path (server/layers/) is the reference every kernel is tested
against under TRITON_INTERPRET=1, and the runner picks kernels on CUDA once, at load.
"""
