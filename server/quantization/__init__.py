"""Weight quantization: the modes lmserve serves, round-to-nearest at load, and the GPTQ algorithm."""
