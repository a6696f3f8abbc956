"""Serving: the transformers ``Cache`` that stores latents, its decode path, and the model wrapper.

Plain PyTorch and transformers: nothing here imports Lightning or ``datasets`` (a test checks it), so inference
code can import it alone.
"""
