"""Triton kernels, one op per file, each beside the plain-torch reference it is tested against.

server/layers/ops.py picks the kernels on CUDA and the references elsewhere, once, at load. The tests run
every kernel in Triton's interpreter (TRITON_INTERPRET=1) on the CPU and compare it with its reference.
"""
